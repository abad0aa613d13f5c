"""A DistributedDataParallel whose gradient hook survives a peer dying mid-allreduce.

torchft 0.2.0's `DistributedDataParallel._comm_hook` asserts that the managed future has an
inner future (`assert fut._fut`). When a peer dies during the allreduce, the Manager hands back
a `_DummyWork` (or a work whose future never got one), the assert fails inside the autograd
engine, and the survivor crashes: the opposite of fault tolerance. This hook returns the
bucket zeroed instead. The Manager has already recorded the error, so `should_commit()` returns
False for the step and the zeroed gradient is never applied.
"""

# No `from __future__ import annotations` here: DDP's register_comm_hook checks the hook's
# annotations at runtime and wants the GradBucket class itself, not a string.
import time
from typing import Any

import torch
import torch.distributed as dist
from torchft.ddp import DistributedDataParallel as _TorchftDDP
from torchft.manager import Manager


def _completed(tensor: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(tensor)
    return fut


class SafeDDP(_TorchftDDP):
    """torchft's DDP with a survivor-safe comm hook (same constructor)."""

    def __init__(self, manager: Manager, module: torch.nn.Module, **kwargs: Any) -> None:
        super().__init__(manager, module, **kwargs)

    @staticmethod
    def _comm_hook(state: Manager, bucket: dist.GradBucket
                   ) -> torch.futures.Future[torch.Tensor]:
        buf = bucket.buffer()
        started = time.perf_counter()
        work = state.allreduce(buf)
        ok = work.wait()  # a managed work reports its own error to the manager, then says False
        note = getattr(state, "note_allreduce", None)
        if note is not None:
            note(time.perf_counter() - started)
        inner = getattr(work.get_future(), "_fut", None)
        if not ok or inner is None or state.errored() is not None:
            # The step is lost either way (should_commit will say no); hand autograd a
            # finished future so that backward() returns instead of raising.
            buf.zero_()
            return _completed(buf)
        return inner
