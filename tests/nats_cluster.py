"""A real NATS cluster for tests: three nats-server processes on loopback, routed to each
other, with clustered JetStream (each server its own store directory).

The client and monitoring ports are port 0 (the servers pick them and write them to their
ports files). The cluster ports cannot be: JetStream refuses to start clustered unless every
server is configured with routes to its peers, so those ports are picked free just before the
servers start. `start` returns once every server sees the same JetStream meta leader and
every peer is current; `stop` stops the survivors with SIGTERM; the store directories live
under the test's tmp_path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from marduk_slurm.adapters.bus import Bus
from marduk_slurm.adapters.nats_server import NatsServerProcess
from marduk_slurm.errors import BusError, BusTimeout


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports nobody listens on now (all bound at once, then released)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                 for _ in range(count)]
        for sock in socks:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in socks]


@dataclass
class ClusterServer:
    """One server of the cluster: its name (JetStream's `server_name`), process, ports."""

    name: str
    process: NatsServerProcess
    monitor_url: str = ""

    @property
    def url(self) -> str:
        return self.process.url

    @property
    def running(self) -> bool:
        return self.process.running

    def ports(self) -> dict[str, list[str]]:
        proc = self.process.proc
        assert proc is not None
        path = self.process.store_dir / "ports" / f"nats-server_{proc.pid}.ports"
        return json.loads(path.read_text()) if path.exists() else {}

    def jsz(self) -> dict[str, Any]:
        """The server's JetStream report (its monitoring endpoint /jsz)."""
        with urllib.request.urlopen(f"{self.monitor_url}/jsz", timeout=5) as resp:
            return json.loads(resp.read())


class NatsCluster:
    """`size` routed nats-servers with clustered JetStream, named s1, s2, ..."""

    def __init__(self, root: Path, size: int = 3, name: str = "marduk-test",
                 host: str = "127.0.0.1") -> None:
        self.root = Path(root)
        self.size = size
        self.name = name
        self.host = host
        self.servers: list[ClusterServer] = []

    @property
    def url(self) -> str:
        """Every server's client URL, comma-separated: what a site puts in nats.url."""
        return ",".join(s.url for s in self.servers)

    def server(self, name: str) -> ClusterServer:
        return next(s for s in self.servers if s.name == name)

    def server_at(self, url: str) -> ClusterServer:
        return next(s for s in self.servers if s.url == url)

    def start(self, timeout_s: float = 60.0) -> NatsCluster:
        cluster_ports = free_ports(self.size, self.host)
        routes = ", ".join(f'"nats-route://{self.host}:{p}"' for p in cluster_ports)
        for i, port in enumerate(cluster_ports, start=1):
            name = f"s{i}"
            store = self.root / name
            store.mkdir(parents=True, exist_ok=True)
            config = store / "server.conf"
            config.write_text(
                f'server_name: "{name}"\n'
                f'http: "{self.host}:-1"\n'
                f'cluster {{\n  name: "{self.name}"\n  listen: "{self.host}:{port}"\n'
                f'  routes: [{routes}]\n}}\n')
            self.servers.append(ClusterServer(name, NatsServerProcess(store, host=self.host,
                                                                      config_file=config)))
        for server in self.servers:
            server.process.prepare()
            server.process.launch()
        for server in self.servers:
            server.process.wait_ready(timeout_s)
            server.monitor_url = server.ports()["monitoring"][0]
        self.wait_formed(timeout_s)
        return self

    def meta_leader(self) -> str:
        """The JetStream meta leader every running server agrees on, once the leader sees all
        its peers current (only the leader knows that); "" until then."""
        reports: dict[str, dict[str, Any]] = {}
        for server in self.servers:
            if not server.running:
                continue
            try:
                reports[server.name] = server.jsz().get("meta_cluster", {})
            except OSError:
                return ""
        leaders = {meta.get("leader", "") for meta in reports.values()}
        leader = leaders.pop() if len(leaders) == 1 else ""
        meta = reports.get(leader, {})
        peers = meta.get("replicas") or []
        if (meta.get("cluster_size") != self.size or len(peers) != self.size - 1
                or not all(p.get("current") or p.get("offline") for p in peers)):
            return ""
        return leader

    def wait_formed(self, timeout_s: float = 60.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            leader = self.meta_leader()
            if leader:
                return leader
            time.sleep(0.1)
        raise RuntimeError(f"NATS cluster did not form in {timeout_s:.0f} s: "
                           f"{[s.jsz().get('meta_cluster') for s in self.servers if s.running]}")

    def kill(self, name: str) -> None:
        """SIGKILL one server: the crash the cluster must survive (its store stays, under the
        test's tmp_path)."""
        proc = self.server(name).process.proc
        assert proc is not None
        proc.kill()
        proc.wait()

    def stop(self) -> None:
        for server in self.servers:
            server.process.stop()


async def leader_of(bus: Bus, kind: str, name: str) -> str:
    """The server that leads stream `name` (kind "STREAM") or consumer "<stream>.<durable>"
    (kind "CONSUMER"), from JetStream's own INFO answer; "" while none does."""
    try:
        info = json.loads(await bus.request(f"$JS.API.{kind}.INFO.{name}", b"", timeout_s=2.0))
    except (BusError, BusTimeout):
        return ""
    return str(info.get("cluster", {}).get("leader") or "")


async def move_leader(bus: Bus, kind: str, name: str, target: str,
                      timeout_s: float = 30.0) -> None:
    """Make server `target` the leader of a stream or consumer: ask its leader to step down
    in `target`'s favour until it is."""
    request = json.dumps({"placement": {"preferred": target}}).encode()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        leader = await leader_of(bus, kind, name)
        if leader == target:
            return
        if leader:
            with contextlib.suppress(BusError, BusTimeout):
                await bus.request(f"$JS.API.{kind}.LEADER.STEPDOWN.{name}", request, 2.0)
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{kind} {name} is not led by {target} after {timeout_s:.0f} s")
