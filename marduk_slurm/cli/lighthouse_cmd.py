"""`marduk lighthouse-proxy`: the liveness proxy in front of torchft's lighthouse (a daemon in
the foreground, started by the sbatch template next to `torchft_lighthouse`)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from datetime import timedelta
from typing import Any

from marduk_slurm.cli import arguments
from marduk_slurm.cli.daemons import setup_logging
from marduk_slurm.settings import LOG_LEVELS


def _config(args: argparse.Namespace) -> Any:
    from marduk_slurm.lighthouse.proxy import ProxyConfig

    job = args.job
    if job is None and os.environ.get("MARDUK_JOB_ID", os.environ.get("SLURM_JOB_ID")):
        job = arguments.job_id(os.environ.get("MARDUK_JOB_ID") or os.environ["SLURM_JOB_ID"])
    url = getattr(args, "nats_url", None) or os.environ.get("MARDUK_NATS_URL", "")
    return ProxyConfig(
        listen=args.listen, lighthouse=args.lighthouse,
        long_timeout=timedelta(milliseconds=args.long_timeout_ms),
        lighthouse_timeout=timedelta(milliseconds=args.lighthouse_timeout_ms),
        relay_interval=timedelta(milliseconds=args.relay_interval_ms),
        job_id=job, nats_url=url if job is not None else "",
        nats_creds=os.environ.get("MARDUK_NATS_CREDS", ""))


async def _serve(config: Any) -> int:
    from marduk_slurm.lighthouse.proxy import LighthouseProxy

    proxy = LighthouseProxy(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await proxy.start()
    try:
        await stop.wait()
    finally:
        await proxy.stop()
    return 0


def cmd_lighthouse_proxy(args: argparse.Namespace) -> int:
    config = _config(args)
    setup_logging(args.log_level or "INFO")
    return asyncio.run(_serve(config))


def add_parsers(sub: Any, add: Any) -> None:
    p = add(sub, "lighthouse-proxy",
            "serve torchft's lighthouse API in front of the real lighthouse: keep each replica "
            "alive there for the long timeout, drop a replica at once when it is told to leave "
            "(the job's leave commands on NATS: MARDUK_NATS_URL, MARDUK_NATS_CREDS)",
            "torchft_lighthouse --bind 127.0.0.1:29511 --heartbeat_timeout_ms 200 ... &\n"
            "  marduk lighthouse-proxy --listen 0.0.0.0:29510 --lighthouse 127.0.0.1:29511 "
            "--long-timeout-ms 1000 --job $SLURM_JOB_ID",
            cmd_lighthouse_proxy, json_flag=False)
    p.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help="where the Managers reach it (their TORCHFT_LIGHTHOUSE)")
    p.add_argument("--lighthouse", required=True, metavar="HOST:PORT",
                   help="the real torchft_lighthouse (run it with a short "
                        "--heartbeat_timeout_ms, e.g. 200)")
    p.add_argument("--long-timeout-ms", type=arguments.int_in("--long-timeout-ms", 100, 3_600_000),
                   default=1000, help="the heartbeat timeout replicas get (default 1000)")
    p.add_argument("--lighthouse-timeout-ms",
                   type=arguments.int_in("--lighthouse-timeout-ms", 10, 3_600_000), default=200,
                   help="the real lighthouse's --heartbeat_timeout_ms (default 200)")
    p.add_argument("--relay-interval-ms", type=arguments.int_in("--relay-interval-ms", 5, 10_000),
                   default=50, help="how often it heartbeats on a replica's behalf (default 50)")
    p.add_argument("--job", type=arguments.job_id,
                   help="the job whose leave commands to hear (default MARDUK_JOB_ID, "
                        "SLURM_JOB_ID)")
    p.add_argument("--log-level", choices=LOG_LEVELS)
