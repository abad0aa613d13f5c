"""Slurm hostlists: `n[1-3,5],gpu[01-02]` <-> a list of node names.

Slurm accepts and prints node sets in this compressed form; batching a drain of 1,000 nodes
into one `scontrol` call depends on it. Zero padding is significant (`gpu[01-02]` names
`gpu01`, not `gpu1`), and a name may hold several bracket groups (`r[1-2]n[1-2]`), which
expand to their cross product as in Slurm.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# The most names one hostlist may stand for: a 100,000-node cluster, whole. Counted on the
# written ranges before any name is built, so `r[1-999999]n[1-999999]` costs nothing.
MAX_EXPANDED = 100_000

_TRAILING_NUMBER = re.compile(r"^(.*?)(\d+)$")
# 18 digits keep every bound an ordinary machine integer; no node number comes near it.
_RANGE = re.compile(r"^(\d{1,18})(?:-(\d{1,18}))?$")
_BRACKET_BODY = re.compile(r"\[([^\]]*)\]")


def expand(hostlist: str, *, max_names: int = MAX_EXPANDED) -> list[str]:
    """All names of `hostlist`, in the order written, duplicates kept as Slurm does.

    Raises ValueError, before building any name, when the list stands for more than
    `max_names` names (the product of a name's ranges, summed over the list).

    >>> expand("n[1-3,5],gpu[01-02]")
    ['n1', 'n2', 'n3', 'n5', 'gpu01', 'gpu02']
    """
    text = hostlist.strip()
    if not text:
        return []
    items = _split_top_level(text)
    total = _count_items(items, hostlist, max_names)
    if total > max_names:
        raise ValueError(f"hostlist {hostlist[:80]!r} expands to more than {max_names} names")
    names: list[str] = []
    for item in items:
        names.extend(_expand_item(item, hostlist))
    return names


def count(hostlist: str, *, max_names: int = MAX_EXPANDED) -> int:
    """How many names `hostlist` stands for, without building them; checks the syntax too.

    Counting stops early above `max_names` (the answer is then some number above it).

    >>> count("r[1-2]n[1-3],login")
    7
    """
    text = hostlist.strip()
    if not text:
        return 0
    return _count_items(_split_top_level(text), hostlist, max_names)


def _count_items(items: list[str], hostlist: str, max_names: int) -> int:
    total = 0
    for item in items:
        names = 1
        for body in _BRACKET_BODY.findall(item):
            names *= sum(high - low + 1 for low, high, _ in _ranges(body, hostlist))
            if names > max_names:
                break  # a product of huge ranges is never worth finishing
        total += names
        if total > max_names:
            break
    return total


def compress(names: Iterable[str]) -> str:
    """The shortest usual Slurm form of `names` (sorted, duplicates dropped).

    >>> compress(["n3", "n1", "n2", "n5", "gpu01", "gpu02"])
    'gpu[01-02],n[1-3,5]'
    """
    groups: dict[tuple[str, int], set[int]] = {}
    plain: set[str] = set()
    for name in names:
        _check_name(name)
        match = _TRAILING_NUMBER.match(name)
        if match is None:
            plain.add(name)
            continue
        prefix, digits = match.groups()
        # Only a leading zero pins the width; `n9` and `n10` belong in one range.
        width = len(digits) if digits.startswith("0") and len(digits) > 1 else 0
        groups.setdefault((prefix, width), set()).add(int(digits))
    _merge_natural_into_padded(groups)
    parts = [_format_group(prefix, width, numbers) for (prefix, width), numbers in groups.items()]
    parts.extend(plain)
    return ",".join(sorted(parts, key=_sort_key))


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets, checking that brackets balance."""
    items: list[str] = []
    depth = 0
    start = 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"hostlist {text!r}: nested '[' at position {i}")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"hostlist {text!r}: ']' without '[' at position {i}")
        elif char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"hostlist {text!r}: '[' is never closed")
    items.append(text[start:])
    for item in items:
        if not item:
            raise ValueError(f"hostlist {text!r}: empty name between commas")
    return items


def _expand_item(item: str, hostlist: str) -> list[str]:
    """Expand one comma-free item such as `r[1-2]n[01-03]`."""
    open_at = item.find("[")
    if open_at < 0:
        _check_name(item, hostlist)
        return [item]
    close_at = item.index("]", open_at)
    prefix, body, rest = item[:open_at], item[open_at + 1 : close_at], item[close_at + 1 :]
    _check_name(prefix, hostlist, allow_empty=True)
    tails = _expand_item(rest, hostlist) if rest else [""]
    return [
        f"{prefix}{number}{tail}" for number in _expand_ranges(body, hostlist) for tail in tails
    ]


def _expand_ranges(body: str, hostlist: str) -> list[str]:
    """`1-3,05` -> ['1', '2', '3', '05'], keeping the width of each lower bound."""
    return [
        str(n).zfill(width)
        for low, high, width in _ranges(body, hostlist)
        for n in range(low, high + 1)
    ]


def _ranges(body: str, hostlist: str) -> list[tuple[int, int, int]]:
    """`1-3,05` -> [(1, 3, 1), (5, 5, 2)]: low, high and the width of the lower bound."""
    ranges = []
    for part in body.split(","):
        match = _RANGE.match(part.strip())
        if match is None:
            raise ValueError(f"hostlist {hostlist[:80]!r}: bad range {part[:40]!r} in "
                             f"[{body[:40]}]")
        low_text, high_text = match.groups()
        low = int(low_text)
        high = int(high_text) if high_text is not None else low
        if high < low:
            raise ValueError(f"hostlist {hostlist[:80]!r}: range {part!r} runs backwards")
        ranges.append((low, high, len(low_text)))
    return ranges


def _check_name(name: str, hostlist: str | None = None, *, allow_empty: bool = False) -> None:
    where = f"hostlist {hostlist!r}" if hostlist is not None else "node name"
    if not name and not allow_empty:
        raise ValueError(f"{where}: empty node name")
    for bad in ("[", "]", ",", " ", "\t", "\n"):
        if bad in name:
            raise ValueError(f"{where}: {name!r} contains {bad!r}")


def _merge_natural_into_padded(groups: dict[tuple[str, int], set[int]]) -> None:
    """Move `n10` into the `n[08-09]` group: it has the padded width already."""
    for prefix, width in [key for key in groups if key[1] == 0]:
        natural = groups[(prefix, width)]
        for number in list(natural):
            padded = groups.get((prefix, len(str(number))))
            if padded is not None:
                padded.add(number)
                natural.discard(number)
        if not natural:
            del groups[(prefix, width)]


def _format_group(prefix: str, width: int, numbers: set[int]) -> str:
    ordered = sorted(numbers)
    if len(ordered) == 1:
        return f"{prefix}{str(ordered[0]).zfill(width)}"
    runs: list[str] = []
    start = previous = ordered[0]
    for number in [*ordered[1:], None]:
        if number is not None and number == previous + 1:
            previous = number
            continue
        low, high = str(start).zfill(width), str(previous).zfill(width)
        runs.append(low if start == previous else f"{low}-{high}")
        if number is not None:
            start = previous = number
    return f"{prefix}[{','.join(runs)}]"


def _sort_key(part: str) -> tuple[str, int, str]:
    prefix = part.split("[", 1)[0]
    match = _TRAILING_NUMBER.match(prefix)
    if "[" not in part and match is not None:
        return (match.group(1), int(match.group(2)), part)
    return (prefix, -1, part)
