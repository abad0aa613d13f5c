"""Slurm hostlist expansion and compression."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from marduk_slurm.domain.hostlist import compress, expand


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("n1", ["n1"]),
        ("n[1-3]", ["n1", "n2", "n3"]),
        ("n[1-3,5],gpu[01-02]", ["n1", "n2", "n3", "n5", "gpu01", "gpu02"]),
        ("gpu[08-10]", ["gpu08", "gpu09", "gpu10"]),
        ("n[9-10]", ["n9", "n10"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("node-[1-2]-ib", ["node-1-ib", "node-2-ib"]),
        ("a,b", ["a", "b"]),
        ("", []),
        ("  n[1-2] ", ["n1", "n2"]),
    ],
)
def test_expand(text: str, names: list[str]) -> None:
    assert expand(text) == names


@pytest.mark.parametrize(
    ("names", "text"),
    [
        (["n3", "n1", "n2", "n5", "gpu01", "gpu02"], "gpu[01-02],n[1-3,5]"),
        ([f"x{i}" for i in range(1, 1001)], "x[1-1000]"),
        (["n08", "n09", "n10"], "n[08-10]"),
        (["n1", "n1", "n2"], "n[1-2]"),
        (["login"], "login"),
        (["n7"], "n7"),
        (["n2", "n10", "n9", "n1"], "n[1-2,9-10]"),
        ([], ""),
    ],
)
def test_compress(names: list[str], text: str) -> None:
    assert compress(names) == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("n[1-3", "never closed"),
        ("n1-3]", "without"),
        ("n[[1]]", "nested"),
        ("n[3-1]", "backwards"),
        ("n[a-b]", "bad range"),
        ("n[]", "bad range"),
        ("n1,,n2", "empty name"),
        ("n 1", "contains"),
        ("n[1-99999999]", "more than 100000"),
        ("n[1-9999999999999999999]", "bad range"),
    ],
)
def test_expand_rejects_bad_syntax(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        expand(text)


def test_expand_limits_total_names() -> None:
    with pytest.raises(ValueError, match="more than 10"):
        expand("a[1-6],b[1-6]", max_names=10)


def test_compress_rejects_names_with_hostlist_syntax() -> None:
    with pytest.raises(ValueError, match="contains"):
        compress(["n[1]"])


names_strategy = st.lists(
    st.builds(
        lambda prefix, number, pad: f"{prefix}{str(number).zfill(pad)}",
        st.sampled_from(["n", "gpu", "rack1-n"]),
        st.integers(0, 120),
        st.integers(0, 3),
    ),
    max_size=40,
)


@given(names_strategy)
def test_compress_then_expand_gives_the_same_set(names: list[str]) -> None:
    assert sorted(expand(compress(names))) == sorted(set(names))
