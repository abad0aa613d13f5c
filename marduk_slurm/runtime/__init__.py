"""Runtime hooks that run inside every training process.

* `client`: `MardukClient` and `ReplicaLink`, the replica's side of the wire protocol; they do
  not import torch, so tools and simulations can use them on their own.
* `manager`: `ManagerMarduk`, torchft's Manager that registers with the controller, reports
  every step, applies live config revisions at agreed steps and leaves when told.
* `ddp`: `SafeDDP`, torchft's DDP with a gradient hook that survives a peer dying.
* `config`: `ConfigApplier`, the revision state of one replica and how changes are applied.

The torch-dependent names are imported on first use, so `import marduk_slurm.runtime.client`
works where torch is not installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from marduk_slurm.runtime.client import MardukClient, ReplicaLink
from marduk_slurm.runtime.config import ConfigApplier

if TYPE_CHECKING:
    from marduk_slurm.runtime.ddp import SafeDDP
    from marduk_slurm.runtime.manager import LeaveRequested, ManagerMarduk, ReplicaIdentity

__all__ = ["ConfigApplier", "LeaveRequested", "ManagerMarduk", "MardukClient", "ReplicaIdentity",
           "ReplicaLink", "SafeDDP"]

_LAZY = {"ManagerMarduk": "manager", "ReplicaIdentity": "manager", "LeaveRequested": "manager",
         "SafeDDP": "ddp"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        module = importlib.import_module(f"marduk_slurm.runtime.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
