#!/usr/bin/env bash
# demo.sh - the main job: on a fresh machine, set up the environment and a real local Slurm
# cluster, then run the fault drill (scripts/drill.py) and print its summary.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
say() { echo "[demo $(date +%T)] $*" >&2; }
bash scripts/setup.sh
if [ "$(id -u)" != 0 ]; then
  say "the drill runs a local Slurm cluster and needs root"; exit 1
fi
say "starting the local Slurm cluster"
bash scripts/slurm-cluster.sh up
exec .venv/bin/python scripts/drill.py "$@"
