"""SQLite adapter (sqlite-utils, WAL): the controller's source of truth.

`Store` is the one class callers use; its methods are grouped by subject in `store`
(history, nodes, GPUs), `mapping` (steps, replicas, the DR mapping), `outbox` (pending Slurm
actions, config revisions) and `standbys` (hot spares and their assume
commands). The schema lives in `migrations`.

`StoreApi` (`api`) is the protocol the apps take: the methods they call, no more. Only the code
that opens a database names `Store`.
"""

from marduk_slurm.adapters.store.api import StoreApi
from marduk_slurm.adapters.store.store import Store

__all__ = ["Store", "StoreApi"]
