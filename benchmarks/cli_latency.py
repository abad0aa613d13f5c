"""Wall time of one `marduk status` / `marduk replicas` call, as an operator types it.

Against a real controller on a real nats-server (port 0), each command runs N times as a
fresh process (`python -m marduk_slurm.cli.main ...`), the way a shell runs it. Baselines in
the same run, on the same machine and load:
- `python -c pass`: the interpreter's floor, what no Python CLI can beat;
- a bare nats-py script that connects, makes one request/reply to a responder on the same
  server, and exits: the floor of any Python client that asks over NATS; once as nats-py
  loads by default (with aiohttp, for its WebSocket transport) and once without aiohttp, as
  the CLI loads it.

    .venv/bin/python benchmarks/cli_latency.py [--runs 20] [--json] [--source-only]

Python compiles a module from source on every start when it may not write bytecode
(PYTHONDONTWRITEBYTECODE, a read-only checkout); an installed package has its .pyc files.
By default the commands run with a bytecode cache in a temporary PYTHONPYCACHEPREFIX (filled
by the warm-up run), as installed; --source-only keeps the environment as it is.

Also prints the ten slowest imports of `marduk status --help` (python -X importtime), which
is where start-up time goes when a CLI call is slow.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from marduk_slurm.adapters.nats_server import NatsServerProcess  # noqa: E402

from harness import ControllerProcess  # noqa: E402

BARE_NATS_CLIENT = """
import asyncio, sys
if sys.argv[2:] == ["no-aiohttp"]:  # as marduk's CLI loads nats-py for a nats:// URL
    sys.modules["aiohttp"] = None
import nats

async def main():
    nc = await nats.connect(sys.argv[1])
    await nc.request("bench.echo", b"ping", timeout=5)
    await nc.close()

asyncio.run(main())
"""


async def _echo_responder(url: str, ready: asyncio.Event, stop: asyncio.Event) -> None:
    import nats

    nc = await nats.connect(url)

    async def reply(msg: Any) -> None:
        await msg.respond(b"pong")

    await nc.subscribe("bench.echo", cb=reply)
    await nc.flush()
    ready.set()
    await stop.wait()
    await nc.close()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _child_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_runs(argv: list[str], runs: int, env: dict[str, str]) -> dict[str, float]:
    """Run `argv` `runs` times (after one warm-up run): wall time p50/p90/min, and the CPU
    time (user + system) the process itself used, p50. On a shared, loaded machine the wall
    time mostly measures the wait for a core; the CPU time is what the command costs."""
    subprocess.run(argv, capture_output=True, check=True, cwd=REPO, env=env)
    times, cpu = [], []
    for _ in range(runs):
        c0, t0 = _child_cpu_s(), time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True, cwd=REPO, env=env)
        times.append(time.perf_counter() - t0)
        cpu.append(_child_cpu_s() - c0)
    return {"p50_ms": statistics.median(times) * 1000, "p90_ms": pct(times, 0.9) * 1000,
            "min_ms": min(times) * 1000, "cpu_p50_ms": statistics.median(cpu) * 1000}


def slowest_imports(env: dict[str, str], top: int = 10) -> list[tuple[int, str]]:
    """(cumulative microseconds, module) of the slowest imports of `marduk status --help`."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "marduk_slurm.cli.main",
                           "status", "--help"], capture_output=True, text=True, cwd=REPO,
                          env=env)
    rows = []
    for line in proc.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]), parts[2].rstrip()))
    return sorted(rows, reverse=True)[:top]


def measure(runs: int, source_only: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="marduk-cli-bench-") as tmp:
        env = dict(os.environ)
        if not source_only:
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
        nats = NatsServerProcess(Path(tmp) / "nats")
        nats.start()
        ctl = ControllerProcess(Path(tmp) / "state", nats.url).start()
        ready, stop = asyncio.Event(), asyncio.Event()
        loop = asyncio.new_event_loop()
        responder = loop.create_task(_echo_responder(nats.url, ready, stop))
        loop.run_until_complete(ready.wait())
        thread = threading.Thread(target=loop.run_until_complete, args=(responder,),
                                  daemon=True)
        thread.start()
        try:
            cli = [sys.executable, "-m", "marduk_slurm.cli.main"]
            results = {
                "python -c pass": time_runs([sys.executable, "-c", "pass"], runs, env),
                "bare nats-py request/reply": time_runs(
                    [sys.executable, "-c", BARE_NATS_CLIENT, nats.url], runs, env),
                "bare nats-py, no aiohttp": time_runs(
                    [sys.executable, "-c", BARE_NATS_CLIENT, nats.url, "no-aiohttp"], runs,
                    env),
                "marduk --help": time_runs([*cli, "--help"], runs, env),
                "marduk status": time_runs([*cli, "status", "--nats-url", nats.url], runs,
                                           env),
                "marduk replicas": time_runs([*cli, "replicas", "--nats-url", nats.url],
                                             runs, env),
            }
            imports = slowest_imports(env)
        finally:
            loop.call_soon_threadsafe(stop.set)
            thread.join(10)
            ctl.stop()
            nats.stop()
    return {"runs": runs, "results": results, "slowest_imports_us": imports,
            "load_average": os.getloadavg()[0], "bytecode_cache": not source_only}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--source-only", action="store_true",
                        help="no bytecode cache when the environment forbids writing one")
    args = parser.parse_args()
    data = measure(args.runs, args.source_only)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"wall time and CPU time per call, N={args.runs}, load average "
          f"{data['load_average']:.1f} on {os.cpu_count()} CPUs, bytecode cache "
          f"{'on' if data['bytecode_cache'] else 'as the environment has it'}")
    print(f"{'command':<30} {'p50 ms':>8} {'p90 ms':>8} {'min ms':>8} {'CPU p50':>8}")
    for name, r in data["results"].items():
        print(f"{name:<30} {r['p50_ms']:>8.1f} {r['p90_ms']:>8.1f} {r['min_ms']:>8.1f} "
              f"{r['cpu_p50_ms']:>8.1f}")
    print("\nslowest imports of `marduk status --help` (cumulative):")
    for us, module in data["slowest_imports_us"]:
        print(f"  {us / 1000:>7.1f} ms  {module.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
