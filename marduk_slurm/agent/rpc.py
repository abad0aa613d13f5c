"""The agent's request/reply verbs on NATS: ``marduk.v1.agent.<node>.<verb>``.

Today one verb, `inject` (fault drills): the controller asks the agent first, so an injected
XID is judged by the same agent code as a real one. With `reset: true` instead of an XID it
resets a simulated GPU (brings one lost after XID 79 back). Each request is answered in its own
task, because nats-py runs the callbacks of one subscription one after another.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from marduk_slurm.adapters.bus import Incoming
from marduk_slurm.agent.health import GpuWatcher, InjectRefused
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.domain.inject import valid_request_id
from marduk_slurm.errors import ProtocolError

log = logging.getLogger(__name__)


def inject_request(args: dict[str, Any]) -> str | None:
    """The controller's request id for this inject; None from an older controller."""
    value = args.get("request_id")
    if value is not None and valid_request_id(value) is None:
        raise ValueError(f"inject request_id is malformed: {value!r}")
    return value


def inject_args(args: dict[str, Any]) -> tuple[str, int | None]:
    """(gpu, xid) from a request's args, xid None for a reset; ValueError when they are not
    usable."""
    gpu, xid, reset = args.get("gpu"), args.get("xid"), args.get("reset", False)
    if isinstance(gpu, bool) or not isinstance(gpu, str | int) or str(gpu).strip() == "":
        raise ValueError("inject needs gpu: a GPU index or UUID")
    if not isinstance(reset, bool):
        raise ValueError(f"inject reset must be true or false, got {reset!r}")
    if reset:
        if xid is not None:
            raise ValueError("inject takes an xid or reset, not both")
        return str(gpu).strip(), None
    if isinstance(xid, str) and xid.strip().isdigit():
        xid = int(xid)
    if isinstance(xid, bool) or not isinstance(xid, int) or xid < 0:
        raise ValueError(f"inject needs xid: a non-negative integer, got {xid!r}")
    return str(gpu).strip(), xid


class AgentRpc:
    def __init__(self, node: str, watcher: GpuWatcher) -> None:
        self.node = node
        self.watcher = watcher
        self._inflight: set[asyncio.Task[None]] = set()

    @property
    def subject(self) -> str:
        return subjects.agent_rpc(self.node, "inject")

    async def on_message(self, msg: Incoming) -> None:
        task = asyncio.create_task(self._answer(msg))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _answer(self, msg: Incoming) -> None:
        reply = await self.inject(msg.data)
        if msg.reply:
            try:
                await msg.respond(m.encode(reply))
            except Exception as exc:  # nats-py raises several types; the caller just times out
                log.warning("cannot answer inject request: %s", exc)

    async def inject(self, data: bytes) -> m.Reply:
        try:
            request = m.decode_request(data)
            gpu, xid = inject_args(request.args)
            request_id = inject_request(request.args)
            actor = request.actor or "operator"
            if xid is None:
                verdict = await self.watcher.reset(gpu, actor)
            else:
                verdict = await self.watcher.inject(gpu, xid, actor, request_id=request_id)
        except (ProtocolError, ValueError) as exc:
            return m.Reply(ok=False, error=str(exc), error_kind="invalid")
        except InjectRefused as exc:
            return m.Reply(ok=False, error=str(exc), error_kind="refused")
        except TimeoutError:
            return m.Reply(
                ok=False,
                error=f"no verdict for the injected xid on {self.node} in time",
                error_kind="timeout",
            )
        target = self.watcher.find(gpu)
        return m.Reply(
            ok=True,
            data={
                "node": self.node,
                "gpu_uuid": target.uuid,
                "gpu_index": target.index,
                "xid": xid,
                "reset": xid is None,
                "action": verdict.action.value,
                "reason": verdict.reason,
                "simulated": self.watcher.simulated,
                "request_id": request_id,
            },
        )
