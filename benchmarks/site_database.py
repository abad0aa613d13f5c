"""A busy site's controller database, written through the Store API before the controller
starts: replicas spread over jobs (8 per node, one GPU each), the nodes' GPU inventory (so
every verdict names a GPU the controller knows on its node) and a history of GPU events.

Used by query_load.py and big_queries.py; not a benchmark itself.
"""

from __future__ import annotations

import time
from pathlib import Path

from marduk_slurm.adapters.store import Store
from marduk_slurm.domain import messages as m

REPLICAS_PER_NODE = 8


def node_name(i: int) -> str:
    return f"node{i:05d}"


def gpu_uuid(replica: int) -> str:
    return f"GPU-{replica:08d}"


def fill(db: Path, *, replicas: int, jobs: int, events: int) -> float:
    """Write the rows in one transaction; returns the seconds it took."""
    t0 = time.perf_counter()
    store = Store(db)
    store.migrate()
    now = time.time()
    per_job = max(1, replicas // jobs)
    with store.transaction():
        for i in range(replicas):
            node = node_name(i // REPLICAS_PER_NODE)
            msg = m.ReplicaRegister(replica_id=f"job{i // per_job}_rg{i % per_job}:" + "u" * 36,
                                    job_id=i // per_job, replica_group=i % per_job, node=node,
                                    gpu_uuids=[gpu_uuid(i)],
                                    hyperparams={"lr": 0.001, "batch_size": 64})
            store.register_replica(msg, now)
            if i % REPLICAS_PER_NODE == 0:
                first = i
                store.upsert_gpus(node, [
                    m.GpuDescriptor(uuid=gpu_uuid(first + k), index=k, name="NVIDIA H100")
                    for k in range(REPLICAS_PER_NODE)], False, now)
        for i in range(events):
            store.add_event("gpu_verdict", now=now, source="agent",
                            node=node_name(i % max(1, replicas // REPLICAS_PER_NODE)),
                            gpu_uuid=gpu_uuid(i % max(1, replicas)), xid=13,
                            action="none",
                            reason="xid 13: graphics engine exception " + "x" * 120)
    store.close()
    return time.perf_counter() - t0
