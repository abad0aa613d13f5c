"""Loading the NATS adapter for a short-lived process (the CLI) as cheaply as possible.

nats-py imports aiohttp, about half of a CLI call's start-up, only for its WebSocket
transport; a nats:// or tls:// URL never uses it, so the import is hidden from nats-py for
that one moment. Other code of the process can still import aiohttp afterwards. Daemons
import `adapters.bus` directly: their start-up time does not matter.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from marduk_slurm.adapters.bus import Bus


def bus_class(url: str) -> type[Bus]:
    """The `Bus` class, imported on first use, without aiohttp unless `url` needs it."""
    if "nats" not in sys.modules and "aiohttp" not in sys.modules \
            and not url.startswith(("ws://", "wss://")):
        sys.modules["aiohttp"] = None  # type: ignore[assignment]  # ImportError inside nats
        try:
            import nats  # noqa: F401
        finally:
            del sys.modules["aiohttp"]
    from marduk_slurm.adapters.bus import Bus

    return Bus
