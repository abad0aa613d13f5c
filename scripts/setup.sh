#!/usr/bin/env bash
# setup.sh - make the project's virtual environment (.venv) on a fresh machine, idempotently.
# Installs torch 2.13.0 (CPU) first, so that nothing else can pull a different torch build,
# then the project with its runtime, plots and dev extras. Prints what it does.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
VENV=${MARDUK_VENV:-.venv}
PY=${PYTHON:-python3}
say() { echo "[setup $(date +%T)] $*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
# pip's warnings about this image's local package folders say nothing about the install.
pip() {
  "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v '^WARNING: Location' >&2)
}
stamp="$VENV/.marduk-setup"
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  say "environment up to date"
  exit 0
fi
if ! "$VENV/bin/python" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
  say "installing torch 2.13.0 (CPU)"
  pip install "torch==2.13.0"
fi
say "installing marduk-slurm with runtime, plots and dev extras"
pip install -e ".[runtime,plots,dev]" 2>&1 | grep -v -E '^(WARNING: Location|  )' >&2 || true
"$VENV/bin/python" -c 'import torch, torchft, nats, matplotlib, marduk_slurm' \
  || { say "installation incomplete"; exit 1; }
"$VENV/bin/python" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' \
  || { say "a dependency replaced torch 2.13.0"; exit 1; }
echo "$want" > "$stamp"
say "ready: $VENV"
