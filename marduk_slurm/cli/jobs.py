"""Operator commands about a running job's configuration: `config set`, `config show`,
`checkpoint load`. Each asks the controller once and prints a table or JSON."""

from __future__ import annotations

import argparse
import json
from typing import Any

from marduk_slurm.cli import arguments, render
from marduk_slurm.cli.commands import ask


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


def _print_revision(data: dict[str, Any]) -> None:
    render.say(f"job {data['job']}: revision {data['revision']} applies at step "
               f"{data['apply_at_step']} ({data['replicas']} replica(s) running)")


def cmd_config_set(args: argparse.Namespace) -> int:
    data = ask(args, "config_set", {"job": args.job, "changes": parse_assignments(args.pairs)})
    if args.json:
        render.as_json(data)
    else:
        _print_revision(data)
    return 0


def cmd_checkpoint_load(args: argparse.Namespace) -> int:
    data = ask(args, "checkpoint_load", {"job": args.job, "path": args.path})
    if args.json:
        render.as_json(data)
    else:
        _print_revision(data)
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    data = ask(args, "config_show", {"job": args.job})
    if args.json:
        render.as_json(data)
        return 0
    render.say(f"job {data['job']}: latest revision {data['latest_revision']}")
    render.table(
        ["REV", "APPLY_AT", "CREATED", "ACTOR", "ACKED", "FAILED", "CHANGES"],
        [[r["revision"], r["apply_at_step"], render.fmt_time(r["created_at"]), r["actor"],
          r["acked"], r["failed"],
          " ".join(f"{k}={json.dumps(v)}" for k, v in sorted(r["changes"].items()))]
         for r in data["revisions"]],
    )
    print()
    render.table(
        ["GROUP", "RANK", "NODE", "STATE", "LAST_STEP", "REVISION", "CURRENT", "REPLICA"],
        [[r["replica_group"], r["group_rank"], r["node"], r["state"], r["last_step"],
          r["config_revision"], "yes" if r["current"] else "no", r["replica_id"]]
         for r in data["replicas"]],
    )
    return 0


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
