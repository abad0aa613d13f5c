"""Mutated messages for the trust-boundary fuzz (tests/test_trust_fuzz.py).

Every case starts from a valid example of tests/protocol_schema.py and changes fields to the
values that have hurt before: integers past SQLite's int64, non-finite floats, huge and
control-character strings, nesting near the JSON decoder's depth limit, wrong types and
shapes, node names with a leading dash, and the ids of another job or node. Nothing here
imports the project's decoders: the oracle of the fuzz is the controller's behaviour, never
what marduk's own code thinks of a message.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import protocol_schema as schema
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

Path_ = tuple[str | int, ...]

# The tenant the fuzz tries to reach from outside: a job and a node that send nothing during
# the storm, whose ids the other senders put in their messages.
VICTIM_JOB, VICTIM_NODE = 9, "n9"
VICTIM_REPLICA, VICTIM_GPU = "job9_rg0:victim", "GPU-n9-0"
OTHER_JOB, OTHER_NODE = 8, "n2"
DASH_NODE = "-n1"


class Raw(str):
    """A JSON token spliced into the text as is (NaN, Infinity, 1e400, deep nesting)."""


def nest(depth: int, kind: str) -> Raw:
    if kind == "list":
        return Raw("[" * depth + "1" + "]" * depth)
    return Raw('{"a":' * depth + "1" + "}" * depth)


def encode(msg: Any) -> bytes:
    raws: list[Raw] = []

    def swap(value: Any) -> Any:
        if isinstance(value, Raw):
            raws.append(value)
            return f"@@RAW{len(raws) - 1}@@"
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        if isinstance(value, list):
            return [swap(v) for v in value]
        return value

    text = json.dumps(swap(msg), separators=(",", ":"))
    for i, raw in enumerate(raws):
        text = text.replace(f'"@@RAW{i}@@"', raw, 1)
    return text.encode()


def leaves(value: Any, path: Path_ = ()) -> Iterator[tuple[Path_, Any]]:
    """Every field and nested value (the first item of each list stands for all)."""
    if path:
        yield path, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, (*path, key))
    elif isinstance(value, list) and value:
        yield from leaves(value[0], (*path, 0))


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


ID_FIELDS = {"node", "job_id", "replica_id", "gpu_uuid", "uuid", "gpu_uuids", "gpu", "job",
             "nodes"}


def _other_ids(path: Path_, value: Any, kind: str) -> list[Any]:
    name = next((p for p in reversed(path) if isinstance(p, str)), "")
    if name not in ID_FIELDS:
        return []
    if kind.startswith("rpc:"):  # operators may name any node: only neighbours, no victim
        return [OTHER_NODE] if isinstance(value, str) else [OTHER_JOB]
    if name in ("node", "nodes"):
        return [OTHER_NODE, VICTIM_NODE]
    if name in ("job_id", "job"):
        return [OTHER_JOB, VICTIM_JOB]
    if name == "replica_id":
        return [VICTIM_REPLICA, "job8_rg0:other"]
    return [VICTIM_GPU]


def _wrong_types(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [[1], "x", 1, None]
    if isinstance(value, list):
        return [{"a": 1}, "x", [[1]], [None]]
    if isinstance(value, bool):
        return ["true", 2]
    if is_number(value):
        return ["1", [1], {"a": 1}, True, 1.5]
    if isinstance(value, str):
        return [1, [value], {"a": value}, None, ""]
    return ["x", 1, {"a": 1}]


def _deep(path: Path_) -> list[Any]:
    # 100 and 500 levels pass a decoder with Python's default limit and reach the store;
    # the last two sit just under and at the limit of about 1,000 for the whole message.
    room = 1000 - len(path) - 4
    return [nest(100, "dict"), nest(500, "list"), nest(room, "dict"), nest(1000, "list")]


MUTATIONS: dict[str, Any] = {
    "int 2**63": lambda p, v, k: [2**63] if is_number(v) else [],
    "int 2**64": lambda p, v, k: [2**64] if is_number(v) else [],
    "int -2**63-1": lambda p, v, k: [-(2**63) - 1] if is_number(v) else [],
    "-1": lambda p, v, k: [-1] if is_number(v) else [],
    "NaN": lambda p, v, k: [Raw("NaN")] if is_number(v) else [],
    "Infinity": lambda p, v, k: [Raw("Infinity"), Raw("-Infinity")] if is_number(v) else [],
    "1e308": lambda p, v, k: [1e308, -1e308] if is_number(v) else [],
    "1e400": lambda p, v, k: [Raw("1e400")] if is_number(v) else [],
    "10k string": lambda p, v, k: ["x" * 10_000] if isinstance(v, str) else [],
    "control chars": lambda p, v, k: [f"{v}\x1b[2J\n\r\x00\x07\x7f", "\x1b"]
    if isinstance(v, str) else [],
    "leading dash": lambda p, v, k: [DASH_NODE if v == "n1" else f"-{v}", "--help"]
    if isinstance(v, str) and v else [],
    "deep nesting": lambda p, v, k: _deep(p),
    "wrong type": lambda p, v, k: _wrong_types(v),
    "other id": lambda p, v, k: _other_ids(p, v, k),
}
ENVELOPE_MUTATIONS = ["missing field", "unknown field", "version 2", "version 2**64",
                      "other type"]


@dataclass
class Case:
    """One message to send: what it is, how it was changed, and the bytes."""

    kind: str  # a message kind of the schema, or rpc:<verb>, jobrpc:<verb>, credrpc
    mutation: str
    path: str
    data: bytes
    node: str = "n1"  # the node or job of the subject (and of the credential used)
    job: int = 7
    classes: tuple[str, ...] = ()  # the mutations of a compound case

    @property
    def cls(self) -> str:
        return f"{self.kind} x {self.mutation}"


# Integers past int64 crash-looped the durable ingest before (OverflowError in SQLite); sent
# last, so that such a crash cannot hide what the other mutations do.
OVERFLOW = ("int 2**63", "int 2**64", "int -2**63-1", "version 2**64")


def overflows(case: Case) -> bool:
    return any(c in OVERFLOW for c in (case.mutation, *case.classes))


@dataclass
class Base:
    kind: str
    message: dict[str, Any]
    frozen: set[Path_] = field(default_factory=set)  # paths never mutated (the type tag)


def bases() -> list[Base]:
    """The valid starting point of every kind the controller hears."""
    out = [Base(k.name, copy.deepcopy(k.example), {("type",)})
           for k in schema.KINDS.values() if k.transport != "outbound"]
    out += [Base(f"rpc:{verb}", schema.request(args))
            for verb, args in schema.OPERATOR_ARGS.items()]
    out += [Base(f"jobrpc:{verb}", schema.request(args)) for verb, args in schema.JOB_ARGS.items()]
    out.append(Base("credrpc", schema.request(schema.CRED_ARGS)))
    return out


def set_path(msg: Any, path: Path_, value: Any) -> None:
    for key in path[:-1]:
        msg = msg[key]
    msg[path[-1]] = value


def del_path(msg: Any, path: Path_) -> None:
    for key in path[:-1]:
        msg = msg[key]
    del msg[path[-1]]


def make_case(base: Base, mutation: str, changes: list[tuple[Path_, Any]]) -> Case:
    msg = copy.deepcopy(base.message)
    node, job = "n1", 7
    for path, value in changes:
        set_path(msg, path, value)
        # A node renamed with a leading dash goes out on that node's subject, with that
        # node's credential, so that it passes the subject check and reaches the store.
        if path == ("node",) and value == DASH_NODE and base.kind in schema.KINDS:
            node = DASH_NODE
    label = ",".join(".".join(map(str, p)) for p, _ in changes)
    return Case(base.kind, mutation, label, encode(msg), node, job)


def systematic() -> list[Case]:
    """Each mutation on each field it applies to, once per value."""
    cases: list[Case] = []
    for base in bases():
        for path, value in list(leaves(base.message)):
            if path in base.frozen:
                continue
            for name, values in MUTATIONS.items():
                for new in values(path, value, base.kind):
                    cases.append(make_case(base, name, [(path, new)]))
        cases += envelope_cases(base)
    return cases


def envelope_cases(base: Base) -> list[Case]:
    out = []
    for path, _ in leaves(base.message):
        if len(path) == 1 and path not in base.frozen:
            msg = copy.deepcopy(base.message)
            del_path(msg, path)
            out.append(Case(base.kind, "missing field", path[0], encode(msg)))  # type: ignore[arg-type]
    extra = copy.deepcopy(base.message)
    extra["fuzz_extra"] = 1
    out.append(Case(base.kind, "unknown field", "fuzz_extra", encode(extra)))
    for version in (2, 2**64):
        msg = copy.deepcopy(base.message)
        msg["v"] = version
        out.append(Case(base.kind, f"version {version if version < 100 else '2**64'}", "v",
                        encode(msg)))
    if "type" in base.message:
        for other in ("heartbeat", "step_start", "verdict", "nosuch"):
            msg = copy.deepcopy(base.message)
            msg["type"] = other
            out.append(Case(base.kind, "other type", "type", encode(msg)))
    return out


@st.composite
def compound(draw: Any, pool: list[Base]) -> Case:
    """Up to three mutations at once, of any classes, on one message."""
    base = draw(st.sampled_from(pool))
    paths = [p for p, _ in leaves(base.message) if p not in base.frozen]
    changes: list[tuple[Path_, Any]] = []
    names: list[str] = []
    msg = copy.deepcopy(base.message)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        try:
            value = dict(leaves(msg))[path]
        except KeyError:  # an earlier change replaced its parent
            continue
        options = [(n, v) for n, f in MUTATIONS.items() for v in f(path, value, base.kind)]
        name, new = draw(st.sampled_from(options))
        set_path(msg, path, new)
        changes.append((path, new))
        names.append(name)
    case = make_case(base, "compound", changes)
    case.classes = tuple(names)
    return case


def drawn(count: int) -> list[Case]:
    """`count` compound cases; derandomized, so every run sends the same ones."""
    pool = bases()
    out: list[Case] = []

    @settings(max_examples=count, derandomize=True, database=None, deadline=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(compound(pool))
    def collect(case: Case) -> None:
        out.append(case)

    collect()
    return out[:count]
