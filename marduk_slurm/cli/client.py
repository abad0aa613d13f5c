"""How the CLI finds and asks the controller: NATS request/reply on ``marduk.v1.rpc.<verb>``."""

from __future__ import annotations

import asyncio
import os
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
        request = m.Request(args={k: v for k, v in args.items() if v is not None}, actor=actor)
        raw = await bus.request(subjects.rpc(verb), m.encode(request), timeout_s)
    finally:
        await bus.close()
    reply = m.decode_reply(raw)
    if not reply.ok:
        if reply.error_kind == "not_found":
            raise NotFound(reply.error)
        raise RequestFailed(reply.error, reply.error_kind)
    return reply.data


def call_sync(url: str, verb: str, args: dict[str, Any], **kw: Any) -> Any:
    return asyncio.run(call(url, verb, args, **kw))
