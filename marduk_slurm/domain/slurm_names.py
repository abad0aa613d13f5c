"""What may be handed to Slurm as a node name or a reason, checked before any Slurm call.

A node name is an argument of `scontrol`: one starting with `-` would be read as an option
(`scontrol show node --help` prints help), and whitespace or a comma would split it into
several names. A reason is stored by slurmctld and printed back inside `scontrol show -o`
lines, so a newline or a control character in it breaks every later reader of that output.
These rules are shared by the Slurm backends, the controller's operator RPC and the CLI.
"""

from __future__ import annotations

import re
import unicodedata

# Slurm keeps node names as host names; 253 is the longest DNS name, so any real node fits.
MAX_NODE_NAME_LEN = 253
# Long enough for marduk's own reasons (prefix, xid, GPU UUID, event id) and an operator's
# sentence; Slurm has no limit of its own, but every `sinfo` line carries the reason.
MAX_REASON_LEN = 512
# An operator's own words, leaving room for marduk's prefix and ` event=<id>` around them.
MAX_OPERATOR_REASON_LEN = MAX_REASON_LEN - 64

# Letters, digits, `-`, `_` and `.`; the first character must be a letter or digit.
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_LINE_BREAK = re.compile(r"\r\n|[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]")
_SPACES = re.compile(r"[ \t]+")
_TRUNCATED = "..."


def check_node_name(name: str) -> str:
    """`name` itself when Slurm may be given it as a node name; ValueError saying why not.

    >>> check_node_name("gpu-01.rack3")
    'gpu-01.rack3'
    """
    if not isinstance(name, str):
        raise ValueError(f"node name must be a string, got {type(name).__name__}")
    if not name:
        raise ValueError("node name is empty")
    if len(name) > MAX_NODE_NAME_LEN:
        raise ValueError(f"node name {name[:40]!r}... is longer than {MAX_NODE_NAME_LEN} "
                         "characters")
    if name.startswith("-"):
        raise ValueError(f"node name {name!r} starts with '-' (Slurm would read an option)")
    if _NODE_NAME.fullmatch(name) is None:
        bad = next((c for c in name if _NODE_NAME.fullmatch(f"a{c}") is None), name[0])
        raise ValueError(f"node name {name!r} contains {bad!r}; node names hold letters, "
                         "digits, '-', '_' and '.', and start with a letter or digit")
    return name


def check_node_names(names: list[str] | tuple[str, ...]) -> list[str]:
    """Every name checked with `check_node_name`; the first bad one raises."""
    return [check_node_name(name) for name in names]


def sanitize_reason(text: str, max_len: int = MAX_REASON_LEN) -> str:
    """`text` as one printable line of at most `max_len` characters, for Slurm's reason field.

    Line breaks become " / " (the lines stay apart in meaning), tabs a space, any other
    control character its `\\xNN` escape, so nothing the writer typed silently disappears.
    Runs of spaces shrink to one; an overlong reason is cut and ends with "...".

    >>> sanitize_reason("swap GPU\\nticket 42")
    'swap GPU / ticket 42'
    """
    if max_len < len(_TRUNCATED) + 1:
        raise ValueError(f"max_len must be at least {len(_TRUNCATED) + 1}, got {max_len}")
    lines = [line.strip() for line in _LINE_BREAK.split(str(text))]
    joined = " / ".join(line for line in lines if line)
    printable = "".join(_printable(char) for char in joined)
    line = _SPACES.sub(" ", printable).strip()
    if len(line) > max_len:
        line = line[: max_len - len(_TRUNCATED)].rstrip() + _TRUNCATED
    return line


def _printable(char: str) -> str:
    if char == "\t":
        return " "
    # Cc: C0/C1 controls and DEL; Zl/Zp: line/paragraph separators; Cs: lone surrogates.
    if unicodedata.category(char) in ("Cc", "Zl", "Zp", "Cs"):
        return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"
    return char
