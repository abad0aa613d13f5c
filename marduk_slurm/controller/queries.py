"""The list queries (`replicas`, `nodes`, `history`, `deadletters`), answered in a worker
process.

Each query is a plain function of a read-only store and the request's arguments, and
`answer` returns the reply already encoded, refused as `too_large` when it would not fit in
one NATS message. They run in the controller's query processes (`StoreRunner.answer_query`),
so reading and encoding thousands of rows takes neither the controller's interpreter lock
nor its CPU share from the fault path; the controller only forwards the bytes.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from typing import Any

from marduk_slurm.adapters.nats_server import die_with
from marduk_slurm.adapters.store import Store, StoreApi
from marduk_slurm.adapters.store.mapping import replica_page_key
from marduk_slurm.domain import input_bounds as bounds
from marduk_slurm.domain import messages as m
from marduk_slurm.errors import MardukError, NotFound

# Rows per page when a list verb is paged: small enough that a page of the widest rows stays
# well under NATS's 1 MiB message limit.
MAX_PAGE_SIZE = 1000

# A GPU's risk as the views show it: (score, the factors' details). Only GPUs with a score
# are passed to a query; every other GPU shows 0.
RiskByGpu = dict[str, tuple[int, list[str]]]


def opt_int(args: dict[str, Any], key: str, low: int | None = None,
            high: int | None = None) -> int | None:
    """An optional integer argument within the range of `key` (input_bounds.INT_RANGES,
    int64 otherwise) or within [low, high]."""
    value = args.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{key} must be an integer")
    return bounds.bounded_int(key, value, low, high)


def opt_float(args: dict[str, Any], key: str, low: float, high: float) -> float | None:
    value = args.get(key)
    if value is None or value == "":
        return None
    return bounds.bounded_float(key, value, low, high)


def opt_str(args: dict[str, Any], key: str, max_len: int = bounds.TEXT_MAX,
            pattern: re.Pattern[str] | None = None) -> str | None:
    """An optional string argument: bounded, no control characters, and when `pattern` is
    given a name that matches it (input_bounds.NODE_NAME for node names)."""
    value = args.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string")
    bounds.check_text(key, value, max_len)
    return value if pattern is None else bounds.check_name(key, value, pattern)


def page_size(args: dict[str, Any]) -> int | None:
    """The page size of a paged request, or None for the one-answer form."""
    size = opt_int(args, "page_size")
    if size is None:
        return None
    if not 1 <= size <= MAX_PAGE_SIZE:
        raise ValueError(f"page_size must be between 1 and {MAX_PAGE_SIZE}")
    return size


def replicas(store: StoreApi, args: dict[str, Any], risk: RiskByGpu) -> Any:
    job_id, node = opt_int(args, "job"), opt_str(args, "node", pattern=bounds.NODE_NAME)
    include_left = bool(args.get("all", False))
    size = page_size(args)
    if size is None:
        return store.replicas(job_id=job_id, node=node, include_left=include_left)
    after = args.get("cursor")
    if after is not None and not (isinstance(after, list) and len(after) == 4):
        raise ValueError("cursor must be the `next` of the previous page")
    rows = store.replicas(job_id=job_id, node=node, include_left=include_left, after=after,
                          limit=size)
    total = store.count_replicas(job_id=job_id, node=node, include_left=include_left)
    last = replica_page_key(rows[-1]) if len(rows) == size else None
    return {"items": rows, "next": last, "total": total}


def nodes(store: StoreApi, args: dict[str, Any], risk: RiskByGpu) -> Any:
    """Nodes with their GPUs (and each GPU's risk) and replica ids; paged or all at once."""
    name = opt_str(args, "node", pattern=bounds.NODE_NAME)
    size = page_size(args)
    after = opt_str(args, "cursor", pattern=bounds.NODE_NAME)
    rows = [store.node(name)] if name else store.nodes(after=after, limit=size)
    found = with_risk(store.with_details([row for row in rows if row is not None]), risk)
    if name and not found:
        raise NotFound(f"unknown node {name}")
    if size is None:
        return found
    last = found[-1]["name"] if len(found) == size else None
    return {"items": found, "next": last, "total": store.count_nodes()}


def history(store: StoreApi, args: dict[str, Any], risk: RiskByGpu) -> Any:
    node, job_id = opt_str(args, "node", pattern=bounds.NODE_NAME), opt_int(args, "job")
    since = args.get("since")
    if since is not None and (isinstance(since, bool) or not isinstance(since, int | float)):
        raise ValueError("since must be a unix time in seconds")
    since = opt_float(args, "since", 0, 2**40)
    kinds = args.get("kinds") or []
    if not isinstance(kinds, list) or len(kinds) > 100 or not all(
            isinstance(k, str) and bounds.NODE_NAME.fullmatch(k) for k in kinds):
        raise ValueError("kinds must be a list of at most 100 event kinds")
    after_id = opt_int(args, "after_id") or 0
    window = opt_int(args, "window", 1, 2**53)
    if window is not None:  # where the newest `window` events start, to page through them
        start, through = store.event_window(window, node=node, job_id=job_id, since=since,
                                            kinds=kinds)
        return {"after_id": start, "through_id": through}
    size = page_size(args)
    if size is None:
        return store.events(node=node, job_id=job_id, since=since, after_id=after_id,
                            kinds=kinds, limit=opt_int(args, "limit") or 200)
    cursor = opt_int(args, "cursor", 0, 2**63 - 1)
    through_id = opt_int(args, "through_id", 0, 2**63 - 1)
    rows = store.events(node=node, job_id=job_id, since=since, after_id=cursor or after_id,
                        kinds=kinds, limit=size, oldest_first=True,
                        before_id=None if through_id is None else through_id + 1)
    return {"items": rows, "next": rows[-1]["id"] if len(rows) == size else None}


def deadletters(store: StoreApi, args: dict[str, Any], risk: RiskByGpu) -> Any:
    """Messages whose handling kept failing, set aside instead of blocking ingest."""
    limit = opt_int(args, "limit") or 100
    if not 1 <= limit <= 10000:
        raise ValueError("limit must be between 1 and 10000")
    return store.dead_letters(limit)


def with_risk(nodes: list[dict[str, Any]], risk: RiskByGpu) -> list[dict[str, Any]]:
    """Each GPU's risk score and factors, and each node's highest score, on node rows."""
    for node in nodes:
        for gpu in node["gpus"]:
            gpu["risk"], gpu["risk_factors"] = risk.get(gpu["uuid"], (0, []))
        node["risk"] = max((g["risk"] for g in node["gpus"]), default=0)
    return nodes


QUERIES: dict[str, Callable[[StoreApi, dict[str, Any], RiskByGpu], Any]] = {
    "replicas": replicas, "nodes": nodes, "history": history, "deadletters": deadletters}


def answer(store: StoreApi, verb: str, args: dict[str, Any], risk: RiskByGpu,
           max_payload: int) -> tuple[bytes, str]:
    """The encoded reply to a list query and its outcome: "ok", "too_large" or the error
    kind. A page that would not fit in one message comes back shorter (a page holds *up to*
    page_size rows, and its `next` says where the rest starts); only a one-answer request,
    or a single row, can be too large."""
    while True:
        try:
            reply = m.Reply(ok=True, data=QUERIES[verb](store, args, risk))
        except NotFound as exc:
            reply = m.Reply(ok=False, error=str(exc), error_kind="not_found")
        except (ValueError, MardukError) as exc:
            reply = m.Reply(ok=False, error=str(exc), error_kind="invalid")
        data = m.encode(reply)
        if len(data) <= max_payload:
            return data, "ok" if reply.ok else reply.error_kind
        size = page_size(args)
        if size is None or size == 1:
            return m.encode(too_large(len(data), max_payload)), "too_large"
        args = {**args, "page_size": max(1, size // 2)}


def too_large(size: int, limit: int) -> m.Reply:
    return m.Reply(ok=False, error_kind="too_large",
                   error=f"the answer ({size:,} bytes) is larger than NATS allows in one "
                         f"message ({limit:,} bytes): ask for fewer rows (--limit) or page "
                         "through them (the CLI does with --all)")


# -- in a query process ---------------------------------------------------------------------

_store: Store | None = None


def worker_init(path: str, parent: int, nice: int) -> None:
    """Start a query process: it dies with the controller, yields the CPU to it (`nice`), and
    reads through its own read-only connection."""
    global _store
    die_with(parent)
    with contextlib.suppress(OSError):
        os.nice(nice)
    _store = Store(path, read_only=True)


def worker_answer(verb: str, args: dict[str, Any], risk: RiskByGpu, max_payload: int
                  ) -> tuple[bytes, str]:
    if _store is None:
        raise RuntimeError("query process not initialised")
    return answer(_store, verb, args, risk, max_payload)
