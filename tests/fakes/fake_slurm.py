"""Stand-in `scontrol` and `sinfo` for tests that count Slurm calls across processes.

It is NOT Slurm and proves nothing about Slurm's behaviour: it answers the few command lines
the commands backend (adapters/slurm/commands.py) sends, in the formats of the recorded
outputs in tests/data/slurm, keeps the nodes' state in a JSON file under a lock, and appends
every `scontrol update` to a log with the caller's name (`MARDUK_FAKE_SLURM_CALLER` in its
environment: a process id would not do, the parent of a call in flight when its controller is
killed is init), so a test can count how many times each node was drained, and by whom.
Nodes are IDLE until drained.

`install(bin_dir, state_dir, nodes)` writes the two executables; put `bin_dir` first on PATH
and `MARDUK_FAKE_SLURM_DIR=state_dir` in the controller's environment.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent
WRAPPER = """#!{python}
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
from fakes.fake_slurm import main
sys.exit(main({command!r}, sys.argv[1:]))
"""


def install(bin_dir: Path, state_dir: Path, nodes: list[str]) -> dict[str, str]:
    """Write the executables and the nodes; the environment a controller needs to use them."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    for command in ("scontrol", "sinfo"):
        path = bin_dir / command
        path.write_text(WRAPPER.format(python=sys.executable, repo=str(REPO),
                                       tests=str(REPO / "tests"), command=command))
        path.chmod(0o755)
    (state_dir / "nodes.json").write_text(json.dumps(
        {name: {"drained": False, "reason": ""} for name in nodes}))
    (state_dir / "calls.jsonl").touch()
    return {"PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
            "MARDUK_FAKE_SLURM_DIR": str(state_dir)}


def calls(state_dir: Path) -> list[dict[str, Any]]:
    """Every `scontrol update`, in order: {caller, pid, t, nodes, state, reason}."""
    text = (state_dir / "calls.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def nodes(state_dir: Path) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = json.loads((state_dir / "nodes.json").read_text())
    return result


def _line(name: str, node: dict[str, Any]) -> str:
    state = "IDLE+DRAIN" if node["drained"] else "IDLE"
    line = (f"NodeName={name} Arch=x86_64 CPUTot=2 Gres=(null) State={state} "
            f"Partitions=debug")
    if node["reason"]:
        line += f" Reason={node['reason']} [marduk@2026-01-01T00:00:00]"
    return line


def main(command: str, argv: list[str]) -> int:
    from marduk_slurm.domain import hostlist

    state_dir = Path(os.environ["MARDUK_FAKE_SLURM_DIR"])
    with (state_dir / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        table = nodes(state_dir)
        if command == "sinfo":
            print(json.dumps({"errors": [], "nodes": [
                {"name": name, "state": "IDLE", "state_flags": ["DRAIN"] if n["drained"] else [],
                 "reason": n["reason"], "cpus": 2, "partitions": ["debug"]}
                for name, n in table.items()]}))
            return 0
        if argv[:1] == ["ping"]:
            print("Slurmctld(primary) at fake is UP")
            return 0
        if "job" in argv:
            print("No jobs in the system")
            return 0
        if "step" in argv:
            print("No job steps in the system")
            return 0
        if argv[:3] == ["show", "-o", "node"]:
            names = hostlist.expand(argv[-1])
            unknown = [n for n in names if n not in table]
            if unknown:
                print(f"Node {unknown[0]} not found", file=sys.stderr)
                return 1
            print("\n".join(_line(name, table[name]) for name in names))
            return 0
        if argv[:1] == ["update"]:
            fields = dict(arg.split("=", 1) for arg in argv[2:])
            names = hostlist.expand(fields["nodename"])
            state = fields["state"].upper()
            for name in names:
                table[name] = {"drained": state == "DRAIN", "reason": fields.get("reason", "")}
            (state_dir / "nodes.json").write_text(json.dumps(table))
            with (state_dir / "calls.jsonl").open("a") as log:
                log.write(json.dumps({"caller": os.environ.get("MARDUK_FAKE_SLURM_CALLER", ""),
                                      "pid": os.getppid(), "t": time.time(), "nodes": names,
                                      "state": state, "reason": fields.get("reason", "")})
                          + "\n")
            return 0
    print(f"fake {command}: unsupported {argv}", file=sys.stderr)
    return 2
