"""Daemon settings: one TOML file, then ``MARDUK_<SECTION>_<KEY>`` environment, then flags.

Each layer overrides the one before. Every effective value remembers where it came from, so
``marduk settings show`` can say it. An unknown section or key is an error that names the file
(or variable) and the key: a typo must never be silently ignored.

The schema is the dataclasses below; adding a setting is adding a field with a default and a
one-line comment (which becomes its help text in docs/configuration.md). Values are converted
and range-checked by msgspec from the field's type: a number carries its bounds as
`msgspec.Meta`, so NaN, infinities, negative intervals and absurd timeouts are refused where
they are read, with the source and key in the message.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, get_type_hints

import msgspec
from msgspec import Meta

from marduk_slurm.domain.gpu_health import FaultPolicy
from marduk_slurm.domain.node_health import NodeHealthPolicy
from marduk_slurm.errors import SettingsError

DEFAULT_PATH = Path("/etc/marduk/marduk.toml")
ENV_PREFIX = "MARDUK_"

HOUR_S = 3600.0
DAY_S = 24 * HOUR_S
YEAR_S = 365 * DAY_S

# Bounds shared by many settings. Every bound is finite, so NaN and infinities fail it too.
# A time limit of one call: positive; a call that takes more than an hour is hung.
Timeout = Annotated[float, Meta(gt=0.0, le=HOUR_S)]
# A period of a loop, or a window: positive (zero would spin), at most a day.
Period = Annotated[float, Meta(gt=0.0, le=DAY_S)]
# A wait that may be zero: at most a day.
Delay = Annotated[float, Meta(ge=0.0, le=DAY_S)]
# An NVIDIA XID; the driver's numbers are small, the bound only refuses nonsense.
Xid = Annotated[int, Meta(ge=0, le=65_535)]
# Bounds of one setting each; the upper ones catch a typo (an extra zero or three).
FlushMs = Annotated[int, Meta(ge=1, le=60_000)]
Restarts = Annotated[int, Meta(ge=0, le=1000)]
StragglerFactor = Annotated[float, Meta(ge=1.0, le=100.0)]  # below 1 everyone is slow
DeviationK = Annotated[float, Meta(ge=0.0, le=100.0)]
RiskScore = Annotated[int, Meta(ge=0, le=100)]  # domain/risk.py scores 0..100
StreamReplicas = Annotated[int, Meta(ge=1, le=5)]  # JetStream allows at most 5
Retention = Annotated[float, Meta(gt=0.0, le=10 * YEAR_S)]
GpuCount = Annotated[int, Meta(ge=0, le=1024)]
# A Slurm partition's name, as a key of a table (resume_check_by_partition).
PartitionName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}\Z")]
BufferSize = Annotated[int, Meta(ge=1, le=10_000_000)]
# Ports and mount points the agent watches (docs/node-health.md): an InfiniBand port as
# DEVICE/PORT, an Ethernet interface by name, "all" for every one found; absolute paths
# without "." or ".." parts. Checked in `validate`, which can say what a good one looks like.
WATCHED_NAMES = {
    "ib_ports": (re.compile(r"all|[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}/[0-9]{1,3}"),
                 "DEVICE/PORT (mlx5_0/1) or all"),
    "net_ports": (re.compile(r"all|[A-Za-z0-9_][A-Za-z0-9_.:@-]{0,14}"),
                  "an interface name (eth0) or all"),
    "mounts": (re.compile(r"/(?!.*(^|/)\.{1,2}(/|$))(?!.*//)[!-~]{0,255}"),
               "an absolute path without spaces, . or .. parts"),
}
WATCHED_NAMES["mounts_read_only"] = WATCHED_NAMES["mounts"]
MAX_WATCHED = 256  # entries of each of those lists
Threshold = Annotated[int, Meta(ge=1, le=1_000_000_000)]
# A controller's name: a NATS subject token and a consumer name, never starting like an option.
ControllerId = Annotated[str, Meta(pattern=r"^([A-Za-z0-9_][A-Za-z0-9_-]{0,63})?\Z")]
LeaseSeconds = Annotated[float, Meta(ge=1.0, le=60.0)]


@dataclasses.dataclass(frozen=True)
class ControllerSettings:
    state_dir: str = "/var/lib/marduk"  # SQLite database, embedded NATS store, nats.url
    database: str = ""  # default: <state_dir>/marduk.db
    log_level: str = "info"  # debug, info, warning, error
    heartbeat_flush_ms: FlushMs = 50  # write-behind period of heartbeats
    reconcile_interval_s: Period = 5.0  # how often Slurm state is read back
    step_grace_s: Delay = 30.0  # a reported step missing from Slurm for this long has ended
    outbox_retry_max_s: Period = 30.0  # longest wait between retries of a Slurm action
    leave_on_drain: bool = True  # tell replicas on a drained node to leave
    task_max_restarts: Restarts = 5  # crashes of one task within task_restart_window_s before exit
    task_restart_window_s: Period = 60.0  # the window for task_max_restarts
    watchdog: bool = True  # ping systemd's watchdog from the main loop when asked to
    http_listen: str = "127.0.0.1:9108"  # dashboard, JSON API and /metrics; empty: off
    straggler_policy: str = "report"  # report, evict, evict_and_drain; per job: marduk straggler
    straggler_factor: StragglerFactor = 1.5  # a straggler's work time exceeds this x the job median
    straggler_mad_k: DeviationK = 5.0  # ... and the median + this x robust deviation (1.4826 MAD)
    straggler_sustain_s: Delay = 3.0  # ... for this long before it is flagged (or cleared)
    risk_drain_threshold: RiskScore = 0  # drain a node when a GPU's risk score reaches it; 0: off
    id: ControllerId = ""  # this controller's name among leader and standbys; default: host name
    standby: bool = False  # a standby (--standby): its own event consumer; acts once it leads
    lease_s: LeaseSeconds = 2.0  # the leader's lease in NATS; a standby takes over when it lapses


@dataclasses.dataclass(frozen=True)
class NatsSettings:
    url: str = ""  # empty: start the embedded nats-server; several: nats://a,nats://b,...
    creds: str = ""  # NATS credentials file of this process
    connect_timeout_s: Timeout = 5.0  # time limit of one connection attempt
    request_timeout_s: Timeout = 10.0  # how long the CLI waits for the controller's answer
    stream_replicas: StreamReplicas = 1  # JetStream replicas of the events stream on a NATS cluster
    stream_max_age_s: Retention = 7 * DAY_S  # events stream retention
    auth: bool = False  # embedded server: users and subject permissions from <state_dir>/auth


@dataclasses.dataclass(frozen=True)
class SlurmSettings:
    backend: str = "auto"  # auto (pyslurm when importable), commands, pyslurm, none
    conf: str = ""  # SLURM_CONF for the Slurm commands; empty: Slurm's default
    command_timeout_s: Timeout = 10.0  # time limit of one Slurm command or API call
    reason_prefix: str = "marduk"  # drain reasons start with it; it marks drains Marduk set
    resume_check: str = ""  # command that must pass before a resume; {node} is replaced
    # The same per partition, {"gpu": "...", ...}: a node takes the command of its first
    # partition (in Slurm's order) named here, else resume_check. From the environment, JSON.
    resume_check_by_partition: dict[PartitionName, str] = dataclasses.field(
        default_factory=dict)
    resume_check_timeout_s: Period = 900.0  # time limit of resume_check


@dataclasses.dataclass(frozen=True)
class AgentSettings:
    node: str = ""  # this node's Slurm name; default: the short host name
    socket: str = "/run/marduk/agent.sock"  # where the SPANK plugin reports steps
    simulate_gpus: GpuCount = 0  # present N simulated GPUs instead of NVML
    poll_interval_s: Annotated[float, Meta(gt=0.0, le=HOUR_S)] = 5.0  # NVML health poll
    nvml_timeout_s: Timeout = 2.0  # time limit of one NVML call
    state_dir: str = "/var/lib/marduk-agent"  # steps.json: the journal of running steps
    log_level: str = "info"  # debug, info, warning, error
    allow_inject: bool = False  # let `marduk inject` feed synthetic XIDs on real NVML GPUs
    buffer_max: BufferSize = 10000  # reports kept in memory while NATS is away (oldest dropped)
    job_credentials_dir: str = ""  # write each job's NATS credential here; "" = off
    # `marduk resume NODES --check`: the agent reads every GPU now and, when this is set, runs
    # this program on its node too ({node} = the node's name), like Slurm's
    # HealthCheckProgram; exit 0 = healthy. Set here, never sent over the network.
    health_check: str = ""
    health_check_timeout_s: Timeout = 300.0  # the longest a check may run on the node
    # Node health beyond the GPU (docs/node-health.md): ports and mounts, judged like GPUs.
    node_health_interval_s: Period = 10.0  # how often ports are read and mounts probed
    sysfs_root: str = "/sys"  # where the port files are read
    ib_ports: list[str] = dataclasses.field(default_factory=list)  # mlx5_0/1 or "all"
    net_ports: list[str] = dataclasses.field(default_factory=list)  # eth0 or "all"
    mounts: list[str] = dataclasses.field(default_factory=list)  # stat+write+fsync probe
    mounts_read_only: list[str] = dataclasses.field(default_factory=list)  # stat probe
    mount_probe_timeout_s: Timeout = 10.0  # a probe (or a port read) longer than this: hung
    mount_probe_slow_s: Timeout = 2.0  # a probe longer than this is watched
    port_window_s: Period = 300.0  # port counters are judged by their growth in this window
    port_flap_changes: Threshold = 3  # link losses in the window that drain the node
    port_error_watch: Threshold = 10  # error counter increments in the window: watch
    port_error_drain: Annotated[int, Meta(ge=0, le=1_000_000_000)] = 1000  # drain; 0: never


@dataclasses.dataclass(frozen=True)
class PolicySettings:
    # XID -> action table (docs/gpu-health.md); unlisted XIDs mean "watch".
    drain_xids: list[Xid] = dataclasses.field(  # drain the node
        default_factory=lambda: [48, 64, 74, 79, 95, 119, 120]
    )
    reset_xids: list[Xid] = dataclasses.field(default_factory=list)  # reset the GPU
    app_xids: list[Xid] = dataclasses.field(  # an application fault: restart the replica
        default_factory=lambda: [13, 31, 43, 94]
    )
    ignore_xids: list[Xid] = dataclasses.field(default_factory=lambda: [63, 92])  # record only


SECTIONS: dict[str, type] = {
    "controller": ControllerSettings,
    "nats": NatsSettings,
    "slurm": SlurmSettings,
    "agent": AgentSettings,
    "policy": PolicySettings,
}


@dataclasses.dataclass(frozen=True)
class Settings:
    controller: ControllerSettings
    nats: NatsSettings
    slurm: SlurmSettings
    agent: AgentSettings
    policy: PolicySettings
    sources: Mapping[str, str]  # "section.key" -> "default" | file path | env var | "flag"

    def node_health_policy(self) -> NodeHealthPolicy:
        """The agent's port and mount thresholds as the domain's policy."""
        a = self.agent
        return NodeHealthPolicy(window_s=a.port_window_s, flap_changes=a.port_flap_changes,
                                error_watch=a.port_error_watch, error_drain=a.port_error_drain,
                                mount_slow_s=a.mount_probe_slow_s)

    def fault_policy(self) -> FaultPolicy:
        """The [policy] section as the domain's XID table (validated there)."""
        return FaultPolicy.from_settings(
            drain_xids=self.policy.drain_xids, app_xids=self.policy.app_xids,
            ignore_xids=self.policy.ignore_xids, reset_xids=self.policy.reset_xids,
        )

    @property
    def database_path(self) -> Path:
        db = self.controller.database
        return Path(db) if db else Path(self.controller.state_dir) / "marduk.db"

    def effective(self) -> dict[str, dict[str, Any]]:
        """Every value with its source, for `marduk settings show`."""
        out: dict[str, dict[str, Any]] = {}
        for section in SECTIONS:
            for key, value in dataclasses.asdict(getattr(self, section)).items():
                name = f"{section}.{key}"
                out[name] = {"value": value, "source": self.sources.get(name, "default")}
        return out


# The spellings of a bool in the environment (any case). msgspec itself takes only true, false,
# 1 and 0; yes/no/on/off are what people write in unit files and shells.
_BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True,
               "0": False, "false": False, "no": False, "off": False}


def _from_text(value: str, kind: Any) -> Any:
    """An environment or flag string shaped for msgspec: a bool word as a bool, a list as its
    comma-separated items, blanks around a number dropped (as int() and float() allow)."""
    # __origin__ is the bare type under Annotated[...] and list[...] alike.
    base = getattr(kind, "__origin__", kind)
    if base is bool:
        return _BOOL_WORDS.get(value.strip().lower(), value)
    if base is list:
        return [item.strip() for item in value.split(",") if item.strip()]
    if base is dict:  # a JSON object; anything else is left for msgspec to refuse
        try:
            return json.loads(value)
        except ValueError:
            return value
    if base in (int, float):
        return value.strip()
    return value


_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def describe(kind: Any) -> str:
    """A field's type in words with its whole range: "float > 0 and <= 3600", "bool",
    "list of int >= 0 and <= 65535" (msgspec names only the bound that failed)."""
    if getattr(kind, "__origin__", None) is list:
        return f"list of {describe(kind.__args__[0])}"
    if getattr(kind, "__origin__", None) is dict:
        return f"table of {describe(kind.__args__[0])} -> {describe(kind.__args__[1])}"
    base = getattr(kind, "__origin__", kind)
    bounds = [f"{op} {_number(getattr(meta, name))}"
              for meta in getattr(kind, "__metadata__", ()) if isinstance(meta, Meta)
              for name, op in _BOUNDS if getattr(meta, name) is not None]
    name = str(getattr(base, "__name__", base))
    return " and ".join([f"{name} {bounds[0]}", *bounds[1:]]) if bounds else name


def _item(err: msgspec.ValidationError) -> str:
    """Which list item failed, from msgspec's "... - at `$[1]`"; "" for a plain value."""
    _, _, path = str(err).replace("`", "").partition(" - at $")
    return f" (item {path})" if path else ""


def _convert(value: Any, kind: Any, where: str, *, from_text: bool) -> Any:
    """Check a TOML value (types as written), or convert an environment or flag value (strings
    become numbers and bools), against the field's type and bounds."""
    shaped = _from_text(value, kind) if from_text and isinstance(value, str) else value
    try:
        return msgspec.convert(shaped, kind, strict=not from_text)
    except msgspec.ValidationError as err:
        words = f" ({', '.join(_BOOL_WORDS)})" if from_text and kind is bool else ""
        raise SettingsError(
            f"{where}: expected {describe(kind)}{words}, got {value!r}{_item(err)}") from None


def _fields(section: str) -> dict[str, Any]:
    # include_extras keeps the Annotated bounds that msgspec checks.
    return get_type_hints(SECTIONS[section], include_extras=True)


def _apply(values: dict[str, dict[str, Any]], sources: dict[str, str], section: str,
           key: str, raw: Any, origin: str, *, from_text: bool) -> None:
    if section not in SECTIONS:
        raise SettingsError(f"{origin}: unknown section [{section}] (valid: {', '.join(SECTIONS)})")
    fields = _fields(section)
    if key not in fields:
        raise SettingsError(
            f"{origin}: unknown key {section}.{key} (valid: {', '.join(sorted(fields))})"
        )
    values.setdefault(section, {})[key] = _convert(raw, fields[key], f"{origin}: {section}.{key}",
                                                   from_text=from_text)
    sources[f"{section}.{key}"] = origin


def read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read: {exc.strerror}") from None


def load(path: Path | None = None, env: Mapping[str, str] | None = None,
         flags: Mapping[str, Any] | None = None) -> Settings:
    """Build settings from the file at `path` (if it exists, or must exist when given
    explicitly), the environment `env` and `flags` (``{"section.key": value}``)."""
    values: dict[str, dict[str, Any]] = {}
    sources: dict[str, str] = {}
    file_path = path if path is not None else DEFAULT_PATH
    if path is not None or DEFAULT_PATH.exists():
        for section, table in read_file(file_path).items():
            if not isinstance(table, dict):
                raise SettingsError(f"{file_path}: {section} must be a [section] table")
            if section not in SECTIONS:
                raise SettingsError(f"{file_path}: unknown section [{section}] "
                                    f"(valid: {', '.join(SECTIONS)})")
            for key, raw in table.items():
                _apply(values, sources, section, key, raw, str(file_path), from_text=False)
    for name, raw in sorted((env or {}).items()):
        parsed = _env_name(name)
        if parsed:
            _apply(values, sources, parsed[0], parsed[1], raw, f"${name}", from_text=True)
    for dotted, raw in (flags or {}).items():
        if raw is None:
            continue
        section, _, key = dotted.partition(".")
        _apply(values, sources, section, key, raw, "flag", from_text=True)
    built = {s: cls(**values.get(s, {})) for s, cls in SECTIONS.items()}
    settings = Settings(**built, sources=sources)
    validate(settings)
    return settings


# Variables that share the MARDUK_ prefix but are not settings: the job environment that the
# SPANK plugin and the sbatch template export to training processes.
_NOT_SETTINGS = {"JOB_ID", "STEP_ID", "NODE", "GPUS", "REPLICA_GROUP", "CONFIG", "ACTOR",
                 "TOKEN", "SETTINGS"}


def _env_name(name: str) -> tuple[str, str] | None:
    """Map MARDUK_SECTION_KEY to (section, key); None for variables that are not settings."""
    if not name.startswith(ENV_PREFIX):
        return None
    rest = name[len(ENV_PREFIX):]
    if rest in _NOT_SETTINGS:
        return None
    for section in SECTIONS:
        head = section.upper() + "_"
        if rest.startswith(head):
            return section, rest[len(head):].lower()
    return None


LOG_LEVELS = ("debug", "info", "warning", "error")
STRAGGLER_POLICIES = ("report", "evict", "evict_and_drain")
SLURM_BACKENDS = ("auto", "commands", "pyslurm", "none")


def validate(s: Settings) -> None:
    """Checks that types and bounds alone cannot express (those msgspec checked on reading)."""
    def where(key: str) -> str:
        return s.sources.get(key, "default")

    if s.controller.log_level not in LOG_LEVELS:
        raise SettingsError(f"{where('controller.log_level')}: controller.log_level must be one "
                            f"of {', '.join(LOG_LEVELS)}")
    if s.slurm.backend not in SLURM_BACKENDS:
        raise SettingsError(f"{where('slurm.backend')}: slurm.backend must be one of "
                            f"{', '.join(SLURM_BACKENDS)}")
    if s.controller.straggler_policy not in STRAGGLER_POLICIES:
        raise SettingsError(f"{where('controller.straggler_policy')}: controller.straggler_policy "
                            f"must be one of {', '.join(STRAGGLER_POLICIES)}")
    if s.controller.standby and not s.nats.url:
        raise SettingsError(f"{where('controller.standby')}: a standby controller needs "
                            "nats.url (the leader's NATS, not an embedded server of its own)")
    host, _, port = s.controller.http_listen.rpartition(":")
    if s.controller.http_listen and (not host or not port.isdigit() or int(port) > 65535):
        raise SettingsError(f"{where('controller.http_listen')}: controller.http_listen must be "
                            "HOST:PORT (e.g. 127.0.0.1:9108) or empty")
    if s.nats.url and not all(
            part.strip().startswith(("nats://", "tls://", "ws://", "wss://"))
            for part in s.nats.url.split(",")):
        raise SettingsError(f"{where('nats.url')}: nats.url must be one URL or several, "
                            "comma-separated, each starting with nats:// or tls://")
    if not s.slurm.reason_prefix.strip():
        raise SettingsError(f"{where('slurm.reason_prefix')}: must not be empty")
    a = s.agent
    if a.mount_probe_slow_s >= a.mount_probe_timeout_s:
        raise SettingsError(f"{where('agent.mount_probe_slow_s')}: agent.mount_probe_slow_s "
                            "must be below agent.mount_probe_timeout_s")
    if a.port_error_drain and a.port_error_drain < a.port_error_watch:
        raise SettingsError(f"{where('agent.port_error_drain')}: agent.port_error_drain must "
                            "be 0 (never) or at least agent.port_error_watch")
    both = set(a.mounts) & set(a.mounts_read_only)
    if both:
        raise SettingsError(f"{where('agent.mounts_read_only')}: {', '.join(sorted(both))} "
                            "in both agent.mounts and agent.mounts_read_only")
    for key, (pattern, what) in WATCHED_NAMES.items():
        if len(getattr(a, key)) > MAX_WATCHED:
            raise SettingsError(f"{where('agent.' + key)}: agent.{key}: more than "
                                f"{MAX_WATCHED} entries")
        for name in getattr(a, key):
            if not pattern.fullmatch(name):
                raise SettingsError(f"{where('agent.' + key)}: agent.{key}: {name[:80]!r} "
                                    f"is not {what}")


def from_environment(path: str | None, flags: Mapping[str, Any] | None = None) -> Settings:
    """What entry points call: the file given by --config (or the default), os.environ, flags."""
    return load(Path(path) if path else None, os.environ, flags)
