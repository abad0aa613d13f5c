"""The agent's request/reply verbs on NATS: ``marduk.v1.agent.<node>.<verb>``.

- `inject` (fault drills): the controller asks the agent first, so an injected XID is judged
  by the same agent code as a real one. With `reset: true` instead of an XID it resets a
  simulated GPU (brings one lost after XID 79 back).
- `check` (`marduk resume NODES --check`, relayed by the controller): read every GPU now and
  judge it, then run the node's configured health check (`agent.health_check`), on the node
  itself, as Slurm's HealthCheckProgram would; `check_cancel` stops one (the operator's
  Ctrl-C), its whole process group with it.

Only the controller may send these (NATS permissions). Each request is answered in its own
task, because nats-py runs the callbacks of one subscription one after another.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from marduk_slurm.adapters.bus import Incoming
from marduk_slurm.adapters.health_check import run_check
from marduk_slurm.agent.health import GpuWatcher, InjectRefused
from marduk_slurm.agent.node_watch import NodeWatcher
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.domain.gpu_health import GpuAction
from marduk_slurm.domain.inject import valid_request_id
from marduk_slurm.domain.node_check import check_args
from marduk_slurm.domain.node_health import node_inject_target
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


# A GPU whose verdict is one of these fails the check: the node is not fit to run jobs.
FAILS_CHECK = (GpuAction.RESET_GPU, GpuAction.DRAIN_NODE)
MAX_RUNNING_CHECKS = 4  # one node is checked by one operator at a time; a few is plenty


class AgentRpc:
    def __init__(self, node: str, watcher: GpuWatcher | None, *, health_check: str = "",
                 health_check_timeout_s: float = 300.0, gpu_error: str = "",
                 node_watcher: NodeWatcher | None = None) -> None:
        self.node = node
        self.watcher = watcher  # None: this agent watches no GPU (gpu_error says why)
        self.node_watcher = node_watcher  # None: no port or mount is watched
        self.gpu_error = gpu_error
        self.health_check = health_check
        self.health_check_timeout_s = health_check_timeout_s
        self.checks: dict[str, asyncio.Task[m.Reply]] = {}  # running, by check id
        self._inflight: set[asyncio.Task[None]] = set()

    @property
    def subscriptions(self) -> list[str]:
        """Checks are answered always; drills only by an agent that watches GPUs, ports or
        mounts (without one, the controller hears no responder and handles an inject as for
        no agent)."""
        drills = self.watcher is not None or self.node_watcher is not None
        verbs = ["check", "check_cancel"] + (["inject"] if drills else [])
        return [subjects.agent_rpc(self.node, verb) for verb in verbs]

    async def on_message(self, msg: Incoming) -> None:
        task = asyncio.create_task(self._answer(msg))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _answer(self, msg: Incoming) -> None:
        verb = msg.subject.rsplit(".", 1)[-1]
        if verb == "inject":
            reply = await self.inject(msg.data)
        elif verb == "check":
            reply = await self.check(msg.data)
        elif verb == "check_cancel":
            reply = self.cancel(msg.data)
        else:
            reply = m.Reply(ok=False, error=f"unknown agent verb {verb[:40]!r}",
                            error_kind="invalid")
        if msg.reply:
            try:
                await msg.respond(m.encode(reply))
            except Exception as exc:  # nats-py raises several types; the caller just times out
                log.warning("cannot answer %s request: %s", verb[:40], exc)

    async def check(self, data: bytes) -> m.Reply:
        """Judge this node now: every GPU read and judged by the agent's policy, then the
        configured health check program, if any."""
        try:
            check_id, timeout_s = check_args(m.decode_request(data).args,
                                             self.health_check_timeout_s)
        except (ProtocolError, ValueError) as exc:
            return m.Reply(ok=False, error=str(exc), error_kind="invalid")
        if check_id in self.checks:
            return m.Reply(ok=False, error=f"check {check_id} is running already",
                           error_kind="busy")
        if len(self.checks) >= MAX_RUNNING_CHECKS:
            return m.Reply(ok=False, error=f"{len(self.checks)} checks are running on "
                           f"{self.node} already", error_kind="busy")
        task = asyncio.ensure_future(self._check(timeout_s))
        self.checks[check_id] = task
        try:
            return await task
        except asyncio.CancelledError:
            return m.Reply(ok=False, error=f"check {check_id} cancelled on {self.node}; its "
                           "processes were stopped", error_kind="cancelled")
        finally:
            self.checks.pop(check_id, None)

    async def _check(self, timeout_s: float) -> m.Reply:
        started = time.monotonic()
        gpus, failed = [], []
        if self.watcher is None:
            return m.Reply(ok=True, data={
                "node": self.node, "gpus": [], "command": f"agent check on {self.node}",
                "returncode": 1, "duration_s": 0.0,
                "output": f"the agent watches no GPU: {self.gpu_error or 'unknown'}"[:2000]})
        for gpu in self.watcher.gpus:
            verdict = await self.watcher.check(gpu)
            gpus.append({"uuid": gpu.uuid, "index": gpu.index, "action": verdict.action.value,
                         "reason": verdict.reason})
            if verdict.action in FAILS_CHECK:
                failed.append(f"GPU {gpu.index} ({gpu.uuid}): {verdict.reason}")
        if not self.watcher.gpus:
            failed.append("no GPU found")
        data: dict[str, Any] = {"node": self.node, "gpus": gpus}
        if self.node_watcher is not None:
            # Ports read and mounts probed now, each within its own time limit.
            await self.node_watcher.check_all()
            data["components"] = self.node_watcher.summary()["components"]
            failed += [f"{c['component']} {c['target']}: {c['reason']}"
                       for c in data["components"] if c["action"] == "drain_node"]
        program = None
        if self.health_check:
            left = max(1.0, timeout_s - (time.monotonic() - started))
            program = await run_check(self.health_check, self.node, timeout_s=left)
            data["program"] = program.evidence()
            if not program.passed:
                failed.append(f"health check '{program.command}' "
                              + (f"exit {program.returncode}" if program.returncode is not None
                                 else program.output))
        passed = not failed
        output = "; ".join(failed) if failed else (
            f"{len(gpus)} GPU(s) healthy" + (f"; '{program.command}' exit 0" if program else ""))
        data.update(command=f"agent check on {self.node}"
                    + (f" + {self.health_check}" if self.health_check else ""),
                    returncode=0 if passed else 1, output=output[:2000],
                    duration_s=round(time.monotonic() - started, 3))
        return m.Reply(ok=True, data=data)

    def cancel(self, data: bytes) -> m.Reply:
        try:
            check_id, _ = check_args(m.decode_request(data).args, self.health_check_timeout_s)
        except (ProtocolError, ValueError) as exc:
            return m.Reply(ok=False, error=str(exc), error_kind="invalid")
        task = self.checks.get(check_id)
        if task is None:
            return m.Reply(ok=True, data={"cancelled": False})
        task.cancel()
        return m.Reply(ok=True, data={"cancelled": True})

    async def inject(self, data: bytes) -> m.Reply:
        try:
            request = m.decode_request(data)
            component = node_inject_target(request.args)
        except (ProtocolError, ValueError) as exc:
            return m.Reply(ok=False, error=str(exc), error_kind="invalid")
        if component is not None:
            return self.inject_node(request, *component)
        return await self.inject_gpu(data)

    def inject_node(self, request: m.Request, component: str, target: str,
                    fault: str) -> m.Reply:
        """A drill on a port or a mount point, judged by the node watcher's own policy."""
        if self.node_watcher is None:
            return m.Reply(ok=False, error=f"the agent on {self.node} watches no port or "
                           "mount (agent.ib_ports, net_ports, mounts)", error_kind="refused")
        try:
            request_id = inject_request(request.args)
            verdict = self.node_watcher.inject(component, target, fault,
                                               request.actor or "operator", request_id)
        except ValueError as exc:
            return m.Reply(ok=False, error=str(exc), error_kind="invalid")
        return m.Reply(ok=True, data={
            "node": self.node, "component": component, "target": target, "fault": fault,
            "action": verdict.action.value, "reason": verdict.reason,
            "request_id": request_id})

    async def inject_gpu(self, data: bytes) -> m.Reply:
        if self.watcher is None:  # not subscribed then; kept for a direct call
            return m.Reply(ok=False, error=f"the agent on {self.node} watches no GPU: "
                           f"{self.gpu_error or 'unknown'}", error_kind="refused")
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
