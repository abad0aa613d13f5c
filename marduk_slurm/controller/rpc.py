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

from nats.aio.msg import Msg

from marduk_slurm.controller.context import Context
from marduk_slurm.controller.operations import Operations
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.errors import MardukError, NotFound, ProtocolError
from marduk_slurm.supervisor import unsubscribe_all

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any], str], Awaitable[Any]]


def _opt_int(args: dict[str, Any], key: str) -> int | None:
    value = args.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{key} must be an integer")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{key} must be an integer, got {value!r}") from None


def _opt_str(args: dict[str, Any], key: str) -> str | None:
    value = args.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string")
    return value


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
        }
        # Requests a training job makes about itself (marduk.v1.jobrpc.<job>.<verb>); the
        # job id from the subject is passed in args["job"], so a job cannot ask for another.
        self.job_handlers: dict[str, Handler] = {}
        self._inflight: set[asyncio.Task[None]] = set()

    def register(self, verb: str, handler: Handler, *, job: bool = False) -> None:
        """Add a verb (used by services beyond the core, e.g. live configuration)."""
        (self.job_handlers if job else self.handlers)[verb] = handler

    async def run(self) -> None:
        subscriptions = []
        try:  # released at the end of the run, so a restarted run answers each request once
            for subject in (subjects.RPC_ALL, subjects.JOB_RPC_ALL):
                subscriptions.append(await self.ctx.bus.subscribe(subject, self.on_message))
            await asyncio.Event().wait()
        finally:
            await unsubscribe_all(subscriptions)

    async def on_message(self, msg: Msg) -> None:
        # Each request in its own task: a drain waiting on Slurm must not hold up `status`.
        task = asyncio.create_task(self.answer(msg))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def answer(self, msg: Msg) -> None:
        parts = msg.subject.split(".")
        if parts[2] == "jobrpc":
            reply = await self.dispatch_job(parts[3], parts[-1], msg.data, msg.subject)
        else:
            reply = await self.dispatch(parts[-1], msg.data, msg.subject)
        if msg.reply:
            try:
                await msg.respond(m.encode(reply))
            except Exception as exc:  # the asker may be gone; nothing else to do
                log.warning("could not answer %s: %s", msg.subject, exc)

    async def dispatch_job(self, job: str, verb: str, data: bytes, subject: str) -> m.Reply:
        if not job.isdigit() or verb not in self.job_handlers:
            self.ctx.reject("unknown_verb", subject, verb)
            return m.Reply(ok=False, error=f"unknown job request {subject}", error_kind="invalid")
        return await self.dispatch(verb, data, subject, self.job_handlers, job=int(job))

    async def dispatch(self, verb: str, data: bytes, subject: str,
                       handlers: dict[str, Handler] | None = None, job: int | None = None
                       ) -> m.Reply:
        handler = (self.handlers if handlers is None else handlers).get(verb)
        if handler is None:
            self.ctx.reject("unknown_verb", subject, verb)
            return m.Reply(ok=False, error=f"unknown request {verb!r}; valid: "
                           f"{', '.join(sorted(self.handlers))}", error_kind="invalid")
        try:
            request = m.decode_request(data)
            args = request.args if job is None else {**request.args, "job": job}
            result = await handler(args, request.actor or "operator")
        except ProtocolError as exc:
            self.ctx.reject(exc.reason, subject, exc.detail)
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
        return await self.ops.status()

    async def replicas(self, args: dict[str, Any], actor: str) -> Any:
        job_id, node = _opt_int(args, "job"), _opt_str(args, "node")
        include_left = bool(args.get("all", False))
        return await self.ctx.db(lambda: self.ctx.db.store.replicas(
            job_id=job_id, node=node, include_left=include_left))

    async def nodes(self, args: dict[str, Any], actor: str) -> Any:
        return await self.ops.nodes(_opt_str(args, "node"))

    async def history(self, args: dict[str, Any], actor: str) -> Any:
        node, job_id = _opt_str(args, "node"), _opt_int(args, "job")
        since = args.get("since")
        if since is not None and not isinstance(since, int | float):
            raise ValueError("since must be a unix time in seconds")
        limit = _opt_int(args, "limit") or 200
        after_id = _opt_int(args, "after_id") or 0
        kinds = args.get("kinds") or []
        if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
            raise ValueError("kinds must be a list of strings")
        return await self.ctx.db(lambda: self.ctx.db.store.events(
            node=node, job_id=job_id, since=since, after_id=after_id, kinds=kinds,
            limit=min(limit, 10000)))

    # -- writes ----------------------------------------------------------------------------

    async def drain(self, args: dict[str, Any], actor: str) -> Any:
        nodes = _opt_str(args, "nodes")
        reason = (_opt_str(args, "reason") or "").strip()
        if not nodes:
            raise ValueError("name the nodes to drain, e.g. n3 or n[1-4]")
        if not reason:
            raise ValueError('a reason is required: reason="..." (Slurm refuses drains '
                             "without one)")
        return await self.ops.drain(nodes, reason, actor=actor, gpu=_opt_str(args, "gpu"),
                                    wait_s=float(args.get("wait_s", 5.0)))

    async def resume(self, args: dict[str, Any], actor: str) -> Any:
        nodes = _opt_str(args, "nodes")
        if not nodes:
            raise ValueError("name the nodes to resume, e.g. n3 or n[1-4]")
        check = args.get("check")
        if check is not None and not isinstance(check, dict):
            raise ValueError("check must be an object with the operator's check result")
        return await self.ops.resume(nodes, actor=actor, force=bool(args.get("force", False)),
                                     wait_s=float(args.get("wait_s", 5.0)),
                                     operator_check=check)

    async def inject(self, args: dict[str, Any], actor: str) -> Any:
        node = _opt_str(args, "node")
        gpu = args.get("gpu")
        xid = _opt_int(args, "xid")
        if not node or gpu in (None, "") or xid is None:
            raise ValueError("inject needs node, gpu (UUID or index) and xid")
        force = args.get("force", False)
        if not isinstance(force, bool):
            raise ValueError("force must be true or false")
        return await self.ops.inject(node, str(gpu), xid, actor=actor, at=time.time(),
                                     force=force)
