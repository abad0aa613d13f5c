"""Arguments out of bounds, through the three doors of a real controller: HTTP query strings
(a 400 with a JSON reason, counted, never a 500), request/reply verbs (a clear `invalid`
reply) and the `marduk` command line (a usage error, exit status 2, before asking)."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest

from marduk_slurm.cli.client import RequestFailed
from marduk_slurm.controller.metrics import rejected_family

from harness import ControllerProcess, http_get, run_cli

BAD_QUERIES = [
    ("/api/history?job=99999999999999999999", "job"),
    ("/api/history?job=-1", "job"),
    ("/api/history?job=1e3", "job"),
    ("/api/history?limit=0", "limit"),
    ("/api/history?limit=5001", "limit"),
    ("/api/history?since=nan", "since"),
    ("/api/history?since=inf", "since"),
    ("/api/history?node=n1%1b%5b2J", "node"),
    ("/api/history?kind=gpu_verdict,a%20b", "kind"),
    ("/api/history?job=1&job=2", "job"),
    ("/api/replicas?job=4294967297", "job"),
    ("/api/replicas?bogus=1", "bogus"),
    ("/api/status?job=1", "job"),
]






def test_http_query_parameters_out_of_bounds_are_a_counted_400(
        web_controller: tuple[ControllerProcess, str]) -> None:
    ctl, base = web_controller
    for path, parameter in BAD_QUERIES:
        status, body = http_get(base + path)
        assert status == 400, (path, status, body)
        error = json.loads(body)
        assert error["parameter"] == parameter, (path, error)
        assert parameter in error["error"], (path, error)
    for path in ("/api/history?job=4294967296&limit=5000&since=0&node=n-1_a&kind=a,b",
                 "/api/history?node=&job=&since=", "/api/replicas?job=0", "/api/status"):
        status, body = http_get(base + path)
        assert status == 200, (path, body)
    metrics = http_get(base + "/metrics")[1]
    assert (f'marduk_controller_operations_total{{op="http_bad_query"}} '
            f'{float(len(BAD_QUERIES))}') in metrics
    assert "Traceback" not in ctl.log()


def test_request_arguments_out_of_bounds_get_a_clear_refusal(
        web_controller: tuple[ControllerProcess, str]) -> None:
    ctl, _ = web_controller
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("history", {"job": 10**20}, "integer beyond int64"),  # refused as it is decoded
        ("history", {"job": "99999999999999999999"}, "job must be between 0 and 4294967296"),
        ("history", {"limit": 0}, "limit must be between 1 and 100000"),
        ("history", {"limit": 100_001}, "limit must be between 1 and 100000"),
        ("history", {"after_id": 2**63}, "integer beyond int64"),
        ("history", {"since": 1e300}, "since must be a number between"),
        ("history", {"node": "n1\x1b[2J"}, "control character in a string"),
        ("history", {"node": "x" * 5000}, "string over 4096 characters"),
        ("history", {"node": "x" * 2000}, "node is 2000 characters long; at most 1024"),
        ("replicas", {"job": -1}, "job must be between 0 and 4294967296"),
        ("nodes", {"node": "n1 n2"}, "is not a valid name"),
        ("drain", {"nodes": "n1", "reason": "swap\x1b]0;t\x07"}, "control character"),
        ("drain", {"nodes": "n1", "reason": "r" * 600}, "at most 512"),
        ("drain", {"nodes": "n1", "reason": "ok", "wait_s": 1e9}, "wait_s must be a number"),
    ]
    for verb, args, message in cases:
        with pytest.raises(RequestFailed) as caught:
            ctl.request(verb, args)
        assert caught.value.kind == "invalid", (verb, args)
        assert message in str(caught.value), (verb, args, str(caught.value))
    assert ctl.request("history", {"job": 2**32, "limit": 100_000}) == []


@pytest.mark.parametrize(("argv", "message"), [
    (["history", "--job", "99999999999999999999"],
     "argument --job: job must be between 0 and 4294967296"),
    (["history", "--limit", "0"], "argument --limit: limit must be between 1 and 100000"),
    (["history", "--since", "nan"], "--since: expected 30m, 2h, 1d"),
    (["history", "--since", "99999999999999999999d"], "--since: expected"),
    (["status", "--timeout", "nan"], "--timeout must be a number between"),
    (["top", "--interval", "inf"], "--interval must be a number between"),
    (["replicas", "--node", "n1\x1b[2J"], "is not a valid name"),
    (["drain", "n1", "reason=swap\x1b[2J"], "reason contains the control character \\x1b"),
    (["drain", "n[1-2],n\x1b", "reason=x"], "contains the control character \\x1b"),
    (["config", "show", "4294967297"], "job must be between 0 and 4294967296"),
    (["straggler", "show", "-5"], "job must be between"),
])
def test_cli_rejects_out_of_range_and_control_characters_as_usage_errors(
        argv: list[str], message: str) -> None:
    proc = run_cli(*argv, "--nats-url", "nats://127.0.0.1:1")  # never reached
    assert proc.returncode == 2, (argv, proc.stdout, proc.stderr)
    assert message in proc.stderr, proc.stderr
    assert "\x1b" not in proc.stderr and "cannot reach" not in proc.stderr


def test_metrics_label_rejections_by_subject_kind_and_cause() -> None:
    family = rejected_family(Counter({("evt.node.*.verdict", "verdict", "out_of_range"): 3,
                                      "bad_json": 2}))
    samples = {tuple(sorted(s.labels.items())): s.value for s in family.samples}
    assert samples[(("cause", "out_of_range"), ("kind", "verdict"),
                    ("subject", "evt.node.*.verdict"))] == 3
    assert samples[(("cause", "bad_json"), ("kind", ""), ("subject", ""))] == 2
