"""The wire protocol as docs/protocol.md describes it, written down as plain data for tests that
must not trust the project's own decoders (tests/test_trust_fuzz.py).

The doc lists each message's fields in prose, not in a typed table, so the field types below are
written by hand from the doc; `doc_messages()` and `doc_verbs()` read the field and verb names
back out of docs/protocol.md, and tests/test_trust_fuzz.py checks that both agree, so the
schema cannot drift from the doc. Valid values are conservative: inside every bound the doc
states (identifiers, job and step ids 0..2**32, finite timings), small and non-negative where
it states none.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
PREFIX = "marduk.v1"
JOB_ID_MAX = 2**32


@dataclass(frozen=True)
class Kind:
    """One message kind: where it travels and the valid example its fields start from."""

    name: str
    transport: str  # durable (JetStream), core, health, or outbound (sent by the controller)
    scope: str  # node or job: which id of the subject the sender's credential is bound to
    example: dict[str, Any]

    @property
    def fields(self) -> set[str]:
        return set(self.example) - set(ENVELOPE)


# A realistic verdict evidence object (docs/gpu-health.md: every NVML counter of the reading,
# the findings); the risk score reads its nested objects (docs/observability.md).
EVIDENCE: dict[str, Any] = {
    "gpu": "GPU-n1-0", "index": 0, "node": "n1", "xids": [79],
    "ecc": {"dbe_volatile": 0, "dbe_aggregate": 0, "sbe_volatile": 2, "sbe_aggregate": 12},
    "retired_pages": {"sbe": 1, "dbe": 0, "pending": False},
    "row_remap": {"correctable": 0, "uncorrectable": 0, "pending": False, "failure": False},
    "recovery_action": 0, "recovery_action_name": "none",
    "throttle_reasons": ["sw_power_cap"], "temperature_c": 61, "power_w": 312.5, "lost": False,
    "findings": [{"action": "drain_node", "reason": "xid 79"}],
}

ENVELOPE = {"type": "", "v": 1, "ts": 1_700_000_000.25}


def _msg(tag: str, **fields: Any) -> dict[str, Any]:
    return {"type": tag, "v": 1, "ts": 1_700_000_000.25, **fields}


KINDS: dict[str, Kind] = {k.name: k for k in [
    Kind("step_start", "durable", "node", _msg(
        "step_start", job_id=7, step_id=0, node="n1", gpu_indices=[0, 1],
        gpu_uuids=["GPU-n1-0", "GPU-n1-1"], pid=4242, uid=1000)),
    Kind("step_end", "durable", "node", _msg(
        "step_end", job_id=7, step_id=0, node="n1", exit_status=0)),
    Kind("verdict", "durable", "node", _msg(
        "verdict", node="n1", gpu_uuid="GPU-n1-0", gpu_index=0, action="restart_app",
        reason="xid 79 seen", xid=79, evidence=EVIDENCE, source="agent")),
    Kind("node_verdict", "durable", "node", _msg(
        "node_verdict", node="n1", component="port", target="mlx5_0/1", action="drain_node",
        reason="port mlx5_0/1 flapping: link lost 3 times in 300 s", source="agent",
        evidence={"component": "port", "target": "mlx5_0/1", "present": True,
                  "state": "ACTIVE", "phys_state": "LinkUp", "flaps": 5, "flaps_in_window": 3,
                  "counters": {"symbol_error": 0}, "growth_in_window": {"symbol_error": 0},
                  "window_s": 300.0, "readings_in_window": 4, "errors": {},
                  "findings": [{"action": "drain_node", "code": "flapping",
                                "reason": "flapping"}]})),
    Kind("gpu_inventory", "durable", "node", _msg(
        "gpu_inventory", node="n1", simulated=True, gpus=[
            {"uuid": "GPU-n1-0", "index": 0, "name": "NVIDIA H100", "pci_bus_id": "0000:1b:00.0"},
            {"uuid": "GPU-n1-1", "index": 1, "name": "NVIDIA H100", "pci_bus_id": "0000:1c:00.0"},
        ])),
    Kind("replica_register", "durable", "job", _msg(
        "replica_register", replica_id="job7_rg0:fuzz", job_id=7, step_id=0, replica_group=0,
        group_rank=0, group_world_size=1, node="n1", gpu_uuids=["GPU-n1-0"], pid=4243,
        hyperparams={"lr": 0.001, "batch_size": 32, "optim": {"betas": [0.9, 0.95]}},
        config_revision=0, step=0, standby=False)),
    Kind("replica_leave", "durable", "job", _msg(
        "replica_leave", replica_id="job7_rg0:fuzz", job_id=7, reason="finished",
        exit_code=0, step=10)),
    Kind("config_ack", "durable", "job", _msg(
        "config_ack", replica_id="job7_rg0:fuzz", job_id=7, revision=1, applied_at_step=5,
        ok=True, error="")),
    Kind("assume_ack", "durable", "job", _msg(
        "assume_ack", standby_id="job7_sb0:fuzz", job_id=7, replica_group=1, event_id=3,
        ok=True, error="")),
    Kind("heartbeat", "core", "job", _msg(
        "heartbeat", replica_id="job7_rg0:fuzz", job_id=7, step=11, step_time_ms=120.5,
        allreduce_ms=8.25, participants=2, quorum_id=3, loss=2.5, config_revision=0)),
    # What agent/health.py sends: per GPU its verdict and NVML counters (docs/protocol.md,
    # Bounds), and the verdict evidence an agent may add, used as is.
    Kind("health", "health", "node", {
        "v": 1, "type": "node_health", "node": "n1", "ts": 1_700_000_000.25,
        "simulated": True, "worst": "none", "stats": {"polls": 3},
        "gpus": [{"uuid": "GPU-n1-0", "index": 0, "action": "none", "reason": "",
                  "evidence": EVIDENCE,
                  "counters": {"ecc_sbe_volatile": 12, "ecc_sbe_aggregate": 5000,
                               "ecc_dbe_volatile": 0, "ecc_dbe_aggregate": 1,
                               "retired_pages_sbe": 40, "retired_pages_dbe": 0,
                               "retired_pages_pending": False, "remap_correctable": 2,
                               "remap_uncorrectable": 0, "remap_pending": False,
                               "remap_failure": False, "temperature_c": 71.0,
                               "power_w": 612.5, "throttle_reasons": ["sw_power_cap"],
                               "xids": [{"xid": 48, "count": 1}]}}]}),
    Kind("job_command", "outbound", "job", _msg(
        "job_command", job_id=7, revision=1, apply_at_step=5, changes={"lr": 0.01})),
    Kind("replica_command", "outbound", "job", _msg(
        "replica_command", replica_id="job7_rg0:fuzz", job_id=7, action="leave", reason="x",
        immediate=False, event_id=1, replica_group=None, fence=3)),
    # From the leading controller to the standby controllers, on marduk.v1.evt.ctl.<id>.*:
    # only a controller may publish there (tests/test_trust_fuzz.py, WRONG_CREDENTIAL).
    Kind("action_applied", "outbound", "node", _msg(
        "action_applied", controller="ctl-a", fence=3, kind="drain", node="n1",
        outcome="done", reason="xid 79")),
    Kind("config_revised", "outbound", "job", _msg(
        "config_revised", controller="ctl-a", fence=3, job_id=7, revision=1, apply_at_step=5,
        changes={"lr": 0.01}, actor="operator")),
    Kind("event", "outbound", "node", _msg(
        "event", id=1, kind="gpu_verdict", reason="x", node="n1", gpu_uuid="GPU-n1-0",
        job_id=7, replica_id="job7_rg0:fuzz", evidence={})),
]}

CHECK_ID = "chk-" + "0" * 32
# Valid arguments of the request/reply verbs (docs/protocol.md, "Request/reply"), for the
# node n1 and job 7 of the fuzz. wait_s stays short: a drain waits for Slurm that long.
OPERATOR_ARGS: dict[str, dict[str, Any]] = {
    "status": {}, "replicas": {"job": 7, "node": "n1", "all": True}, "nodes": {"node": "n1"},
    "history": {"node": "n1", "job": 7, "since": 0, "after_id": 0, "kinds": ["step_start"],
                "limit": 10},
    "drain": {"nodes": "n1", "reason": "fuzz", "gpu": "GPU-n1-0", "wait_s": 0.1},
    "resume": {"nodes": "n1", "force": True, "wait_s": 0.1,
               "check": {"command": "true", "returncode": 0, "output": "", "duration_s": 0.1}},
    "node_check": {"nodes": "n1", "check_id": CHECK_ID, "timeout_s": 1},
    "node_check_cancel": {"check_id": CHECK_ID},
    "inject": {"node": "n1", "gpu": "GPU-n1-0", "xid": 79, "force": False, "reset": False,
               "port": None, "mount": None, "fault": None},
    "deadletters": {"limit": 10}, "gpu_release": {"uuid": "GPU-spare-0"},
    "config_set": {"job": 7, "changes": {"lr": 0.002}}, "config_show": {"job": 7},
    "checkpoint_load": {"job": 7, "path": "/ckpt/step-10"},
    "straggler_policy": {"job": 7, "policy": {"action": "flag"}},
    "straggler_show": {"job": 7}, "risk": {"node": "n1"}, "top": {},
    "timeline": {"job": 7, "window_s": 60},
    "timeout_policy": {"job": 7, "k": 10, "floor_s": 10, "ceiling_s": 600, "off": False},
}
JOB_ARGS: dict[str, dict[str, Any]] = {"config_latest": {}}
AGENT_ARGS: dict[str, dict[str, Any]] = {
    "inject": {"gpu": "GPU-n1-0", "xid": 79, "reset": False, "port": None, "mount": None,
               "fault": None},
    "check": {"check_id": CHECK_ID, "timeout_s": 1}, "check_cancel": {"check_id": CHECK_ID}}
CRED_ARGS: dict[str, Any] = {"job": 7, "uid": 1000}


def request(args: dict[str, Any]) -> dict[str, Any]:
    return {"v": 1, "args": copy.deepcopy(args), "actor": "fuzz"}


# -- what the doc says, read back from docs/protocol.md -----------------------------------------


def _strip_parens(text: str) -> str:
    while True:
        out = re.sub(r"\([^()]*\)", "", text)
        if out == text:
            return out
        text = out


def doc_messages(text: str | None = None) -> dict[str, set[str]]:
    """{kind: field names} from the "## Messages" section: each paragraph that starts with
    "`kind`:" lists its fields in backquotes up to the end of its first sentence; backquoted
    words in parentheses are values or examples, not fields."""
    text = DOC.read_text() if text is None else text
    section = text.split("\n## Messages", 1)[1].split("\n### Request/reply", 1)[0]
    out: dict[str, set[str]] = {}
    for para in section.split("\n\n"):
        para = " ".join(para.split())
        found = re.match(r"`(\w+)`:\s*(.*)", para)
        if not found:
            continue
        body = re.split(r"[.:](?:\s|$)", _strip_parens(found.group(2)), maxsplit=1)[0]
        out[found.group(1)] = set(re.findall(r"`(\w+)`", body))
    return out


def doc_envelope(text: str | None = None) -> set[str]:
    text = DOC.read_text() if text is None else text
    table = text.split("## Envelope", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(\w+)` \|", table, flags=re.M))


def doc_subjects(text: str | None = None) -> dict[str, str]:
    """{subject pattern: message column} from the subjects table."""
    text = DOC.read_text() if text is None else text
    rows = re.findall(r"^\| `(marduk\.v1\.[^`]+)` \|[^|]*\|[^|]*\| (.*?) \|$", text, flags=re.M)
    return dict(rows)


def doc_verbs(text: str | None = None) -> dict[str, dict[str, set[str]]]:
    """{"operator" | "job" | "agent": {verb: argument names}} from "### Request/reply"."""
    text = DOC.read_text() if text is None else text
    section = " ".join(text.split("### Request/reply", 1)[1].split("\n## ", 1)[0].split())
    out: dict[str, dict[str, set[str]]] = {}
    for who in ("Operator", "Job", "Agent"):
        para = section.split(f"{who} verbs", 1)[1]
        para = re.split(r"(?:Operator|Job|Agent|Credential) (?:verbs|requests)", para)[0]
        verbs: dict[str, set[str]] = {}
        for verb, args in re.findall(r"`(\w+)`(?:\s*\(([^()]*)\))?", para):
            verbs[verb] = set(re.findall(r"`(\w+)`", args or ""))
        out[who.lower()] = verbs
    return out
