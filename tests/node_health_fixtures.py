"""A fake sysfs tree of network ports, as the kernel lays it out, for the node health tests."""

from __future__ import annotations

from pathlib import Path

from marduk_slurm.domain.node_health import IB_ERROR_COUNTERS, NET_ERROR_COUNTERS


class FakeSysfs:
    """/sys/class/infiniband/<dev>/ports/<n>/... and /sys/class/net/<if>/... under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def ib_port(self, target: str, *, state: str = "4: ACTIVE",
                phys_state: str = "5: LinkUp", link_downed: int = 0,
                errors: int = 0) -> Path:
        device, port = target.split("/")
        base = self.root / "class" / "infiniband" / device / "ports" / port
        (base / "counters").mkdir(parents=True, exist_ok=True)
        (base / "state").write_text(state + "\n")
        (base / "phys_state").write_text(phys_state + "\n")
        (base / "counters" / "link_downed").write_text(f"{link_downed}\n")
        for name in IB_ERROR_COUNTERS:
            (base / "counters" / name).write_text(f"{errors}\n")
        return base

    def net_port(self, name: str, *, operstate: str = "up", carrier_changes: int = 2,
                 errors: int = 0, device: bool = True) -> Path:
        base = self.root / "class" / "net" / name
        (base / "statistics").mkdir(parents=True, exist_ok=True)
        (base / "operstate").write_text(operstate + "\n")
        (base / "carrier_changes").write_text(f"{carrier_changes}\n")
        for stat in NET_ERROR_COUNTERS:
            (base / "statistics" / stat).write_text(f"{errors}\n")
        if device:  # a physical interface has its device behind it; lo and veths do not
            (base / "device").mkdir(exist_ok=True)
        return base

    def write(self, relative: str, data: str | bytes) -> None:
        """Overwrite one file the way the kernel would update it: all at once."""
        path = self.root / relative
        tmp = path.with_name(path.name + ".tmp")
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
        tmp.replace(path)
