"""Adapters: one module (or package) per real system.

Each hides its library behind a small interface: NATS (`bus`, `nats_server`), SQLite (`store`),
Slurm (`slurm`), NVML (`nvml`), sysfs ports and mount points (`node_probes`), systemd
(`systemd`), matplotlib (`timeline_plot`). Only the adapter imports its library.
"""
