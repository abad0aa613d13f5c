#!/usr/bin/env python3
"""Check the real NVML path on a GPU machine: enumerate, poll each GPU once, wait for XIDs.

Prints one JSON document: the GPUs, each reading and its verdict under the default policy,
and the XID events seen while waiting. Exit status: 0 after a probe, 2 when this machine has
no usable NVML (no pynvml, no driver, no GPU), with the reason on stderr.

Example:
    .venv/bin/python scripts/nvml-probe.py --wait-ms 1000 > probe.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import socket
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

# Run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from marduk_slurm.adapters.nvml import (
    GpuSourceError,
    NvmlGpuSource,
    NvmlRunner,
)
from marduk_slurm.domain.gpu_health import FaultPolicy

EXIT_NO_NVML = 2


def _jsonable(value: Any) -> Any:
    if isinstance(value, frozenset | set):
        return sorted(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


async def probe(node: str, wait_ms: int, call_timeout: timedelta) -> dict[str, Any]:
    runner = await NvmlRunner.open(lambda: NvmlGpuSource(node), call_timeout=call_timeout)
    policy = FaultPolicy()
    try:
        gpus = await runner.gpus()
        events = await runner.wait_xid(wait_ms)
        results = []
        for gpu in gpus:
            reading = await runner.read(gpu)
            verdict = policy.evaluate(reading)
            results.append(
                {
                    "gpu": dataclasses.asdict(gpu),
                    "reading": dataclasses.asdict(reading),
                    "verdict": {"action": str(verdict.action), "reason": verdict.reason},
                    "evidence": verdict.evidence,
                }
            )
    finally:
        await runner.aclose()
    return {
        "node": node,
        "gpu_count": len(gpus),
        "xid_events": [dataclasses.asdict(event) for event in events],
        "gpus": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--node", default=socket.gethostname(), help="node name in readings")
    parser.add_argument("--wait-ms", type=int, default=1000, help="how long to wait for XIDs")
    parser.add_argument("--timeout-s", type=float, default=10.0, help="limit per NVML call")
    args = parser.parse_args(argv)
    try:
        report = asyncio.run(probe(args.node, args.wait_ms, timedelta(seconds=args.timeout_s)))
    except GpuSourceError as err:
        print(f"nvml-probe: NVML is not usable on this machine: {err}", file=sys.stderr)
        return EXIT_NO_NVML
    json.dump(report, sys.stdout, indent=2, default=_jsonable)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
