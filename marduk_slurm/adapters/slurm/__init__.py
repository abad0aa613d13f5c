"""Slurm adapter: node, job and step state in, drain/resume/down/signal/requeue out.

`base` holds the values (`SlurmNode`, `SlurmJob`, `SlurmStep`) and the `SlurmBackend` protocol;
`factory` holds `make_backend`. Two backends implement the protocol: `commands` runs Slurm's
own commands (scontrol, sinfo, squeue, scancel) through one runner, with the output parsing in
the pure `parse`; and `pyslurm_backend` calls pyslurm, which must match the cluster's Slurm major
version. Both raise `SlurmUnavailable` when slurmctld cannot be reached and `SlurmError` when
Slurm refuses. See docs/slurm.md.
"""

from marduk_slurm.adapters.slurm.base import (
    SlurmBackend,
    SlurmJob,
    SlurmNode,
    SlurmStep,
)
from marduk_slurm.adapters.slurm.factory import make_backend

__all__ = ["SlurmBackend", "SlurmJob", "SlurmNode", "SlurmStep", "make_backend"]
