"""NATS subjects of protocol version 1, in one place.

Subjects carry the node or job they are about, so that NATS permissions can scope an agent to
its node and a training job to its job (see docs/security.md).
"""

from __future__ import annotations

from typing import Final

PREFIX: Final = "marduk.v1"

# Durable events (JetStream stream EVENTS_STREAM): acknowledged only after the SQLite commit.
EVENTS_STREAM: Final = "MARDUK_EVENTS"
EVENTS_ALL: Final = f"{PREFIX}.evt.>"
# Heartbeats: core NATS, written behind in batches.
HEARTBEATS_ALL: Final = f"{PREFIX}.hb.>"
# The controller's event feed, for dashboards and `marduk history --follow`.
FEED: Final = f"{PREFIX}.feed.event"


def node_event(node: str, kind: str) -> str:
    """step_start, step_end, verdict, gpu_inventory, node_verdict from the agent of `node`."""
    return f"{PREFIX}.evt.node.{node}.{kind}"


def job_event(job_id: int, kind: str) -> str:
    """replica_register, replica_leave, config_ack, assume_ack from a replica of `job_id`."""
    return f"{PREFIX}.evt.job.{job_id}.{kind}"


def controller_event(controller_id: str, kind: str) -> str:
    """action_applied from the leading controller, for the standbys (docs/operations.md)."""
    return f"{PREFIX}.evt.ctl.{controller_id}.{kind}"


def heartbeat(job_id: int) -> str:
    return f"{PREFIX}.hb.{job_id}"


def node_health(node: str) -> str:
    """The agent's periodic health summary (core NATS, not persisted)."""
    return f"{PREFIX}.health.{node}"


def job_commands(job_id: int) -> str:
    """Config revisions broadcast to every replica of a job."""
    return f"{PREFIX}.cmd.job.{job_id}"


def replica_commands(job_id: int, replica_group: int) -> str:
    """Commands for one replica group of a job (leave)."""
    return f"{PREFIX}.cmd.replica.{job_id}.{replica_group}"


def replica_commands_all(job_id: int) -> str:
    """Every replica group's commands of a job (the lighthouse proxy listens for leaves)."""
    return f"{PREFIX}.cmd.replica.{job_id}.*"


def standby_commands(job_id: int) -> str:
    """Commands for the standbys (hot spares) of a job (assume); under the replica commands,
    so a job's credential already covers it."""
    return f"{PREFIX}.cmd.replica.{job_id}.standby"


def rpc(verb: str) -> str:
    """Operator request/reply (the CLI)."""
    return f"{PREFIX}.rpc.{verb}"


RPC_ALL: Final = f"{PREFIX}.rpc.*"


def job_rpc(job_id: int, verb: str) -> str:
    """Requests a training job may make about itself (fetch the latest config)."""
    return f"{PREFIX}.jobrpc.{job_id}.{verb}"


JOB_RPC_ALL: Final = f"{PREFIX}.jobrpc.*.*"


def agent_rpc(node: str, verb: str) -> str:
    """Requests to the agent of one node (fault injection through its own policy)."""
    return f"{PREFIX}.agent.{node}.{verb}"


def cred_rpc(node: str) -> str:
    """An agent asks the controller for the credential of a job running on its node."""
    return f"{PREFIX}.credrpc.{node}"


CRED_RPC_ALL: Final = f"{PREFIX}.credrpc.*"


# Which tokens of a subject name a node or job (masked when counting), by the token after
# the prefix: evt.node.<n>.<kind>, evt.job.<j>.<kind>, hb.<j>, health.<n>, jobrpc.<j>.<verb>,
# credrpc.<n>, cmd.job.<j>, cmd.replica.<j>.<g>.
_ID_TOKENS: Final = {"evt": (2,), "hb": (1,), "health": (1,), "jobrpc": (1,), "credrpc": (1,),
                     "cmd": (2, 3), "agent": (1,)}


def subject_class(subject: str) -> str:
    """A subject with its node, job and group tokens masked (``evt.node.*.verdict``), so that
    rejections can be counted per kind of subject without one counter per sender. Tokens a
    sender chooses freely are cut short."""
    tokens = subject.split(".")
    if tokens[:2] == PREFIX.split("."):
        tokens = tokens[2:]
    masked = _ID_TOKENS.get(tokens[0] if tokens else "", ())
    out = ["*" if i in masked else t[:32] for i, t in enumerate(tokens[:6])]
    return ".".join(out) or "?"
