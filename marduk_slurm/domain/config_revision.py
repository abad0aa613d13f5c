"""Live configuration of a running job: which changes are valid, at which step every replica
applies them, what a late joiner must apply, and how the batch is split across replica groups.

Pure functions over plain values; the controller (config_service) and the runtime hooks
(marduk_slurm.runtime.config) both use them, so both sides agree on the rules.

Keys a revision may change:

* ``lr``, ``weight_decay``: set on every optimizer param group.
* ``optim.<key>``: any other param-group key (``optim.momentum``, ``optim.betas``).
* ``batch_size``: the per-replica (micro) batch size.
* ``keep_global_batch``: hold the global batch constant as replica groups join and leave;
  ``true`` holds batch_size x participants as of the step it is applied, an integer holds that
  global batch, ``false`` stops holding it.
* ``max_steps``: training ends (exit 0) once this many steps are committed.
* ``timeout``, ``quorum_timeout``: torchft's Manager timeouts, in seconds (up to a day):
  ``timeout`` bounds each collective and ``should_commit`` (and the process group's
  reconfiguration), ``quorum_timeout`` each quorum. torchft reads both on every call, so a
  revision changes them for the next step on every group at once.
* ``checkpoint``: a path handed to the training script's registered checkpoint loader.
* ``user.<name>``: handed to the training script's handler registered under ``<name>``.

LR scaling rule: the gradient torchft averages is the mean over the global batch. While the
global batch is held constant, its statistics do not change, so the learning rate is left
alone. When it is not held and the number of participating groups changes, the global batch
changes with it; `scale_lr` gives the linear rule (lr proportional to the global batch, the
usual choice for SGD) and the square-root rule (the usual choice for Adam-type optimizers).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

SCALAR_KEYS: Final = ("lr", "weight_decay", "batch_size", "keep_global_batch", "max_steps",
                      "checkpoint", "timeout", "quorum_timeout")
TIMEOUT_KEYS: Final = frozenset({"timeout", "quorum_timeout"})
MAX_TIMEOUT_S: Final = 86400.0
# Keys that act once (load a file) rather than describe the job's state: a late joiner gets
# them only while they are still ahead of the job.
ONE_SHOT_KEYS: Final = frozenset({"checkpoint"})
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
MAX_KEYS: Final = 64

LrRule = Literal["none", "linear", "sqrt"]


def _number(key: str, value: Any, *, minimum: float, strict: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < minimum or (strict and number == minimum):
        op = ">" if strict else ">="
        raise ValueError(f"{key} must be a finite number {op} {minimum:g}, got {value!r}")
    return number


def _integer(key: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _validate_one(key: str, value: Any) -> Any:
    if key == "lr":
        return _number(key, value, minimum=0.0, strict=True)
    if key == "weight_decay":
        return _number(key, value, minimum=0.0, strict=False)
    if key == "batch_size":
        return _integer(key, value, minimum=1)
    if key == "max_steps":
        return _integer(key, value, minimum=0)
    if key in TIMEOUT_KEYS:
        seconds = _number(key, value, minimum=0.0, strict=True)
        if seconds > MAX_TIMEOUT_S:
            raise ValueError(f"{key} is in seconds, at most {MAX_TIMEOUT_S:g}, got {value!r}")
        return seconds
    if key == "keep_global_batch":
        if isinstance(value, bool):
            return value
        return _integer(key, value, minimum=1)
    if key == "checkpoint":
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"checkpoint must be a non-empty path, got {value!r}")
        return value
    prefix, _, suffix = key.partition(".")
    if prefix in ("optim", "user") and NAME_RE.match(suffix):
        if prefix == "optim" and suffix == "params":
            raise ValueError("optim.params cannot be changed")
        return value
    raise ValueError(f"unknown config key {key!r}; valid: {', '.join(SCALAR_KEYS)}, "
                     f"optim.<param-group key>, user.<name>")


def validate_changes(changes: Mapping[str, Any]) -> dict[str, Any]:
    """Check a revision's changes; returns them normalised (numbers as float or int).
    Raises ValueError naming the first bad key."""
    if not isinstance(changes, Mapping):
        raise ValueError("changes must be an object of key=value pairs")
    if not changes:
        raise ValueError("no changes given, e.g. lr=3e-4")
    if len(changes) > MAX_KEYS:
        raise ValueError(f"at most {MAX_KEYS} keys per revision")
    out: dict[str, Any] = {}
    for key, value in changes.items():
        if not isinstance(key, str):
            raise ValueError(f"config keys are strings, got {key!r}")
        out[key] = _validate_one(key, value)
    return out


# -- when to apply -------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaProgress:
    """What the last heartbeat of one replica said."""

    step: int
    step_time_ms: float
    last_seen: float


def estimated_step(r: ReplicaProgress, now: float) -> float:
    """Where the replica probably is now: its last step plus the steps since, at its pace."""
    if r.step_time_ms <= 0:
        return float(r.step)
    return r.step + max(0.0, now - r.last_seen) * 1000.0 / r.step_time_ms


def choose_apply_at_step(replicas: Sequence[ReplicaProgress], now: float, *,
                         lead_steps: int = 2, lead_s: float = 1.0,
                         max_lead_steps: int = 10_000) -> int:
    """A step ahead of the fastest replica by at least `lead_steps` steps and `lead_s` seconds
    (at the fastest pace seen), so that the command reaches every replica before any of them
    gets there. With no heartbeats yet, 0: whoever runs applies it at once."""
    if not replicas:
        return 0
    fastest = max(estimated_step(r, now) for r in replicas)
    paces = [r.step_time_ms for r in replicas if r.step_time_ms > 0]
    steps_for_time = math.ceil(lead_s * 1000.0 / min(paces)) if paces else 0
    lead = min(max(lead_steps, steps_for_time), max_lead_steps)
    return math.ceil(fastest) + lead


def latest_config(revisions: Sequence[Mapping[str, Any]], job_step: int
                  ) -> dict[str, Any] | None:
    """What a replica that joins, heals or reconnects must apply: the state keys of every
    revision folded in order, plus the one-shot keys of the newest revision while the job has
    not reached its step yet. Returns {revision, apply_at_step, changes} or None."""
    if not revisions:
        return None
    ordered = sorted(revisions, key=lambda r: int(r["revision"]))
    state: dict[str, Any] = {}
    for rev in ordered:
        state.update({k: v for k, v in rev["changes"].items() if k not in ONE_SHOT_KEYS})
    newest = ordered[-1]
    if int(newest["apply_at_step"]) > job_step:
        state.update({k: v for k, v in newest["changes"].items() if k in ONE_SHOT_KEYS})
    return {"revision": int(newest["revision"]), "apply_at_step": int(newest["apply_at_step"]),
            "changes": state}


# -- batch size and learning rate -----------------------------------------------------------


@dataclass(frozen=True)
class BatchPlan:
    """How one replica group runs a step: `accum_steps` micro-batches of `micro_batch`."""

    micro_batch: int
    accum_steps: int
    participants: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accum_steps * self.participants


def batch_plan(global_batch: int, participants: int, max_micro_batch: int) -> BatchPlan:
    """Split `global_batch` over `participants` groups without exceeding `max_micro_batch`
    per forward pass: fewer groups means more gradient-accumulation steps, never a bigger
    micro-batch. When the share does not divide evenly, the global batch is rounded up to the
    nearest size that does (at most participants x accum_steps - 1 samples more)."""
    if global_batch < 1 or max_micro_batch < 1:
        raise ValueError("global_batch and max_micro_batch must be >= 1")
    participants = max(1, participants)
    share = math.ceil(global_batch / participants)
    accum = math.ceil(share / max_micro_batch)
    micro = math.ceil(share / accum)
    return BatchPlan(micro_batch=micro, accum_steps=accum, participants=participants)


def scale_lr(lr: float, from_global_batch: int, to_global_batch: int, rule: LrRule = "linear"
             ) -> float:
    """The learning rate for a new global batch size: linear (lr x new/old), square root
    (lr x sqrt(new/old)) or none."""
    if from_global_batch < 1 or to_global_batch < 1:
        raise ValueError("global batch sizes must be >= 1")
    ratio = to_global_batch / from_global_batch
    if rule == "linear":
        return lr * ratio
    if rule == "sqrt":
        return lr * math.sqrt(ratio)
    if rule == "none":
        return lr
    raise ValueError(f"unknown lr scaling rule {rule!r}; valid: none, linear, sqrt")
