"""Job credentials on the node (agent.job_credentials_dir, docs/security.md).

When the step relay sees a job's first step on this node, the agent asks the controller for
the job's NATS credential (``marduk.v1.credrpc.<node>``) in a task of its own, so relaying the
step never waits, and writes it to `<dir>/<job>.json`, mode 0600, owned by the job's user:
the SPANK plugin (`creds_dir=`) points the job's tasks there through MARDUK_NATS_CREDS. The
file is removed when the job's last step on this node ends. Failures are logged and
counted; a job without its credential still trains, it only cannot report.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections import Counter
from pathlib import Path

from marduk_slurm.adapters.bus import Bus
from marduk_slurm.adapters.nats_auth import write_private
from marduk_slurm.backoff import Backoff
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.errors import BusError, BusTimeout, MardukError, ProtocolError

log = logging.getLogger(__name__)

# How often a "no step of this job on this node yet" refusal is asked again.
NO_STEP_RETRIES = 4
DIR_MODE = 0o711  # users reach their own file by name; nobody lists the job ids


class CredentialRefused(MardukError):
    """The controller answered with an error; `kind` says which (see controller.job_creds)."""

    def __init__(self, message: str, kind: str = "") -> None:
        super().__init__(message)
        self.kind = kind


class JobCredentials:
    def __init__(self, bus: Bus, node: str, directory: Path, *, timeout_s: float = 10.0,
                 retry_max_s: float = 10.0) -> None:
        self.bus = bus
        self.node = node
        self.directory = directory
        self.timeout_s = timeout_s
        self.retry_max_s = retry_max_s
        self.stats: Counter[str] = Counter()
        self._steps: dict[int, set[int]] = {}
        self._fetches: dict[int, asyncio.Task[None]] = {}

    def path(self, job_id: int) -> Path:
        return self.directory / f"{job_id}.json"

    def step_started(self, job_id: int, step_id: int, uid: int) -> None:
        """Count the step; the job's first step on this node starts the fetch."""
        steps = self._steps.setdefault(job_id, set())
        steps.add(step_id)
        if job_id in self._fetches:
            return
        task = asyncio.create_task(self._fetch(job_id, uid), name=f"job-creds-{job_id}")
        self._fetches[job_id] = task

    async def step_ended(self, job_id: int, step_id: int) -> None:
        """Forget the step; after the job's last one here, remove its credential file."""
        steps = self._steps.get(job_id)
        if steps is None:
            return
        steps.discard(step_id)
        if steps:
            return
        del self._steps[job_id]
        task = self._fetches.pop(job_id, None)
        if task is not None:
            task.cancel()
        try:
            await asyncio.to_thread(self.path(job_id).unlink, missing_ok=True)
            self.stats["removed"] += 1
        except OSError as exc:
            self.stats["failures"] += 1
            log.error("job %d: cannot remove its credential file: %s", job_id, exc)

    async def close(self) -> None:
        for task in self._fetches.values():
            task.cancel()
        await asyncio.gather(*self._fetches.values(), return_exceptions=True)

    async def _fetch(self, job_id: int, uid: int) -> None:
        """Ask until the controller answers (NATS may be away), then write the file. A
        refusal because the controller has not yet ingested this node's step (its ingest may
        be behind) is asked again a few times; any other refusal is final."""
        backoff = Backoff(base_s=0.5, max_s=self.retry_max_s)
        while True:
            self.stats["requests"] += 1
            try:
                text = await self._request(job_id, uid)
                break
            except CredentialRefused as exc:
                self.stats["failures"] += 1
                if exc.kind != "no_step" or backoff.attempt >= NO_STEP_RETRIES:
                    log.error("job %d: no credential from the controller: %s", job_id, exc)
                    return
                log.warning("job %d: %s; asking again", job_id, exc)
            except (BusError, BusTimeout, ProtocolError, ValueError) as exc:
                self.stats["failures"] += 1
                log.warning("job %d: credential request failed (%s); retrying", job_id, exc)
            await asyncio.sleep(backoff.next())
        try:
            await asyncio.to_thread(self._write, job_id, text, uid, asyncio.current_task())
        except OSError as exc:
            self.stats["failures"] += 1
            log.error("job %d: cannot write its credential file: %s", job_id, exc)
            return
        self.stats["written"] += 1
        log.info("job %d: credential written to %s for uid %d", job_id, self.path(job_id), uid)

    async def _request(self, job_id: int, uid: int) -> str:
        if not self.bus.connected:
            raise BusError("not connected to NATS")
        request = m.Request(args={"job": job_id, "uid": uid}, actor=f"agent-{self.node}")
        raw = await self.bus.request(subjects.cred_rpc(self.node), m.encode(request),
                                     self.timeout_s)
        reply = m.decode_reply(raw)
        if not reply.ok:
            raise CredentialRefused(reply.error, reply.error_kind)
        text = (reply.data or {}).get("credentials")
        if not isinstance(text, str):
            raise ValueError("the reply carries no credentials")
        json.loads(text)  # a reply we cannot parse must not become a job's file
        return text

    def _write(self, job_id: int, text: str, uid: int, fetch: object) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        os.chmod(self.directory, DIR_MODE)  # mkdir's mode passes through the umask
        write_private(self.path(job_id), text, uid=uid)
        # The job's last step may have ended while this thread wrote (cancelling the task
        # does not stop the thread): step_ended drops the fetch before it removes the file,
        # so either it removes what we wrote or we see it gone and remove it ourselves.
        if self._fetches.get(job_id) is not fetch:
            self.path(job_id).unlink(missing_ok=True)
