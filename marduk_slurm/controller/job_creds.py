"""Job credentials for node agents: ``marduk.v1.credrpc.<node>`` (docs/security.md).

An agent that relays a job's first step asks here for that job's NATS credential; only the
agent of `<node>` may publish on that subject, so the node in the subject is who asks. It gets
the credential only while the controller's store has a step of that job on `<node>` that has
not ended: a node can obtain the credential of the jobs it runs, not of any job it names. The
agent relays the step_start (durable, through its outbox) before it asks, but the request is
a plain request and can overtake it, so a request with no step yet waits up to
`STEP_WAIT_S` for the step to be ingested. A refusal is counted and recorded as a
`job_credential_refused` event.

The controller issues the credential once per job and hands the same one to every node of the
job: passwords are kept only as bcrypt hashes in the roster, so the clear credential is kept
in `auth/jobs/<job>.json` (0600). A new user is added to the server config and the embedded
nats-server reloads it before the reply, so the job can connect as soon as the file lands.

Only the embedded server with `nats.auth = true` has a roster the controller may change; in
any other set-up every request gets an error reply that says so.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from marduk_slurm.adapters.bus import Bus, Incoming
from marduk_slurm.adapters.nats_auth import AuthDir, AuthError, Credentials
from marduk_slurm.adapters.nats_server import NatsServerProcess
from marduk_slurm.adapters.store import StoreApi
from marduk_slurm.controller.context import Context
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.errors import BusError, ProtocolError
from marduk_slurm.supervisor import unsubscribe_all

log = logging.getLogger(__name__)

NOT_EMBEDDED = ("job credentials are issued only with the embedded server and "
                "nats.auth = true; see docs/security.md")
RELOAD_WAIT_S = 5.0  # how long a new user may take to be accepted after the SIGHUP
# How long a request waits for its step_start to be ingested: well inside the agent's request
# timeout (10 s), long enough for a step_start relayed just before through JetStream.
STEP_WAIT_S = 2.0
STEP_POLL_S = 0.1
REFUSED_EVENT = "job_credential_refused"


class NoRunningStep(ValueError):
    """The asking node runs no step of the job (as far as the controller's store knows)."""


def job_and_uid(args: dict[str, Any]) -> tuple[str, int]:
    """(job id, uid) from a request's args; ValueError when they are not usable."""
    job, uid = args.get("job"), args.get("uid", -1)
    if isinstance(job, int) and not isinstance(job, bool) and job > 0:
        job = str(job)
    if not isinstance(job, str) or not job.isdigit() or len(job) > 20:
        raise ValueError(f"job must be a Slurm job id, got {job!r}")
    if isinstance(uid, bool) or not isinstance(uid, int):
        raise ValueError(f"uid must be an integer, got {uid!r}")
    return job, uid


class JobCredentialService:
    """Answers the agents' credential requests; `auth` and `server` are None when the
    controller does not run the embedded server with auth."""

    def __init__(self, ctx: Context, auth: AuthDir | None, server: NatsServerProcess | None,
                 *, step_wait_s: float = STEP_WAIT_S) -> None:
        self.ctx = ctx
        self.step_wait_s = step_wait_s
        self.auth = auth
        self.server = server
        self.stats: Counter[str] = Counter()
        self._lock = asyncio.Lock()  # one roster change and reload at a time
        self._inflight: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        subscription = await self.ctx.bus.subscribe(subjects.CRED_RPC_ALL, self.on_message)
        try:  # released at the end of the run, so a restarted run answers each request once
            await asyncio.Event().wait()
        finally:
            await unsubscribe_all([subscription])

    async def on_message(self, msg: Incoming) -> None:
        task = asyncio.create_task(self._answer(msg))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _answer(self, msg: Incoming) -> None:
        reply = await self.handle(msg.subject.split(".")[-1], msg.data)
        if msg.reply:
            try:
                await msg.respond(m.encode(reply))
            except Exception as exc:  # the agent may be gone; it asks again
                log.warning("could not answer %s: %s", msg.subject, exc)

    async def handle(self, node: str, data: bytes) -> m.Reply:
        if self.auth is None or self.server is None:
            self.stats["refused"] += 1
            return m.Reply(ok=False, error=NOT_EMBEDDED, error_kind="refused")
        try:
            job, uid = job_and_uid(m.decode_request(data).args)
            await self._check_step(node, int(job))
            async with self._lock:
                creds = await self._credential(job)
        except NoRunningStep as exc:
            await self._refuse(node, job, str(exc))
            return m.Reply(ok=False, error=str(exc), error_kind="no_step")
        except (ProtocolError, ValueError) as exc:  # AuthError is a ValueError
            self.stats["invalid"] += 1
            return m.Reply(ok=False, error=str(exc), error_kind="invalid")
        except (OSError, BusError) as exc:
            self.stats["failed"] += 1
            log.error("job credential for node %s failed: %s", node, exc)
            return m.Reply(ok=False, error=f"cannot issue the credential: {exc}",
                           error_kind="internal")
        log.info("job %s: credential handed to the agent of %s (uid %d)", job, node, uid)
        return m.Reply(ok=True, data={"job": job, "credentials": creds.to_json()})

    async def _check_step(self, node: str, job_id: int) -> None:
        """Return once the store has a running step of the job on `node`; NoRunningStep when
        none shows up within step_wait_s."""
        deadline = time.monotonic() + self.step_wait_s
        while True:
            if await self.ctx.db.read(lambda store: running_step_of(store, job_id, node)):
                return
            if time.monotonic() >= deadline:
                raise NoRunningStep(f"node {node} runs no step of job {job_id}: a job's "
                                    f"credential goes only to the nodes of its running steps")
            await asyncio.sleep(STEP_POLL_S)

    async def _refuse(self, node: str, job: str, why: str) -> None:
        self.stats["refused_no_step"] += 1
        self.ctx.stats["job_credential_refused"] += 1
        log.warning("job %s: credential refused to the agent of %s: %s", job, node, why)

        def record(store: StoreApi) -> int:
            return store.add_event(REFUSED_EVENT, now=time.time(), source="controller",
                                   node=node, job_id=int(job), reason=why)
        try:
            event_id = await self.ctx.db.tx(record)
        except Exception as exc:  # the refusal stands; only its record is missing
            log.error("job %s: cannot record the refused credential request: %s", job, exc)
            return
        await self.ctx.publish_feed([event_id])

    async def _credential(self, job: str) -> Credentials:
        assert self.auth is not None and self.server is not None
        creds, new = await asyncio.to_thread(self.auth.job_credential, job)
        if not new:
            self.stats["reused"] += 1
            return creds
        self.stats["issued"] += 1
        self.server.reload()
        path = self.auth.job_credential_path(job)
        if not await accepted(self.ctx.bus.url, path, RELOAD_WAIT_S):
            log.warning("job %s: the server did not accept the new user within %.0f s; "
                        "the job's client keeps retrying", job, RELOAD_WAIT_S)
        return creds


def running_step_of(store: StoreApi, job_id: int, node: str) -> bool:
    """Whether `node` has a step of the job that has not ended."""
    return any(step["job_id"] == job_id for step in store.running_steps(node))


async def accepted(url: str, creds: Path, within_s: float) -> bool:
    """Whether the server accepts `creds` (retried until `within_s`): a SIGHUP reload is
    asynchronous, and the job should not meet a refusal for a user it was just given."""
    deadline = time.monotonic() + within_s
    while True:
        probe = Bus(url, name="marduk-credential-check", creds=str(creds),
                    connect_timeout_s=2.0)
        try:
            await probe.connect()
            return True
        except (BusError, AuthError):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        finally:
            await probe.close()
