"""A `pynvml` with two GPUs whose counters a test drives through a JSON file, for tests that
run the real agent process: put this folder first on its PYTHONPATH and name the file in
MARDUK_TEST_NVML_STATE. The file maps a GPU index to what to change:
`{"0": {"fields": {"5": 5000}, "clock_reasons": 64, "temperature_c": 91, "xids": [48]}}`;
field ids are NVML's (fakes/fake_nvml.py names them), and each new entry of `xids` is raised
once as an XID event. The file is read again whenever it changes.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for `fakes`

from fakes.fake_nvml import FakeGpu, FakeNvml

UUIDS = ["GPU-driven-0000", "GPU-driven-0001"]


class DrivenNvml(FakeNvml):
    def __init__(self, state: Path) -> None:
        super().__init__([FakeGpu(u, bus_id=f"00000000:{0x18 + i:02X}:00.0")
                          for i, u in enumerate(UUIDS)])
        self.state = state
        self.mtime = 0.0
        self.xids_raised = [0] * len(UUIDS)
        self.lock = threading.Lock()

    def refresh(self) -> None:
        with self.lock:
            try:
                mtime = self.state.stat().st_mtime
            except FileNotFoundError:
                return
            if mtime == self.mtime:
                return
            self.mtime = mtime
            for key, change in json.loads(self.state.read_text()).items():
                index = int(key)
                gpu = self.gpus[index]
                gpu.fields.update({int(f): v for f, v in change.get("fields", {}).items()})
                for attr in ("clock_reasons", "temperature_c", "power_mw"):
                    if attr in change:
                        setattr(gpu, attr, change[attr])
                if "remapped_rows" in change:
                    gpu.remapped_rows = tuple(change["remapped_rows"])
                xids = change.get("xids", [])
                for xid in xids[self.xids_raised[index]:]:
                    self.emit_xid(index, xid)
                self.xids_raised[index] = len(xids)

    def _device(self, name: str, handle: int) -> FakeGpu:
        self.refresh()
        self.calls.clear()  # a long-running agent must not grow this list
        return super()._device(name, handle)

    def nvmlEventSetWait_v2(self, event_set: str, timeout_ms: int) -> Any:
        self.refresh()
        return super().nvmlEventSetWait_v2(event_set, timeout_ms)


_nvml = DrivenNvml(Path(os.environ["MARDUK_TEST_NVML_STATE"]))


def __getattr__(name: str) -> Any:
    return getattr(_nvml, name)
