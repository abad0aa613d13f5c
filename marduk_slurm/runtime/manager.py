"""`ManagerMarduk`: torchft's Manager, reporting to and commanded by the Marduk controller.

It is a subclass of `torchft.Manager` that hooks the two calls every torchft training loop
makes once per step: `start_quorum` (from `Optimizer.zero_grad`) and `should_commit` (from
`Optimizer.step`). Between a commit and the next quorum is the step boundary where revisions
are applied and a commanded leave happens, so every replica changes at the same step.

Training never waits for Marduk: heartbeats go to a bounded buffer, commands are read from a
queue filled by the client's own thread, and the only bounded waits are the first config fetch
at start-up and the final flush when leaving.

A standby (hot spare, `ReplicaIdentity.standby_slot` set) is the exception by design: its
constructor waits, with the model built and the client connected, until the controller tells
it which replica group to assume; only then does torchft's Manager start, so that a standby
never heartbeats to the lighthouse and never counts in its quorum arithmetic.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torchft.manager import REPLICA_ID_KEY, Manager

from marduk_slurm.domain import config_revision as cr
from marduk_slurm.domain import messages as m
from marduk_slurm.domain.exit_codes import EXIT_DONE, EXIT_LEAVE, EXIT_STOP
from marduk_slurm.runtime.client import MardukClient
from marduk_slurm.runtime.config import ConfigApplier, HasParamGroups

log = logging.getLogger(__name__)

LEAVE_KEY = "marduk/leave_at"  # in the replica group's TCPStore, so all its ranks leave at once
QUORUM_POLL_S = 0.1  # how often a replica waiting for its quorum looks for a leave command
EXIT_AFTER_STUCK_QUORUM_S = 2.0  # a process leaving with a quorum call in flight ends by then


class LeaveRequested(SystemExit):
    """Raised at a step boundary after a commanded leave; the process exits with `code`."""


def replica_prefix(job_id: int, replica_group: int) -> str:
    """torchft appends ":<uuid>" and reads the group index from the trailing digits."""
    return f"job{job_id}_rg{replica_group}"


def standby_prefix(job_id: int, slot: int) -> str:
    """A standby's id before it assumes a group (no trailing group digits on purpose)."""
    return f"job{job_id}_sb{slot}"


def assume_marker(directory: Path, replica_group: int) -> Path:
    """The file a standby writes when it assumes `replica_group`; the sbatch supervisor reads
    it before respawning the group (templates/torchft.sbatch.j2)."""
    return directory / f"group-{replica_group}.assumed"


def _name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]", "-", text)[:128] or "unknown"


def local_gpu_uuids(node: str, rank: int) -> list[str]:
    """The UUID of the GPU this rank uses (CUDA_VISIBLE_DEVICES is honoured by torch's
    numbering); on CPU a stable `cpu:<node>:<rank>` so the mapping still has a row."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        uuid = str(props.uuid)
        return [uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"]
    return [f"cpu:{_name(node)}:{rank}"]


@dataclass(frozen=True)
class ReplicaIdentity:
    """Who this process is, for the controller's DR mapping."""

    job_id: int
    replica_group: int
    node: str
    step_id: int | None = None
    gpu_uuids: tuple[str, ...] = ()
    standby_slot: int | None = None  # a hot spare, until it assumes a group
    group_rank: int = 0
    group_world_size: int = 1

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ReplicaIdentity:
        """MARDUK_* first (exported by the SPANK plugin), then Slurm's and torchft's names.

        MARDUK_GPUS holds the step's GPU indices as Slurm prints them (or UUIDs, where a
        site's GRES reports those): indices name no GPU the controller can match, so they are
        left out and the controller joins the step's GPUs (resolved by the agent) instead."""
        def pick(*names: str) -> str:
            return next((env[n] for n in names if env.get(n, "") != ""), "")

        job, group = pick("MARDUK_JOB_ID", "SLURM_JOB_ID"), pick("MARDUK_REPLICA_GROUP",
                                                                  "REPLICA_GROUP_ID")
        step = pick("MARDUK_STEP_ID", "SLURM_STEP_ID")
        gpus = pick("MARDUK_GPUS")
        standby = pick("MARDUK_STANDBY") not in ("", "0")
        return cls(job_id=int(job or 0), replica_group=int(group or 0),
                   node=_name(pick("MARDUK_NODE", "SLURMD_NODENAME") or socket.gethostname()),
                   step_id=int(step) if step.isdigit() else None,
                   gpu_uuids=tuple(g for g in gpus.split(",") if g and not g.isdigit()),
                   standby_slot=int(pick("MARDUK_STANDBY_SLOT") or 0) if standby else None,
                   group_rank=int(pick("RANK") or 0),
                   group_world_size=int(pick("WORLD_SIZE") or 1))


def leave_grace(text: str) -> timedelta | None:
    """MARDUK_LEAVE_GRACE_S: seconds a replica told to leave may take to reach its step
    boundary (30 when unset; 0 waits forever)."""
    if not text.strip():
        return timedelta(seconds=30)
    value = float(text)
    if not 0 <= value <= 86400:  # NaN fails both comparisons
        raise ValueError(f"MARDUK_LEAVE_GRACE_S must be 0..86400 seconds, not {text!r}")
    return None if value == 0 else timedelta(seconds=value)


class ManagerMarduk(Manager):
    """torchft's Manager plus registration, per-step telemetry and live commands.

    Arguments beyond Manager's: `identity` (job, group, node), `client` (None: run as a plain
    Manager), `optimizer` (whose param groups revisions change; or `attach_optimizer` later),
    `batch_size` and `max_steps` (starting values a revision may change), `exit_on_leave`
    (raise `LeaveRequested` at the next boundary instead of only answering `should_stop`),
    `first_config_timeout` (bounded wait for the latest revision before the first step),
    `assume_dir` (where a standby writes its assume marker for the sbatch supervisor).

    With `identity.standby_slot` set, the constructor stands by (see the module docstring)
    and returns once the process is a replica of the group it was told to assume.
    """

    def __init__(self, *, identity: ReplicaIdentity, client: MardukClient | None = None,
                 optimizer: HasParamGroups | None = None, batch_size: int | None = None,
                 max_steps: int | None = None, exit_on_leave: bool = True,
                 first_config_timeout: timedelta = timedelta(seconds=2),
                 assume_dir: Path | None = None, **manager_kwargs: Any) -> None:
        self.config = ConfigApplier(batch_size=batch_size, max_steps=max_steps)
        if optimizer is not None:
            self.config.add_optimizer(optimizer)
        self.assumed_from: str | None = None  # the standby id this process started as
        if identity.standby_slot is not None:
            identity = self._stand_by(identity, client, assume_dir)
        manager_kwargs.setdefault("replica_id",
                                  replica_prefix(identity.job_id, identity.replica_group))
        super().__init__(**manager_kwargs)
        self.identity = identity
        self.client = client
        self.exit_on_leave = exit_on_leave
        self.full_replica_id: str = self._store.get(REPLICA_ID_KEY).decode()
        # torchft gives every rank of a group the same replica id; marduk's mapping is per
        # process (each rank has its own GPU), so ranks beyond a single one get a suffix.
        self.marduk_replica_id = (self.full_replica_id if self._group_world_size == 1
                                  else f"{self.full_replica_id}/{self._group_rank}")
        self.gpu_uuids = list(identity.gpu_uuids) or local_gpu_uuids(identity.node,
                                                                     self._group_rank)
        self.register_state_dict_fn("marduk", self.config.load_state_dict,
                                    self.config.state_dict)
        self.config.timeout_setter = self._set_timeout
        self._leave: tuple[str, int] | None = None  # (reason, exit code)
        self._leave_at: int | None = None
        self._exit_code: int | None = None
        self._loss: float | None = None
        self._allreduce_s = 0.0  # blocking waits noted by SafeDDP's hook this step
        # Any other caller of allreduce (torchft's DDP, FSDP, a training loop's own): when
        # this step's last allreduce was issued and when the last one completed.
        self._issued_last = 0.0
        self._done_last = 0.0
        self._last_commit_end: float | None = None
        self._step_started = 0.0
        self._participants = 0
        self.last_step_time_s = 0.0
        self.uncommitted_steps = 0  # steps whose work was thrown away (should_commit False)
        if client is not None:
            if self.assumed_from is not None:
                client.assume(identity.replica_group, self.marduk_replica_id,
                              self._registration)
            else:
                client.start(self.marduk_replica_id, self._registration)
                client.wait_first_config(first_config_timeout)
            self._boundary()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **kwargs: Any) -> ManagerMarduk:
        """The entry point: identity and NATS URL from the MARDUK_* environment. Without
        MARDUK_NATS_URL it trains as a plain torchft Manager (no telemetry, no commands)."""
        env = os.environ if env is None else env
        identity = ReplicaIdentity.from_env(env)
        client = None
        if env.get("MARDUK_NATS_URL"):
            client = MardukClient(env["MARDUK_NATS_URL"], identity.job_id,
                                  identity.replica_group, creds=env.get("MARDUK_NATS_CREDS", ""),
                                  leave_grace=leave_grace(env.get("MARDUK_LEAVE_GRACE_S", "")))
        if env.get("MARDUK_ASSUME_DIR"):
            kwargs.setdefault("assume_dir", Path(env["MARDUK_ASSUME_DIR"]))
        return cls(identity=identity, client=client, **kwargs)

    # -- user API --------------------------------------------------------------------------

    @property
    def replica_group(self) -> int:
        """The replica group this process trains as: for a standby, the one it assumed (read
        it after construction, not from REPLICA_GROUP_ID)."""
        return self.identity.replica_group

    def attach_optimizer(self, optimizer: HasParamGroups) -> None:
        """The (inner) optimizer whose param groups lr, weight_decay and optim.* change."""
        self.config.add_optimizer(optimizer)

    def register_handler(self, name: str, handler: Callable[[Any], None]) -> None:
        """Run `handler(value)` at the agreed step when a revision sets ``user.<name>``."""
        self.config.register_handler(name, handler)

    def unregister_handler(self, name: str) -> None:
        self.config.unregister_handler(name)

    def register_checkpoint_loader(self, loader: Callable[[str], None]) -> None:
        """`loader(path)` loads model and optimizer state at the agreed step. torchft's step
        is not touched, so it stays monotonic across replicas."""
        self.config.checkpoint_loader = loader

    def report_loss(self, loss: float) -> None:
        """The loss to put in this step's heartbeat (a float: calling .item() is yours)."""
        self._loss = float(loss)

    def note_allreduce(self, seconds: float) -> None:
        """Called by SafeDDP's hook with the time spent waiting for each allreduce."""
        self._allreduce_s += seconds

    def allreduce(self, tensor: Any, *args: Any, **kwargs: Any) -> Any:
        """torchft's allreduce, timed. A caller that does not wait at once (torchft's DDP
        overlaps its buckets with the backward pass; FSDP's managed process group) hides its
        wait inside the backward pass; what shows it is how long the step's allreduces take
        to complete after the last one was issued: a fast group waits for the slow one's
        last bucket, the slow one finds its peers ready."""
        self._issued_last = time.perf_counter()
        work = super().allreduce(tensor, *args, **kwargs)
        # The process group's own work: torchft's managed future runs its callbacks only
        # when someone waits, so it cannot tell when the allreduce completed. A dummy work
        # (after an error) has none; that step then shows no wait, and it does not commit.
        inner = getattr(work, "_work", None)
        if inner is not None:
            with contextlib.suppress(RuntimeError, AttributeError):
                inner.get_future().add_done_callback(self._allreduce_done)
        return work

    def _allreduce_done(self, _fut: Any) -> None:
        self._done_last = max(self._done_last, time.perf_counter())

    def _allreduce_wait_s(self) -> float:
        """This step's time waiting for peers: SafeDDP's own measure when it ran, else the
        tail of the overlapped allreduces."""
        if self._allreduce_s > 0 or not self._issued_last:
            return self._allreduce_s
        return max(0.0, self._done_last - self._issued_last)

    @property
    def timeouts(self) -> dict[str, float]:
        """torchft's timeouts in force now, in seconds (a revision may change them)."""
        return {"timeout": self._timeout.total_seconds(),
                "quorum_timeout": self._quorum_timeout.total_seconds()}

    def _set_timeout(self, key: str, seconds: float) -> None:
        """Applied at the revision's step. torchft reads `_quorum_timeout` on every quorum,
        and `_timeout` on every should_commit, checkpoint transfer and managed future. The
        collectives themselves are bounded by the process group's own timeout, which is set
        too: NCCL and the other accelerator groups take it from their next operation, Gloo
        when it is next configured (the next quorum change)."""
        value = timedelta(seconds=seconds)
        if key == "timeout":
            self._timeout = value
            with contextlib.suppress(NotImplementedError, AttributeError):
                self._pg.set_timeout(value)
        else:
            self._quorum_timeout = value
        log.info("torchft %s is now %g s", key, seconds)

    @property
    def max_steps(self) -> int | None:
        return self.config.max_steps

    @property
    def batch_size(self) -> int | None:
        return self.config.batch_size

    def batch_plan(self) -> cr.BatchPlan | None:
        """Micro-batch size and accumulation steps for the coming step (see docs/runtime.md)."""
        return self.config.batch_plan(self._participants or 1)

    def should_stop(self) -> bool:
        """True once max_steps are committed or a leave was commanded: end the loop, then
        `sys.exit(manager.finish())`."""
        self._boundary()
        return self._leave is not None or self._done()

    def stop(self, reason: str = "stopped") -> None:
        """Leave at the next boundary and tell the supervisor not to respawn (exit 76)."""
        self._leave = (reason, EXIT_STOP)

    def finish(self) -> int:
        """Leave cleanly and return the exit code for the process (see exit_codes)."""
        if self._exit_code is not None:
            return self._exit_code
        reason, code = self._leave or ("max_steps reached", EXIT_DONE)
        return self._leave_now(reason, code)

    # -- torchft hooks ---------------------------------------------------------------------

    def start_quorum(self, allow_heal: bool = True, shrink_only: bool = False,
                     timeout: timedelta | None = None) -> None:
        self._boundary()
        if self._leave is not None and self.exit_on_leave:
            raise LeaveRequested(self._leave_now(*self._leave))
        self._step_started = time.perf_counter()
        self._allreduce_s = 0.0
        self._issued_last = self._done_last = 0.0
        super().start_quorum(allow_heal=allow_heal, shrink_only=shrink_only, timeout=timeout)

    def should_commit(self, timeout: timedelta | None = None) -> bool:
        started = time.perf_counter()
        committed = super().should_commit(timeout)
        now = time.perf_counter()
        if not committed:
            self.uncommitted_steps += 1
        self.last_step_time_s = now - (self._last_commit_end or self._step_started)
        self._last_commit_end = now
        self._participants = self.num_participants()
        if self.client is not None:
            self.client.send_heartbeat(m.Heartbeat(
                replica_id=self.marduk_replica_id, job_id=self.identity.job_id,
                step=self.current_step(), step_time_ms=self.last_step_time_s * 1000.0,
                allreduce_ms=(self._allreduce_wait_s() + now - started) * 1000.0,
                participants=self._participants, quorum_id=max(self._quorum_id, 0),
                loss=self._loss, config_revision=self.config.revision, ts=time.time()))
        return committed

    def wait_quorum(self) -> None:
        """torchft's wait for the quorum, in slices: a leave that arrives while the quorum
        hangs is carried out at once. A replica told to leave is refused by the lighthouse
        proxy, and torchft's quorum call then only ends at `quorum_timeout` (60 s by
        default), with the training thread blocked here, inside its first allreduce, where
        no step boundary comes."""
        future = self._quorum_future
        if future is None:
            super().wait_quorum()  # torchft's own message for a wait without a quorum
            return
        while not concurrent.futures.wait([future], timeout=QUORUM_POLL_S).done:
            self._take_commands()
            if self._leave is not None and self.exit_on_leave:
                code = self._leave_now(*self._leave)
                if self.client is not None:
                    # At exit the interpreter joins torchft's quorum thread, still in its
                    # call: the process must not wait out quorum_timeout on its way out.
                    self.client.exit_within(timedelta(seconds=EXIT_AFTER_STUCK_QUORUM_S),
                                            code)
                raise LeaveRequested(code)
        future.result()

    def shutdown(self, wait: bool = True) -> None:
        if self._exit_code is None:  # _leave_now already shut torchft down
            super().shutdown(wait=wait)
        if self.client is not None:
            self.client.close()

    # -- internals -------------------------------------------------------------------------

    def _done(self) -> bool:
        return self.config.max_steps is not None and self.current_step() >= self.config.max_steps

    def _boundary(self) -> None:
        """Between two steps: take in commands, apply what is due, settle a leave."""
        self._take_commands()
        step = self.current_step()
        for cmd in self.config.due(step):
            self._apply(cmd, step)
        if self._group_world_size > 1:
            self._agree_on_leave(step)

    def _take_commands(self) -> None:
        """Revisions wait for their step; the first leave is noted."""
        if self.client is not None:
            for cmd in self.client.poll_commands():
                if isinstance(cmd, m.JobCommand):
                    self.config.offer(cmd)
                elif self._leave is None:
                    self._leave = (cmd.reason or "told to leave", EXIT_LEAVE)

    def _apply(self, cmd: m.JobCommand, step: int) -> None:
        try:
            self.config.apply(cmd, self._participants)
        except Exception as exc:  # a user handler or loader may raise anything: report it
            log.warning("revision %d failed at step %d: %s", cmd.revision, step, exc)
            if self.client is not None:
                self.client.send_ack(cmd.revision, step, ok=False, error=str(exc))
            return
        log.info("applied revision %d at step %d: %s", cmd.revision, step, cmd.changes)
        if self.client is not None:
            self.client.send_ack(cmd.revision, step)

    def _agree_on_leave(self, step: int) -> None:
        """Ranks of one group get the leave command at different moments; the first to see it
        names the next boundary in the group's store, and every rank leaves there."""
        if self._leave is not None and self._leave_at is None:
            # compare_set: only the first rank's step counts, a later one does not move it.
            self._store.compare_set(LEAVE_KEY, "",
                                    f"{step + 1}:{self._leave[1]}:{self._leave[0]}")
        if self._store.check([LEAVE_KEY]):
            at, code, reason = self._store.get(LEAVE_KEY).decode().split(":", 2)
            self._leave_at = int(at)
            self._leave = (reason, int(code)) if step >= self._leave_at else None

    def _leave_now(self, reason: str, code: int) -> int:
        """Order matters for the survivors: stop heartbeating to the lighthouse first (they
        are waiting for that heartbeat to age out), then report, then close."""
        step = self.current_step()
        self._exit_code = code
        Manager.shutdown(self, wait=False)
        if self.client is not None:
            self.client.send_leave(reason, code, step)
            if not self.client.flush(timedelta(seconds=2)):
                log.warning("leave not confirmed by NATS within 2 s; exiting anyway")
            self.client.close()
        log.info("leaving at step %d with exit code %d: %s", step, code, reason)
        return code

    def _stand_by(self, identity: ReplicaIdentity, client: MardukClient | None,
                  assume_dir: Path | None) -> ReplicaIdentity:
        """Register as a standby, heartbeat, and wait for the assume command; then write the
        marker, acknowledge, and return the identity of the assumed group. Told to leave
        instead (its node is being drained), it exits with EXIT_LEAVE: the job's supervisor
        starts a standby on a healthy spare."""
        if client is None:
            raise ValueError("a standby needs the controller (MARDUK_NATS_URL): nothing else "
                             "can assign it a replica group")
        slot = identity.standby_slot or 0
        # One id for every rank of the standby: the Slurm step, or a fresh one without it.
        suffix = f"s{identity.step_id}" if identity.step_id is not None else uuid.uuid4().hex[:12]
        unit = f"{standby_prefix(identity.job_id, slot)}:{suffix}"
        rank, world = identity.group_rank, identity.group_world_size
        standby_id = unit if world == 1 else f"{unit}/{rank}"
        gpus = list(identity.gpu_uuids) or local_gpu_uuids(identity.node, rank)

        def register() -> m.ReplicaRegister:
            return m.ReplicaRegister(
                replica_id=standby_id, job_id=identity.job_id, step_id=identity.step_id,
                replica_group=slot, group_rank=rank, group_world_size=world,
                node=identity.node, gpu_uuids=gpus, pid=os.getpid(),
                hyperparams=self.config.hyperparams(), config_revision=self.config.revision,
                standby=True, ts=time.time())

        client.start(standby_id, register, standby=True)
        log.info("standing by as %s on %s", standby_id, identity.node)
        while (cmd := client.wait_assignment(timedelta(seconds=1))) is None:
            client.send_heartbeat(m.Heartbeat(replica_id=standby_id, job_id=identity.job_id,
                                              step=0, ts=time.time()))
        if cmd.action == "leave":  # a node it waits on is drained: it could never train there
            log.info("standby %s stands down: %s", standby_id, cmd.reason)
            client.send_leave(cmd.reason or "told to stand down", EXIT_LEAVE, 0)
            if not client.flush(timedelta(seconds=2)):
                log.warning("leave not confirmed by NATS within 2 s; exiting anyway")
            client.close()
            raise SystemExit(EXIT_LEAVE)
        group = int(cmd.replica_group or 0)
        if assume_dir is not None and rank == 0:
            marker = assume_marker(assume_dir, group)
            tmp = marker.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(f"{slot} {identity.step_id if identity.step_id is not None else ''}"
                           f" {identity.node}\n")
            tmp.replace(marker)  # the supervisor never reads half a marker
        if rank == 0:
            client.send_assume_ack(cmd)
        log.info("standby %s assumes replica group %d: %s", standby_id, group, cmd.reason)
        self.assumed_from = unit
        return replace(identity, replica_group=group, standby_slot=None)

    def _registration(self) -> m.ReplicaRegister:
        """Built on the client's thread at every (re)connect: a snapshot of plain values."""
        ident = self.identity
        return m.ReplicaRegister(
            replica_id=self.marduk_replica_id, job_id=ident.job_id, step_id=ident.step_id,
            replica_group=ident.replica_group, group_rank=self._group_rank,
            group_world_size=self._group_world_size, node=ident.node,
            gpu_uuids=self.gpu_uuids,
            pid=os.getpid(), hyperparams=self.config.hyperparams(),
            config_revision=self.config.revision, step=self.current_step(), ts=time.time())

