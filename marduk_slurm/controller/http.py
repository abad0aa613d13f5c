"""The controller's HTTP side: one dashboard page, its read-only JSON API, a server-sent
event stream, and ``/metrics`` for Prometheus.

aiohttp serves it: a maintained HTTP/1.1 implementation (parsing, keep-alive, streaming
responses) on the controller's own event loop, instead of a hand-written parser facing the
network. Everything is GET; mutating endpoints wait for operator authentication. Bound to
loopback by default, and then only loopback Host headers are answered, so that a web page
elsewhere cannot read the API through DNS rebinding. The bound address is written to
``<state_dir>/http.url`` (port 0 picks a free port, for tests). Every query parameter of
the JSON API is checked against what its endpoint takes (`QUERY_PARAMS`); a bad one is a
counted 400 with a JSON reason, never a 500.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from multidict import MultiMapping

from marduk_slurm.controller.event_stream import EventStream
from marduk_slurm.controller.metrics import CONTENT_TYPE as METRICS_TYPE
from marduk_slurm.controller.timeline import KEEP_S as TIMELINE_KEEP_S
from marduk_slurm.domain import input_bounds as bounds
from marduk_slurm.domain import subjects
from marduk_slurm.supervisor import unsubscribe_all

if TYPE_CHECKING:
    from marduk_slurm.controller.observe import Observability

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent / "web"
ASSETS = {"index.html": "text/html", "app.js": "text/javascript",
          "timeline.js": "text/javascript", "style.css": "text/css"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
RETRY_BIND_S = 30.0
URL_FILE = "http.url"
# The operator token that changes over HTTP require (reads never do); see docs/security.md.
TOKEN_FILE = "auth/http-token"
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
HISTORY_LIMIT_MAX = 5000
REPLICA_PAGE_DEFAULT = 500
REPLICA_PAGE_MAX = 5000
QUERY_VALUE_MAX = 4096


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


class BadQuery(ValueError):
    """A query parameter the endpoint does not take, or one out of its bounds."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter


QueryParser = Callable[[str, str], Any]


def _int_param(low: int, high: int) -> QueryParser:
    return lambda key, text: bounds.bounded_int(key, text, low, high)


def _float_param(low: float, high: float) -> QueryParser:
    return lambda key, text: bounds.bounded_float(key, text, low, high)


def _name_param(key: str, text: str) -> str:
    return bounds.check_name(key, text)


def _kinds_param(key: str, text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    if len(kinds) > 100:
        raise ValueError(f"{key}: at most 100 event kinds, got {len(kinds)}")
    return [bounds.check_name(key, k) for k in kinds]


def _cursor_param(key: str, text: str) -> list[Any]:
    """A replica page's `next`: the page key of its last row, as URL-safe base64 JSON."""
    try:
        value = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except ValueError:  # bad base64, bad UTF-8 and bad JSON all are
        value = None
    if not (isinstance(value, list) and len(value) == 4
            and all(type(v) is int for v in value[:3]) and isinstance(value[3], str)):
        raise ValueError(f"{key}: not a cursor of this API (pass the `next` of the previous "
                         "page)")
    return value


def encode_cursor(page_key: list[Any] | None) -> str | None:
    if page_key is None:
        return None
    text = json.dumps(page_key, separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


# What each endpoint takes; anything else in its query string is a 400.
JOB_PARAM = _int_param(0, bounds.JOB_ID_MAX)
QUERY_PARAMS: dict[str, dict[str, QueryParser]] = {
    "/api/replicas": {"job": JOB_PARAM, "limit": _int_param(1, REPLICA_PAGE_MAX),
                      "cursor": _cursor_param},
    "/api/history": {"node": _name_param, "job": JOB_PARAM,
                     "since": _float_param(0, 2**40), "kind": _kinds_param,
                     "limit": _int_param(1, HISTORY_LIMIT_MAX)},
    "/api/timeline": {"job": JOB_PARAM, "window": _float_param(1.0, TIMELINE_KEEP_S)},
}


def parse_query(path: str, query: MultiMapping[str]) -> dict[str, Any]:
    """The endpoint's query parameters, checked (BadQuery names the first bad one); a missing
    or empty parameter is None."""
    allowed = QUERY_PARAMS.get(path, {})
    keys = [key for key, _ in query.items()]  # with repeats (keys() has each key once)
    for key in keys:
        if key not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise BadQuery(bounds.shorten(key, 40),
                           f"unknown query parameter {bounds.shorten(key, 40)!r} "
                           f"(this endpoint takes: {known})")
        if keys.count(key) > 1:
            raise BadQuery(key, f"query parameter {key!r} given more than once")
    values: dict[str, Any] = dict.fromkeys(allowed)
    for key, parse in allowed.items():
        text = query.get(key, "").strip()
        if not text:
            continue
        if len(text) > QUERY_VALUE_MAX:
            raise BadQuery(key, f"{key}: at most {QUERY_VALUE_MAX} characters")
        try:
            values[key] = parse(key, text)
        except ValueError as exc:
            raise BadQuery(key, str(exc)) from None
    return values


def _json(data: Any) -> web.Response:
    return web.Response(text=json.dumps(data, default=str), content_type="application/json")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpServer:
    def __init__(self, obs: Observability, listen: str, state_dir: str, *,
                 client_bytes: int | None = None) -> None:
        self.obs = obs
        self.host, self.port = parse_listen(listen)
        self.state_dir = Path(state_dir)
        self.stream = EventStream(obs, client_bytes=client_bytes, headers=SECURITY_HEADERS)
        self.url = ""
        self._allowed_hosts: set[str] = set()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        get = [("/", self.asset), ("/static/{name}", self.asset),
               ("/api/status", self.api_status), ("/api/replicas", self.api_replicas),
               ("/api/nodes", self.api_nodes), ("/api/history", self.api_history),
               ("/api/timeline", self.api_timeline),
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
        try:
            if request.path.startswith("/api/"):  # the JSON API and the event stream
                request["query"] = parse_query(request.path, request.query)
            response = await handler(request)
        except BadQuery as exc:
            response = self._bad_query(request, exc)
        if not response.prepared:
            response.headers.update(SECURITY_HEADERS)
        return response

    def _bad_query(self, request: web.Request, exc: BadQuery) -> web.Response:
        """A 400 with the reason as JSON; counted (marduk_controller_operations
        {op="http_bad_query"}) and logged without the raw value."""
        self.obs.ctx.stats["http_bad_query"] += 1
        log.warning("HTTP %s: bad query parameter %r", request.path, exc.parameter)
        return web.Response(status=400, content_type="application/json",
                            text=json.dumps({"error": str(exc), "parameter": exc.parameter}))

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
        """One page of replicas, `{items, next, total}`; pass `next` back as `cursor`."""
        q = request["query"]
        page = await self.obs.replica_page(q["job"], after=q["cursor"],
                                           limit=q["limit"] or REPLICA_PAGE_DEFAULT)
        page["next"] = encode_cursor(page["next"])
        return _json(page)

    async def api_nodes(self, request: web.Request) -> web.Response:
        return _json(await self.obs.nodes())

    async def api_history(self, request: web.Request) -> web.Response:
        q = request["query"]
        rows = await self.obs.ctx.db.read(lambda store: store.events(
            node=q["node"], job_id=q["job"], since=q["since"], kinds=q["kind"] or [],
            limit=q["limit"] or 200))
        return _json(rows)

    async def api_timeline(self, request: web.Request) -> web.Response:
        """A job's fault timeline over the last `window` seconds (`job` is required)."""
        q = request["query"]
        if q["job"] is None:
            raise BadQuery("job", "job: required (a job id)")
        return _json(await self.obs.timeline.timeline(q["job"], q["window"]))

    async def metrics(self, request: web.Request) -> web.Response:
        body = await self.obs.metrics.render()
        return web.Response(body=body, headers={"Content-Type": METRICS_TYPE})
