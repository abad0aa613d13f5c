"""What an operator's or a client's argument may be: integer ranges, names, bounded text.

One definition for the three doors arguments come through (the `marduk` command line, the
controller's request/reply verbs and its HTTP query strings), so that a job id the CLI
accepts is one the controller accepts too. Every check raises `ValueError` with a message
that names the argument and the allowed range.

`UNSAFE_CHARS` is also what the CLI escapes before printing: characters that a terminal acts
on instead of showing (C0 including ESC, DEL, C1) and those that reorder or break the text a
reader sees (bidirectional overrides, the Unicode line and paragraph separators).
"""

from __future__ import annotations

import math
import re
from typing import Final

INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1
JOB_ID_MAX: Final = 2**32  # Slurm job and step ids are 32-bit (messages.JobId)
# Slurm node names as the wire protocol takes them (messages.Name): one NATS subject token.
NODE_NAME: Final = re.compile(r"[A-Za-z0-9_\-]{1,128}")
GPU_ID: Final = re.compile(r"[A-Za-z0-9_:\-]{1,96}")  # a UUID (messages.GpuUuid) or an index
NAME_MAX: Final = 128
REASON_MAX: Final = 512
TEXT_MAX: Final = 1024

UNSAFE_CHARS: Final = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")

# Sensible ranges of the integer arguments, by name; anything else stays within int64.
INT_RANGES: Final[dict[str, tuple[int, int]]] = {
    "job": (0, JOB_ID_MAX),
    "step": (0, JOB_ID_MAX),
    "limit": (1, 100_000),
    "after_id": (0, INT64_MAX),
    "xid": (0, 65_535),
    "gpu_index": (0, 1023),
}


def int_range(name: str) -> tuple[int, int]:
    return INT_RANGES.get(name, (INT64_MIN, INT64_MAX))


def bounded_int(name: str, value: int | str, low: int | None = None,
                high: int | None = None) -> int:
    """`value` (an int, or decimal digits with an optional sign) within the range of `name`
    (INT_RANGES, int64 otherwise) or within [low, high] when given."""
    default_low, default_high = int_range(name)
    low = default_low if low is None else low
    high = default_high if high is None else high
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        # Digits only: int() also takes "1_000" and non-ASCII digits; and no 10,000-digit
        # strings parsed before the range check.
        if not re.fullmatch(r"[-+]?[0-9]{1,20}", text):
            raise ValueError(f"{name} must be an integer between {low} and {high}, "
                             f"got {shorten(value)!r}")
        value = int(text)
    if not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {shorten(str(value))}")
    return value


def bounded_float(name: str, value: float | int | str, low: float, high: float) -> float:
    """A finite number within [low, high] (NaN and infinities are refused)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if isinstance(value, str):
        if len(value) > 64:
            raise ValueError(f"{name} must be a number, got {shorten(value)!r}")
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number) or not low <= number <= high:
        raise ValueError(f"{name} must be a number between {low:g} and {high:g}, "
                         f"got {shorten(str(value))}")
    return number


def check_text(name: str, value: str, max_len: int = TEXT_MAX) -> str:
    """Free text (a reason, a path): bounded, and no character that a terminal acts on."""
    if len(value) > max_len:
        raise ValueError(f"{name} is {len(value)} characters long; at most {max_len}")
    bad = UNSAFE_CHARS.search(value)
    if bad:
        raise ValueError(f"{name} contains the control character "
                         f"{escape_char(bad.group())} at position {bad.start()}")
    return value


def check_name(name: str, value: str, pattern: re.Pattern[str] = NODE_NAME) -> str:
    """A node name (or, with `pattern`, another identifier): the characters Slurm and a NATS
    subject token both take."""
    if not pattern.fullmatch(value):
        raise ValueError(f"{name}: {shorten(value)!r} is not a valid name (letters, digits, "
                         f"'_' and '-', at most {NAME_MAX} characters)")
    return value


def escape_char(char: str) -> str:
    """One unsafe character as a reader can see it: `\\n`, `\\x1b`, `\\u202e`."""
    return repr(char)[1:-1] if ord(char) < 0x100 else f"\\u{ord(char):04x}"


def shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
