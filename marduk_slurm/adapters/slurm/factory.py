"""The one place that chooses and builds a Slurm backend.

It lives apart from `base` because the backends import `base`: a factory there would make
`base` and its backends import each other.
"""

from __future__ import annotations

import importlib.util

from marduk_slurm.adapters.slurm.base import SlurmBackend


def make_backend(
    kind: str = "auto", *, timeout_s: float, slurm_conf: str | None = None
) -> SlurmBackend:
    """Build a backend: "commands", "pyslurm", or "auto" (pyslurm if importable, else commands).

    Only here are the backend modules imported, so pyslurm is loaded only when chosen.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if kind == "auto":
        kind = "pyslurm" if importlib.util.find_spec("pyslurm") is not None else "commands"
    if kind == "commands":
        from marduk_slurm.adapters.slurm.commands import CommandsBackend, SlurmCommandRunner

        return CommandsBackend(SlurmCommandRunner(timeout_s=timeout_s, slurm_conf=slurm_conf))
    if kind == "pyslurm":
        from marduk_slurm.adapters.slurm.pyslurm_backend import PyslurmBackend

        return PyslurmBackend(timeout_s=timeout_s, slurm_conf=slurm_conf)
    raise ValueError(f"unknown Slurm backend {kind!r}; valid: 'auto', 'commands', 'pyslurm'")
