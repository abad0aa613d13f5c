"""Observability commands: `straggler policy|show`, `risk`, `timeline` (a job's recent faults,
as text or a picture file), and `top`, a live terminal view.

`top` redraws with plain ANSI escapes (home, clear to end), so it needs no curses; `--once`
prints one frame without them, for scripts and tests.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, TextIO

from marduk_slurm.cli import arguments, render
from marduk_slurm.cli.commands import ask

POLICIES = ("report", "evict", "evict_and_drain")
HOME_CLEAR = "\x1b[H\x1b[2J"
CLEAR_BELOW = "\x1b[J"


def cmd_straggler_policy(args: argparse.Namespace) -> int:
    data = ask(args, "straggler_policy", {"job": args.job, "policy": args.policy})
    if args.json:
        render.as_json(data)
    else:
        render.say(f"job {data['job']}: straggler policy {data['policy']} "
                   f"(was {data['previous']})")
    return 0


def cmd_straggler_timeouts(args: argparse.Namespace) -> int:
    data = ask(args, "timeout_policy", {"job": args.job, "off": args.off, "k": args.k,
                                        "floor_s": args.floor, "ceiling_s": args.ceiling})
    if args.json:
        render.as_json(data)
        return 0
    policy = data["policy"]
    if policy is None:
        render.say(f"job {data['job']}: torchft timeouts no longer follow its step times "
                   "(the values in force stay)")
    else:
        render.say(f"job {data['job']}: torchft timeouts follow its step times: timeout "
                   f"{policy['k']:g} x p99 step, quorum_timeout {2 * policy['k']:g} x p99, "
                   f"at least {policy['floor_s']:g} s ({3 * policy['floor_s']:g} s for the "
                   f"quorum), at most {policy['ceiling_s']:g} s; each change is a config "
                   "revision and a timeouts_adjusted event")
    return 0


def cmd_straggler_show(args: argparse.Namespace) -> int:
    data = ask(args, "straggler_show", {"job": args.job})
    if args.json:
        render.as_json(data)
        return 0
    stats = data["stats"] or {}
    render.say(f"job {data['job']}: policy {data['policy']}, {stats.get('replicas', 0)} "
               f"replica(s) reporting, {stats.get('step_rate', 0):.2f} steps/s")
    if stats:
        render.say(f"median step {stats['median_step_ms']:.1f} ms (p99 "
                   f"{stats['p99_step_ms']:.1f}), allreduce wait "
                   f"{stats['median_allreduce_ms']:.1f} ms, own work "
                   f"{stats['median_work_ms']:.1f} ms (MAD {stats['mad_work_ms']:.1f}); flagged "
                   f"above {stats['threshold_ms']:.1f} ms" if stats["threshold_ms"] else
                   "; too few replicas to flag")
    print()
    render.table(["REPLICA", "STEP", "STEPS/S", "STEP_MS", "ALLREDUCE_MS", "WORK_MS",
                  "STRAGGLER"],
                 [[r["replica_id"], r["step"], r["step_rate"], r["step_ms"], r["allreduce_ms"],
                   r["work_ms"], "yes" if r["straggler"] else "-"] for r in data["replicas"]])
    auto = data.get("timeout_policy")
    if auto:
        render.say(f"\ntorchft timeouts follow the step times: {auto['k']:g} x p99, "
                   f"{auto['floor_s']:g}-{auto['ceiling_s']:g} s (marduk history --job "
                   f"{data['job']} shows each change)")
    if data["timeouts"]:
        print("\ntorchft timeouts that fit the observed step times:")
        render.table(["SETTING", "SECONDS", "WHY"],
                     [[t["name"], t["seconds"], t["why"]] for t in data["timeouts"]])
    return 0


def cmd_risk(args: argparse.Namespace) -> int:
    rows = ask(args, "risk", {"node": args.node})
    if args.json:
        render.as_json(rows)
        return 0
    render.table(["NODE", "GPU", "UUID", "RISK", "FACTORS"],
                 [[r["node"], r["index"], r["gpu_uuid"], r["score"],
                   "; ".join(f"{f['detail']} (+{f['points']})" for f in r["factors"]) or "-"]
                  for r in sorted(rows, key=lambda r: -r["score"])])
    return 0


def cmd_timeline(args: argparse.Namespace) -> int:
    from pathlib import Path

    from marduk_slurm.domain import timeline as tl

    plot = Path(args.plot) if args.plot else None
    if plot is not None and plot.suffix.lower() not in (".svg", ".png"):
        raise ValueError(f"--plot {plot}: the file must end in .svg or .png")
    data = ask(args, "timeline", {"job": args.job, "window_s": args.window})
    if plot is not None:
        from marduk_slurm.adapters.timeline_plot import PlotsUnavailable, write_plot

        try:
            write_plot(tl.from_json(data), plot, title=f"job {args.job}: fault timeline")
        except PlotsUnavailable as exc:
            render.error(exc)
            return 1
        data["plot"] = str(plot)
    if args.json:
        render.as_json(data)
        return 0
    render.say(f"job {data['job']}: {data['samples']} step samples over the last "
               f"{data['window_s']:g} s, {len(data['groups'])} group(s), full quorum "
               f"{data['full_quorum']}")
    render.table(["TIME", "KIND", "GROUP", "WHAT"],
                 [[render.fmt_time(mk["t"]), mk["kind"], mk["group"], mk["label"]]
                  for mk in data["marks"]])
    if data["missing"]:
        render.say(f"not seen after a fault: {', '.join(data['missing'])}")
    if plot is not None:
        render.say(f"plot: {plot}")
    return 0


def frame(data: dict[str, Any], out: TextIO) -> None:
    """One screen of `marduk top`."""
    s = data["status"]
    render.say(f"marduk top  {render.fmt_time(data['ts'])}  NATS {s['nats']}  nodes "
               f"{s['nodes']} ({s['nodes_drained']} drained)  replicas {s['replicas_active']}  "
               f"stragglers {s.get('stragglers', 0)}  Slurm actions pending "
               f"{s['outbox_pending']}", out=out)
    rates = data["job_rates"]
    if rates:
        render.say("jobs: " + "  ".join(f"{j} {r:.2f} steps/s"
                                        for j, r in sorted(rates.items())), out=out)
    print(file=out)
    render.table(["JOB", "GROUP", "NODE", "STATE", "STEP", "STEPS/S", "STEP_MS", "CFG",
                  "LAST_SEEN", "STRAGGLER", "REPLICA"],
                 [[r["job_id"], r["replica_group"], r["node"], r["state"], r["last_step"],
                   "-" if r.get("step_rate") is None else f"{r['step_rate']:.2f}",
                   f"{r['step_time_ms']:.1f}", r["config_revision"],
                   render.fmt_ago(r["last_seen"]), "YES" if r.get("straggler") else "-",
                   r["replica_id"]] for r in data["replicas"]], out=out)
    _more(len(data["replicas"]), data.get("replicas_total"), "replicas", "marduk replicas",
          out)
    print(file=out)
    render.table(["DRAINED", "STATE", "BY_MARDUK", "RISK", "REASON"],
                 [[n["name"], "queued" if n["pending"] else "drained",
                   "yes" if n["by_marduk"] else "no", n["risk"], n["reason"] or "-"]
                  for n in data["drained"]], out=out)
    _more(len(data["drained"]), data.get("drained_total"), "drained nodes", "marduk nodes",
          out)


def _more(shown: int, total: int | None, what: str, command: str, out: TextIO) -> None:
    if total is not None and total > shown:
        render.say(f"({shown} of {total:,} {what} shown; `{command}` lists them all)", out=out)


def cmd_top(args: argparse.Namespace) -> int:
    if args.once:
        data = ask(args, "top", {})
        if args.json:
            render.as_json(data)
        else:
            frame(data, sys.stdout)
        return 0
    try:
        while True:
            data = ask(args, "top", {})
            sys.stdout.write(HOME_CLEAR if not args.json else "")
            if args.json:
                render.as_json(data)
            else:
                frame(data, sys.stdout)
                sys.stdout.write(CLEAR_BELOW)
            sys.stdout.flush()
            time.sleep(max(0.2, args.interval))
    except KeyboardInterrupt:
        print()
        return 0


def add_parsers(sub: Any, add: Any) -> None:
    p = add(sub, "straggler", "straggler detection of a running job (policy, show)",
            "marduk straggler show 1234", None, json_flag=False)
    p.set_defaults(func=lambda _args, group=p: group.print_help() or 2)
    ssub = p.add_subparsers(dest="straggler_command", metavar="ACTION")
    q = add(ssub, "policy", "what to do with a job's stragglers: report (record only), "
            "evict (the replica leaves at its next step), evict_and_drain (and drain its node)",
            "marduk straggler policy 1234 evict", cmd_straggler_policy)
    q.add_argument("job", type=arguments.job_id, help="Slurm job id")
    q.add_argument("policy", choices=POLICIES)
    q = add(ssub, "timeouts", "let a job's torchft timeouts follow its step times (timeout "
            "k x p99 step, quorum_timeout 2k x p99, within bounds), or stop (--off)",
            "marduk straggler timeouts 1234 --k 10 --floor 10 --ceiling 600",
            cmd_straggler_timeouts)
    q.add_argument("job", type=arguments.job_id, help="Slurm job id")
    q.add_argument("--k", type=arguments.seconds_in("--k", 0.001, 1000), default=None,
                   help="timeout = k x p99 step time (default 10)")
    q.add_argument("--floor", type=arguments.seconds_in("--floor", 0.001, 86400),
                   default=None, metavar="S",
                   help="the least timeout, seconds (default 10; 3x for quorum_timeout)")
    q.add_argument("--ceiling", type=arguments.seconds_in("--ceiling", 0.001, 86400),
                   default=None, metavar="S", help="the most for either, seconds (default 600)")
    q.add_argument("--off", action="store_true",
                   help="stop adjusting (the values in force stay)")
    q = add(ssub, "show", "a job's step statistics, flagged replicas and the torchft "
            "timeouts that fit its step times", "marduk straggler show 1234", cmd_straggler_show)
    q.add_argument("job", type=arguments.job_id, help="Slurm job id")
    p = add(sub, "risk", "GPU failure risk scores and what they are made of",
            "marduk risk n3", cmd_risk)
    p.add_argument("node", nargs="?", type=arguments.node_name, help="only this node's GPUs")
    p = add(sub, "timeline", "a job's recent faults: each group's step rate and quorum size, "
            "with the fault, drain, leave, standby or respawn and full strength marked",
            "marduk timeline 1234 --window 600 --plot job1234.svg", cmd_timeline)
    p.add_argument("job", type=arguments.job_id, help="Slurm job id")
    p.add_argument("--window", type=arguments.seconds_in("--window", 1, 900), default=None,
                   metavar="S", help="the last S seconds (default 300, at most 900: what "
                   "the controller keeps)")
    p.add_argument("--plot", metavar="FILE", help="also draw it into FILE (.svg or .png; "
                   "needs matplotlib: pip install 'marduk-slurm[plots]')")
    p = add(sub, "top", "live view of replicas, step rates, stragglers and drained nodes "
            "(Ctrl-C exits)", "marduk top --interval 2", cmd_top)
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.add_argument("--interval", type=arguments.interval_s, default=1.0,
                   help="seconds between frames (0.2 to 3600)")
