"""The biggest operator queries at a big site, through the real `marduk` CLI.

A real nats-server and controller (`--slurm-backend none`) over a database of 100,000
replicas (1,000 jobs, 12,500 nodes with 8 known GPUs each) and 100,000 events, written before
start. Each query runs as its own CLI subprocess, as an operator would run it, stdout to a
file:

    marduk replicas --all --json            (pages of 1,000 over one connection)
    marduk history --limit 100000 --json    (pages of 1,000, newest first)
    marduk nodes --json                     (pages of 1,000 nodes, then risk scores)

For each: wall time, bytes of output, whether the JSON parses to the right number of rows,
the CLI process's peak RSS (/usr/bin/time's %M of that one process) and the controller's RSS
before and after. The baseline, in the same run, is the physical floor: a subprocess that
reads the same rows with the stdlib sqlite3 module (the store's own SQL) and writes them as
one JSON array, row by row as they are read (each row indented as the CLI indents a row when
it streams), to a file.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/big_queries.py [--replicas 100000]
        [--events 100000]

Not a test: it prints, it does not judge. About 60-90 s on two shared cores.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from query_load import rss_mib, settle
from site_database import REPLICAS_PER_NODE, fill

from marduk_slurm.adapters.nats_server import NatsServerProcess

from harness import REPO, ControllerProcess, marduk_argv

# The store's own queries (adapters/store), so that the floor reads exactly the same rows.
FLOOR_SQL = {
    "replicas": "SELECT r.*, (SELECT json_group_array(gpu_uuid) FROM (SELECT gpu_uuid FROM "
                "mapping WHERE replica_id = r.replica_id ORDER BY gpu_uuid)) AS gpu_uuids "
                "FROM replicas r ORDER BY r.job_id, r.replica_group, r.group_rank, "
                "r.replica_id",
    "history": "SELECT * FROM (SELECT * FROM events ORDER BY id DESC LIMIT 100000) ORDER BY id",
}
JSON_COLUMNS = {"replicas": "gpu_uuids", "history": "evidence"}


def floor(db: str, what: str, out: str) -> None:
    """The baseline, run as a child: stdlib sqlite3, row by row, to one JSON array written as
    it is read (each row as json.dumps(indent=2, sort_keys=True), as the CLI writes rows when
    it streams), so neither time nor memory is spent on anything the answer does not need."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    column = JSON_COLUMNS[what]
    with open(out, "w") as f:
        sep = "[\n"
        for record in conn.execute(FLOOR_SQL[what]):
            row = dict(record)
            row[column] = json.loads(row[column])
            f.write(sep + json.dumps(row, indent=2, sort_keys=True, default=str,
                                     ensure_ascii=True))
            sep = ",\n"
        f.write("[]\n" if sep == "[\n" else "\n]\n")
    conn.close()


def timed_child(argv: list[str], out: Path) -> tuple[float, float, int, str]:
    """(seconds, peak RSS MiB, exit status, stderr tail) of one child, stdout to `out`.

    The peak RSS comes from /usr/bin/time, whose own child is the one measured: a child of
    this process would report at least this process's peak (Linux carries the high-water
    mark across exec), and this process has parsed 50 MB of JSON by then."""
    err_path = out.parent / (out.name + ".err")
    rss_path = out.parent / (out.name + ".rss")
    with out.open("wb") as stdout, err_path.open("wb") as stderr:
        t0 = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(rss_path), *argv],
                              stdout=stdout, stderr=stderr, cwd=REPO, check=False)
        elapsed = time.perf_counter() - t0
    peak_kib = int(rss_path.read_text().split()[-1])
    err = err_path.read_text(errors="replace")[-300:]
    return elapsed, peak_kib / 1024, proc.returncode, err.strip()


def rows_in(path: Path) -> int | None:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return len(data) if isinstance(data, list) else None


def count(db: Path, sql: str) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(conn.execute(sql).fetchone()[0])
    finally:
        conn.close()


def measure(ctl: ControllerProcess, pid: int, tmp: Path) -> list[dict[str, Any]]:
    db = ctl.state_dir / "marduk.db"
    expected = {"replicas": count(db, "SELECT COUNT(*) FROM replicas"),
                "history": min(100_000, count(db, "SELECT COUNT(*) FROM events")),
                "nodes": count(db, "SELECT COUNT(*) FROM nodes")}
    queries = {"replicas": ("replicas", "--all", "--json"),
               "history": ("history", "--limit", "100000", "--json"),
               "nodes": ("nodes", "--json")}
    results = []
    for name, cli_args in queries.items():
        rss_before = rss_mib(pid)[0]
        out = tmp / f"cli-{name}.json"
        secs, peak, rc, err = timed_child(
            marduk_argv(*cli_args, "--nats-url", ctl.url, "--timeout", "60"), out)
        row = {"query": f"marduk {' '.join(cli_args)}", "name": name, "s": secs,
               "bytes": out.stat().st_size, "rows": rows_in(out), "expected": expected[name],
               "peak_rss_mib": peak, "rc": rc, "err": err if rc else "",
               "ctl_rss_before": rss_before, "ctl_rss_after": rss_mib(pid)[0],
               "ctl_hwm": rss_mib(pid)[1]}
        if name in FLOOR_SQL:
            fout = tmp / f"floor-{name}.json"
            fsecs, fpeak, frc, ferr = timed_child(
                [sys.executable, __file__, "--floor", str(db), name, str(fout)], fout)
            if frc:
                raise SystemExit(f"the sqlite3 floor failed: {ferr}")
            row.update(floor_s=fsecs, floor_bytes=fout.stat().st_size,
                       floor_rows=rows_in(fout), floor_rss_mib=fpeak)
        results.append(row)
        print(f"  {row['query']}: {secs:.1f} s, exit {rc}", flush=True)
    return results


def report(results: list[dict[str, Any]]) -> None:
    for r in results:
        ok = r["rc"] == 0 and r["rows"] == r["expected"]
        print(f"{r['query']}")
        print(f"  CLI  : {r['s']:6.2f} s  {r['bytes'] / 1e6:7.1f} MB  rows {r['rows']} "
              f"(expected {r['expected']:,}: {'right' if ok else 'WRONG'})  peak RSS "
              f"{r['peak_rss_mib']:.0f} MiB  exit {r['rc']}")
        if r["err"]:
            print(f"         stderr: {r['err']}")
        if "floor_s" in r:
            print(f"  floor: {r['floor_s']:6.2f} s  {r['floor_bytes'] / 1e6:7.1f} MB  rows "
                  f"{r['floor_rows']:,}  peak RSS {r['floor_rss_mib']:.0f} MiB  (stdlib "
                  "sqlite3 -> json)")
            print(f"  ratio CLI/floor: time {r['s'] / r['floor_s']:.1f}x, peak RSS "
                  f"{r['peak_rss_mib'] / r['floor_rss_mib']:.1f}x, bytes "
                  f"{r['bytes'] / r['floor_bytes']:.2f}x")
        print(f"  controller RSS: {r['ctl_rss_before']:.0f} -> {r['ctl_rss_after']:.0f} MiB "
              f"(peak so far {r['ctl_hwm']:.0f} MiB)")
    print(json.dumps([{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()
                       if k not in ("err", "query")} for r in results]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replicas", type=int, default=100_000)
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--events", type=int, default=100_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        state = tmp / "state"
        state.mkdir()
        fill_s = fill(state / "marduk.db", replicas=args.replicas, jobs=args.jobs,
                      events=args.events)
        print(f"database: {args.replicas:,} replicas in {args.jobs:,} jobs on "
              f"{args.replicas // REPLICAS_PER_NODE:,} nodes, {args.events:,} events "
              f"(written in {fill_s:.1f} s)", flush=True)
        server = NatsServerProcess(tmp / "nats")
        url = server.start()
        ctl = ControllerProcess(state, url, reconcile_s=3600)
        try:
            ctl.start(timeout_s=120)
            assert ctl.proc is not None
            pid = ctl.proc.pid
            settle_s = settle(pid)
            print(f"controller idle {settle_s:.1f} s after answering status; RSS "
                  f"{rss_mib(pid)[0]:.0f} MiB", flush=True)
            results = measure(ctl, pid, tmp)
            ctl.stop()
        finally:
            if ctl.proc is not None and ctl.proc.poll() is None:
                ctl.stop()
            server.stop()
    report(results)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--floor":
        floor(sys.argv[2], sys.argv[3], sys.argv[4])
        sys.exit(0)
    sys.exit(main())
