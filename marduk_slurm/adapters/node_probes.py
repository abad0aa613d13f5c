"""Reading ports from sysfs and probing mount points, without ever blocking the event loop.

Sysfs files are read by the kernel's drivers (an InfiniBand counter is a firmware query) and a
mount point on a hung shared filesystem blocks whoever touches it, unkillably. So every read
and probe runs through a `ThreadProbe`: a thread of its own, a time limit, and never a second
one while the first is still stuck (it is reported as hung instead), so that nothing piles up.

What a file holds is never trusted: at most 256 bytes are read, a counter must be decimal
digits (clamped to 2^53), a state printable words; anything else is an error in the reading,
never an exception. The root of the tree is a parameter (`sysfs_root`), so tests read a fake.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from marduk_slurm.domain.node_health import (
    IB_ERROR_COUNTERS,
    IB_FLAP_COUNTER,
    NET_ERROR_COUNTERS,
    MountReading,
    PortReading,
    ProbeOutcome,
    is_ib_port,
)

T = TypeVar("T")

READ_LIMIT = 256
COUNTER_MAX = 2**53
MAX_PORTS = 256  # ports that "all" takes from one tree
# Names "all" takes: those the settings would take (never starting like an option or as ..).
IB_PORT_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}/[0-9]{1,3}")
NET_PORT_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:@-]{0,14}")
_DIGITS = re.compile(r"[0-9]{1,40}")
_STATE = re.compile(r"[A-Za-z][A-Za-z_ -]{0,31}")


# -- running blocking calls --------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeResult(Generic[T]):
    outcome: ProbeOutcome  # OK, FAILED (error set), TIMED_OUT or HUNG
    value: T | None = None
    error: BaseException | None = None
    elapsed_s: float = 0.0


class ThreadProbe(Generic[T]):
    """Run one blocking call at a time in a thread of its own, with a time limit.

    A call past its limit is abandoned, not stopped (a thread stuck in the kernel cannot be):
    while it runs, `run` starts nothing and answers HUNG with how long it has been stuck."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._running: asyncio.Future[tuple[bool, Any, float]] | None = None
        self._started = 0.0
        self.runs = 0
        self.hung = 0

    @property
    def busy(self) -> bool:
        """Whether the last call has not returned yet (its thread may linger a moment after
        it did: that is no hang)."""
        return self._running is not None and not self._running.done()

    async def run(self, fn: Callable[[], T], timeout_s: float) -> ProbeResult[T]:
        if self.busy:
            self.hung += 1
            return ProbeResult(ProbeOutcome.HUNG, elapsed_s=time.monotonic() - self._started)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[bool, Any, float]] = loop.create_future()
        started = self._started = time.monotonic()

        def call() -> None:
            try:
                result: tuple[bool, Any, float] = (True, fn(), time.monotonic() - started)
            except BaseException as exc:  # the thread's every outcome goes back to the loop
                result = (False, exc, time.monotonic() - started)
            # The loop may have closed while the call hung: then nobody waits for it.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, done, result)

        self._running = done
        self.runs += 1
        threading.Thread(target=call, name=f"probe {self.name}", daemon=True).start()
        try:
            ok, value, elapsed = await asyncio.wait_for(asyncio.shield(done), timeout_s)
        except TimeoutError:
            return ProbeResult(ProbeOutcome.TIMED_OUT, elapsed_s=time.monotonic() - started)
        if ok:
            return ProbeResult(ProbeOutcome.OK, value=value, elapsed_s=elapsed)
        return ProbeResult(ProbeOutcome.FAILED, error=value, elapsed_s=elapsed)


def _settle(done: asyncio.Future[Any], result: Any) -> None:
    if not done.done():
        done.set_result(result)


# -- sysfs -------------------------------------------------------------------------------------


def _read(path: Path) -> str:
    with path.open("rb") as fh:
        data = fh.read(READ_LIMIT + 1)
    if len(data) > READ_LIMIT:
        raise ValueError(f"more than {READ_LIMIT} bytes")
    return data.decode("ascii", errors="replace").strip()


def _shown(text: str) -> str:
    """A bad value as evidence can carry it: short and printable."""
    return printable_text(repr(text[:40])[:60])


def printable_text(text: str) -> str:
    """`text` with every character that evidence may not hold (controls, line separators,
    bidi overrides, anything beyond ASCII) replaced by "?"."""
    return "".join(c if c.isascii() and c.isprintable() else "?" for c in text)


def read_counter(path: Path, errors: dict[str, str]) -> int | None:
    """A counter file's value; None (and why, in `errors`) when unreadable or not a number.
    A missing file is None with no error: not every driver has every counter."""
    try:
        text = _read(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        errors[path.name] = _why(exc)
        return None
    if not _DIGITS.fullmatch(text):
        errors[path.name] = f"not a counter: {_shown(text)}"
        return None
    return min(int(text), COUNTER_MAX)


def read_state(path: Path, errors: dict[str, str]) -> str | None:
    """A state file's word: InfiniBand writes "4: ACTIVE", Ethernet "up"."""
    try:
        text = _read(path)
    except (OSError, ValueError) as exc:
        errors[path.name] = _why(exc)
        return None
    word = text.rsplit(":", 1)[-1].strip()
    if not _STATE.fullmatch(word):
        errors[path.name] = f"not a state: {_shown(text)}"
        return None
    return word


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return printable_text(str(exc)[:100])


def read_port(root: Path, target: str, ts: float) -> PortReading:
    """One reading of an InfiniBand port (DEVICE/PORT) or an Ethernet interface."""
    errors: dict[str, str] = {}
    if is_ib_port(target):
        device, port = target.split("/", 1)
        base = root / "class" / "infiniband" / device / "ports" / port
        if not base.is_dir():
            return PortReading(target, ts, present=False)
        counters = base / "counters"
        return PortReading(
            target, ts, state=read_state(base / "state", errors),
            phys_state=read_state(base / "phys_state", errors),
            flaps=read_counter(counters / IB_FLAP_COUNTER, errors),
            counters=_counters(counters, IB_ERROR_COUNTERS, errors), errors=errors)
    base = root / "class" / "net" / target
    if not base.is_dir():
        return PortReading(target, ts, present=False)
    return PortReading(
        target, ts, state=read_state(base / "operstate", errors),
        flaps=read_counter(base / "carrier_changes", errors),
        counters=_counters(base / "statistics", NET_ERROR_COUNTERS, errors), errors=errors)


def _counters(base: Path, names: Iterable[str], errors: dict[str, str]) -> dict[str, int]:
    out = {}
    for name in names:
        value = read_counter(base / name, errors)
        if value is not None:
            out[name] = value
    return out


def find_ports(root: Path, ib: Iterable[str], net: Iterable[str]) -> list[str]:
    """The ports to read: the names given, "all" standing for every InfiniBand port, or
    every Ethernet interface with a device behind it (not lo, bridges or veths), found."""
    out: list[str] = []
    for name in ib:
        out.extend(_all_ib(root) if name == "all" else [name])
    for name in net:
        out.extend(_all_net(root) if name == "all" else [name])
    return list(dict.fromkeys(out))[:MAX_PORTS]


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))[:MAX_PORTS]
    except OSError:
        return []


def _all_ib(root: Path) -> list[str]:
    base = root / "class" / "infiniband"
    found = [f"{dev}/{port}" for dev in _listdir(base)
             for port in _listdir(base / dev / "ports")]
    return [p for p in found if IB_PORT_RE.fullmatch(p)]


def _all_net(root: Path) -> list[str]:
    base = root / "class" / "net"
    return [name for name in _listdir(base)
            if NET_PORT_RE.fullmatch(name) and (base / name / "device").exists()]


def read_ports(root: Path, ib: Iterable[str], net: Iterable[str]) -> list[PortReading]:
    """Every configured port, read now (blocking: run it in a `ThreadProbe`)."""
    now = time.monotonic()
    return [read_port(root, target, now) for target in find_ports(root, ib, net)]


# -- mount points --------------------------------------------------------------------------------


class NotMounted(OSError):
    """The path is there, but it is no mount point: the filesystem is not mounted."""


def probe_mount(path: str, *, write: bool, node: str) -> None:
    """Stat the mount point and check it is one; then write, fsync and remove a small file
    (`write`) or list the directory. Blocking; raises OSError on any failure."""
    os.stat(path)
    if not os.path.ismount(path):
        raise NotMounted(errno.ENOENT, "not a mount point", path)
    if not write:
        os.statvfs(path)
        with os.scandir(path) as entries:
            next(entries, None)
        return
    # Every node writes into the same shared directory: the node's name keeps them apart.
    # The old file (a crash's leftover, or someone's symlink) goes first; O_EXCL|O_NOFOLLOW
    # then never follows a link planted in between, whatever it points at.
    probe = os.path.join(path, f".marduk-probe.{node}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(probe)
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, b"marduk mount probe\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.unlink(probe)


class MountProber:
    """One mount point, probed through its own `ThreadProbe`."""

    def __init__(self, path: str, *, write: bool, node: str,
                 probe: Callable[[], None] | None = None) -> None:
        self.path = path
        self.write = write
        self.runner: ThreadProbe[None] = ThreadProbe(f"mount {path}")
        self._probe = probe or (lambda: probe_mount(path, write=write, node=node))

    async def probe(self, timeout_s: float) -> MountReading:
        result = await self.runner.run(self._probe, timeout_s)
        exc = result.error
        if result.outcome is ProbeOutcome.FAILED and isinstance(exc, NotMounted):
            return MountReading(self.path, ProbeOutcome.NOT_MOUNTED, result.elapsed_s,
                                self.write)
        if result.outcome is ProbeOutcome.FAILED:
            code = exc.errno if isinstance(exc, OSError) else None
            name = errno.errorcode.get(code, "") if code is not None else ""
            text = (str(exc) or type(exc).__name__)[:200]
            return MountReading(self.path, ProbeOutcome.FAILED, result.elapsed_s, self.write,
                                name, printable_text(text))
        return MountReading(self.path, result.outcome, result.elapsed_s, self.write)
