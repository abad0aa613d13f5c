"""Operator commands about a running job's configuration: `config set`, `config show`,
`checkpoint load`.

`config set` and `checkpoint load` wait (--wait, over the same connection) until every
replica that was running has acknowledged the revision, and exit 0 only when all applied it:
a replica that failed makes the command fail with the replica's own error text, and one that
has not answered by the deadline makes it fail as not confirmed. --no-wait returns once the
controller has recorded and sent the revision.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from marduk_slurm.cli import arguments, render
from marduk_slurm.cli.commands import ask, session

EXIT_NOT_APPLIED = 1
ACK_POLL_S = 0.2


def parse_value(text: str) -> Any:
    """`3e-4` -> 0.0003, `32` -> 32, `true` -> True, `[0.9,0.95]` -> a list; anything that is
    not JSON stays a string (paths, names)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_assignments(words: list[str]) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    for word in words:
        key, eq, value = word.partition("=")
        if not eq or not key:
            raise ValueError(f"expected key=value, got {word!r} (e.g. lr=3e-4 batch_size=32)")
        changes[key.strip()] = parse_value(value)
    if not changes:
        raise ValueError("usage: marduk config set JOB key=value ...")
    return changes


@dataclass
class AckOutcome:
    """Who of the replicas expected to apply a revision did, failed, or has not answered."""

    applied: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (replica, its error)
    pending: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)  # left the job before acknowledging

    def as_dict(self) -> dict[str, Any]:
        return {"applied": self.applied, "pending": self.pending, "gone": self.gone,
                "failed": [{"replica_id": r, "error": e} for r, e in self.failed]}


def ack_outcome(shown: dict[str, Any], revision: int, expected: list[str]) -> AckOutcome:
    """Sort `expected` by what `config show` says about `revision`. An ack of a later
    revision counts as applied (revisions are applied in order; a replica that missed one
    gets the folded latest)."""
    acks = {(a["replica_id"], r["revision"]): a for r in shown["revisions"]
            for a in r["acks"] if r["revision"] >= revision}
    present = {r["replica_id"] for r in shown["replicas"]}
    out = AckOutcome()
    for replica in expected:
        mine = [acks[key] for key in acks if key[0] == replica]
        exact = acks.get((replica, revision))
        if exact is not None and not exact["ok"]:
            out.failed.append((replica, exact["error"] or "failed (no reason given)"))
        elif exact is not None or any(a["ok"] for a in mine):
            out.applied.append(replica)
        elif replica not in present:
            out.gone.append(replica)
        else:
            out.pending.append(replica)
    return out


async def _new_revision(args: argparse.Namespace, verb: str, params: dict[str, Any]
                        ) -> tuple[dict[str, Any], AckOutcome | None]:
    """Ask for the revision; unless --no-wait, poll `config show` on the same connection
    until every expected replica answered or --wait ran out."""
    async with session(args) as connection:
        data = await connection.ask(verb, {**params, "force": args.force or None})
        expected = list(data.get("replica_ids") or [])
        if args.no_wait or not expected:
            return data, None
        deadline = time.monotonic() + args.wait
        while True:
            shown = await connection.ask("config_show", {"job": data["job"]})
            outcome = ack_outcome(shown, int(data["revision"]), expected)
            if not outcome.pending or time.monotonic() >= deadline:
                return data, outcome
            await asyncio.sleep(ACK_POLL_S)


def _set_revision(args: argparse.Namespace, verb: str, params: dict[str, Any]) -> int:
    data, outcome = asyncio.run(_new_revision(args, verb, params))
    if args.json:
        render.as_json({**data, "outcome": outcome.as_dict() if outcome else None})
    else:
        _print_revision(data, outcome)
    if outcome is None:
        return 0
    if outcome.failed:
        render.error(f"job {data['job']}: revision {data['revision']} failed on "
                     f"{len(outcome.failed)} of {len(data['replica_ids'])} replica(s):")
        for replica, error in outcome.failed:
            render.error(f"  {replica}: {error}")
        return EXIT_NOT_APPLIED
    if outcome.pending:
        render.error(f"job {data['job']}: revision {data['revision']} not confirmed within "
                     f"{args.wait:g} s by {len(outcome.pending)} replica(s) "
                     f"({', '.join(outcome.pending)}); it still applies when they reach step "
                     f"{data['apply_at_step']} (marduk config show {data['job']})")
        return EXIT_NOT_APPLIED
    return 0


def _print_revision(data: dict[str, Any], outcome: AckOutcome | None) -> None:
    head = f"job {data['job']}: revision {data['revision']}"
    if not data.get("replica_ids"):
        render.say(f"{head} recorded; no replica is running, it applies when one joins")
    elif outcome is None:
        render.say(f"{head} applies at step {data['apply_at_step']} "
                   f"({data['replicas']} replica(s) running; not waiting for them)")
    elif not outcome.failed and not outcome.pending:
        left = f", {len(outcome.gone)} left before applying it" if outcome.gone else ""
        render.say(f"{head} applied at step {data['apply_at_step']} by "
                   f"{len(outcome.applied)} replica(s){left}")
    else:
        render.say(f"{head} at step {data['apply_at_step']}: applied by "
                   f"{len(outcome.applied)}, failed on {len(outcome.failed)}, pending "
                   f"{len(outcome.pending)} of {len(data['replica_ids'])} replica(s)")


def cmd_config_set(args: argparse.Namespace) -> int:
    return _set_revision(args, "config_set", {"job": args.job,
                                              "changes": parse_assignments(args.pairs)})


def cmd_checkpoint_load(args: argparse.Namespace) -> int:
    return _set_revision(args, "checkpoint_load", {"job": args.job, "path": args.path})


def cmd_config_show(args: argparse.Namespace) -> int:
    data = ask(args, "config_show", {"job": args.job})
    if args.json:
        render.as_json(data)
        return 0
    render.say(f"job {data['job']}: latest revision {data['latest_revision']}")
    render.table(
        ["REV", "APPLY_AT", "CREATED", "ACTOR", "ACKED", "FAILED", "CHANGES", "ERROR"],
        [[r["revision"], r["apply_at_step"], render.fmt_time(r["created_at"]), r["actor"],
          r["acked"], r["failed"],
          " ".join(f"{k}={json.dumps(v)}" for k, v in sorted(r["changes"].items())),
          "; ".join(_errors(r)) or None]
         for r in data["revisions"]],
    )
    print()
    render.table(
        ["GROUP", "RANK", "NODE", "STATE", "LAST_STEP", "REVISION", "CURRENT", "REPLICA",
         "ERROR"],
        [[r["replica_group"], r["group_rank"], r["node"], r["state"], r["last_step"],
          r["config_revision"], _current(r), r["replica_id"], r.get("error") or None]
         for r in data["replicas"]],
    )
    return 0


def _errors(revision: dict[str, Any]) -> list[str]:
    """The distinct errors of a revision's failed acks (older controllers: from the acks)."""
    if "errors" in revision:
        return list(revision["errors"])
    return sorted({a["error"] for a in revision.get("acks", []) if not a["ok"]})


def _current(replica: dict[str, Any]) -> str:
    state = replica.get("config_state")
    if state == "failed":
        return f"no (revision {replica.get('failed_revision')} failed)"
    return "yes" if replica["current"] else "no"


def _group_help(parser: argparse.ArgumentParser) -> Any:
    def show(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2
    return show


def add_parsers(sub: Any, add: Any) -> None:
    p = add(sub, "config", "live configuration of a running job (set, show)",
            "marduk config set 1234 lr=3e-4 batch_size=32", None, json_flag=False)
    p.set_defaults(func=_group_help(p))
    csub = p.add_subparsers(dest="config_command", metavar="ACTION")
    q = add(csub, "set", "change hyperparameters of a running job; every replica applies "
            "them at the same step (keys: lr, weight_decay, optim.<key>, batch_size, "
            "keep_global_batch, max_steps, checkpoint, user.<name>)",
            "marduk config set 1234 lr=3e-4 optim.momentum=0.95 keep_global_batch=true",
            cmd_config_set)
    q.add_argument("job", type=arguments.job_id, help="Slurm job id")
    q.add_argument("pairs", nargs="+", metavar="key=value")
    _wait_options(q)
    q = add(csub, "show", "a job's config revisions, their acks, and which replica runs which",
            "marduk config show 1234 --json", cmd_config_show)
    q.add_argument("job", type=arguments.job_id, help="Slurm job id")
    p = add(sub, "checkpoint", "checkpoint actions on a running job (load)",
            "marduk checkpoint load 1234 /ckpt/step-5000.pt", None, json_flag=False)
    p.set_defaults(func=_group_help(p))
    csub = p.add_subparsers(dest="checkpoint_command", metavar="ACTION")
    q = add(csub, "load", "every replica loads PATH through its registered loader at the same "
            "step (torchft's step stays monotonic)",
            "marduk checkpoint load 1234 /ckpt/step-5000.pt", cmd_checkpoint_load)
    q.add_argument("job", type=arguments.job_id, help="Slurm job id")
    q.add_argument("path", type=arguments.path,
                   help="checkpoint path as the training processes see it")
    _wait_options(q)


def _wait_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait", type=arguments.seconds_in("--wait", 0, 3600), default=10.0,
                        metavar="S", help="wait up to S seconds for every running replica to "
                        "apply the revision; exit 1 if one failed or did not answer (default "
                        "10)")
    parser.add_argument("--no-wait", action="store_true",
                        help="return once the controller has recorded and sent the revision")
    parser.add_argument("--force", action="store_true",
                        help="also for a job the controller has not seen yet (about to "
                             "start): its replicas apply the revision when they join")
