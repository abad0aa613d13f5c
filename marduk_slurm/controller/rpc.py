"""Request/reply handlers for the `marduk` CLI (subjects ``marduk.v1.rpc.<verb>``).

Each handler takes the request's `args`, checks them (ValueError -> a clear error reply) and
returns JSON-able data. Reads come straight from SQLite, so the answers stay available while
Slurm is down; writes are committed before the reply.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from marduk_slurm.adapters.bus import Incoming
from marduk_slurm.controller import queries
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
from marduk_slurm.domain.node_check import CHECK_ID, DEFAULT_CHECK_S, MAX_CHECK_S
from marduk_slurm.domain.node_health import node_inject_target
from marduk_slurm.errors import MardukError, NotFound, ProtocolError
from marduk_slurm.supervisor import unsubscribe_all

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any], str], Awaitable[Any]]


class Encoded(bytes):
    """A reply already encoded (and checked against the payload limit) by a query process."""


_opt_int = queries.opt_int
_opt_float = queries.opt_float
_opt_str = queries.opt_str


def _wait_s(args: dict[str, Any]) -> float:
    """How long a drain or resume waits for Slurm before answering "queued"."""
    wait_s = _opt_float(args, "wait_s", 0.0, 60.0)
    return 5.0 if wait_s is None else wait_s


CHECK_WORKERS = 8  # node checks at once (`resume --check`), each waiting on agents

# Verbs that may read and send thousands of rows: they have their own lane (see RpcServer).
HEAVY_VERBS = frozenset({"replicas", "nodes", "history", "top", "straggler_show", "risk",
                         "config_show", "deadletters", "timeline"})


class RpcServer:
    def __init__(self, ctx: Context, ops: Operations) -> None:
        self.ctx = ctx
        self.ops = ops
        self.handlers: dict[str, Handler] = {
            "status": self.status,
            **{verb: self._query_handler(verb) for verb in queries.QUERIES},
            "drain": self.drain,
            "resume": self.resume,
            "node_check": self.node_check,
            "node_check_cancel": self.node_check_cancel,
            "inject": self.inject,
            "gpu_release": self.gpu_release,
        }
        # Requests a training job makes about itself (marduk.v1.jobrpc.<job>.<verb>); the
        # job id from the subject is passed in args["job"], so a job cannot ask for another.
        self.job_handlers: dict[str, Handler] = {}
        # The GPUs' risk scores for the `nodes` query; observability sets it when it runs.
        self.risk_view: Callable[[dict[str, Any]], Awaitable[queries.RiskByGpu]] | None = None
        # Two lanes: list queries that may read thousands of rows, and everything else
        # (status, drains, resumes, config): an operator's drain never waits behind a
        # dashboard's or a script's heavy reads.
        self.queues = {"heavy": FairRequestQueue(workers=4), "light": FairRequestQueue(workers=4),
                       # Health checks run on the nodes for minutes: a lane of their own, so
                       # they never hold a worker that a drain or a status needs.
                       "checks": FairRequestQueue(workers=CHECK_WORKERS)}

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
        verb = msg.subject.rsplit(".", 1)[-1]
        queue = self.queues["checks" if verb == "node_check"
                            else "heavy" if verb in HEAVY_VERBS else "light"]
        if not queue.offer(item):
            self.ctx.stats["rpc_refused_busy"] += 1
            await self._respond(msg, m.Reply(
                ok=False, error=f"the controller is busy ({queue.waiting()} requests "
                "waiting); try again shortly", error_kind="busy"))

    async def answer(self, item: Pending) -> None:
        msg, request = item.payload
        if not self.ctx.may_act():
            # A leader whose lease may have lapsed (it was stopped, NATS was away) stays
            # silent: the controller that leads now answers, and this one stops shortly.
            self.ctx.stats["rpc_not_leader"] += 1
            return
        parts = msg.subject.split(".")
        reply: m.Reply | Encoded
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

    async def _respond(self, msg: Incoming, reply: m.Reply | Encoded) -> None:
        if not msg.reply:
            return
        data = reply if isinstance(reply, Encoded) else m.encode(reply)
        limit = self.ctx.bus.max_payload()
        if len(data) > limit:
            self.ctx.stats["rpc_reply_too_large"] += 1
            data = m.encode(queries.too_large(len(data), limit))
        try:
            await msg.respond(data)
        except Exception as exc:  # the asker may be gone; nothing else to do
            log.warning("could not answer %r: %s", msg.subject[:200], exc)

    async def dispatch_job(self, job: str, verb: str, request: m.Request, subject: str
                           ) -> m.Reply | Encoded:
        if not job.isdigit() or len(job) > 10 or verb not in self.job_handlers:
            self.ctx.reject("unknown_verb", subject, verb, "request")
            return m.Reply(ok=False, error=f"unknown job request {subject}", error_kind="invalid")
        return await self.dispatch(verb, request, subject, self.job_handlers, job=int(job))

    async def dispatch(self, verb: str, request: m.Request, subject: str,
                       handlers: dict[str, Handler] | None = None, job: int | None = None
                       ) -> m.Reply | Encoded:
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
        return result if isinstance(result, Encoded) else m.Reply(ok=True, data=result)

    # -- reads -----------------------------------------------------------------------------

    async def status(self, args: dict[str, Any], actor: str) -> Any:
        data = await self.ops.status()
        data["requests"] = {
            key: sum(q.stats[key] for q in self.queues.values())
            for key in ("admitted", "refused_busy", "expired", "served")}
        data["requests"]["waiting"] = sum(q.waiting() for q in self.queues.values())
        if self.ctx.leadership is not None:
            data["controller"] = self.ctx.leadership.view()
            data["controller"]["standbys"] = await self.ctx.leadership.standbys()
        return data

    def _query_handler(self, verb: str) -> Handler:
        async def handle(args: dict[str, Any], actor: str) -> Encoded:
            risk = await self.risk_view(args) if verb == "nodes" and self.risk_view else {}
            data, outcome = await self.ctx.db.answer_query(verb, args, risk,
                                                    self.ctx.bus.max_payload())
            if outcome == "too_large":
                self.ctx.stats["rpc_reply_too_large"] += 1
            return Encoded(data)
        return handle

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

    async def node_check(self, args: dict[str, Any], actor: str) -> Any:
        nodes = _opt_str(args, "nodes", bounds.TEXT_MAX)
        if not nodes:
            raise ValueError("name the nodes to check, e.g. n3 or n[1-4]")
        check_id = args.get("check_id")
        if not isinstance(check_id, str) or not CHECK_ID.fullmatch(check_id):
            raise ValueError("check_id is malformed")
        timeout = _opt_float(args, "timeout_s", 1.0, MAX_CHECK_S) or DEFAULT_CHECK_S
        return await self.ops.node_check(nodes, check_id, timeout, actor=actor)

    async def node_check_cancel(self, args: dict[str, Any], actor: str) -> Any:
        check_id = args.get("check_id")
        if not isinstance(check_id, str) or not CHECK_ID.fullmatch(check_id):
            raise ValueError("check_id is malformed")
        return {"cancelled": self.ops.cancel_check(check_id)}

    async def inject(self, args: dict[str, Any], actor: str) -> Any:
        node = _opt_str(args, "node", pattern=bounds.NODE_NAME)
        if args.get("port") is not None or args.get("mount") is not None:
            if not node or args.get("gpu") not in (None, "") or args.get("xid") is not None:
                raise ValueError("inject of a port or mount needs node, port or mount, and "
                                 "fault (no gpu, xid)")
            component, target, fault = node_inject_target(args) or ("", "", "")
            return await self.ops.inject_node(node, component, target, fault, actor=actor)
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
        if xid is None:  # a reset (checked above: no xid exactly when reset)
            return await self.ops.reset_gpu(node, str(gpu), actor=actor)
        return await self.ops.inject(node, str(gpu), xid, actor=actor, at=time.time(),
                                     force=force)

    # -- the trust boundary ----------------------------------------------------------------

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
