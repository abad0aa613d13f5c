"""A tiny fault-tolerant training script with marduk's runtime hooks: what a train.py looks
like under `marduk sbatch`. Used by the fault drill (scripts/drill.py).

One process is one replica group here (the template's `python3 train_tiny.py` per group,
group world size 1), so it hosts its group's TCPStore itself; under torchrun, torchrun does.
It trains a small MLP on CPU with ProcessGroupGloo and prints one line per step.

    MAX_STEPS (default 300)   STEP_SLEEP_S (default 0.05, to make the run last a while)
    TINY_STANDBY_HANG_S (drills only: a standby hangs this long before ManagerMarduk, as one
    whose model build or data loader never finishes would; it never becomes ready)

Started as a standby (MARDUK_STANDBY=1, `marduk sbatch --hot-spares`), everything before
ManagerMarduk (imports, model, optimizer) is done at job start, and ManagerMarduk returns once
the controller told it which group to assume; the group is then `manager.replica_group`.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from datetime import timedelta
from typing import Any

import torch
from torch import nn
from torch.distributed import TCPStore
from torchft import Optimizer, ProcessGroupGloo

from marduk_slurm.runtime import LeaveRequested, ManagerMarduk, SafeDDP

SLOW_STEP_S = 0.1  # a step slower than this is printed with its time


def print_median(group: int, node: str, took: list[float]) -> None:
    if took:
        print(f"group {group}: median step {statistics.median(took) * 1000:.0f} ms over "
              f"{len(took)} steps on {node}", flush=True)


def main() -> int:
    max_steps = int(os.environ.get("MAX_STEPS", "300"))
    step_sleep_s = float(os.environ.get("STEP_SLEEP_S", "0.05"))
    group = int(os.environ.get("REPLICA_GROUP_ID", "0"))
    store = None
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # no torchrun: host the group's store
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        store = TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"),
                         int(os.environ["MASTER_PORT"]), is_master=True,
                         wait_for_workers=False)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
    inner = torch.optim.SGD(model.parameters(), lr=0.01)

    def load_state(sd: dict[str, Any]) -> None:  # torchft heals a new replica with this
        model.load_state_dict(sd["model"])
        inner.load_state_dict(sd["optim"])

    def save_state() -> dict[str, Any]:
        return {"model": model.state_dict(), "optim": inner.state_dict()}

    if os.environ.get("MARDUK_STANDBY") and os.environ.get("TINY_STANDBY_HANG_S"):
        time.sleep(float(os.environ["TINY_STANDBY_HANG_S"]))
    manager = ManagerMarduk.from_env(
        optimizer=inner, max_steps=max_steps, batch_size=8,
        pg=ProcessGroupGloo(timeout=timedelta(seconds=5)), min_replica_size=1,
        load_state_dict=load_state, state_dict=save_state,
        timeout=timedelta(seconds=10), quorum_timeout=timedelta(seconds=60),
    )
    # A standby (MARDUK_STANDBY=1) returns from ManagerMarduk only once it assumed a group.
    group = manager.replica_group
    ddp = SafeDDP(manager, model)  # survives a peer dying mid-allreduce
    opt = Optimizer(manager, inner)
    data = torch.Generator().manual_seed(group)
    node = os.environ.get("SLURMD_NODENAME", "?")
    print(f"group {group}: replica {manager.full_replica_id} on {node}"
          + (f" (was standby {manager.assumed_from})" if manager.assumed_from else ""),
          flush=True)
    # The drill reads these lines: the participant count (recovery times), every step whose
    # work was thrown away, this incarnation's first committed step and its last one (steps
    # lost or redone around a fault), each step slower than SLOW_STEP_S and the median step
    # (what a fault costs the survivors).
    participants, committed_once, took = 0, False, []
    try:
        while not manager.should_stop():
            began = time.monotonic()
            x = torch.randn(8, 16, generator=data)
            opt.zero_grad()
            loss = nn.functional.mse_loss(ddp(x), x.sum(dim=1, keepdim=True))
            loss.backward()
            failed = manager.uncommitted_steps
            opt.step()
            manager.report_loss(float(loss))
            step = manager.current_step()
            took.append(time.monotonic() - began)
            if took[-1] > SLOW_STEP_S:
                print(f"group {group}: slow step {step} took {took[-1] * 1000:.0f} ms on "
                      f"{node} t={time.time():.3f}", flush=True)
            if manager.uncommitted_steps != failed:
                print(f"group {group}: step {step} not committed on {node} "
                      f"t={time.time():.3f}", flush=True)
            elif not committed_once:
                committed_once = True
                print(f"group {group}: first commit at step {step} on {node} "
                      f"t={time.time():.3f}", flush=True)
            if manager.num_participants() != participants:
                participants = manager.num_participants()
                print(f"group {group}: participants {participants} at step {step} "
                      f"t={time.time():.3f}", flush=True)
            if step % 25 == 0:
                print(f"group {group}: step {step} loss {float(loss):.4f} "
                      f"participants {manager.num_participants()}", flush=True)
            time.sleep(step_sleep_s)
    except LeaveRequested as leave:  # told to leave between should_stop and the next quorum
        print_median(group, node, took)
        print(f"group {group}: exit {leave.code} at step {manager.current_step()} on {node}",
              flush=True)
        raise
    code = manager.finish()
    print_median(group, node, took)
    print(f"group {group}: exit {code} at step {manager.current_step()} on {node}", flush=True)
    del store
    return code


if __name__ == "__main__":
    sys.exit(main())
