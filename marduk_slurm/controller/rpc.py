"""Request/reply handlers for the `marduk` CLI (subjects ``marduk.v1.rpc.<verb>``).

Each handler takes the request's `args`, checks them (ValueError -> a clear error reply) and
returns JSON-able data. Reads come straight from SQLite, so the answers stay available while
Slurm is down; writes are committed before the reply.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from marduk_slurm.adapters.bus import Incoming
from marduk_slurm.adapters.store import Store
from marduk_slurm.adapters.store.mapping import replica_page_key
from marduk_slurm.controller.context import Context
from marduk_slurm.controller.operations import Operations
from marduk_slurm.controller.request_queue import (
    FairRequestQueue,
    Pending,
    deadline_for,
    requester_of,
)
from marduk_slurm.domain import input_bounds as bounds
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.errors import MardukError, NotFound, ProtocolError
from marduk_slurm.supervisor import unsubscribe_all

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any], str], Awaitable[Any]]


def _opt_int(args: dict[str, Any], key: str, low: int | None = None,
             high: int | None = None) -> int | None:
    """An optional integer argument within the range of `key` (input_bounds.INT_RANGES,
    int64 otherwise) or within [low, high]."""
    value = args.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{key} must be an integer")
    return bounds.bounded_int(key, value, low, high)


# Verbs that may read and send thousands of rows: they have their own lane (see RpcServer).
HEAVY_VERBS = frozenset({"replicas", "nodes", "history", "top", "straggler_show", "risk",
                         "config_show", "deadletters"})

# Rows per page when a list verb is paged: small enough that a page of the widest rows stays
# well under NATS's 1 MiB message limit.
MAX_PAGE_SIZE = 1000


def _page_size(args: dict[str, Any]) -> int | None:
    """The page size of a paged request, or None for the one-answer form."""
    size = _opt_int(args, "page_size")
    if size is None:
        return None
    if not 1 <= size <= MAX_PAGE_SIZE:
        raise ValueError(f"page_size must be between 1 and {MAX_PAGE_SIZE}")
    return size


def _wait_s(args: dict[str, Any]) -> float:
    """How long a drain or resume waits for Slurm before answering "queued"."""
    wait_s = _opt_float(args, "wait_s", 0.0, 60.0)
    return 5.0 if wait_s is None else wait_s


def _opt_float(args: dict[str, Any], key: str, low: float, high: float) -> float | None:
    value = args.get(key)
    if value is None or value == "":
        return None
    return bounds.bounded_float(key, value, low, high)


def _opt_str(args: dict[str, Any], key: str, max_len: int = bounds.TEXT_MAX,
             pattern: re.Pattern[str] | None = None) -> str | None:
    """An optional string argument: bounded, no control characters, and when `pattern` is
    given a name that matches it (input_bounds.NODE_NAME for node names)."""
    value = args.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string")
    bounds.check_text(key, value, max_len)
    return value if pattern is None else bounds.check_name(key, value, pattern)


class RpcServer:
    def __init__(self, ctx: Context, ops: Operations) -> None:
        self.ctx = ctx
        self.ops = ops
        self.handlers: dict[str, Handler] = {
            "status": self.status,
            "replicas": self.replicas,
            "nodes": self.nodes,
            "history": self.history,
            "drain": self.drain,
            "resume": self.resume,
            "inject": self.inject,
            "deadletters": self.deadletters,
            "gpu_release": self.gpu_release,
        }
        # Requests a training job makes about itself (marduk.v1.jobrpc.<job>.<verb>); the
        # job id from the subject is passed in args["job"], so a job cannot ask for another.
        self.job_handlers: dict[str, Handler] = {}
        # Two lanes: list queries that may read thousands of rows, and everything else
        # (status, drains, resumes, config): an operator's drain never waits behind a
        # dashboard's or a script's heavy reads.
        self.queues = {"heavy": FairRequestQueue(workers=4), "light": FairRequestQueue(workers=4)}

    def register(self, verb: str, handler: Handler, *, job: bool = False) -> None:
        """Add a verb (used by services beyond the core, e.g. live configuration)."""
        (self.job_handlers if job else self.handlers)[verb] = handler

    async def run(self) -> None:
        subscriptions = []
        try:  # released at the end of the run, so a restarted run answers each request once
            for subject in (subjects.RPC_ALL, subjects.JOB_RPC_ALL):
                subscriptions.append(await self.ctx.bus.subscribe(subject, self.on_message))
            await asyncio.gather(*(q.serve(self.answer) for q in self.queues.values()))
        finally:
            await unsubscribe_all(subscriptions)

    async def on_message(self, msg: Incoming) -> None:
        """Admit a request: decoded here (cheap), answered by a worker in fair order."""
        try:
            request: m.Request | ProtocolError = m.decode_request(msg.data)
        except ProtocolError as exc:
            request = exc
        timeout_ms = request.timeout_ms if isinstance(request, m.Request) else None
        item = Pending(requester_of(msg.reply or msg.subject),
                       deadline_for(timeout_ms, time.monotonic()), (msg, request))
        queue = self.queues["heavy" if msg.subject.rsplit(".", 1)[-1] in HEAVY_VERBS
                            else "light"]
        if not queue.offer(item):
            self.ctx.stats["rpc_refused_busy"] += 1
            await self._respond(msg, m.Reply(
                ok=False, error=f"the controller is busy ({queue.waiting()} requests "
                "waiting); try again shortly", error_kind="busy"))

    async def answer(self, item: Pending) -> None:
        msg, request = item.payload
        parts = msg.subject.split(".")
        try:
            if isinstance(request, ProtocolError):
                self.ctx.reject(request.reason, msg.subject, request.detail, "request")
                reply = m.Reply(ok=False, error=str(request), error_kind="invalid")
            elif parts[2] == "jobrpc":
                reply = await self.dispatch_job(parts[3], parts[-1], request, msg.subject)
            else:
                reply = await self.dispatch(parts[-1], request, msg.subject)
        except Exception as exc:  # one request never stops the workers
            log.exception("request on %r failed", msg.subject[:200])
            reply = m.Reply(ok=False, error=f"internal error: {exc}", error_kind="internal")
        if time.monotonic() > item.deadline:
            self.ctx.stats["rpc_answered_late"] += 1  # its requester has stopped waiting
            return
        await self._respond(msg, reply)

    async def _respond(self, msg: Incoming, reply: m.Reply) -> None:
        if not msg.reply:
            return
        data = m.encode(reply)
        limit = self.ctx.bus.max_payload()
        if len(data) > limit:
            self.ctx.stats["rpc_reply_too_large"] += 1
            data = m.encode(m.Reply(
                ok=False, error_kind="too_large",
                error=f"the answer ({len(data):,} bytes) is larger than NATS allows in one "
                      f"message ({limit:,} bytes): ask for fewer rows (--limit) or page "
                      "through them (the CLI does with --all)"))
        try:
            await msg.respond(data)
        except Exception as exc:  # the asker may be gone; nothing else to do
            log.warning("could not answer %r: %s", msg.subject[:200], exc)

    async def dispatch_job(self, job: str, verb: str, request: m.Request, subject: str
                           ) -> m.Reply:
        if not job.isdigit() or len(job) > 10 or verb not in self.job_handlers:
            self.ctx.reject("unknown_verb", subject, verb, "request")
            return m.Reply(ok=False, error=f"unknown job request {subject}", error_kind="invalid")
        return await self.dispatch(verb, request, subject, self.job_handlers, job=int(job))

    async def dispatch(self, verb: str, request: m.Request, subject: str,
                       handlers: dict[str, Handler] | None = None, job: int | None = None
                       ) -> m.Reply:
        handler = (self.handlers if handlers is None else handlers).get(verb)
        if handler is None:
            self.ctx.reject("unknown_verb", subject, verb, "request")
            return m.Reply(ok=False, error=f"unknown request {verb[:64]!r}; valid: "
                           f"{', '.join(sorted(self.handlers))}", error_kind="invalid")
        try:
            args = request.args if job is None else {**request.args, "job": job}
            result = await handler(args, request.actor or "operator")
        except ProtocolError as exc:
            self.ctx.reject(exc.reason, subject, exc.detail, "request")
            return m.Reply(ok=False, error=str(exc), error_kind="invalid")
        except NotFound as exc:
            return m.Reply(ok=False, error=str(exc), error_kind="not_found")
        except (ValueError, MardukError) as exc:
            return m.Reply(ok=False, error=str(exc), error_kind="invalid")
        except Exception as exc:
            log.exception("request %s failed", verb)
            return m.Reply(ok=False, error=f"internal error: {exc}", error_kind="internal")
        self.ctx.stats[f"rpc_{verb}"] += 1
        return m.Reply(ok=True, data=result)

    # -- reads -----------------------------------------------------------------------------

    async def status(self, args: dict[str, Any], actor: str) -> Any:
        data = await self.ops.status()
        data["requests"] = {
            key: sum(q.stats[key] for q in self.queues.values())
            for key in ("admitted", "refused_busy", "expired", "served")}
        data["requests"]["waiting"] = sum(q.waiting() for q in self.queues.values())
        return data

    async def replicas(self, args: dict[str, Any], actor: str) -> Any:
        job_id, node = _opt_int(args, "job"), _opt_str(args, "node", pattern=bounds.NODE_NAME)
        include_left = bool(args.get("all", False))
        page_size = _page_size(args)
        if page_size is None:
            return await self.ctx.db.read(lambda store: store.replicas(
                job_id=job_id, node=node, include_left=include_left))
        after = args.get("cursor")
        if after is not None and not (isinstance(after, list) and len(after) == 4):
            raise ValueError("cursor must be the `next` of the previous page")

        def page(store: Store) -> dict[str, Any]:
            rows = store.replicas(job_id=job_id, node=node, include_left=include_left,
                                  after=after, limit=page_size)
            total = store.count_replicas(job_id=job_id, node=node, include_left=include_left)
            last = replica_page_key(rows[-1]) if len(rows) == page_size else None
            return {"items": rows, "next": last, "total": total}
        return await self.ctx.db.read(page)

    async def nodes(self, args: dict[str, Any], actor: str) -> Any:
        page_size = _page_size(args)
        after = _opt_str(args, "cursor", pattern=bounds.NODE_NAME)
        return await self.ops.nodes(_opt_str(args, "node", pattern=bounds.NODE_NAME),
                                    after=after, page_size=page_size)

    async def history(self, args: dict[str, Any], actor: str) -> Any:
        node, job_id = _opt_str(args, "node", pattern=bounds.NODE_NAME), _opt_int(args, "job")
        since = args.get("since")
        if since is not None and (isinstance(since, bool) or not isinstance(since, int | float)):
            raise ValueError("since must be a unix time in seconds")
        since = _opt_float(args, "since", 0, 2**40)
        limit = _opt_int(args, "limit") or 200
        after_id = _opt_int(args, "after_id") or 0
        kinds = args.get("kinds") or []
        if not isinstance(kinds, list) or len(kinds) > 100 or not all(
                isinstance(k, str) and bounds.NODE_NAME.fullmatch(k) for k in kinds):
            raise ValueError("kinds must be a list of at most 100 event kinds")
        page_size = _page_size(args)
        if page_size is None:
            return await self.ctx.db.read(lambda store: store.events(
                node=node, job_id=job_id, since=since, after_id=after_id, kinds=kinds,
                limit=limit))
        cursor = _opt_int(args, "cursor", 0, 2**63 - 1)
        newest_first = bool(args.get("newest_first", False))

        def page(store: Store) -> dict[str, Any]:
            # Oldest first pages forward from the cursor; newest first pages back from it
            # (each page itself in id order).
            if newest_first:
                rows = store.events(node=node, job_id=job_id, since=since, after_id=after_id,
                                    kinds=kinds, limit=page_size, before_id=cursor)
                return {"items": rows,
                        "next": rows[0]["id"] if len(rows) == page_size else None}
            rows = store.events(node=node, job_id=job_id, since=since,
                                after_id=cursor or after_id, kinds=kinds, limit=page_size,
                                oldest_first=True)
            return {"items": rows, "next": rows[-1]["id"] if len(rows) == page_size else None}
        return await self.ctx.db.read(page)

    # -- writes ----------------------------------------------------------------------------

    async def drain(self, args: dict[str, Any], actor: str) -> Any:
        nodes = _opt_str(args, "nodes", bounds.TEXT_MAX)
        reason = (_opt_str(args, "reason", bounds.REASON_MAX) or "").strip()
        if not nodes:
            raise ValueError("name the nodes to drain, e.g. n3 or n[1-4]")
        if not reason:
            raise ValueError('a reason is required: reason="..." (Slurm refuses drains '
                             "without one)")
        return await self.ops.drain(nodes, reason, actor=actor,
                                    gpu=_opt_str(args, "gpu", pattern=bounds.GPU_ID),
                                    wait_s=_wait_s(args))

    async def resume(self, args: dict[str, Any], actor: str) -> Any:
        nodes = _opt_str(args, "nodes", bounds.TEXT_MAX)
        if not nodes:
            raise ValueError("name the nodes to resume, e.g. n3 or n[1-4]")
        check = args.get("check")
        if check is not None and not isinstance(check, dict):
            raise ValueError("check must be an object with the operator's check result")
        return await self.ops.resume(nodes, actor=actor, force=bool(args.get("force", False)),
                                     wait_s=_wait_s(args),
                                     operator_check=check)

    async def inject(self, args: dict[str, Any], actor: str) -> Any:
        node = _opt_str(args, "node", pattern=bounds.NODE_NAME)
        gpu = args.get("gpu")
        if isinstance(gpu, int) and not isinstance(gpu, bool):
            gpu = str(_opt_int(args, "gpu", *bounds.int_range("gpu_index")))
        elif gpu not in (None, ""):
            gpu = _opt_str(args, "gpu", pattern=bounds.GPU_ID)
        xid = _opt_int(args, "xid")
        force, reset = args.get("force", False), args.get("reset", False)
        if not isinstance(force, bool) or not isinstance(reset, bool):
            raise ValueError("force and reset must be true or false")
        if not node or gpu in (None, "") or (xid is None) != reset:
            raise ValueError("inject needs node, gpu (UUID or index) and either xid or "
                             "reset")
        if reset:
            return await self.ops.reset_gpu(node, str(gpu), actor=actor)
        return await self.ops.inject(node, str(gpu), xid, actor=actor, at=time.time(),
                                     force=force)

    # -- the trust boundary ----------------------------------------------------------------

    async def deadletters(self, args: dict[str, Any], actor: str) -> Any:
        """Messages whose handling kept failing, set aside instead of blocking ingest."""
        limit = _opt_int(args, "limit") or 100
        if not 1 <= limit <= 10000:
            raise ValueError("limit must be between 1 and 10000")
        return await self.ctx.db.read(lambda store: store.dead_letters(limit))

    async def gpu_release(self, args: dict[str, Any], actor: str) -> Any:
        """Forget which node a GPU UUID belongs to, so that the next node to report it binds
        it (a GPU moved between nodes, or a board swap reused a UUID)."""
        uuid = _opt_str(args, "uuid")
        if not uuid or not m.printable(uuid) or len(uuid) > 96:
            raise ValueError("name the GPU UUID to release")
        now = time.time()

        def release(store: Any) -> dict[str, Any]:
            owner = store.gpu_owners([uuid]).get(uuid)
            if owner is None:
                raise NotFound(f"unknown GPU {uuid}")
            store.release_gpu(uuid)
            eid = store.add_event("gpu_released", now=now, source=actor[:128], node=owner,
                                  gpu_uuid=uuid, reason=f"GPU {uuid} released from {owner}")
            return {"uuid": uuid, "node": owner, "event": eid}

        result = await self.ctx.db.tx(release)
        await self.ctx.publish_feed([result["event"]])
        return result
