"""argparse types for the `marduk` command line, over domain.input_bounds.

A job id beyond Slurm's 32 bits, a NaN timeout or a reason with a terminal escape is a usage
error (exit status 2) with a message naming the option, before anything is asked of the
controller.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from marduk_slurm.domain import input_bounds as bounds

ArgType = Callable[[str], object]


def _typed(check: Callable[[str], object], name: str) -> ArgType:
    def parse(text: str) -> object:
        try:
            return check(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = name  # argparse names the type in some of its messages
    return parse


def int_in(name: str, low: int | None = None, high: int | None = None) -> ArgType:
    """An integer within the range of `name` (input_bounds.INT_RANGES) or [low, high]."""
    return _typed(lambda text: bounds.bounded_int(name, text, low, high), name)


def seconds_in(name: str, low: float, high: float) -> ArgType:
    """A finite number of seconds within [low, high]."""
    return _typed(lambda text: bounds.bounded_float(name, text, low, high), name)


def text_up_to(name: str, max_len: int) -> ArgType:
    """Free text without control characters, at most `max_len` characters."""
    return _typed(lambda text: bounds.check_text(name, text, max_len), name)


job_id = int_in("job")
limit = int_in("limit")
count = int_in("count", 0, 10**9)
node_name = _typed(lambda text: bounds.check_name("node", text), "node")
gpu_id = _typed(lambda text: bounds.check_name("gpu", text, bounds.GPU_ID), "gpu")
user_name = _typed(lambda text: bounds.check_name("name", text), "name")
reason = text_up_to("reason", bounds.REASON_MAX)
path = text_up_to("path", 4096)
timeout_s = seconds_in("--timeout", 0.01, 3600)
interval_s = seconds_in("--interval", 0.2, 3600)
