"""Live job configuration on the controller side (filled in with the runtime hooks)."""

from __future__ import annotations

from marduk_slurm.controller.context import Context
from marduk_slurm.controller.rpc import RpcServer


def install(ctx: Context, rpc: RpcServer) -> None:
    """Register the config verbs on `rpc`."""
