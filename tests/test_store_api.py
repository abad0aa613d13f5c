"""`Store` keeps the promise of `StoreApi`, the protocol the apps hold the store by.

Twice: statically (this module is typed; mypy checks the assignment below, and the test that
runs mypy on this file makes it fail here when a signature drifts) and at run time (every
member of the protocol is on `Store`, with the same parameters in the same order).
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable
from pathlib import Path

import pytest

from marduk_slurm.adapters.store import Store, StoreApi

ROOT = Path(__file__).resolve().parent.parent


def protocol_members() -> list[str]:
    """The protocol's own methods and attributes (typing adds dunders of its own)."""
    names = {name for name in vars(StoreApi) if not name.startswith("_")}
    names |= set(getattr(StoreApi, "__annotations__", {}))
    return sorted(names)


def parameters(fn: Callable[..., object]) -> list[tuple[str, object, object]]:
    """Name, kind and default of each parameter: what a caller may rely on."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_the_concrete_store_is_a_store_api() -> None:
    concrete = Store(":memory:")
    store: StoreApi = concrete  # the static check: mypy reads this line
    try:
        concrete.migrate()
        assert store.count_nodes() == 0
    finally:
        concrete.close()


def test_every_member_of_the_protocol_is_on_the_store_with_the_same_parameters() -> None:
    members = protocol_members()
    assert len(members) > 50, members  # the protocol was read, not an empty class
    missing = [name for name in members if not hasattr(Store, name)]
    assert not missing, f"on StoreApi, not on Store: {missing}"
    drifted = {
        name: (parameters(getattr(StoreApi, name)), parameters(getattr(Store, name)))
        for name in members
        if callable(getattr(StoreApi, name))
        and parameters(getattr(StoreApi, name)) != parameters(getattr(Store, name))
    }
    assert not drifted, f"StoreApi and Store disagree (protocol, store): {drifted}"


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy not installed")
def test_mypy_accepts_the_store_as_a_store_api() -> None:
    from mypy import api

    stdout, stderr, status = api.run([
        "--config-file", str(ROOT / "pyproject.toml"), "--follow-imports=silent",
        str(Path(__file__))])
    assert status == 0, stdout + stderr
