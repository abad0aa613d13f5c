"""The sbatch script of a fault-tolerant TorchFT job, rendered from templates/torchft.sbatch.j2.

`sbatch_script()`'s signature is the parameter schema: `render()` takes a mapping of
parameters, rejects unknown names with the list of valid ones, and checks values (ValueError)
before anything is rendered. The template is jinja2 with StrictUndefined, so a name the
template uses but the code forgot to pass fails loudly instead of rendering as empty; every
value that lands in a shell command goes through the `q` filter (shlex.quote).

The rendered script allocates replica_groups * nodes_per_group nodes for training plus
spares * nodes_per_group spare nodes, starts the torchft lighthouse on the first node, one
srun step per replica group, and a bash supervisor that respawns failed groups according to
the runtime's exit codes (marduk_slurm.domain.exit_codes; docs/cli.md, `marduk sbatch`).
With hot_spares K (at most `spares`), K of the spare node sets run the training script as
standbys from the start; a group the controller sends away is assumed by one of them instead of
being respawned cold (docs/runtime.md, "Hot spares").
"""

from __future__ import annotations

import inspect
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import jinja2

from marduk_slurm.domain.exit_codes import EXIT_LEAVE, EXIT_STOP

TEMPLATE_NAME: Final = "torchft.sbatch.j2"
# A checkout's templates/ folder first (editable installs, development), then the copy an
# installed package puts under <prefix>/share/marduk-slurm/templates (pyproject data-files).
_PACKAGE = Path(__file__).resolve().parents[1]
TEMPLATE_DIRS: Final = (_PACKAGE.parent / "templates",
                        Path(sys.prefix) / "share" / "marduk-slurm" / "templates")


def default_template_dir() -> Path:
    return next((d for d in TEMPLATE_DIRS if (d / TEMPLATE_NAME).is_file()), TEMPLATE_DIRS[-1])

# sbatch options the template sets itself; passing them through would contradict it.
_RESERVED_SBATCH = frozenset({
    "nodes", "N", "ntasks", "n", "ntasks-per-node", "gres", "gpus", "gpus-per-node", "G",
    "job-name", "J", "partition", "p", "time", "t", "account", "A",
})
_SBATCH_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
# Values on #SBATCH lines are read by sbatch, not by a shell, so quoting cannot protect them.
_SBATCH_VALUE = re.compile(r"^[^\s'\"\\]*$")


def sbatch_script(
    train_script: str,
    train_args: Sequence[str] = (),
    *,
    replica_groups: int = 2,
    nodes_per_group: int = 1,
    gpus_per_node: int = 8,
    spares: int = 0,
    hot_spares: int = 0,
    max_restarts: int = 3,
    job_name: str = "marduk-torchft",
    partition: str | None = None,
    time: str | None = None,
    account: str | None = None,
    sbatch_args: Mapping[str, str] | None = None,
    launcher: str = "python3",
    lighthouse: str = "torchft_lighthouse",
    lighthouse_port: int = 29510,
    lighthouse_bind: str | None = None,
    min_replicas: int = 1,
    quorum_tick_ms: int = 25,
    join_timeout_ms: int = 10000,
    heartbeat_timeout_ms: int = 1000,
    lighthouse_proxy: bool = True,
    lighthouse_short_timeout_ms: int = 150,
    marduk: str = "marduk",
    master_port: int = 29600,
    poll_s: float = 1.0,
    assume_grace_s: int = 5,
    assume_dir: str | None = None,
    nats_url: str | None = None,
    template_dir: str | None = None,
) -> str:
    """Render the sbatch script.

    `launcher` is the command (shell words) that runs `train_script` on each node, e.g.
    "python3" or "torchrun --nproc-per-node=8"; empty runs the script itself. Group g's
    MASTER_PORT is master_port + g. `lighthouse_bind` defaults to the first node's NodeAddr.
    `max_restarts` counts respawns over the whole job, all groups together.
    With `lighthouse_proxy` (the default) the Managers reach `marduk lighthouse-proxy` on
    lighthouse_port (`marduk` is the command, shell words), which holds `heartbeat_timeout_ms`
    and drops a replica told to leave at once; the real lighthouse listens on loopback at
    lighthouse_port + 1 with `lighthouse_short_timeout_ms` (docs/architecture.md).
    `hot_spares` of the `spares` run standbys (MARDUK_STANDBY=1); up to `max_restarts` more
    standbys are started as free healthy spares allow, to keep `hot_spares` standing by.
    Standby s uses MASTER_PORT master_port + replica_groups + s. A group that ends while
    standbys stand by is given `assume_grace_s` for one to assume it before a cold respawn.
    `assume_dir` (default $SLURM_SUBMIT_DIR/.marduk-job-$SLURM_JOB_ID) must be visible from
    every node: standbys write their takeover markers there.
    """
    params = dict(locals())
    _check(params)
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(template_dir or str(default_template_dir())),
        undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True,
        trim_blocks=True, lstrip_blocks=True,
        # bash's ${#array[@]} would open a jinja comment with the default "{#".
        comment_start_string="<%#", comment_end_string="#%>",
    )
    env.filters["q"] = shlex.quote
    command = [*shlex.split(launcher), train_script, *train_args]
    return env.get_template(TEMPLATE_NAME).render(
        **params, command=command, marduk_command=shlex.split(marduk),
        total_nodes=(replica_groups + spares) * nodes_per_group,
        sbatch_lines=_sbatch_lines(params), exit_leave=EXIT_LEAVE, exit_stop=EXIT_STOP,
    )


def valid_parameters() -> dict[str, Any]:
    """Every parameter of `sbatch_script` with its default (`inspect.Parameter.empty` when
    it has none)."""
    return {name: p.default for name, p in inspect.signature(sbatch_script).parameters.items()}


def render(params: Mapping[str, Any]) -> str:
    """`sbatch_script(**params)`, but an unknown name is a ValueError listing the valid ones."""
    valid = valid_parameters()
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"unknown sbatch parameter(s) {', '.join(unknown)}; valid parameters: "
                         f"{', '.join(valid)}")
    missing = [n for n, d in valid.items() if d is inspect.Parameter.empty and n not in params]
    if missing:
        raise ValueError(f"missing sbatch parameter(s): {', '.join(missing)}")
    return sbatch_script(**params)


def coerce(name: str, text: str) -> Any:
    """A `KEY=VALUE` string from the command line as the type of the parameter's default."""
    valid = valid_parameters()
    if name not in valid:
        raise ValueError(f"unknown sbatch parameter {name}; valid parameters: "
                         f"{', '.join(valid)}")
    default = valid[name]
    if isinstance(default, bool):
        if text.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ValueError(f"{name}: expected true or false, got {text!r}")
        return text.lower() in ("1", "true", "yes", "on")
    for kind in (int, float):
        if isinstance(default, kind):
            try:
                return kind(text)
            except ValueError:
                raise ValueError(f"{name}: expected {kind.__name__}, got {text!r}") from None
    if isinstance(default, tuple):
        return tuple(shlex.split(text))
    return text


# -- validation -------------------------------------------------------------------------


def _check(p: Mapping[str, Any]) -> None:
    if not str(p["train_script"]).strip():
        raise ValueError("train_script must not be empty")
    for name in ("replica_groups", "nodes_per_group", "min_replicas", "quorum_tick_ms",
                 "join_timeout_ms", "heartbeat_timeout_ms", "lighthouse_short_timeout_ms"):
        _int_at_least(p, name, 1)
    if not isinstance(p["lighthouse_proxy"], bool):
        raise ValueError(f"lighthouse_proxy must be true or false, got {p['lighthouse_proxy']!r}")
    if p["lighthouse_proxy"]:
        if p["lighthouse_short_timeout_ms"] >= p["heartbeat_timeout_ms"]:
            raise ValueError(f"lighthouse_short_timeout_ms ({p['lighthouse_short_timeout_ms']}) "
                             f"must be below heartbeat_timeout_ms ({p['heartbeat_timeout_ms']})")
        if not shlex.split(p["marduk"]):
            raise ValueError("marduk (the command that runs the lighthouse proxy) is empty")
    for name in ("gpus_per_node", "spares", "hot_spares", "max_restarts", "assume_grace_s"):
        _int_at_least(p, name, 0)
    if p["hot_spares"] > p["spares"]:
        raise ValueError(f"hot_spares ({p['hot_spares']}) exceeds spares ({p['spares']}): "
                         "a standby runs on spare nodes")
    if not (isinstance(p["poll_s"], int | float) and p["poll_s"] > 0):
        raise ValueError(f"poll_s must be a positive number, got {p['poll_s']!r}")
    _port(p, "lighthouse_port", p["lighthouse_port"] + int(p["lighthouse_proxy"]))
    standby_ports = p["hot_spares"] + p["max_restarts"] if p["hot_spares"] else 0
    _port(p, "master_port", p["master_port"] + p["replica_groups"] + standby_ports - 1)
    lighthouse_ports = range(p["lighthouse_port"], p["lighthouse_port"] + 1 + p["lighthouse_proxy"])
    master_ports = range(p["master_port"], p["master_port"] + p["replica_groups"] + standby_ports)
    if set(lighthouse_ports) & set(master_ports):
        raise ValueError(f"lighthouse ports {lighthouse_ports.start}-{lighthouse_ports.stop - 1} "
                         f"overlap the MASTER_PORTs {master_ports.start}-{master_ports.stop - 1}")
    if p["min_replicas"] > p["replica_groups"]:
        raise ValueError(f"min_replicas ({p['min_replicas']}) exceeds replica_groups "
                         f"({p['replica_groups']})")
    for name in ("job_name", "partition", "time", "account"):
        if p[name] is not None:
            _sbatch_value(name, str(p[name]))
    if isinstance(p["train_args"], str):
        raise ValueError("train_args must be a list of arguments, not one string")
    for key, value in (p["sbatch_args"] or {}).items():
        _sbatch_arg(key, value)
    text = [p["train_script"], *p["train_args"], p["launcher"], p["lighthouse"], p["marduk"],
            p["nats_url"] or "", p["lighthouse_bind"] or "", p["assume_dir"] or ""]
    if any("\n" in str(t) or "\0" in str(t) for t in text):
        raise ValueError("arguments must not contain newlines or NUL characters")


def _int_at_least(p: Mapping[str, Any], name: str, low: int) -> None:
    value = p[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _port(p: Mapping[str, Any], name: str, highest: int) -> None:
    _int_at_least(p, name, 1)
    if highest > 65535:
        raise ValueError(f"{name} {p[name]} leaves the port range (highest used: {highest})")


def _sbatch_value(name: str, value: str) -> None:
    if not value or not _SBATCH_VALUE.match(value):
        raise ValueError(f"{name} {value!r}: empty, or has spaces, quotes or backslashes "
                         "(sbatch reads #SBATCH lines without a shell)")


def _sbatch_arg(key: str, value: str | None) -> None:
    if not _SBATCH_KEY.match(key):
        raise ValueError(f"sbatch argument {key!r} is not an option name")
    if key.replace("_", "-") in _RESERVED_SBATCH:
        raise ValueError(f"sbatch argument {key!r} is set by the template; use the "
                         "dedicated parameter (replica_groups, gpus_per_node, job_name, ...)")
    if value:
        _sbatch_value(f"sbatch argument {key}", value)


def _sbatch_lines(p: Mapping[str, Any]) -> list[str]:
    """The #SBATCH options after the fixed ones: named passthroughs, then sbatch_args."""
    lines = [f"--{name}={p[name]}" for name in ("partition", "time", "account")
             if p[name] is not None]
    for key, value in sorted((p["sbatch_args"] or {}).items()):
        option = key.replace("_", "-")
        lines.append(f"--{option}={value}" if value else f"--{option}")
    return lines
