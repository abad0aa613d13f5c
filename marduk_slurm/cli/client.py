"""How the CLI finds and asks the controller: NATS request/reply on ``marduk.v1.rpc.<verb>``.

The NATS adapter and the message codec are imported when a request is made, not when this
module is: `marduk --help`, usage errors and local commands never pay for nats-py. See
`_bus_class` for why aiohttp is kept out of a CLI process.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from marduk_slurm.errors import BusError, MardukError, NotFound

if TYPE_CHECKING:
    from marduk_slurm.adapters.bus import Bus
    from marduk_slurm.domain import messages as m
    from marduk_slurm.settings import Settings


class RequestFailed(MardukError):
    """The controller answered with an error."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def resolve_nats_url(settings: Settings, flag_url: str | None) -> str:
    """--nats-url, then nats.url from settings/environment, then the URL file the controller's
    embedded nats-server wrote into its state directory."""
    if flag_url:
        return flag_url
    if settings.nats.url:
        return settings.nats.url
    url_file = Path(settings.controller.state_dir) / "nats.url"
    try:
        return url_file.read_text().strip()
    except OSError:
        raise BusError(
            f"no NATS URL: set --nats-url or MARDUK_NATS_URL, or point --state-dir at a "
            f"running controller's state directory ({url_file} not found)"
        ) from None


def resolve_creds(settings: Settings) -> str:
    """nats.creds, else the operator credential that `marduk auth init` (or a controller with
    nats.auth) left in the state directory, when this user can read it."""
    from marduk_slurm.adapters.nats_auth import OPERATOR_CREDS  # the Bus needs it anyway

    if settings.nats.creds:
        return settings.nats.creds
    operator = Path(settings.controller.state_dir) / "auth" / OPERATOR_CREDS
    return str(operator) if os.access(operator, os.R_OK) else ""


def _bus_class(url: str) -> type[Bus]:
    """The NATS adapter, imported on first use. nats-py imports aiohttp (about half of a CLI
    call's start-up) only for its WebSocket transport; a nats:// or tls:// URL never uses
    it, so the import is hidden from nats-py for that moment. Other code of the process can
    still import aiohttp afterwards."""
    if "nats" not in sys.modules and "aiohttp" not in sys.modules \
            and not url.startswith(("ws://", "wss://")):
        sys.modules["aiohttp"] = None  # type: ignore[assignment]  # ImportError inside nats
        try:
            import nats  # noqa: F401
        finally:
            del sys.modules["aiohttp"]
    from marduk_slurm.adapters.bus import Bus

    return Bus


class Session:
    """One connection to the controller for several requests (`config set`, then its acks).

        async with Session(url, creds=..., timeout_s=10) as session:
            data = await session.ask("status", {})
    """

    def __init__(self, url: str, *, creds: str = "", timeout_s: float = 10.0,
                 actor: str = "") -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.actor = actor
        self.bus = _bus_class(url)(url, name="marduk-cli", creds=creds,
                                   connect_timeout_s=min(timeout_s, 5.0))

    async def __aenter__(self) -> Session:
        await self.bus.connect()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.bus.close()

    async def ask(self, verb: str, args: dict[str, Any]) -> Any:
        """One request; returns the reply's data or raises (NotFound, RequestFailed)."""
        from marduk_slurm.domain import messages as m
        from marduk_slurm.domain import subjects

        request = m.Request(args={k: v for k, v in args.items() if v is not None},
                            actor=self.actor, timeout_ms=_timeout_ms(self.timeout_s))
        raw = await self.bus.request(subjects.rpc(verb), m.encode(request), self.timeout_s)
        return _reply_data(m.decode_reply(raw))


async def call(url: str, verb: str, args: dict[str, Any], *, creds: str = "",
               timeout_s: float = 10.0, actor: str = "") -> Any:
    """One request to the controller; returns the reply's data or raises."""
    async with Session(url, creds=creds, timeout_s=timeout_s, actor=actor) as session:
        return await session.ask(verb, args)


PAGE_SIZE = 1000


async def call_pages(url: str, verb: str, args: dict[str, Any],
                     on_page: Callable[[list[Any]], bool | None], *, creds: str = "",
                     timeout_s: float = 10.0, actor: str = "", page_size: int = PAGE_SIZE
                     ) -> int | None:
    """Ask a list verb page after page over one connection, handing each page to `on_page`
    as it arrives; `on_page` returns True to stop early. Returns the total the controller
    reported (None when the verb does not count)."""
    total: int | None = None
    cursor: Any = None
    async with Session(url, creds=creds, timeout_s=timeout_s, actor=actor) as session:
        while True:
            page = await session.ask(verb, {**args, "page_size": page_size, "cursor": cursor})
            total = page.get("total", total)
            if on_page(page["items"]) or page.get("next") is None:
                return total
            cursor = page["next"]


def _timeout_ms(timeout_s: float) -> int:
    """What the controller is told: how long this call waits (it drops the request after)."""
    return min(max(1, int(timeout_s * 1000)), 600_000)


def _reply_data(reply: m.Reply) -> Any:
    if not reply.ok:
        if reply.error_kind == "not_found":
            raise NotFound(reply.error)
        raise RequestFailed(reply.error, reply.error_kind)
    return reply.data


def call_sync(url: str, verb: str, args: dict[str, Any], **kw: Any) -> Any:
    return asyncio.run(call(url, verb, args, **kw))
