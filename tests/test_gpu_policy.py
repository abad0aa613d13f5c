"""The GPU fault policy: reading in, verdict out, with plain values."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from marduk_slurm.domain.gpu_health import (
    FaultPolicy,
    GpuAction,
    GpuReading,
    GpuVerdict,
    verdict_changed,
    xid_description,
)
from marduk_slurm.errors import SettingsError

HEALTHY = GpuReading(
    uuid="GPU-1",
    index=0,
    node="gpu-node-01",
    ecc_dbe_volatile=0,
    ecc_dbe_aggregate=0,
    ecc_sbe_volatile=0,
    ecc_sbe_aggregate=0,
    remap_correctable=0,
    remap_uncorrectable=0,
    recovery_action=0,
    temperature_c=45,
    power_w=350.0,
)


def reading(**changes: Any) -> GpuReading:
    return replace(HEALTHY, **changes)


CASES = [
    ({}, GpuAction.NONE, "healthy"),
    ({"xids": (79,)}, GpuAction.DRAIN_NODE, "xid 79: GPU has fallen off the bus"),
    ({"xids": (48,)}, GpuAction.DRAIN_NODE, "xid 48: double-bit ECC error"),
    ({"xids": (64,)}, GpuAction.DRAIN_NODE, "xid 64"),
    ({"xids": (74,)}, GpuAction.DRAIN_NODE, "xid 74: NVLink error"),
    ({"xids": (95,)}, GpuAction.DRAIN_NODE, "xid 95: uncontained ECC error"),
    ({"xids": (119,)}, GpuAction.DRAIN_NODE, "xid 119: GSP RPC timeout"),
    ({"xids": (120,)}, GpuAction.DRAIN_NODE, "xid 120: GSP error"),
    ({"xids": (13,)}, GpuAction.RESTART_APP, "xid 13: graphics engine exception"),
    ({"xids": (31,)}, GpuAction.RESTART_APP, "xid 31: GPU memory page fault"),
    ({"xids": (43,)}, GpuAction.RESTART_APP, "xid 43: GPU stopped processing"),
    ({"xids": (94,)}, GpuAction.RESTART_APP, "xid 94: contained ECC error"),
    ({"xids": (63,)}, GpuAction.NONE, "xid 63"),
    ({"xids": (92,)}, GpuAction.NONE, "(ignored)"),
    ({"xids": (999,)}, GpuAction.WATCH, "xid 999: unknown xid"),
    ({"recovery_action": 1}, GpuAction.RESET_GPU, "NVML recovery action: gpu reset"),
    ({"recovery_action": 2}, GpuAction.DRAIN_NODE, "NVML recovery action: node reboot"),
    ({"recovery_action": 3}, GpuAction.DRAIN_NODE, "NVML recovery action: drain p2p"),
    ({"recovery_action": 4}, GpuAction.DRAIN_NODE, "NVML recovery action: drain and reset"),
    ({"recovery_action": 42}, GpuAction.DRAIN_NODE, "unknown (42)"),
    ({"recovery_action": None}, GpuAction.NONE, "healthy"),
    ({"ecc_dbe_volatile": 2}, GpuAction.DRAIN_NODE, "2 uncorrectable"),
    ({"ecc_dbe_aggregate": 7}, GpuAction.NONE, "healthy"),  # history, not a current fault
    ({"ecc_sbe_volatile": 1000}, GpuAction.NONE, "healthy"),  # corrected
    ({"remap_failure": True}, GpuAction.DRAIN_NODE, "row remapping failed"),
    ({"remap_pending": True}, GpuAction.RESET_GPU, "row remapping pending"),
    ({"retired_pages_pending": True}, GpuAction.RESET_GPU, "page retirement pending"),
    ({"lost": True}, GpuAction.DRAIN_NODE, "GPU is lost"),
    (
        {"throttle_reasons": frozenset({"hw_thermal_slowdown"})},
        GpuAction.WATCH,
        "clocks throttled: hw_thermal_slowdown",
    ),
    ({"throttle_reasons": frozenset({"gpu_idle"})}, GpuAction.NONE, "healthy"),
    ({"errors": {"row_remap": "Not Supported"}}, GpuAction.NONE, "healthy"),
    ({"errors": {"power_w": "Unknown Error"}}, GpuAction.WATCH, "NVML errors reading power_w"),
    (
        {"timed_out": True, "errors": {"read": "no answer within 5 s"}},
        GpuAction.WATCH,
        "NVML did not answer: no answer within 5 s",
    ),
]


@pytest.mark.parametrize(("changes", "action", "reason"), CASES)
def test_default_policy(changes: dict[str, Any], action: GpuAction, reason: str) -> None:
    verdict = FaultPolicy().evaluate(reading(**changes))
    assert verdict.action is action
    assert reason in verdict.reason


def test_most_severe_finding_wins_whatever_the_order() -> None:
    verdict = FaultPolicy().evaluate(reading(xids=(13, 999, 79, 63)))
    assert verdict.action is GpuAction.DRAIN_NODE
    assert verdict.reason == "xid 79: GPU has fallen off the bus"
    actions = [finding["action"] for finding in verdict.evidence["findings"]]
    assert actions == ["restart_app", "watch", "drain_node", "none"]


def test_driver_recovery_action_beats_xid_table_at_equal_severity() -> None:
    verdict = FaultPolicy().evaluate(reading(xids=(79,), recovery_action=4))
    assert verdict.reason == "NVML recovery action: drain and reset"


def test_severity_order() -> None:
    order = [GpuAction.NONE, GpuAction.WATCH, GpuAction.RESTART_APP, GpuAction.RESET_GPU]
    order.append(GpuAction.DRAIN_NODE)
    assert sorted(GpuAction, key=lambda a: a.severity) == order
    assert [a.value for a in order] == ["none", "watch", "restart_app", "reset_gpu", "drain_node"]


def test_evidence_is_complete_and_json_ready() -> None:
    verdict = FaultPolicy().evaluate(
        reading(xids=(63, 63), ecc_sbe_volatile=3, recovery_action=0, errors={"x": "Not Supported"})
    )
    assert verdict.action is GpuAction.NONE
    evidence = json.loads(json.dumps(verdict.evidence))
    assert evidence["xids"] == [63, 63]
    assert evidence["ecc"]["sbe_volatile"] == 3
    assert evidence["recovery_action"] == 0
    assert evidence["recovery_action_name"] == "none"
    assert evidence["errors"] == {"x": "Not Supported"}
    assert evidence["gpu"] == "GPU-1" and evidence["node"] == "gpu-node-01"
    assert len(evidence["findings"]) == 1  # repeated xids count once


def test_lost_gpu_does_not_also_report_its_failed_fields() -> None:
    verdict = FaultPolicy().evaluate(reading(lost=True, errors={"power_w": "GPU is lost"}))
    assert [f["reason"] for f in verdict.evidence["findings"]] == [
        "GPU is lost (NVML_ERROR_GPU_IS_LOST)"
    ]


def test_from_settings_overrides_one_key_and_keeps_the_rest() -> None:
    policy = FaultPolicy.from_settings(drain_xids=[13, 79])
    assert policy.xid_action(13) is GpuAction.DRAIN_NODE
    assert 13 not in policy.app_xids  # moved, not duplicated
    assert policy.xid_action(31) is GpuAction.RESTART_APP
    assert policy.xid_action(48) is GpuAction.WATCH  # drain list was replaced
    assert policy.xid_action(63) is GpuAction.NONE


def test_from_settings_all_keys() -> None:
    policy = FaultPolicy.from_settings(
        drain_xids=[79], app_xids=[13], ignore_xids=[43], reset_xids=[119]
    )
    assert policy.evaluate(reading(xids=(119,))).action is GpuAction.RESET_GPU
    assert policy.evaluate(reading(xids=(43,))).action is GpuAction.NONE
    assert policy.evaluate(reading(xids=(31,))).action is GpuAction.WATCH


def test_from_settings_without_keys_is_the_default() -> None:
    assert FaultPolicy.from_settings() == FaultPolicy()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"drain_xids": [79], "app_xids": [79]},
        {"drain_xids": ["79"]},
        {"ignore_xids": [-1]},
        {"reset_xids": [True]},
    ],
)
def test_from_settings_rejects_bad_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(SettingsError, match=r"\[policy\]"):
        FaultPolicy.from_settings(**kwargs)


def test_xid_description() -> None:
    assert xid_description(79) == "GPU has fallen off the bus"
    assert xid_description(48) == "double-bit ECC error"
    assert xid_description(123456) == "unknown xid"


def test_verdict_changed() -> None:
    policy = FaultPolicy()
    healthy = policy.evaluate(HEALTHY)
    warmer = policy.evaluate(reading(temperature_c=70))
    app_fault = policy.evaluate(reading(xids=(13,)))
    assert verdict_changed(None, healthy)
    assert not verdict_changed(healthy, warmer)  # evidence drift is not news
    assert verdict_changed(healthy, app_fault)
    assert verdict_changed(app_fault, app_fault)  # a second xid 13 is a second fault
    assert verdict_changed(app_fault, healthy)
    watch = GpuVerdict(GpuAction.WATCH, "clocks throttled: sw_power_cap")
    assert verdict_changed(watch, GpuVerdict(GpuAction.WATCH, "clocks throttled: hw_slowdown"))
    assert not verdict_changed(watch, GpuVerdict(GpuAction.WATCH, watch.reason))
