"""A tiny CPU training script with ManagerMarduk, launched by the runtime tests and benchmarks.

One process is one replica group (group world size 1). It hosts its group's TCPStore itself
(no torchrun), trains a two-layer MLP on ProcessGroupGloo, and prints one JSON line per event
and per step to stdout. Settings come from the environment, as in a real sbatch step:

  TORCHFT_LIGHTHOUSE, MASTER_PORT   lighthouse URL, the group's TCPStore port
  MARDUK_*                          see docs/runtime.md (no MARDUK_NATS_URL: plain torchft)
  WORKER_MANAGER=marduk|torchft     ManagerMarduk (default) or torchft's own Manager
  WORKER_DDP=safe|stock             SafeDDP (default) or torchft's DDP
  MAX_STEPS, STEP_SLEEP_S, GLOO_TIMEOUT_S, HEARTBEAT_INTERVAL_MS
  MARDUK_STANDBY=1, MARDUK_STANDBY_SLOT   start as a hot spare (the group comes with assume)
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed import TCPStore
from torchft import DistributedDataParallel, Manager, Optimizer, ProcessGroupGloo

from marduk_slurm.adapters.bus import Bus
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.runtime import ManagerMarduk, SafeDDP


def emit(**fields: Any) -> None:
    print(json.dumps({"t": time.time(), **fields}), flush=True)


def build_model(seed: int = 1234) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))


def digest(model: nn.Module) -> str:
    """Bit-exact fingerprint of the parameters: equal digests mean identical weights."""
    h = hashlib.sha1()
    for p in model.parameters():
        h.update(bytes(p.detach().contiguous().view(-1).view(torch.uint8).tolist()))
    return h.hexdigest()[:16]


def make_manager(kind: str, group: int, model: nn.Module, opt: torch.optim.Optimizer,
                 max_steps: int) -> Manager:
    def load(sd: dict[str, Any]) -> None:
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optim"])

    def save() -> dict[str, Any]:
        return {"model": model.state_dict(), "optim": opt.state_dict()}

    common: dict[str, Any] = dict(
        pg=ProcessGroupGloo(timeout=timedelta(seconds=float(os.environ.get("GLOO_TIMEOUT_S",
                                                                             "5")))),
        min_replica_size=1, load_state_dict=load, state_dict=save,
        timeout=timedelta(seconds=10), quorum_timeout=timedelta(seconds=60),
        heartbeat_interval=timedelta(milliseconds=int(os.environ.get("HEARTBEAT_INTERVAL_MS",
                                                                     "100"))),
    )
    if kind == "torchft":
        return Manager(replica_id=f"plain_rg{group}", **common)
    return ManagerMarduk.from_env(optimizer=opt, max_steps=max_steps, batch_size=8, **common)


def main() -> int:
    group = int(os.environ.get("MARDUK_REPLICA_GROUP", os.environ.get("REPLICA_GROUP_ID", "0")))
    max_steps = int(os.environ.get("MAX_STEPS", "1000000"))
    step_sleep = float(os.environ.get("STEP_SLEEP_S", "0"))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    # torchft's Manager connects to its group's store as a client: someone must host it.
    store = TCPStore("127.0.0.1", int(os.environ["MASTER_PORT"]), is_master=True,
                     wait_for_workers=False)
    model = build_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.01)
    manager = make_manager(os.environ.get("WORKER_MANAGER", "marduk"), group, model, inner,
                           max_steps)
    marduk = manager if isinstance(manager, ManagerMarduk) else None
    if marduk is not None:  # a standby learns its group only when it assumes one
        group = marduk.replica_group
    scale = {"x": 1.0}
    if marduk is not None:
        def load_checkpoint(path: str) -> None:
            sd = torch.load(path, weights_only=True)
            model.load_state_dict(sd["model"])
            emit(ev="checkpoint_loaded", step=marduk.current_step(), digest=digest(model))
        marduk.register_checkpoint_loader(load_checkpoint)
        marduk.register_handler("input_scale", lambda v: scale.update(x=float(v)))
    emit(ev="ready", rg=group, replica_id=getattr(manager, "full_replica_id", ""),
         pid=os.getpid(), assumed_from=marduk.assumed_from if marduk else None)
    ddp = (SafeDDP if os.environ.get("WORKER_DDP", "safe") == "safe"
           else DistributedDataParallel)(manager, model)
    opt = Optimizer(manager, inner)
    gen = torch.Generator().manual_seed(group)
    loss_fn = nn.MSELoss()

    def stop() -> bool:
        return marduk.should_stop() if marduk else manager.current_step() >= max_steps

    clock = HookClock(manager) if os.environ.get("WORKER_HOOK_TIMING") == "1" else None
    while True:
        t0 = time.perf_counter()  # the step includes the boundary (should_stop)
        if clock is not None:
            clock.start_step()
            stopping = clock.timed_stop(stop)
        else:
            stopping = stop()
        if stopping:
            break
        x = torch.randn(8, 16, generator=gen) * scale["x"]
        opt.zero_grad()
        stall = os.environ.get("STALL_FILE")
        if stall and os.path.exists(stall):  # the test asks this group to stall one step
            seconds = float(Path(stall).read_text() or "3")
            os.unlink(stall)
            emit(ev="stall", rg=group, step=manager.current_step(), s=seconds)
            time.sleep(seconds)
        loss = loss_fn(ddp(x), x.sum(dim=1, keepdim=True))
        loss.backward()
        before = manager.current_step()
        opt.step()
        emit(rg=group, step=manager.current_step(), committed=manager.current_step() > before,
             np=manager.num_participants(), lr=inner.param_groups[0]["lr"],
             rev=marduk.config.revision if marduk else 0, digest=digest(model),
             dt=time.perf_counter() - t0,
             **({"timeout": marduk.timeouts["timeout"],
                 "quorum_timeout": marduk.timeouts["quorum_timeout"]} if marduk else {}),
             **({"hook_us": clock.step_us()} if clock is not None else {}))
        if step_sleep:
            time.sleep(step_sleep)
    code = marduk.finish() if marduk else 0
    if marduk is None:
        manager.shutdown()
    emit(ev="exit", rg=group, code=code, step=manager.current_step())
    del store
    return code


class HookClock:
    """The time a step spends in ManagerMarduk's own code: each Manager call it overrides
    (start_quorum, should_commit) minus the torchft call inside it, plus should_stop.

    torchft's methods are wrapped on the class (what ManagerMarduk's super() calls reach) and
    the manager's on the instance (what torchft's Optimizer calls). With torchft's own
    Manager the same wrappers measure the clock's own cost, which is the floor."""

    def __init__(self, manager: Manager) -> None:
        self.outer_ns = self.inner_ns = 0
        for name in ("start_quorum", "should_commit"):
            setattr(Manager, name, self._timed(getattr(Manager, name), "inner_ns"))
            setattr(manager, name, self._timed(getattr(manager, name), "outer_ns"))

    def _timed(self, fn: Any, total: str) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                setattr(self, total, getattr(self, total) + time.perf_counter_ns() - started)
        return timed

    def start_step(self) -> None:
        self.outer_ns = self.inner_ns = 0

    def timed_stop(self, stop: Any) -> bool:
        started = time.perf_counter_ns()
        try:
            return bool(stop())
        finally:
            self.outer_ns += time.perf_counter_ns() - started

    def step_us(self) -> float:
        return (self.outer_ns - self.inner_ns) / 1000.0


# -- launching (used by the tests and the benchmarks) ------------------------------------------


def commit_gap(records: list[dict[str, Any]], after: float) -> float:
    """The longest wait between two commits, counted from the last commit before `after`."""
    times = [r["t"] for r in records if r.get("committed")]
    times = [t for t in times if t < after][-1:] + [t for t in times if t >= after]
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def send_leave(url: str, job_id: int, replica_id: str, group: int, reason: str) -> None:
    """Tell one replica group to leave, as the controller would."""
    async def send() -> None:
        bus = Bus(url, name="leave-sender")
        await bus.connect()
        cmd = m.ReplicaCommand(replica_id=replica_id, job_id=job_id, action="leave",
                               reason=reason, ts=time.time())
        await bus.publish(subjects.replica_commands(job_id, group), m.encode(cmd))
        await bus.flush()
        await bus.close()
    asyncio.run(send())

WORKER = Path(__file__).resolve()
REPO = WORKER.parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Lighthouse:
    """A real `torchft_lighthouse` on a free loopback port."""

    def __init__(self, log_path: Path, *, heartbeat_timeout_ms: int = 5000,
                 join_timeout_ms: int = 10000, min_replicas: int = 1,
                 quorum_tick_ms: int = 100) -> None:
        self.port = free_port()
        self.heartbeat_timeout_ms = heartbeat_timeout_ms
        binary = Path(sys.executable).parent / "torchft_lighthouse"
        self.log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [str(binary), "--bind", f"127.0.0.1:{self.port}", "--min_replicas",
             str(min_replicas), "--quorum_tick_ms", str(quorum_tick_ms), "--join_timeout_ms",
             str(join_timeout_ms), "--heartbeat_timeout_ms", str(heartbeat_timeout_ms)],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("torchft_lighthouse did not start listening")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


_HEARTBEAT_ROW = re.compile(r'<li class="heartbeat\s*(old)?\s*">\s*(\S+): seen ([0-9.e-]+)s ago')


def lighthouse_heartbeats(port: int) -> dict[str, tuple[float, bool]]:
    """The real lighthouse's view (its /status page): replica id -> (seconds since its last
    heartbeat, whether that is beyond the lighthouse's heartbeat timeout)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as reply:
        page = reply.read().decode(errors="replace")
    return {rid: (float(age), old == "old") for old, rid, age in _HEARTBEAT_ROW.findall(page)}


class LighthouseProxyProcess:
    """`marduk lighthouse-proxy` on a free loopback port in front of `lighthouse`."""

    def __init__(self, lighthouse: Lighthouse, log_path: Path, *, long_timeout_ms: int,
                 job_id: int | None = None, nats_url: str = "") -> None:
        self.port = free_port()
        argv = [sys.executable, "-m", "marduk_slurm.cli.main", "lighthouse-proxy",
                "--listen", f"127.0.0.1:{self.port}", "--lighthouse", lighthouse.url,
                "--long-timeout-ms", str(long_timeout_ms),
                "--lighthouse-timeout-ms", str(lighthouse.heartbeat_timeout_ms)]
        if job_id is not None:
            argv += ["--job", str(job_id), "--nats-url", nats_url]
        self.log = log_path.open("wb")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.proc.poll() is None:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"lighthouse proxy did not start listening:\n{log_path.read_text()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict[str, Any]:
        from marduk_slurm.adapters.lighthouse_grpc import proxy_stats
        return asyncio.run(proxy_stats(f"127.0.0.1:{self.port}"))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.log.close()
        return rc


class WorkerProcess:
    """One replica group running this script; its JSON lines are read back from a file."""

    def __init__(self, group: int, lighthouse: Lighthouse | LighthouseProxyProcess,
                 out_dir: Path, env: dict[str, str]) -> None:
        self.group = group
        self.out_path = out_dir / f"rg{group}-{time.monotonic_ns()}.jsonl"
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHFT_LIGHTHOUSE": lighthouse.url,
                    "MASTER_PORT": str(free_port()), "MARDUK_REPLICA_GROUP": str(group),
                    "REPLICA_GROUP_ID": str(group), "PYTHONPATH": str(REPO), **env}
        with self.out_path.open("wb") as out:
            self.proc = subprocess.Popen([sys.executable, str(WORKER)], stdout=out,
                                         stderr=subprocess.STDOUT, env=full_env, cwd=REPO)

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.out_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def steps(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if "step" in r and "ev" not in r]

    def last_step(self) -> int:
        steps = self.steps()
        return int(steps[-1]["step"]) if steps else -1

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("ev") == name]

    def tail(self) -> str:
        return self.out_path.read_text(errors="replace")[-3000:]

    def wait(self, timeout_s: float) -> int:
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


if __name__ == "__main__":
    sys.exit(main())
