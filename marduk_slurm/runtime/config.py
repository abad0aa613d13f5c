"""Applying config revisions at step boundaries, inside the training process.

`ConfigApplier` keeps the revisions a replica has received but not yet applied, hands out the
ones that are due at a step (`due`), and applies one revision's changes to the optimizer's
param groups, the batch settings, max_steps, the checkpoint loader or a user handler. It does
not import torch: an optimizer is anything with `param_groups` (a list of dicts).

Its `state_dict` travels with torchft's healing checkpoint (registered by ManagerMarduk under
the key "marduk"), so a replica that heals from a peer also takes over the peer's revision and
settings.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from marduk_slurm.domain import config_revision as cr
from marduk_slurm.domain import messages as m

log = logging.getLogger(__name__)


class HasParamGroups(Protocol):
    param_groups: list[dict[str, Any]]


class ConfigApplier:
    """The revision state of one replica and the code that applies changes."""

    def __init__(self, *, batch_size: int | None = None, max_steps: int | None = None) -> None:
        self.optimizers: list[HasParamGroups] = []
        self.handlers: dict[str, Callable[[Any], None]] = {}
        self.checkpoint_loader: Callable[[str], None] | None = None
        # Sets torchft's timeouts ("timeout" or "quorum_timeout", seconds): ManagerMarduk's.
        self.timeout_setter: Callable[[str, float], None] | None = None
        self.batch_size = batch_size
        self.global_batch: int | None = None  # held constant while set (keep_global_batch)
        self.max_steps = max_steps
        self.revision = 0
        self.values: dict[str, Any] = {}  # every state key applied so far, for healing
        self.pending: dict[int, m.JobCommand] = {}

    # -- registration ----------------------------------------------------------------------

    def add_optimizer(self, optimizer: HasParamGroups) -> None:
        self.optimizers.append(optimizer)

    def register_handler(self, name: str, handler: Callable[[Any], None]) -> None:
        """`handler(value)` runs at the agreed step when a revision sets ``user.<name>``."""
        if not cr.NAME_RE.match(name):
            raise ValueError(f"handler names are identifiers, got {name!r}")
        self.handlers[name] = handler

    def unregister_handler(self, name: str) -> None:
        self.handlers.pop(name, None)

    # -- revisions -------------------------------------------------------------------------

    def offer(self, cmd: m.JobCommand) -> None:
        """Keep a received revision until it is due (older or repeated ones are dropped)."""
        if cmd.revision > self.revision:
            self.pending[cmd.revision] = cmd

    def due(self, step: int) -> list[m.JobCommand]:
        """Revisions to apply before `step` runs, oldest first. One that arrives after its
        step (a replica that healed or lagged) is due at once."""
        ready = sorted((c for c in self.pending.values() if c.apply_at_step <= step),
                       key=lambda c: c.revision)
        for cmd in ready:
            del self.pending[cmd.revision]
        return ready

    def apply(self, cmd: m.JobCommand, participants: int) -> None:
        """Apply one revision. Raises ValueError (bad value, no handler, no loader) or what a
        user handler raises; the revision counts as applied either way, so that it is not
        retried at every step, and the ack reports the error."""
        if cmd.revision <= self.revision:
            return
        self.revision = cmd.revision
        for stale in [r for r in self.pending if r <= cmd.revision]:
            del self.pending[stale]
        changes = cr.validate_changes(cmd.changes)
        self.apply_values(changes, participants)
        self.values.update({k: v for k, v in changes.items() if k not in cr.ONE_SHOT_KEYS})

    def apply_values(self, changes: dict[str, Any], participants: int) -> None:
        for key, value in changes.items():
            self._apply_one(key, value, participants)

    def _apply_one(self, key: str, value: Any, participants: int) -> None:
        if key in ("lr", "weight_decay"):
            self._set_group_key(key, value)
        elif key.startswith("optim."):
            self._set_group_key(key[len("optim."):], value)
        elif key == "batch_size":
            self.batch_size = int(value)
        elif key == "max_steps":
            self.max_steps = int(value)
        elif key in cr.TIMEOUT_KEYS:
            if self.timeout_setter is None:
                raise ValueError(f"{key}: no torchft Manager attached (ManagerMarduk sets it)")
            self.timeout_setter(key, float(value))
        elif key == "keep_global_batch":
            self._keep_global_batch(value, participants)
        elif key == "checkpoint":
            if self.checkpoint_loader is None:
                raise ValueError("no checkpoint loader registered "
                                 "(ManagerMarduk.register_checkpoint_loader)")
            self.checkpoint_loader(str(value))
        elif key.startswith("user."):
            name = key[len("user."):]
            handler = self.handlers.get(name)
            if handler is None:
                raise ValueError(f"no handler registered for user.{name}")
            handler(value)

    def _set_group_key(self, key: str, value: Any) -> None:
        if not self.optimizers:
            raise ValueError(f"{key}: no optimizer attached (ManagerMarduk.attach_optimizer)")
        for opt in self.optimizers:
            for group in opt.param_groups:
                if key not in group:
                    raise ValueError(f"optimizer param groups have no key {key!r}")
                # Keep the type the optimizer uses (betas is a tuple, not a JSON list).
                group[key] = tuple(value) if isinstance(group[key], tuple) else value

    def _keep_global_batch(self, value: Any, participants: int) -> None:
        if value is False:
            self.global_batch = None
        elif value is True:
            if self.batch_size is None:
                raise ValueError("keep_global_batch=true needs batch_size")
            self.global_batch = self.batch_size * max(1, participants)
        else:
            self.global_batch = int(value)

    # -- reading ---------------------------------------------------------------------------

    def batch_plan(self, participants: int) -> cr.BatchPlan | None:
        """Micro-batch and accumulation steps for this step, or None when no batch size is
        known. While a global batch is held, fewer groups means more accumulation."""
        if self.batch_size is None:
            return None
        if self.global_batch is None:
            return cr.BatchPlan(self.batch_size, 1, max(1, participants))
        return cr.batch_plan(self.global_batch, participants, self.batch_size)

    def hyperparams(self) -> dict[str, Any]:
        """What the replica reports at registration: optimizer values and Marduk settings."""
        out: dict[str, Any] = {}
        if self.optimizers and self.optimizers[0].param_groups:
            group = self.optimizers[0].param_groups[0]
            for key in ("lr", "weight_decay", "momentum"):
                if isinstance(group.get(key), int | float):
                    out[key] = group[key]
        for key, value in (("batch_size", self.batch_size), ("max_steps", self.max_steps),
                           ("global_batch", self.global_batch)):
            if value is not None:
                out[key] = value
        out.update({k: v for k, v in self.values.items()
                    if k.startswith("user.") or k in cr.TIMEOUT_KEYS})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"revision": self.revision, "values": dict(self.values),
                "batch_size": self.batch_size, "global_batch": self.global_batch,
                "max_steps": self.max_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take over a healthy peer's settings when healing from it."""
        if int(state["revision"]) <= self.revision:
            return
        self.revision = int(state["revision"])
        for stale in [r for r in self.pending if r <= self.revision]:
            del self.pending[stale]
        try:
            self.apply_values(dict(state["values"]), participants=1)
        except ValueError as exc:  # a handler this process lacks: logged, the peer's values win
            log.warning("while taking over revision %d from a peer: %s", self.revision, exc)
        self.values = dict(state["values"])
        self.batch_size = state["batch_size"]
        self.global_batch = state["global_batch"]
        self.max_steps = state["max_steps"]
