"""Operator commands that ask the controller: status, replicas, nodes, history, deadletters,
drain, resume, inject. Each parses its arguments, makes one request, and prints a table or JSON.

Settings, the NATS client and the health-check runner are imported by the commands that use
them, so that parsing arguments and printing help stay fast (benchmarks/cli_latency.py)."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import time
from typing import TYPE_CHECKING, Any

from marduk_slurm.cli import arguments, render
from marduk_slurm.cli.client import Session, call_pages, resolve_creds, resolve_nats_url
from marduk_slurm.domain import hostlist
from marduk_slurm.domain import input_bounds as bounds
from marduk_slurm.domain.node_health import MOUNT_FAULTS, PORT_FAULTS
from marduk_slurm.domain.slurm_state import step_name

if TYPE_CHECKING:
    from marduk_slurm.adapters.health_check import CheckResult
    from marduk_slurm.settings import Settings

EXIT_INTERRUPTED = 130  # as a shell reports a command ended by SIGINT
EXIT_SLURM_DOWN = 1  # `status` when the controller cannot reach Slurm, as `scontrol ping`


def _actor() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def cli_settings(args: argparse.Namespace) -> Settings:
    from marduk_slurm import settings as settings_mod

    flags = {"controller.state_dir": args.state_dir} if args.state_dir else {}
    return settings_mod.from_environment(args.config, flags)


def session(args: argparse.Namespace) -> Session:
    """A connection to the controller for several requests (`async with session(args)`)."""
    s = cli_settings(args)
    return Session(resolve_nats_url(s, args.nats_url), creds=resolve_creds(s),
                   timeout_s=args.timeout or s.nats.request_timeout_s,
                   actor=os.environ.get("MARDUK_ACTOR", _actor()))


def ask(args: argparse.Namespace, verb: str, params: dict[str, Any]) -> Any:
    async def one() -> Any:
        async with session(args) as connection:
            return await connection.ask(verb, params)
    return asyncio.run(one())


# Rows a list verb prints for a person unless told otherwise (as squeue users page with less,
# a table of 100,000 rows helps nobody); --json and --limit 0 print them all.
HUMAN_LIMIT = 1000


def ask_list(args: argparse.Namespace, verb: str, params: dict[str, Any], *,
             limit: int | None, page_size: int = 1000
             ) -> tuple[list[Any], int | None]:
    """A list verb, page after page over one connection, up to `limit` rows (None: all).
    With --json and no limit, each page is written out as it arrives (exact JSON, one array)
    and nothing is kept; the rows returned are then empty."""
    s = cli_settings(args)
    url = resolve_nats_url(s, args.nats_url)
    rows: list[Any] = []
    stream = getattr(args, "json", False) and limit is None
    out = sys.stdout
    first = [True]

    def on_page(items: list[Any]) -> bool:
        if stream:
            for item in items:
                out.write(("[\n" if first[0] else ",\n") + render.json_text(item))
                first[0] = False
            return False
        rows.extend(items)
        return limit is not None and len(rows) >= limit

    total = asyncio.run(call_pages(url, verb, params, on_page, creds=resolve_creds(s),
                                   timeout_s=args.timeout or s.nats.request_timeout_s,
                                   actor=os.environ.get("MARDUK_ACTOR", _actor()),
                                   page_size=page_size))
    if stream:
        out.write("[]\n" if first[0] else "\n]\n")
    return (rows[:limit] if limit is not None else rows), total


def _shown(args: argparse.Namespace) -> int | None:
    """How many rows to fetch: --limit (0 for all), else all for --json, else HUMAN_LIMIT."""
    limit = getattr(args, "limit", None)
    if limit is not None:
        return limit or None
    return None if args.json else HUMAN_LIMIT


def _footer(shown: int, total: int | None, what: str) -> None:
    if total is not None and total > shown:
        render.say(f"({shown:,} of {total:,} {what} shown; --limit N, --limit 0 or --json "
                   "for more)")


def parse_since(text: str | None, now: float | None = None) -> float | None:
    """`30m`, `2h`, `1d`, `90s`, unix seconds, or an ISO date/time."""
    if not text:
        return None
    now = time.time() if now is None else now
    return bounds.bounded_float("--since", _since(text, now), 0, 2**40)


def _since(text: str, now: float) -> float:
    match = re.fullmatch(r"(\d{1,12}(?:\.\d{1,9})?)([smhd])", text.strip())
    if match:
        scale = {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
        return max(0.0, now - float(match.group(1)) * scale)
    if re.fullmatch(r"\d{1,12}(?:\.\d{1,9})?", text.strip()):
        return float(text)
    from datetime import datetime
    try:
        return datetime.fromisoformat(text).timestamp()
    except (ValueError, OverflowError):
        raise ValueError(f"--since: expected 30m, 2h, 1d, unix seconds or an ISO time, "
                         f"got {bounds.shorten(text)!r}") from None


def parse_scontrol_args(words: list[str]) -> tuple[str, dict[str, str]]:
    """`n3 reason="swap GPU"`, `n4 n2`, `n[1-2],n4` or `nodename=n3 reason=...`: the node list
    (several node words become one hostlist) and the key=value pairs."""
    node_words: list[str] = []
    pairs: dict[str, str] = {}
    for word in words:
        key, eq, value = word.partition("=")
        if not eq:
            node_words.append(word)
        elif key.lower() in ("reason", "nodename", "nodes", "gpu"):
            pairs["nodes" if key.lower() in ("nodename", "nodes") else key.lower()] = value
        else:
            raise ValueError(f"unknown argument {bounds.shorten(word)!r}; valid keys: "
                             "nodename=, reason=, gpu=")
    if node_words and "nodes" in pairs:
        raise ValueError("give the nodes either as words or as nodename=, not both")
    nodes = ",".join(node_words)
    nodes = pairs.pop("nodes", nodes)
    if nodes:  # a bad hostlist or node name is a usage error, caught before asking
        bounds.check_text("node list", nodes)
        for name in hostlist.expand(nodes):
            bounds.check_name("node", name)
    if "reason" in pairs:
        bounds.check_text("reason", pairs["reason"], bounds.REASON_MAX)
    if "gpu" in pairs:
        bounds.check_name("gpu", pairs["gpu"], bounds.GPU_ID)
    return nodes, pairs


# -- commands ----------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    """Exit status 1 when the controller cannot reach Slurm (as `scontrol ping` fails)."""
    data = ask(args, "status", {})
    slurm, unreachable = slurm_lines(data)
    if args.json:
        render.as_json(data)
        return EXIT_SLURM_DOWN if unreachable else 0
    say = render.say
    # An older controller does not say which server it is on.
    server = f" to {data['nats_server']}" if data.get("nats_server") else ""
    say(f"controller up {data['uptime_s']:.0f}s, NATS {data['nats']}{server} "
        f"({data.get('nats_reconnects', 0)} reconnects), Slurm backend {data['slurm_backend']}")
    lead = leader_line(data.get("controller"))
    if lead:
        say(lead)
        for line in standby_lines(data["controller"].get("standbys")):
            say(line)
    for line in slurm:
        say(line)
    say(f"nodes {data['nodes']} ({data['nodes_drained']} drained, "
        f"{data['nodes_drained_by_marduk']} by marduk), GPUs {data['gpus']}")
    say(f"jobs {data['jobs_active']}, replicas {data['replicas_active']}, "
        f"events {data['events']}, Slurm actions pending {data['outbox_pending']}, "
        f"messages rejected {data.get('rejected_total', '-')}")
    for line in rejection_lines(data):
        say(line)
    return EXIT_SLURM_DOWN if unreachable else 0


def leader_line(view: Any) -> str:
    """Who leads: the controller that answered (only the leader answers) and its lease."""
    if not isinstance(view, dict):
        return ""  # an older controller, without leadership
    given = view.get("leader")
    leader: dict[str, Any] = given if isinstance(given, dict) else {}
    renewed = view.get("renewed_ago_s")
    ago = f", renewed {renewed:.1f}s ago" if isinstance(renewed, int | float) else ""
    return (f"leader {leader.get('id', view.get('id', '?'))} on "
            f"{leader.get('host', '?')} (version "
            f"{leader.get('version', '?')}, pid {leader.get('pid', '?')}), "
            f"role of this controller: {view.get('role', '?')}, lease "
            f"revision {view.get('lease_revision', '?')} of {view.get('lease_s', '?')}s{ago}")


def standby_lines(standbys: Any) -> list[str]:
    """The standby controllers that announced themselves, or that there is none."""
    if not isinstance(standbys, list):
        return []
    if not standbys:
        return ["standby controllers: none (a failure of this one waits for its restart)"]
    lines = []
    for s in standbys:
        if not isinstance(s, dict):
            continue
        if "error" in s:
            lines.append(f"standby controllers: unknown ({s['error']})")
            continue
        behind = s.get("behind")
        lag = ("caught up" if behind == 0 else f"{behind} event(s) behind"
               if isinstance(behind, int) and behind > 0 else "lag unknown")
        lines.append(f"standby {s.get('id', '?')} on {s.get('host', '?')} (version "
                     f"{s.get('version', '?')}, pid {s.get('pid', '?')}): {lag}")
    return lines


def slurm_lines(data: dict[str, Any], now: float | None = None) -> tuple[list[str], bool]:
    """What `status` says about Slurm, and whether the controller cannot reach it.

    A controller that reports `slurm_health` (reachable, last_ok, failing_since,
    consecutive_failures, last_error) is taken at its word. Without it, only counters since
    the controller started are known: every reconcile pass failed and none succeeded means
    Slurm has been unreachable since the start; failures after a success are reported as
    counts, since this controller cannot say whether Slurm answers now."""
    if data.get("slurm_backend") == "none":
        return ["Slurm: not used (--slurm-backend none)"], False
    now = time.time() if now is None else now
    health = data.get("slurm_health")
    if isinstance(health, dict):
        return _slurm_health_lines(health, now)
    counters, calls = data.get("counters") or {}, data.get("slurm_calls") or {}
    ok_passes = int(counters.get("reconciles", 0))
    failed_passes = int(counters.get("reconcile_failures", 0))
    failed_calls = {k.removeprefix("failures."): int(v) for k, v in calls.items()
                    if k.startswith("failures.") and v}
    detail = ", ".join(f"{cmd} failed {n} of {calls.get(f'calls.{cmd}', n)}"
                       for cmd, n in sorted(failed_calls.items()))
    if failed_passes and not ok_passes:
        started = now - float(data.get("uptime_s", 0))
        return [f"Slurm UNREACHABLE: no Slurm call has succeeded since the controller started "
                f"{render.fmt_ago(started, now)} ({failed_passes} failed reconcile "
                f"pass(es); {detail or 'no call counts'})"], True
    if failed_passes or failed_calls:
        return [f"Slurm calls failed since start: {failed_passes} of "
                f"{ok_passes + failed_passes} reconcile passes; {detail or '-'}"], False
    return [f"Slurm: reachable ({ok_passes} reconcile passes, none failed)"], False


def _slurm_health_lines(health: dict[str, Any], now: float) -> tuple[list[str], bool]:
    if health.get("reachable") is False:
        since = health.get("failing_since")
        when = (f"since {render.fmt_time(since)} ({render.fmt_ago(since, now)})" if since
                else "")
        last_ok = health.get("last_ok")
        ok = f"last success {render.fmt_ago(last_ok, now)}" if last_ok else "never reached"
        return [f"Slurm UNREACHABLE {when}: {health.get('consecutive_failures', '?')} calls "
                f"failed in a row, {ok}; last error: {health.get('last_error') or '-'}"], True
    if health.get("reachable") is None:
        return ["Slurm: not asked yet"], False
    return [f"Slurm: reachable, last answer {render.fmt_ago(health.get('last_ok'), now)}"], False


def rejection_lines(data: dict[str, Any], top: int = 5) -> list[str]:
    """What `status` says about rejected input: the busiest causes since the controller
    started and the dead letters kept. Controllers from before these keys print nothing."""
    lines = []
    rows = data.get("rejections")
    if isinstance(rows, list) and rows:
        total = sum(int(r.get("count", 0)) for r in rows)
        lines.append(f"rejected since start {total}; top causes:")
        for r in rows[:top]:
            lines.append(f"  {r.get('count', 0):>6}  {r.get('subject', '?')} "
                         f"{r.get('kind', '?')}: {r.get('cause', '?')}")
        if len(rows) > top:
            lines.append(f"  ... and {len(rows) - top} more (marduk status --json)")
    if "dead_letters" in data:
        lines.append(f"dead letters {data['dead_letters']} (marduk deadletters)")
    return lines


def cmd_replicas(args: argparse.Namespace) -> int:
    limit = _shown(args)
    rows, total = ask_list(args, "replicas", {"job": args.job, "node": args.node,
                                              "all": args.all}, limit=limit)
    if args.json:
        if limit is not None:
            render.as_json(rows)
        return 0
    render.table(
        ["JOB", "STEP", "GROUP", "RANK", "NODE", "STATE", "REPLICA", "GPUS", "LAST_STEP",
         "STEP_MS", "CFG", "LAST_SEEN"],
        [[r["job_id"], "-" if r["step_id"] is None else step_name(r["step_id"]),
          r["replica_group"], r["group_rank"], r["node"],
          r["state"], r["replica_id"], ",".join(render.short_uuid(g) for g in r["gpu_uuids"]),
          r["last_step"], f"{r['step_time_ms']:.1f}", r["config_revision"],
          render.fmt_ago(r["last_seen"])] for r in rows],
    )
    _footer(len(rows), total, "replicas")
    return 0


def cmd_nodes(args: argparse.Namespace) -> int:
    if args.node:
        rows, total = ask(args, "nodes", {"node": args.node}), None
    else:
        limit = _shown(args)
        # A node row carries its GPUs and replicas: 1,000 of them can pass NATS's 1 MiB.
        rows, total = ask_list(args, "nodes", {}, limit=limit, page_size=100)
        if args.json and limit is None:  # written out page by page as it came
            return 0
    if args.json:
        render.as_json(rows)
        return 0
    render.table(
        ["NODE", "STATE", "FLAGS", "BY_MARDUK", "GPUS", "UNHEALTHY", "RISK", "REPLICAS",
         "REASON"],
        [[n["name"], n["state"], ",".join(n["flags"]) or "-",
          "yes" if n["drained_by_marduk"] else "no",
          f"{len(n['gpus'])}{' (simulated)' if n['simulated_gpus'] else ''}",
          ",".join([f"{g['idx']}:{g['health']}" for g in n["gpus"] if g["health"] != "none"]
                   + [f"{c['target']}:{c['health']}" for c in n.get("components", [])
                      if c["health"] != "none"]) or "-", n.get("risk", "-"), len(n["replicas"]),
          (n["reason"] + (f" [{n['reason_user']}]" if n["reason_user"] else "")) or "-"]
         for n in rows],
    )
    _footer(len(rows), total, "nodes")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    params = {"node": args.node, "job": args.job, "since": parse_since(args.since)}
    if args.limit <= 1000:
        rows = ask(args, "history", {**params, "limit": args.limit})
    else:  # more than one answer holds: find where the newest N start, then page forward
        window = ask(args, "history", {**params, "window": args.limit})
        rows, _ = ask_list(args, "history", {**params, **window}, limit=None)
        if args.json:  # written out page by page as it came
            return 0
    if args.json:
        render.as_json(rows)
        return 0
    render.table(
        ["ID", "TIME", "KIND", "SOURCE", "NODE", "JOB", "GPU/TARGET", "REASON"],
        [[e["id"], render.fmt_time(e["ts"]), e["kind"], e["source"], e["node"], e["job_id"],
          _event_target(e), e["reason"]] for e in rows],
    )
    return 0


def _event_target(event: dict[str, Any]) -> str | None:
    """The GPU an event is about, or the port or mount point of a port or mount verdict."""
    if event.get("gpu_uuid"):
        return render.short_uuid(event["gpu_uuid"])
    evidence = event.get("evidence")
    if event["kind"] in ("port_verdict", "mount_verdict") and isinstance(evidence, dict):
        target = evidence.get("target")
        return str(target) if target is not None else None
    return None


def cmd_deadletters(args: argparse.Namespace) -> int:
    rows = ask(args, "deadletters", {"limit": args.limit})
    if args.json:
        render.as_json(rows)
        return 0
    render.table(
        ["ID", "TIME", "SUBJECT", "SEQ", "DELIVERIES", "ERROR", "DATA"],
        [[r.get("id"), render.fmt_time(r.get("ts")), r.get("subject"), r.get("stream_seq"),
          r.get("deliveries"), r.get("error"), bounds.shorten(str(r.get("data_preview") or ""),
                                                              60) or None]
         for r in rows],
    )
    return 0


def cmd_gpu_release(args: argparse.Namespace) -> int:
    data = ask(args, "gpu_release", {"uuid": args.uuid})
    if args.json:
        render.as_json(data)
        return 0
    render.say(f"GPU {data['uuid']} released from {data['node']} (event {data['event']}); "
               "the next node to report it owns it")
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    nodes, pairs = parse_scontrol_args(args.words)
    reason = args.reason or pairs.get("reason", "")
    if not nodes:
        raise ValueError('usage: marduk drain NODES reason="..."')
    if not reason.strip():
        raise ValueError('a reason is required: marduk drain NODES reason="..."')
    data = ask(args, "drain", {"nodes": nodes, "reason": reason,
                               "gpu": args.gpu or pairs.get("gpu")})
    if args.json:
        render.as_json(data)
        return 0
    for node, outcome in data["slurm"].items():
        render.say(f"{node}: drain {outcome}")
    render.say(f"{data['leaves']} replica(s) told to leave; events {data['events']}")
    return 0 if all(v == "done" or v.startswith("queued") for v in data["slurm"].values()) else 1


def cmd_resume(args: argparse.Namespace) -> int:
    nodes, _ = parse_scontrol_args(args.words)
    if not nodes:
        raise ValueError("usage: marduk resume NODES [--force] [--check CMD]")
    check = None
    if args.check == ON_NODE:
        passed = run_node_check(args, nodes)
        if passed is None:
            render.error("interrupted: the check was cancelled on the nodes and its processes "
                         "stopped; nothing was resumed")
            return EXIT_INTERRUPTED
        if not passed:
            render.error("the check failed; not resumed (see marduk history)")
            return 1
    elif args.check:
        result = run_local_check(args.check, nodes, args.check_timeout)
        if result is None:
            render.error("interrupted: the check and everything it started were stopped; "
                         "nothing was resumed")
            return EXIT_INTERRUPTED
        check = result.evidence()
    data = ask(args, "resume", {"nodes": nodes, "force": args.force, "check": check})
    if args.json:
        render.as_json(data)
        return 0
    for node, outcome in data["slurm"].items():
        render.say(f"{node}: resume {outcome}")
    return 0 if all(v == "done" or v.startswith("queued") for v in data["slurm"].values()) else 1


ON_NODE = "\0on-node"  # `--check` without a command: each node's agent checks its node


def run_node_check(args: argparse.Namespace, nodes: str) -> bool | None:
    """Ask each node's agent (through the controller) to check its node; print each outcome.
    True when every node passed, None when Ctrl-C (or SIGTERM) cancelled it, on the nodes
    too."""
    from marduk_slurm.domain.node_check import new_check_id

    check_id = new_check_id()
    timeout = args.check_timeout_on_node

    async def check(connection: Session) -> Any:
        return await connection.ask("node_check", {"nodes": nodes, "check_id": check_id,
                                                   "timeout_s": timeout})

    async def run() -> Any:
        import signal

        s = cli_settings(args)
        async with Session(resolve_nats_url(s, args.nats_url), creds=resolve_creds(s),
                           timeout_s=timeout + 15.0,
                           actor=os.environ.get("MARDUK_ACTOR", _actor())) as connection:
            loop = asyncio.get_running_loop()
            task = asyncio.ensure_future(check(connection))
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, task.cancel)
            try:
                return await task
            except asyncio.CancelledError:
                await connection.ask("node_check_cancel", {"check_id": check_id})
                return None
            finally:
                for signum in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(signum)

    render.say(f"checking {nodes} on the nodes (at most {timeout:g} s; Ctrl-C cancels)")
    data = asyncio.run(run())
    if data is None:
        return None
    for node, ev in data["checks"].items():
        verdict = "passed" if ev.get("returncode") == 0 else "FAILED"
        render.say(f"{node}: check {verdict} in {ev.get('duration_s', 0):.1f} s: "
                   f"{ev.get('output', '')}")
    return bool(data["passed"])


def run_local_check(template: str, nodes: str, timeout_s: float) -> CheckResult | None:
    """Run the operator's --check here, once for the node list ({node} -> the hostlist), for
    at most `timeout_s`; its result goes to the controller, which records it and resumes only
    if it passed. Ctrl-C (or SIGTERM) stops the check's whole process group and returns None."""
    result = asyncio.run(_check_or_interrupt(template, nodes, timeout_s))
    if result is not None:
        render.say(f"check '{result.command}': "
                   + (f"exit {result.returncode}" if result.returncode is not None
                      else result.output)
                   + f" in {result.duration_s:.1f} s")
    return result


async def _check_or_interrupt(template: str, nodes: str, timeout_s: float
                              ) -> CheckResult | None:
    import signal

    from marduk_slurm.adapters.health_check import run_check

    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(run_check(template, nodes, timeout_s=timeout_s))
    # The check runs in its own session, out of reach of the terminal's Ctrl-C: on SIGINT
    # the task is cancelled, and run_check stops the check's process group.
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        return None
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def cmd_inject(args: argparse.Namespace) -> int:
    if args.gpu is not None:
        if (args.xid is None and not args.reset) or args.fault is not None:
            raise ValueError("--gpu takes --xid or --reset (not --fault)")
        req = {"node": args.node, "gpu": args.gpu, "xid": args.xid,
               "force": args.force or None, "reset": args.reset or None}
        what = f"gpu {args.gpu}"
    else:
        if args.fault is None or args.xid is not None or args.reset or args.force:
            raise ValueError("--port and --mount take --fault (not --xid, --reset, --force)")
        component = "port" if args.port is not None else "mount"
        req = {"node": args.node, component: args.port or args.mount, "fault": args.fault}
        what = f"{component} {args.port or args.mount}"
    data = ask(args, "inject", req)
    if args.json:
        render.as_json(data)
        return 0
    done = ("reset" if args.reset else f"injected xid {args.xid} on" if args.gpu is not None
            else f"injected {args.fault} on")
    render.say(f"{done} {args.node} {what} via {data['via']}: "
               f"{data.get('action', '?')} ({data.get('reason', '')})")
    return 0


def add_parsers(sub: Any, add: Any) -> None:
    add(sub, "status", "summary of the controller, nodes, replicas and Slurm actions",
        "marduk status --json", cmd_status)
    p = add(sub, "replicas", "the DR mapping: job, step, replica, group, node, GPU UUIDs",
            "marduk replicas --job 1234", cmd_replicas)
    p.add_argument("--job", type=arguments.job_id, help="only this Slurm job id")
    p.add_argument("--node", type=arguments.node_name, help="only replicas on this node")
    p.add_argument("--all", action="store_true", help="include replicas that left")
    p.add_argument("--limit", type=arguments.count, default=None,
                   help=f"at most N rows (default {HUMAN_LIMIT}, all with --json; 0: all)")
    p = add(sub, "nodes", "nodes: Slurm state, drain reason and who set it, GPUs, replicas",
            "marduk nodes n3", cmd_nodes)
    p.add_argument("node", nargs="?", type=arguments.node_name, help="one node")
    p.add_argument("--limit", type=arguments.count, default=None,
                   help=f"at most N rows (default {HUMAN_LIMIT}, all with --json; 0: all)")
    p = add(sub, "history", "the failure and decision history, oldest first",
            "marduk history --node n2 --since 2h", cmd_history)
    p.add_argument("--node", type=arguments.node_name, help="only events about this node")
    p.add_argument("--job", type=arguments.job_id, help="only events about this job")
    p.add_argument("--since", help="30m, 2h, 1d, unix seconds or ISO time")
    p.add_argument("--limit", type=arguments.limit, default=200,
                   help="newest N events (default 200, at most 100000)")
    p = add(sub, "deadletters", "messages the controller could not ingest and set aside, "
            "newest first", "marduk deadletters --limit 20", cmd_deadletters)
    p.add_argument("--limit", type=arguments.limit, default=100,
                   help="newest N dead letters (default 100)")
    p = add(sub, "gpu-release", "forget which node a GPU belongs to (after moving a board)",
            "marduk gpu-release GPU-5f0c...", cmd_gpu_release)
    p.add_argument("uuid", type=arguments.gpu_id, help="the GPU UUID")
    p = add(sub, "drain", "drain nodes in Slurm and tell their replicas to leave",
            'marduk drain n[3-4] reason="swap GPU"', cmd_drain)
    p.add_argument("words", nargs="*", metavar='NODES reason="..."',
                   help="a hostlist (n[3-4]) or several node names (n3 n4), and the reason")
    p.add_argument("--reason", type=arguments.reason, help="why (the same as reason=...)")
    p.add_argument("--gpu", type=arguments.gpu_id,
                   help="the GPU UUID this drain is about, for the record")
    p = add(sub, "resume", "resume nodes that marduk drained (others only with --force)",
            'marduk resume n3 --check "ssh {node} nvidia-smi -q -d ECC"', cmd_resume)
    p.add_argument("words", nargs="+", metavar="NODES",
                   help="a hostlist (n[3-4]) or several node names (n3 n4)")
    p.add_argument("--force", action="store_true", help="also resume drains set by others")
    p.add_argument("--check", metavar="CMD", nargs="?", const=ON_NODE,
                   help="check first, resume only if the check passes. Alone: each node's "
                        "agent checks its node (reads every GPU now, then runs the site's "
                        "agent.health_check program), as Slurm's HealthCheckProgram would. "
                        "With CMD: run CMD here ({node} is replaced by NODES: n3, or n3,n4 for "
                        "several; pdsh -w {node} takes such a list); it must reach the nodes "
                        "outside Slurm (ssh {node} ...): Slurm starts no job on a drained node, "
                        "so `srun -w {node}` waits forever")
    p.add_argument("--check-timeout", type=arguments.seconds_in("--check-timeout", 1, 86400),
                   default=60.0, metavar="S",
                   help="stop CMD (its whole process group) after S seconds and refuse "
                        "the resume (default 60)")
    p.add_argument("--check-timeout-on-node",
                   type=arguments.seconds_in("--check-timeout-on-node", 1, 3600),
                   default=300.0, metavar="S",
                   help="the longest the agents' check may take (default 300; the agent's own "
                        "agent.health_check_timeout_s caps it)")
    p = add(sub, "inject", "inject a GPU, port or mount fault for drills, or reset a "
            "simulated GPU",
            "marduk inject --node n2 --gpu 1 --xid 79; marduk inject --node n2 --gpu 1 --reset; "
            "marduk inject --node n2 --port mlx5_0/1 --fault flap; "
            "marduk inject --node n2 --mount /lustre --fault hang", cmd_inject)
    p.add_argument("--node", required=True)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--gpu", help="GPU UUID or index on the node")
    where.add_argument("--port", help="a port the agent watches: mlx5_0/1 or eth0")
    where.add_argument("--mount", help="a mount point the agent probes: /lustre")
    p.add_argument("--fault", choices=sorted({*PORT_FAULTS, *MOUNT_FAULTS}),
                   help="with --port: down, flap (link lost agent.port_flap_changes times), "
                        "errors (error counters up by agent.port_error_drain); with --mount: "
                        "hang (the probe timed out), fail (EIO)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--xid", type=int)
    what.add_argument("--reset", action="store_true",
                      help="reset a simulated GPU, as nvidia-smi -r would a real one: one "
                           "lost after XID 79 is back on the bus")
    p.add_argument("--force", action="store_true",
                   help="when the agent does not answer, let the controller publish the "
                        "verdict even for real (not simulated) GPUs")
