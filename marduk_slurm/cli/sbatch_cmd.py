"""`marduk sbatch`: render the fault-tolerant TorchFT sbatch script, print it or submit it.

The rendering is marduk_slurm.domain.sbatch; this module only maps command-line options onto
its parameters and, with --submit, hands the script to sbatch through the Slurm runner.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from marduk_slurm.cli import render as out
from marduk_slurm.cli.client import resolve_nats_url
from marduk_slurm.errors import BusError

# The template engine (domain.sbatch, jinja2) and the settings are imported by the command
# itself, not when the parser is built: every other verb would pay for them.

EXAMPLE = ("marduk sbatch --replica-groups 4 --nodes-per-group 2 --gpus-per-node 8 --spares 2 "
           "--hot-spares 1 --time 24:00:00 train.py -- --lr 3e-4")

# Options that map one to one onto sbatch_script() parameters.
_DIRECT = ("replica_groups", "nodes_per_group", "gpus_per_node", "spares", "hot_spares",
           "max_restarts",
           "partition", "time", "account", "job_name", "heartbeat_timeout_ms", "launcher")


def key_value(text: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                add: Callable[..., argparse.ArgumentParser]) -> None:
    p = add(sub, "sbatch", "render (or submit) the sbatch script of a fault-tolerant TorchFT job",
            EXAMPLE, cmd_sbatch)
    p.add_argument("--replica-groups", type=int, required=True, metavar="N",
                   help="TorchFT replica groups")
    p.add_argument("--nodes-per-group", type=int, default=1, metavar="M",
                   help="nodes of one replica group (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, metavar="G",
                   help="GPUs requested on every node (default 8; 0: no GRES)")
    p.add_argument("--spares", type=int, default=0, metavar="S",
                   help="spare groups: S*M extra nodes to respawn on (default 0)")
    p.add_argument("--hot-spares", type=int, default=0, metavar="K",
                   help="of the spares, K run standby training processes (model built, "
                        "outside the quorum) that take a failed group's place in about one "
                        "quorum plus one heal (default 0: cold respawn)")
    p.add_argument("--max-restarts", type=int, default=3, metavar="K",
                   help="respawns allowed in the whole job (default 3)")
    p.add_argument("--heartbeat-timeout-ms", type=int, default=1000,
                   help="lighthouse heartbeat timeout (default 1000)")
    p.add_argument("--launcher", default="python3",
                   help='what runs the script on each node (default python3; e.g. '
                        '"torchrun --nproc-per-node=8"; "" runs it directly)')
    for name in ("partition", "time", "account", "job-name"):
        p.add_argument(f"--{name}", default=None, help=f"sbatch --{name}")
    p.add_argument("--sbatch-arg", type=key_value, action="append", default=[],
                   metavar="KEY=VALUE", help="another #SBATCH option, e.g. mem=0 or "
                                             "exclusive= (repeatable)")
    p.add_argument("--param", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="any other template parameter, e.g. lighthouse_port=29510 "
                        "(repeatable; an unknown KEY lists the valid ones)")
    p.add_argument("--submit", action="store_true",
                   help="submit with sbatch and print the job id instead of the script")
    p.add_argument("script", help="the training script, run on every node of each group")
    p.add_argument("train_args", nargs=argparse.REMAINDER,
                   help="arguments of the training script, after --")


def parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The sbatch_script() parameters that the command line asks for."""
    params: dict[str, Any] = {"train_script": args.script,
                              "train_args": tuple(_strip_dashes(args.train_args))}
    for name in _DIRECT:
        value = getattr(args, name)
        if value is not None:
            params[name] = value
    from marduk_slurm.domain import sbatch

    for key, value in args.param:
        params[key] = sbatch.coerce(key, value)
    if args.sbatch_arg:
        params["sbatch_args"] = dict(args.sbatch_arg)
    return params


def _strip_dashes(words: list[str]) -> list[str]:
    return words[1:] if words[:1] == ["--"] else words


def _default_nats_url(args: argparse.Namespace) -> str | None:
    """The controller's NATS URL for the job's runtime hooks, when one can be found (flag,
    settings, or a local controller's state directory); else None, and the hooks rely on
    MARDUK_NATS_URL from the SPANK plugin or the job's environment."""
    from marduk_slurm import settings as settings_mod

    flags = {"controller.state_dir": args.state_dir} if getattr(args, "state_dir", None) else {}
    s = settings_mod.from_environment(getattr(args, "config", None), flags)
    try:
        return resolve_nats_url(s, getattr(args, "nats_url", None))
    except BusError:
        return None


def _own_marduk() -> str:
    """The `marduk` the job runs (the lighthouse proxy): this one, by its full path, so that
    the job does not depend on the PATH a batch step starts with; plain `marduk` when this
    one is not an installed command."""
    here = Path(sys.executable).with_name("marduk")
    return str(here) if here.is_file() and os.access(here, os.X_OK) else "marduk"


def cmd_sbatch(args: argparse.Namespace) -> int:
    from marduk_slurm.domain import sbatch

    params = parameters(args)
    if "nats_url" not in params:
        params["nats_url"] = _default_nats_url(args)
    if "marduk" not in params:
        params["marduk"] = _own_marduk()
    script = sbatch.render(params)
    if not args.submit:
        if args.json:
            out.as_json({"parameters": params, "script": script})
        else:
            print(script, end="")
        return 0
    job_id = submit(script, _slurm_conf(args))
    if args.json:
        out.as_json({"job_id": job_id})
    else:
        print(job_id)
    return 0


def _slurm_conf(args: argparse.Namespace) -> str | None:
    from marduk_slurm import settings as settings_mod

    s = settings_mod.from_environment(getattr(args, "config", None))
    return s.slurm.conf or None


def submit(script: str, slurm_conf: str | None, timeout_s: float = 30.0) -> int:
    """sbatch the script (it copies the file at submission, so a temporary file will do)."""
    from marduk_slurm.adapters.slurm.commands import SlurmCommandRunner

    runner = SlurmCommandRunner(timeout_s=timeout_s, slurm_conf=slurm_conf)
    with tempfile.NamedTemporaryFile("w", prefix="marduk-", suffix=".sbatch") as f:
        f.write(script)
        f.flush()
        os.chmod(f.name, 0o700)
        result = asyncio.run(runner.run(["sbatch", "--parsable", f.name]))
    return int(result.stdout.strip().split(";")[0])
