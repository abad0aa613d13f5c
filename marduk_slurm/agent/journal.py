"""The agent's journal of job steps on its node, `<state_dir>/steps.json`.

It holds the steps that are running, and the ended ones whose end has not yet reached
JetStream. The in-memory outbox is lost when the agent stops; the journal is what lets a
restarted agent announce its running steps again and still deliver the ends it owed. It is
small (one entry per step on one node) and rewritten whole, atomically (write a temporary
file, fsync, rename), so a crash leaves either the old or the new version, never half.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

JOURNAL_VERSION = 1
StepKey = tuple[int, int, str]


@dataclass
class StepEntry:
    """One step as the agent last knew it."""

    job_id: int
    step_id: int
    node: str
    gpu_indices: list[int] = field(default_factory=list)
    gpu_uuids: list[str] = field(default_factory=list)
    pid: int = 0
    uid: int = 0
    started_at: float = 0.0
    ended: bool = False
    exit_status: int | None = None
    ended_at: float | None = None

    @property
    def key(self) -> StepKey:
        return (self.job_id, self.step_id, self.node)


def _entry(raw: Any) -> StepEntry:
    if not isinstance(raw, dict):
        raise ValueError("a step entry must be an object")
    entry = StepEntry(**raw)
    if not isinstance(entry.job_id, int) or not isinstance(entry.step_id, int):
        raise ValueError("job_id and step_id must be integers")
    if not isinstance(entry.node, str) or not entry.node:
        raise ValueError("node must be a non-empty string")
    return entry


class StepJournal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.steps: dict[StepKey, StepEntry] = {}
        self._lock = asyncio.Lock()
        self.write_errors = 0

    def load(self) -> list[StepEntry]:
        """Read the journal (blocking: call it in a thread). A damaged file is set aside
        as steps.json.damaged and the agent starts with an empty journal."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        try:
            doc = json.loads(text)
            if not isinstance(doc, dict) or doc.get("v") != JOURNAL_VERSION:
                raise ValueError(f"not a version {JOURNAL_VERSION} step journal")
            entries = [_entry(raw) for raw in doc.get("steps", [])]
        except (ValueError, TypeError) as exc:
            damaged = self.path.with_name(self.path.name + ".damaged")
            log.error(
                "step journal %s is damaged (%s); moved to %s, starting empty",
                self.path,
                exc,
                damaged,
            )
            os.replace(self.path, damaged)
            return []
        self.steps = {e.key: e for e in entries}
        return entries

    def _write(self, snapshot: list[dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        data = json.dumps({"v": JOURNAL_VERSION, "steps": snapshot}, indent=1).encode()
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    async def save(self) -> bool:
        """Write the current steps; False (logged, counted) when the disk refuses.

        The snapshot is taken under the lock, so saves land in the order they were asked for
        and the last one always holds the latest state."""
        async with self._lock:
            snapshot = [asdict(e) for e in self.steps.values()]
            try:
                await asyncio.to_thread(self._write, snapshot)
            except OSError as exc:
                self.write_errors += 1
                log.error("cannot write step journal %s: %s", self.path, exc)
                return False
        return True
