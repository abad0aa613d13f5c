"""A `pynvml` whose nvmlInit never returns (a wedged driver), for tests that run the real
agent process: put this folder first on its PYTHONPATH."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for `fakes`

from fakes.fake_nvml import FakeGpu, FakeNvml

_nvml = FakeNvml([FakeGpu("GPU-wedged")], init_hang=threading.Event())


def __getattr__(name: str) -> Any:
    return getattr(_nvml, name)
