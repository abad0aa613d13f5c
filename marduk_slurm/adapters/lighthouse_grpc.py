"""gRPC for the lighthouse liveness proxy: the only module that imports grpcio.

`LighthouseUpstream` calls the real torchft lighthouse; `LighthouseProxyServer` serves
torchft's `LighthouseService` (Quorum, Heartbeat) and forwards every call to it as raw bytes,
asking a `ProxyPolicy` first. Nothing is generated from torchft's proto: the proxy only reads
the caller's replica id (domain/lighthouse_wire.py). Quorum calls are long polls (they return
when the lighthouse forms a quorum), so each one is its own forwarded call on grpc.aio, and
the quorum calls of a replica told to leave can be cancelled.

The server also answers `marduk.LighthouseProxy/Leave` (a LighthouseHeartbeatRequest naming
the replica that leaves) and `marduk.LighthouseProxy/Stats` (the counters, JSON), so a
leaving replica can announce itself and tests and operators can read the proxy's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any, Final, Protocol

import grpc
import grpc.aio

from marduk_slurm.domain import lighthouse_wire as wire
from marduk_slurm.errors import MardukError

log = logging.getLogger(__name__)

SERVICE: Final = "torchft.LighthouseService"
PROXY_SERVICE: Final = "marduk.LighthouseProxy"
QUORUM: Final = f"/{SERVICE}/Quorum"
HEARTBEAT: Final = f"/{SERVICE}/Heartbeat"
LEAVE: Final = f"/{PROXY_SERVICE}/Leave"
STATS: Final = f"/{PROXY_SERVICE}/Stats"
MAX_CONCURRENT_RPCS: Final = 4096
_OPTIONS: Final = [("grpc.max_receive_message_length", wire.MESSAGE_MAX),
                   ("grpc.max_send_message_length", 4 * 1024 * 1024)]


class LighthouseCallError(MardukError, ConnectionError):
    """A call to the lighthouse (or to the proxy) failed; `code` is the gRPC status name."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code


class ProxyPolicy(Protocol):
    def on_heartbeat(self, replica_id: str) -> bool:
        """True to forward the replica's heartbeat, False to drop it."""

    def on_quorum(self, replica_id: str) -> bool:
        """True to forward the replica's quorum request, False to refuse it."""

    def on_leave(self, replica_id: str) -> str:
        """The replica announces that it leaves; returns the outcome's name."""

    def stats(self) -> dict[str, Any]: ...


def grpc_target(address: str, *, any_port: bool = False) -> str:
    """`http://host:port` (torchft's TORCHFT_LIGHTHOUSE form) or `host:port` -> `host:port`;
    port 0 (a free one) only with `any_port`, for listening."""
    for scheme in ("http://", "grpc://"):
        if address.startswith(scheme):
            address = address[len(scheme):]
    host, sep, port = address.rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit() or not int(not any_port) <= int(port) < 65536:
        raise ValueError(f"not a host:port address: {address!r}")
    return f"{host}:{port}"


def _error(exc: grpc.aio.AioRpcError) -> LighthouseCallError:
    return LighthouseCallError(exc.code().name, exc.details() or "")


class LighthouseUpstream:
    """A channel to the real lighthouse; requests and replies stay raw bytes."""

    def __init__(self, address: str) -> None:
        self.target = grpc_target(address)
        self._channel = grpc.aio.insecure_channel(self.target, options=_OPTIONS)
        self._heartbeat = self._channel.unary_unary(HEARTBEAT)
        self.quorum_call = self._channel.unary_unary(QUORUM)

    async def heartbeat(self, raw: bytes, timeout_s: float | None) -> bytes:
        try:
            return bytes(await self._heartbeat(raw, timeout=timeout_s))
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None

    async def close(self) -> None:
        await self._channel.close()


class LighthouseProxyServer:
    """torchft's LighthouseService in front of `upstream`, with `policy` deciding."""

    def __init__(self, listen: str, upstream: LighthouseUpstream, policy: ProxyPolicy) -> None:
        self.listen = grpc_target(listen, any_port=True)
        self.upstream = upstream
        self.policy = policy
        self.port = 0
        self.malformed = 0
        self.upstream_errors = 0
        self._pending: dict[str, set[Any]] = {}  # replica id -> its forwarded quorum calls
        self._cancelled: set[Any] = set()
        self._server = grpc.aio.server(options=_OPTIONS,
                                       maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS)
        self._server.add_generic_rpc_handlers([
            grpc.method_handlers_generic_handler(SERVICE, {
                "Quorum": grpc.unary_unary_rpc_method_handler(self._quorum),
                "Heartbeat": grpc.unary_unary_rpc_method_handler(self._heartbeat)}),
            grpc.method_handlers_generic_handler(PROXY_SERVICE, {
                "Leave": grpc.unary_unary_rpc_method_handler(self._leave),
                "Stats": grpc.unary_unary_rpc_method_handler(self._stats)}),
        ])

    async def start(self) -> int:
        self.port = self._server.add_insecure_port(self.listen)
        if not self.port:
            raise OSError(f"cannot listen on {self.listen}")
        await self._server.start()
        return self.port

    async def stop(self, grace_s: float = 1.0) -> None:
        await self._server.stop(grace_s)

    def cancel_quorums(self, replica_id: str) -> int:
        """Cancel the replica's forwarded quorum calls: it is told to leave, and waiting for a
        quorum without it would only delay its exit."""
        calls = self._pending.get(replica_id, set())
        for call in calls:
            self._cancelled.add(call)
            call.cancel()
        return len(calls)

    def pending_quorums(self) -> int:
        return sum(len(calls) for calls in self._pending.values())

    async def _decode(self, context: grpc.aio.ServicerContext,
                      decode: Callable[[bytes], str], request: bytes) -> str:
        try:
            return decode(request)
        except ValueError as exc:
            self.malformed += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {exc}")
            raise  # abort raises; this line is for type checkers

    async def _heartbeat(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        replica_id = await self._decode(context, wire.heartbeat_replica_id, request)
        if not self.policy.on_heartbeat(replica_id):
            return b""  # an empty LighthouseHeartbeatResponse: the beat goes nowhere
        try:
            return await self.upstream.heartbeat(request, context.time_remaining())
        except LighthouseCallError as exc:
            self.upstream_errors += 1
            await context.abort(grpc.StatusCode[exc.code], str(exc))
            raise

    async def _quorum(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        replica_id = await self._decode(context, wire.quorum_replica_id, request)
        if not self.policy.on_quorum(replica_id):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"replica {replica_id} was told to leave")
        call = self.upstream.quorum_call(request, timeout=context.time_remaining())
        self._pending.setdefault(replica_id, set()).add(call)
        try:
            return bytes(await call)
        except grpc.aio.AioRpcError as exc:
            self.upstream_errors += 1
            await context.abort(exc.code(), exc.details() or "")
            raise
        except asyncio.CancelledError:
            if call not in self._cancelled:
                raise  # the caller went away: the finally below cancels the upstream call
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"replica {replica_id} was told to leave")
            raise
        finally:
            call.cancel()
            self._cancelled.discard(call)
            calls = self._pending.get(replica_id, set())
            calls.discard(call)
            if not calls:
                self._pending.pop(replica_id, None)

    async def _leave(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        replica_id = await self._decode(context, wire.heartbeat_replica_id, request)
        return json.dumps({"outcome": self.policy.on_leave(replica_id)}).encode()

    async def _stats(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        stats = {**self.policy.stats(), "malformed": self.malformed,
                 "upstream_errors": self.upstream_errors,
                 "pending_quorums": self.pending_quorums()}
        return json.dumps(stats, sort_keys=True).encode()


async def _proxy_call(address: str, method: str, raw: bytes, timeout_s: float) -> bytes:
    async with grpc.aio.insecure_channel(grpc_target(address), options=_OPTIONS) as channel:
        try:
            return bytes(await channel.unary_unary(method)(raw, timeout=timeout_s))
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None


async def proxy_stats(address: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """The counters of the proxy at `address`."""
    data: dict[str, Any] = json.loads(await _proxy_call(address, STATS, b"", timeout_s))
    return data


async def announce_leave(address: str, replica_id: str, timeout_s: float = 1.0) -> str:
    """Tell the proxy at `address` that `replica_id` (torchft's id) leaves; the outcome."""
    reply = await _proxy_call(address, LEAVE, wire.heartbeat_request(replica_id), timeout_s)
    with contextlib.suppress(ValueError, AttributeError):
        return str(json.loads(reply)["outcome"])
    return "?"
