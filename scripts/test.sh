#!/usr/bin/env bash
# test.sh - the whole test suite on a fresh machine: environment, a real local Slurm cluster
# (when root), then pytest. Extra arguments go to pytest, e.g. scripts/test.sh -k controller.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
say() { echo "[test $(date +%T)] $*" >&2; }
bash scripts/setup.sh
# Tools some tests use: headless Chromium (the dashboard), shellcheck (the sbatch template),
# systemd-analyze (the unit files). Without them those tests skip and say why.
TEST_PACKAGES="chromium shellcheck systemd"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=""
  for p in $TEST_PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
  done
  if [ -n "$missing" ]; then
    say "installing:$missing"
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086  # a list of package names, split on purpose
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends $missing >/dev/null; } \
      || say "could not install$missing: the tests that need them will skip"
  fi
fi
if [ "$(id -u)" = 0 ]; then
  say "starting the local Slurm cluster (scripts/slurm-cluster.sh up)"
  bash scripts/slurm-cluster.sh up || say "Slurm cluster unavailable: Slurm tests will be skipped"
else
  say "not root: tests that need the local Slurm cluster will be skipped"
fi
say "ruff"
.venv/bin/ruff check marduk_slurm tests benchmarks scripts
say "pytest"
set +e
.venv/bin/python -m pytest -q -rs "$@"
rc=$?
set -e
[ "$rc" = 5 ] && { say "no tests collected"; exit 1; }
exit "$rc"
