"""How the CLI finds and asks the controller: NATS request/reply on ``marduk.v1.rpc.<verb>``."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from marduk_slurm.adapters.bus import Bus
from marduk_slurm.adapters.nats_auth import OPERATOR_CREDS
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.errors import BusError, MardukError, NotFound
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
    if settings.nats.creds:
        return settings.nats.creds
    operator = Path(settings.controller.state_dir) / "auth" / OPERATOR_CREDS
    return str(operator) if os.access(operator, os.R_OK) else ""


async def call(url: str, verb: str, args: dict[str, Any], *, creds: str = "",
               timeout_s: float = 10.0, actor: str = "") -> Any:
    """One request to the controller; returns the reply's data or raises."""
    bus = Bus(url, name="marduk-cli", creds=creds, connect_timeout_s=min(timeout_s, 5.0))
    await bus.connect()
    try:
        request = m.Request(args={k: v for k, v in args.items() if v is not None}, actor=actor,
                            timeout_ms=_timeout_ms(timeout_s))
        raw = await bus.request(subjects.rpc(verb), m.encode(request), timeout_s)
    finally:
        await bus.close()
    return _reply_data(m.decode_reply(raw))


PAGE_SIZE = 1000


async def call_pages(url: str, verb: str, args: dict[str, Any],
                     on_page: Callable[[list[Any]], bool | None], *, creds: str = "",
                     timeout_s: float = 10.0, actor: str = "", page_size: int = PAGE_SIZE
                     ) -> int | None:
    """Ask a list verb page after page over one connection, handing each page to `on_page`
    as it arrives; `on_page` returns True to stop early. Returns the total the controller
    reported (None when the verb does not count)."""
    bus = Bus(url, name="marduk-cli", creds=creds, connect_timeout_s=min(timeout_s, 5.0))
    await bus.connect()
    total: int | None = None
    cursor: Any = None
    try:
        while True:
            params = {**{k: v for k, v in args.items() if v is not None},
                      "page_size": page_size, "cursor": cursor}
            request = m.Request(args={k: v for k, v in params.items() if v is not None},
                                actor=actor, timeout_ms=_timeout_ms(timeout_s))
            raw = await bus.request(subjects.rpc(verb), m.encode(request), timeout_s)
            page = _reply_data(m.decode_reply(raw))
            total = page.get("total", total)
            if on_page(page["items"]) or page.get("next") is None:
                return total
            cursor = page["next"]
    finally:
        await bus.close()


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
