"""The controller's HTTP side: one dashboard page, its read-only JSON API, a server-sent
event stream, and ``/metrics`` for Prometheus.

aiohttp serves it: a maintained HTTP/1.1 implementation (parsing, keep-alive, streaming
responses) on the controller's own event loop, instead of a hand-written parser facing the
network. Everything is GET; mutating endpoints wait for operator authentication. Bound to
loopback by default, and then only loopback Host headers are answered, so that a web page
elsewhere cannot read the API through DNS rebinding. The bound address is written to
``<state_dir>/http.url`` (port 0 picks a free port, for tests).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from nats.aio.msg import Msg

from marduk_slurm.controller.metrics import CONTENT_TYPE as METRICS_TYPE
from marduk_slurm.domain import subjects
from marduk_slurm.supervisor import unsubscribe_all

if TYPE_CHECKING:
    from marduk_slurm.controller.observe import Observability

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent / "web"
ASSETS = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
TICK_S = 1.0  # live replica numbers pushed to the page
KEEPALIVE_S = 15.0
CLIENT_QUEUE = 256
RETRY_BIND_S = 30.0
URL_FILE = "http.url"
# The operator token that changes over HTTP require (reads never do); see docs/security.md.
TOKEN_FILE = "auth/http-token"
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def parse_listen(text: str) -> tuple[str, int]:
    """`127.0.0.1:9108`, `[::1]:9108`, `0.0.0.0:9108` -> (host, port)."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"controller.http_listen: expected HOST:PORT, got {text!r}")
    return host, int(port)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _query_int(request: web.Request, key: str) -> int | None:
    value = request.query.get(key, "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise web.HTTPBadRequest(text=f"{key} must be a non-negative integer")
    return int(value)


def _query_float(request: web.Request, key: str) -> float | None:
    value = request.query.get(key, "").strip()
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{key} must be unix seconds") from None


def _json(data: Any) -> web.Response:
    return web.Response(text=json.dumps(data, default=str), content_type="application/json")


class EventStream:
    """Fans the controller's feed and a periodic replica snapshot out to SSE clients."""

    def __init__(self, obs: Observability) -> None:
        self.obs = obs
        self.clients: set[asyncio.Queue[bytes | None]] = set()

    def send(self, event: str, data: str) -> None:
        chunk = f"event: {event}\ndata: {data}\n\n".encode()
        for queue in list(self.clients):
            try:
                queue.put_nowait(chunk)
            except asyncio.QueueFull:  # a client too slow to keep up: end its stream
                self.clients.discard(queue)
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(None)

    async def on_feed(self, msg: Msg) -> None:
        if self.clients:
            self.send("event", msg.data.decode(errors="replace"))

    async def tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            if self.clients:
                replicas = await self.obs.replicas()
                self.send("replicas", json.dumps({"ts": time.time(), "replicas": replicas},
                                                 default=str))

    def close(self) -> None:
        for queue in list(self.clients):
            queue.put_nowait(None)
        self.clients.clear()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "X-Accel-Buffering": "no", **SECURITY_HEADERS})
        await resp.prepare(request)
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=CLIENT_QUEUE)
        self.clients.add(queue)
        try:
            await resp.write(b"retry: 2000\n\n")
            while True:
                try:
                    chunk = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    chunk = b": keepalive\n\n"
                if chunk is None:
                    break
                await resp.write(chunk)
        except (ConnectionResetError, ConnectionError):
            pass
        finally:
            self.clients.discard(queue)
        return resp


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpServer:
    def __init__(self, obs: Observability, listen: str, state_dir: str) -> None:
        self.obs = obs
        self.host, self.port = parse_listen(listen)
        self.state_dir = Path(state_dir)
        self.stream = EventStream(obs)
        self.url = ""
        self._allowed_hosts: set[str] = set()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        get = [("/", self.asset), ("/static/{name}", self.asset),
               ("/api/status", self.api_status), ("/api/replicas", self.api_replicas),
               ("/api/nodes", self.api_nodes), ("/api/history", self.api_history),
               ("/api/events", self.stream.handle), ("/metrics", self.metrics)]
        for path, handler in get:
            app.router.add_get(path, handler)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._allowed_hosts and request.host.lower() not in self._allowed_hosts:
            raise web.HTTPMisdirectedRequest(text="unexpected Host header")
        if request.method not in READ_METHODS:
            self._check_operator(request)
        response = await handler(request)
        if not response.prepared:
            response.headers.update(SECURITY_HEADERS)
        return response

    def _check_operator(self, request: web.Request) -> None:
        """Anything but a read needs the operator token (<state_dir>/auth/http-token), in the
        Authorization header only: never a cookie or a query string, which end up in logs."""
        try:
            token = (self.state_dir / TOKEN_FILE).read_text().strip()
        except OSError:
            token = ""
        if not token:
            raise web.HTTPForbidden(text="changes over HTTP are off: no operator token in "
                                         f"{self.state_dir / TOKEN_FILE}")
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not given or not hmac.compare_digest(given.encode(), token.encode()):
            raise web.HTTPUnauthorized(text="operator token required",
                                       headers={"WWW-Authenticate": "Bearer"})

    async def run(self) -> None:
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        subscriptions = []
        try:
            site = await self._bind(runner)
            self._publish_address(site)
            subscriptions.append(await self.obs.ctx.bus.subscribe(subjects.FEED,
                                                                  self.stream.on_feed))
            await self.stream.tick()
        finally:
            await unsubscribe_all(subscriptions)  # a restarted run subscribes again
            self.stream.close()
            await runner.cleanup()
            (self.state_dir / URL_FILE).unlink(missing_ok=True)

    async def _bind(self, runner: web.AppRunner) -> web.TCPSite:
        # A taken port must not take the controller down with it: retry, keep serving NATS.
        while True:
            site = web.TCPSite(runner, self.host, self.port, shutdown_timeout=1.0)
            try:
                await site.start()
                return site
            except OSError as exc:
                self.obs.ctx.stats["http_bind_failures"] += 1
                log.error("dashboard cannot listen on %s:%d (%s); retrying in %.0f s",
                          self.host, self.port, exc, RETRY_BIND_S)
                await asyncio.sleep(RETRY_BIND_S)

    def _publish_address(self, site: web.TCPSite) -> None:
        server = site._server  # the bound socket tells the port chosen for port 0
        sockets = getattr(server, "sockets", None) or []
        port = sockets[0].getsockname()[1] if sockets else self.port
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{host}:{port}"
        if _is_loopback(self.host):
            self._allowed_hosts = {f"{h}:{port}" for h in
                                   ("127.0.0.1", "localhost", "[::1]", host)}
        else:
            log.warning("the dashboard listens on %s, beyond this host: its read-only pages "
                        "and /metrics are open to anyone who can reach it", self.url)
        (self.state_dir / URL_FILE).write_text(self.url + "\n")
        log.info("dashboard and /metrics at %s", self.url)

    # -- handlers ---------------------------------------------------------------------------

    async def asset(self, request: web.Request) -> web.Response:
        name = request.match_info.get("name", "index.html")
        if name not in ASSETS:
            raise web.HTTPNotFound()
        body = await asyncio.to_thread((WEB_DIR / name).read_bytes)
        return web.Response(body=body, content_type=ASSETS[name], charset="utf-8")

    async def api_status(self, request: web.Request) -> web.Response:
        return _json(await self.obs.status())

    async def api_replicas(self, request: web.Request) -> web.Response:
        return _json(await self.obs.replicas(_query_int(request, "job")))

    async def api_nodes(self, request: web.Request) -> web.Response:
        return _json(await self.obs.nodes())

    async def api_history(self, request: web.Request) -> web.Response:
        node = request.query.get("node", "").strip() or None
        job, since = _query_int(request, "job"), _query_float(request, "since")
        kinds = [k for k in request.query.get("kind", "").split(",") if k.strip()]
        limit = min(_query_int(request, "limit") or 200, 5000)
        store = self.obs.ctx.db.store
        rows = await self.obs.ctx.db(lambda: store.events(node=node, job_id=job, since=since,
                                                          kinds=kinds, limit=limit))
        return _json(rows)

    async def metrics(self, request: web.Request) -> web.Response:
        body = await self.obs.metrics.render()
        return web.Response(body=body, headers={"Content-Type": METRICS_TYPE})
