"""Schema of the controller's SQLite database, changed only by appending migrations.

Each migration is applied once, in order, inside one transaction, and recorded in
``schema_migrations``. Never edit a migration that has shipped: add the next one.
"""

from __future__ import annotations

from typing import Final

MIGRATIONS: Final[list[str]] = [
    # 1: the DR mapping, the history and the outbox.
    """
    CREATE TABLE nodes (
        name TEXT PRIMARY KEY,
        state TEXT NOT NULL DEFAULT 'unknown',      -- as Slurm last reported it
        flags TEXT NOT NULL DEFAULT '[]',           -- JSON list, e.g. ["DRAIN"]
        reason TEXT NOT NULL DEFAULT '',
        reason_user TEXT NOT NULL DEFAULT '',
        drained_by_marduk INTEGER NOT NULL DEFAULT 0,
        drain_event_id INTEGER,                     -- the decision that drained it
        simulated_gpus INTEGER NOT NULL DEFAULT 0,
        updated_at REAL NOT NULL
    );
    CREATE TABLE gpus (
        uuid TEXT PRIMARY KEY,
        node TEXT NOT NULL,
        idx INTEGER NOT NULL,
        name TEXT NOT NULL DEFAULT '',
        pci_bus_id TEXT NOT NULL DEFAULT '',
        health TEXT NOT NULL DEFAULT 'none',        -- last GpuAction
        health_reason TEXT NOT NULL DEFAULT '',
        updated_at REAL NOT NULL
    );
    CREATE INDEX gpus_node ON gpus(node, idx);
    CREATE TABLE jobs (
        job_id INTEGER PRIMARY KEY,
        first_seen REAL NOT NULL,
        last_seen REAL NOT NULL,
        config_revision INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE job_steps (
        job_id INTEGER NOT NULL,
        step_id INTEGER NOT NULL,
        node TEXT NOT NULL,
        gpu_indices TEXT NOT NULL DEFAULT '[]',
        gpu_uuids TEXT NOT NULL DEFAULT '[]',
        pid INTEGER NOT NULL DEFAULT 0,
        uid INTEGER NOT NULL DEFAULT 0,
        started_at REAL NOT NULL,
        ended_at REAL,
        exit_status INTEGER,
        PRIMARY KEY (job_id, step_id, node)
    );
    CREATE TABLE replicas (
        replica_id TEXT PRIMARY KEY,
        job_id INTEGER NOT NULL,
        step_id INTEGER,
        replica_group INTEGER NOT NULL,
        group_rank INTEGER NOT NULL DEFAULT 0,
        group_world_size INTEGER NOT NULL DEFAULT 1,
        node TEXT NOT NULL,
        pid INTEGER NOT NULL DEFAULT 0,
        state TEXT NOT NULL DEFAULT 'active',       -- active, leaving, left
        registered_at REAL NOT NULL,
        left_at REAL,
        leave_reason TEXT NOT NULL DEFAULT '',
        last_step INTEGER NOT NULL DEFAULT 0,
        step_time_ms REAL NOT NULL DEFAULT 0,
        allreduce_ms REAL NOT NULL DEFAULT 0,
        participants INTEGER NOT NULL DEFAULT 0,
        quorum_id INTEGER NOT NULL DEFAULT 0,
        loss REAL,
        config_revision INTEGER NOT NULL DEFAULT 0,
        last_seen REAL NOT NULL
    );
    CREATE INDEX replicas_job ON replicas(job_id, state);
    CREATE INDEX replicas_node ON replicas(node, state);
    -- The DR mapping: which replica uses which GPU, in which step, on which node.
    CREATE TABLE mapping (
        replica_id TEXT NOT NULL,
        gpu_uuid TEXT NOT NULL,
        job_id INTEGER NOT NULL,
        step_id INTEGER,
        node TEXT NOT NULL,
        since REAL NOT NULL,
        PRIMARY KEY (replica_id, gpu_uuid)
    );
    CREATE INDEX mapping_gpu ON mapping(gpu_uuid);
    CREATE INDEX mapping_node ON mapping(node);
    CREATE INDEX mapping_step ON mapping(job_id, step_id, node);
    CREATE TABLE hyperparams (
        replica_id TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,                        -- JSON
        revision INTEGER NOT NULL DEFAULT 0,
        updated_at REAL NOT NULL,
        PRIMARY KEY (replica_id, key)
    );
    CREATE TABLE config_revisions (
        job_id INTEGER NOT NULL,
        revision INTEGER NOT NULL,
        created_at REAL NOT NULL,
        actor TEXT NOT NULL DEFAULT '',
        apply_at_step INTEGER NOT NULL,
        changes TEXT NOT NULL,                      -- JSON object
        PRIMARY KEY (job_id, revision)
    );
    CREATE TABLE config_acks (
        job_id INTEGER NOT NULL,
        revision INTEGER NOT NULL,
        replica_id TEXT NOT NULL,
        applied_at_step INTEGER NOT NULL,
        ok INTEGER NOT NULL DEFAULT 1,
        error TEXT NOT NULL DEFAULT '',
        ts REAL NOT NULL,
        PRIMARY KEY (job_id, revision, replica_id)
    );
    -- The failure and decision history: every decision is a row.
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,
        kind TEXT NOT NULL,
        source TEXT NOT NULL DEFAULT '',            -- who or what: agent, operator, reconcile
        node TEXT,
        gpu_uuid TEXT,
        job_id INTEGER,
        replica_id TEXT,
        xid INTEGER,
        action TEXT,
        reason TEXT NOT NULL DEFAULT '',
        evidence TEXT NOT NULL DEFAULT '{}'         -- JSON
    );
    CREATE INDEX events_ts ON events(ts);
    CREATE INDEX events_node ON events(node, ts);
    CREATE INDEX events_job ON events(job_id, ts);
    -- Slurm actions waiting for Slurm to confirm them.
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,                         -- drain, resume
        node TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        event_id INTEGER,
        state TEXT NOT NULL DEFAULT 'pending',      -- pending, done, failed
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        last_error TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        done_at REAL
    );
    CREATE INDEX outbox_pending ON outbox(state, next_attempt_at);
    -- JetStream sequences already committed: a redelivered message is skipped, not re-applied.
    CREATE TABLE ingested (
        stream_seq INTEGER PRIMARY KEY,
        ts REAL NOT NULL
    );
    CREATE TABLE rejections (
        reason TEXT PRIMARY KEY,
        count INTEGER NOT NULL DEFAULT 0,
        last_at REAL NOT NULL,
        last_subject TEXT NOT NULL DEFAULT '',
        last_detail TEXT NOT NULL DEFAULT ''
    );
    """,
    # 2: drains due together with the same cause can share one Slurm call.
    """
    ALTER TABLE outbox ADD COLUMN batch_reason TEXT NOT NULL DEFAULT '';
    """,
    # 3: the trust boundary: poison messages kept aside, durable leave commands, GPUs bound
    # to the node that first reported them, rejections counted by subject class and kind.
    """
    CREATE TABLE dead_letters (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,
        subject TEXT NOT NULL,
        stream_seq INTEGER NOT NULL DEFAULT 0,
        deliveries INTEGER NOT NULL DEFAULT 0,
        error TEXT NOT NULL DEFAULT '',
        size INTEGER NOT NULL DEFAULT 0,
        data BLOB                                   -- the first 64 KiB of the message
    );
    CREATE TABLE leave_commands (
        replica_id TEXT PRIMARY KEY,
        job_id INTEGER NOT NULL,
        replica_group INTEGER NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        immediate INTEGER NOT NULL DEFAULT 0,
        event_id INTEGER,
        state TEXT NOT NULL DEFAULT 'pending',      -- pending, done
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        created_at REAL NOT NULL,
        done_at REAL,
        done_reason TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX leave_commands_pending ON leave_commands(state, next_attempt_at);
    CREATE INDEX events_inject ON events(json_extract(evidence, '$.inject_request_id'))
        WHERE kind = 'gpu_verdict';
    CREATE TABLE rejection_counts (
        subject TEXT NOT NULL,
        kind TEXT NOT NULL,
        cause TEXT NOT NULL,
        count INTEGER NOT NULL DEFAULT 0,
        last_at REAL NOT NULL,
        last_detail TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (subject, kind, cause)
    );
    """,
    # 4: hot spares. A replica row is a replica or a standby (state `standby` while ready,
    # `assuming` once a decision named it); the assume command is durable like a leave.
    """
    ALTER TABLE replicas ADD COLUMN role TEXT NOT NULL DEFAULT 'replica';
    CREATE TABLE assume_commands (
        standby_id TEXT PRIMARY KEY,                -- the standby's id, without a /rank
        job_id INTEGER NOT NULL,
        replica_group INTEGER NOT NULL,             -- the group it is to become
        reason TEXT NOT NULL DEFAULT '',
        event_id INTEGER,                           -- the standby_assigned event
        state TEXT NOT NULL DEFAULT 'pending',      -- pending, done
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        created_at REAL NOT NULL,
        done_at REAL,
        done_reason TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX assume_commands_pending ON assume_commands(state, next_attempt_at);
    CREATE INDEX assume_commands_group ON assume_commands(job_id, replica_group, state);
    """,
    # 5: a command to a standby is to assume a group, or to stand down (its node drained).
    """
    ALTER TABLE assume_commands ADD COLUMN action TEXT NOT NULL DEFAULT 'assume';
    """,
    # 6: health beyond the GPU: the latest verdict on each port and mount point of a node.
    """
    CREATE TABLE node_components (
        node TEXT NOT NULL,
        component TEXT NOT NULL,                    -- port, mount
        target TEXT NOT NULL,                       -- mlx5_0/1, eth0, /lustre
        health TEXT NOT NULL DEFAULT 'none',        -- last action: none, watch, drain_node
        health_reason TEXT NOT NULL DEFAULT '',
        event_id INTEGER,                           -- the verdict's event
        updated_at REAL NOT NULL,
        PRIMARY KEY (node, component, target)
    );
    """,
]
