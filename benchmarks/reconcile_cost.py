"""What one reconcile pass costs on a 1,000-node cluster.

The commands backend runs against a fake `sinfo` that prints 1,000 nodes in Slurm 22.05's
`sinfo --json` shape (the fields of a node from the local test cluster; 5% of them drained by
someone else) and a fake `scontrol` that lists no steps: the subprocess, the JSON parse and the
controller's SQLite write are real, slurmctld's own work is not. A pass is
`Reconciler.reconcile_once` with a real store (WAL, the write lane thread).

Printed: the pass's wall time and the write lane's share of it, in steady state (nothing
changed) and with 20 new foreign drains; the pass's CPU share of the default 5 s interval;
and, as the baseline measured in the same run, the write that every pass made before (an upsert
of every node).

    .venv/bin/python benchmarks/reconcile_cost.py [--nodes 1000] [--passes 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import stat
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from marduk_slurm.adapters.slurm.commands import CommandsBackend, SlurmCommandRunner
from marduk_slurm.adapters.store import Store
from marduk_slurm.controller.context import Context, StoreRunner
from marduk_slurm.controller.decisions import Policy
from marduk_slurm.controller.node_rows import changed_nodes, write_nodes
from marduk_slurm.controller.reconcile import Reconciler

INTERVAL_S = 5.0


def node_json(i: int, drained_by: str | None) -> dict[str, Any]:
    name = f"node{i:05d}"
    return {
        "architecture": "x86_64", "burstbuffer_network_address": "", "boards": 1,
        "boot_time": 1796172011, "comment": "", "cores": 32, "cpu_binding": 0,
        "cpu_load": 1670, "extra": "", "free_memory": 1900000, "cpus": 128,
        "last_busy": 1796182395, "features": "h100", "active_features": "h100",
        "gres": "gpu:h100:8(S:0-1)", "gres_drained": "N/A", "gres_used": "gpu:h100:8(IDX:0-7)",
        "mcs_label": "", "name": name, "next_state_after_reboot": "invalid",
        "address": name, "hostname": name,
        "state": "mixed", "state_flags": ["DRAIN"] if drained_by else [],
        "next_state_after_reboot_flags": [],
        "operating_system": "Linux 6.8.0 #1 SMP PREEMPT_DYNAMIC", "owner": None,
        "partitions": ["gpu", "debug"], "port": 6818, "real_memory": 2000000,
        "reason": f"fan check {i}" if drained_by else "",
        "reason_changed_at": 1796180000 if drained_by else 0,
        "reason_set_by_user": drained_by, "slurmd_start_time": 1796182395, "sockets": 2,
        "threads": 2, "temporary_disk": 0, "weight": 1,
        "tres": "cpu=128,mem=2000000M,billing=128,gres/gpu=8", "slurmd_version": "22.05.8",
        "alloc_memory": 1000000, "alloc_cpus": 64, "idle_cpus": 64, "tres_used": None,
        "tres_weighted": 0.0,
    }


def write_sinfo(path: Path, nodes: int, drained: set[int]) -> None:
    data = {"meta": {"plugin": {"type": "openapi/v0.0.38"}}, "errors": [],
            "nodes": [node_json(i, "ops" if i in drained else None) for i in range(nodes)]}
    path.write_text(json.dumps(data, indent=2))


def fake_bin(bindir: Path, sinfo_json: Path) -> None:
    bindir.mkdir()
    scripts = {"sinfo": f"#!/bin/sh\nexec /bin/cat {sinfo_json}\n",
               "scontrol": "#!/bin/sh\nexit 0\n"}
    for name, text in scripts.items():
        (bindir / name).write_text(text)
        (bindir / name).chmod(stat.S_IRWXU)


class QuietBus:
    async def publish(self, subject: str, data: bytes) -> None:
        return None


async def passes(rec: Reconciler, count: int) -> list[tuple[float, float]]:
    """(wall s, CPU s) of each pass."""
    out = []
    for _ in range(count):
        w0, c0 = time.perf_counter(), time.process_time()
        assert await rec.reconcile_once(), rec.last_error
        out.append((time.perf_counter() - w0, time.process_time() - c0))
    return out


async def timed_tx(runner: StoreRunner, count: int, fn: Any) -> list[float]:
    out = []
    for _ in range(count):
        t0 = time.perf_counter()
        await runner.tx(fn)
        out.append(time.perf_counter() - t0)
    return out


def ms(values: list[float]) -> str:
    return f"median {statistics.median(values) * 1e3:7.2f} ms, max {max(values) * 1e3:7.2f} ms"


async def run(args: argparse.Namespace, tmp: Path) -> None:
    drained = set(range(0, args.nodes, 20))
    sinfo_json = tmp / "sinfo.json"
    write_sinfo(sinfo_json, args.nodes, drained)
    fake_bin(tmp / "bin", sinfo_json)
    runner = SlurmCommandRunner(timeout_s=30, base_env={**os.environ, "PATH": str(tmp / "bin")})
    backend = CommandsBackend(runner)
    store = Store(tmp / "marduk.db")
    store.migrate()
    db = StoreRunner(store)
    ctx = Context(db, QuietBus(), Policy())  # type: ignore[arg-type]
    rec = Reconciler(ctx, backend, interval_s=INTERVAL_S)
    first = await passes(rec, 1)
    print(f"nodes: {args.nodes}, sinfo --json output: {sinfo_json.stat().st_size / 1e6:.2f} MB, "
          f"foreign drains recorded on first sight: {ctx.stats['foreign_node_changes']}")
    print(f"first pass (every row new):          {first[0][0] * 1e3:7.2f} ms")

    reads = []
    for _ in range(args.passes):
        t0 = time.perf_counter()
        nodes = await backend.list_nodes()
        reads.append(time.perf_counter() - t0)
    steady = await passes(rec, args.passes)
    write_s = [w for w, _ in steady]
    print(f"steady pass (nothing changed):       {ms(write_s)}")
    print(f"  sinfo + parse alone:               {ms(reads)}")

    newly = set(range(1, args.nodes, args.nodes // 20))
    write_sinfo(sinfo_json, args.nodes, drained | newly)
    before = ctx.stats["foreign_node_changes"]
    change = await passes(rec, 1)
    print(f"pass with {len(newly)} new foreign drains:   {change[0][0] * 1e3:7.2f} ms, events "
          f"{ctx.stats['foreign_node_changes'] - before}")
    cpu = statistics.median(c for _, c in steady)
    print(f"controller CPU per steady pass: {cpu * 1e3:.2f} ms = "
          f"{cpu / INTERVAL_S * 100:.2f}% of one core at the {INTERVAL_S:g} s default interval "
          "(the fake sinfo's own CPU not included)")

    prefix = ctx.policy.reason_prefix
    # Now: the comparison runs on a read connection; the write lane sees the changed nodes.
    changed = await db.read(lambda s: changed_nodes(s.node_slurm_rows(), nodes))
    compare = []
    for _ in range(args.passes):
        t0 = time.perf_counter()
        await db.read(lambda s: changed_nodes(s.node_slurm_rows(), nodes))
        compare.append(time.perf_counter() - t0)
    changed_write = await timed_tx(db, args.passes, lambda s: write_nodes(
        s, changed, read_at=time.time(), prefix=prefix))

    def upsert_all(s: Store) -> None:  # what every pass wrote before
        now = time.time()
        for n in nodes:
            s.update_node_from_slurm(n.name, str(n.state), list(n.flags), n.reason,
                                     n.reason_user or "", now, prefix)

    baseline = await timed_tx(db, args.passes, upsert_all)
    ratio = statistics.median(baseline) / statistics.median(changed_write)
    print(f"compare on a read connection, now:                {ms(compare)}")
    print(f"write lane held per pass, now (changed rows only): {ms(changed_write)}")
    print(f"write lane held per pass, baseline (every row):    {ms(baseline)}")
    print(f"ratio baseline/now: {ratio:.1f}x")
    db.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--passes", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(args, Path(tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
