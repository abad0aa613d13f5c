"""Terminal-safe output: a history row and a Slurm drain reason carrying terminal escapes,
stored before the controller starts (an old row, a reason Slurm gave us), shown by the real
`marduk` command line. No control byte reaches the operator's terminal; the text is there,
escaped, and `--json` gives back the exact string."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from marduk_slurm.adapters.nats_server import NatsServerProcess
from marduk_slurm.adapters.store import Store
from marduk_slurm.cli.commands import rejection_lines
from marduk_slurm.cli.render import safe_text

from harness import REPO, ControllerProcess, marduk_argv

CLEAR_SCREEN = "\x1b[2J"
SET_TITLE = "\x1b]0;pwned\x07"
FORGED_ROW = "\n999  2020-01-01 00:00:00  resumed  operator  n9  -  -  all clear"
REASON = f"xid 79{CLEAR_SCREEN}{SET_TITLE} fell off the bus{FORGED_ROW}"
GPU = "GPU-\u202eevil\u2028x"
NODE_REASON = "bad\x9b31mcable\x7f\r"
# Bytes a terminal acts on: C0 but the line feeds that end our own lines, DEL, and the
# UTF-8 forms of C1, the bidi overrides and the Unicode line and paragraph separators.
RAW_CONTROL = [bytes([b]) for b in range(0x20) if b != 0x0A] + [b"\x7f"] + [
    chr(c).encode() for c in [*range(0x80, 0xA0), 0x202E, 0x2028, 0x2029]]


def seed(state: Path) -> None:
    store = Store(state / "marduk.db")
    store.migrate()
    with store.transaction():
        store.add_event("gpu_verdict", now=time.time(), source="agent", reason=REASON,
                        node="n1", gpu_uuid=GPU, job_id=5)
        store.update_node_from_slurm("n1", "drained", ["DRAIN"], NODE_REASON, "root",
                                     time.time(), "marduk")
    store.close()


def cli(url: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(marduk_argv(*args, "--nats-url", url), capture_output=True,
                          timeout=60, cwd=REPO, env={**os.environ, "PYTHONIOENCODING": "utf-8"})


@pytest.fixture
def seeded_controller(tmp_path: Path, nats_server: NatsServerProcess):  # type: ignore[no-untyped-def]
    state = tmp_path / "state"
    state.mkdir()
    seed(state)
    ctl = ControllerProcess(state, nats_server.url).start()
    yield ctl
    assert ctl.stop() == 0, ctl.log()


def assert_no_raw_control(out: bytes) -> None:
    found = [c for c in RAW_CONTROL if c in out]
    assert not found, f"raw control characters reached the terminal: {found}\n{out!r}"


def test_history_and_nodes_escape_control_characters_from_stored_rows(
        seeded_controller: ControllerProcess) -> None:
    url = seeded_controller.url
    proc = cli(url, "history")
    assert proc.returncode == 0, proc.stderr
    assert_no_raw_control(proc.stdout)
    text = proc.stdout.decode()
    lines = text.splitlines()
    assert len(lines) == 3, text  # header, rule, one row: the forged row is not a row
    row = lines[2]
    assert "\\x1b[2J" in row and "\\x1b]0;pwned\\x07" in row
    assert "\\n999  2020-01-01 00:00:00  resumed" in row  # on the real row's line, visible
    history = json.loads(cli(url, "history", "--json").stdout)
    assert history[0]["reason"] == REASON and history[0]["gpu_uuid"] == GPU

    proc = cli(url, "nodes")
    assert proc.returncode == 0, proc.stderr
    assert_no_raw_control(proc.stdout)
    assert "bad\\x9b31mcable\\x7f\\r [root]" in proc.stdout.decode()
    raw_json = cli(url, "nodes", "--json").stdout
    assert_no_raw_control(raw_json)  # JSON escapes them too (DEL included)
    assert json.loads(raw_json)[0]["reason"] == NODE_REASON


def test_safe_text_escapes_every_class_of_unsafe_character() -> None:
    assert safe_text("a\x00b\x1bc\x7fd\x85e\x9ff\u202eg\u2066h\u2028i\u2029j\tk") == (
        "a\\x00b\\x1bc\\x7fd\\x85e\\x9ff\\u202eg\\u2066h\\u2028i\\u2029j\\tk")
    assert safe_text("n1 GPU-ab:cd é ü 日本") == "n1 GPU-ab:cd é ü 日本"  # printable stays
    assert safe_text(None) == "None" and safe_text(42) == "42"


def test_status_lines_show_rejections_when_the_controller_has_them() -> None:
    assert rejection_lines({"rejected_total": 0}) == []  # an older controller
    rows = [{"subject": "evt.node.*.verdict", "kind": "verdict", "cause": "out_of_range",
             "count": 7},
            {"subject": "hb.*", "kind": "heartbeat", "cause": "bad\x1b[2Jjson", "count": 2}]
    lines = rejection_lines({"rejections": rows, "dead_letters": 3})
    assert lines[0] == "rejected since start 9; top causes:"
    assert "evt.node.*.verdict verdict: out_of_range" in lines[1]
    assert lines[-1] == "dead letters 3 (marduk deadletters)"
    assert "\\x1b" in safe_text(lines[2])


def test_deadletters_table_escapes_the_message_preview(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from marduk_slurm.cli import commands
    from marduk_slurm.cli.main import main

    rows = [{"id": 4, "ts": time.time(), "subject": "marduk.v1.evt.node.n1.verdict",
             "stream_seq": 17, "deliveries": 5, "error": "out_of_range: gpu_index",
             "data_preview": '{"reason": "' + CLEAR_SCREEN + '\\n"}' + FORGED_ROW}]
    asked: list[tuple[str, dict[str, object]]] = []

    def ask(args: object, verb: str, params: dict[str, object]) -> object:
        asked.append((verb, params))
        return rows

    monkeypatch.setattr(commands, "ask", ask)
    assert main(["deadletters", "--limit", "5"]) == 0
    out = capsys.readouterr().out
    assert asked == [("deadletters", {"limit": 5})]
    assert "\x1b" not in out and len(out.splitlines()) == 3, out
    assert "marduk.v1.evt.node.n1.verdict  17" in out and "\\x1b[2J" in out
    assert main(["deadletters", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == rows
