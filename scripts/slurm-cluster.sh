#!/usr/bin/env bash
# slurm-cluster.sh - a real single-machine Slurm cluster for marduk-slurm's tests and demos.
#
#   scripts/slurm-cluster.sh up|down|status|env
#
# up      install the Debian packages if missing, write the configs, start munged, slurmctld
#         and one slurmd per node, wait until every node is idle. Idempotent: a second run
#         only starts what is not running (and restarts everything if a config changed).
# down    cancel all jobs (so no slurmstepd is left behind), then stop the daemons by their
#         PID files: TERM, wait, KILL only as a last resort. Idempotent.
# status  daemons with their PIDs, then sinfo.
# env     print the line to eval: export SLURM_CONF=...
#
# Environment (all optional):
#   MARDUK_SLURM_BASE           everything lives here             (/tmp/marduk-slurm)
#   MARDUK_SLURM_NODES          compute nodes n1..nN with a slurmd (4)
#   MARDUK_SLURM_GPUS_PER_NODE  fake GPUs per node                 (2)
#   MARDUK_SLURM_CPUS_PER_NODE  CPUs per node, may exceed cores    (2)
#   MARDUK_SLURM_EXTRA_NODES    K node records x1..xK without a slurmd, in partition
#                               "extra"; they list and drain like real nodes (benchmarks) (0)
#   MARDUK_SLURM_EXTRA_STATE    their configured state: DOWN (listed by sinfo/scontrol) or
#                               FUTURE (hidden unless `scontrol --future`)          (DOWN)
#   MARDUK_SLURM_PLUGSTACK      plugstack.conf lines, e.g. "required /path/x.so arg=1";
#                               unset: marduk's own SPANK plugin (built from spank/), on by
#                               default, reporting to $BASE/run/agent-<node>.sock; empty: none
#   MARDUK_SLURM_CTLD_PORT      slurmctld port                     (6917)
#   MARDUK_SLURM_SLURMD_PORT    slurmd of node i listens on this + i (17100)
#   MARDUK_SLURM_TIMEOUT_S      how long `up` waits for idle nodes (60)
#
# Needs root (the daemons run as root; no systemd, no cgroups). The ports differ from
# /work/shared/reference/slurm-up.sh so both clusters can run side by side.
set -euo pipefail

BASE=${MARDUK_SLURM_BASE:-/tmp/marduk-slurm}
NODES=${MARDUK_SLURM_NODES:-4}
GPUS=${MARDUK_SLURM_GPUS_PER_NODE:-2}
CPUS=${MARDUK_SLURM_CPUS_PER_NODE:-2}
EXTRA=${MARDUK_SLURM_EXTRA_NODES:-0}
EXTRA_STATE=${MARDUK_SLURM_EXTRA_STATE:-DOWN}
REPO=$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)
PLUGSTACK=${MARDUK_SLURM_PLUGSTACK-default}
CTLD_PORT=${MARDUK_SLURM_CTLD_PORT:-6917}
SLURMD_PORT=${MARDUK_SLURM_SLURMD_PORT:-17100}
TIMEOUT_S=${MARDUK_SLURM_TIMEOUT_S:-60}
PACKAGES="slurmctld slurmd slurm-client munge libslurm-dev"

ETC=$BASE/etc RUN=$BASE/run LOG=$BASE/log STATE=$BASE/state DEV=$BASE/dev MUNGE=$BASE/munge
export SLURM_CONF=$ETC/slurm.conf

say() { echo "[slurm-cluster $(date +%T)] $*" >&2; }
die() { say "error: $*"; exit 1; }

# live_pid PIDFILE COMM: print the PID if the file names a live, non-zombie COMM process.
# Checking the command name guards against a recycled PID after a reboot or crash.
live_pid() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1")
  [ -r "/proc/$pid/stat" ] || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1
  # A zombie leader with threads left is still shutting down (slurmctld does this for
  # seconds after TERM, holding its port); only a single-threaded zombie is gone.
  if [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" = Z ] &&
    [ "$(awk '/^Threads:/{print $2}' "/proc/$pid/status" 2>/dev/null)" = 1 ]; then
    return 1
  fi
  echo "$pid"
}

# stop_daemon PIDFILE COMM: TERM, wait up to 10 s, KILL as a last resort.
stop_daemon() {
  local pid
  pid=$(live_pid "$1" "$2") || { rm -f "$1"; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do live_pid "$1" "$2" >/dev/null || break; sleep 0.1; done
  if live_pid "$1" "$2" >/dev/null; then
    say "$2 (pid $pid) ignored TERM; sending KILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$1"
  say "stopped $2 (pid $pid)"
}

require_root() { [ "$(id -u)" = 0 ] || die "must run as root (the Slurm daemons run as root here)"; }

install_packages() {
  local missing="" p own_guard=0
  for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
      missing="$missing $p"
  done
  [ -z "$missing" ] && return 0
  command -v apt-get >/dev/null || die "apt-get not found; install:$missing"
  say "installing:$missing"
  # Without systemd the maintainer scripts would try to start the distro's own daemons
  # with the distro's config; policy-rc.d exit 101 forbids that.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    own_guard=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  [ "$own_guard" = 1 ] && rm -f /usr/sbin/policy-rc.d
  return 0
}

prepare_dirs() {
  local i g
  mkdir -p "$ETC" "$RUN" "$LOG" "$STATE/ctld" "$DEV" "$MUNGE/sock"
  chmod 755 "$BASE" "$RUN" "$LOG" "$MUNGE/sock"
  chmod 711 "$MUNGE"
  if [ ! -s "$MUNGE/munge.key" ]; then
    mungekey --create --keyfile="$MUNGE/munge.key" 2>/dev/null ||
      dd if=/dev/urandom of="$MUNGE/munge.key" bs=1024 count=1 status=none
  fi
  chmod 600 "$MUNGE/munge.key"
  for i in $(seq 1 "$NODES"); do
    mkdir -p "$STATE/n$i" "$DEV/n$i"
    # gres/gpu wants File= to be a device (stat follows the link); the GPU index Slurm
    # reports is the number at the end of the file name, so nvidiaG gives index G.
    for g in $(seq 0 $((GPUS - 1))); do ln -sfn /dev/null "$DEV/n$i/nvidia$g"; done
  done
}

# ports_of COUNT: the slurmd Port= value for nodes 1..COUNT
ports_of() {
  if [ "$1" = 1 ]; then echo $((SLURMD_PORT + 1)); else echo "[$((SLURMD_PORT + 1))-$((SLURMD_PORT + $1))]"; fi
}

write_slurm_conf() {
  local host
  host=$(hostname -s)
  cat <<EOF
# Written by scripts/slurm-cluster.sh on every "up"; edits here are overwritten.
ClusterName=marduk-dev
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE/sock/munge.socket
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups in a container: track processes by /proc, bind nothing
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# the default batch_sched_delay=3 spaces back-to-back sbatch starts ~3 s apart
SchedulerParameters=batch_sched_delay=0
# one machine plays all nodes, so each slurmd takes its hardware from this file
SlurmdParameters=config_overrides
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
# 1: a node an admin set DOWN stays DOWN until resumed (2 would return it at once)
ReturnToService=1
KillWait=5
GresTypes=gpu
PlugStackConfig=$ETC/plugstack.conf
NodeName=n[1-$NODES] NodeHostname=$host NodeAddr=127.0.0.1 Port=$(ports_of "$NODES") CPUs=$CPUS Sockets=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=1000 Gres=gpu:$GPUS State=UNKNOWN
PartitionName=debug Nodes=n[1-$NODES] Default=YES MaxTime=INFINITE State=UP
EOF
  if [ "$EXTRA" -gt 0 ]; then
    # Records without a slurmd still accept drain/resume (22.05: DOWN -> DOWN+DRAIN, FUTURE ->
    # FUTURE+DRAIN), enough to time "drain 1,000 nodes" against a real slurmctld. Their own
    # partition keeps jobs off them.
    echo "NodeName=x[1-$EXTRA] NodeAddr=127.0.0.1 CPUs=1 RealMemory=100 State=$EXTRA_STATE"
    echo "PartitionName=extra Nodes=x[1-$EXTRA] Default=NO MaxTime=INFINITE State=UP"
  fi
}

write_gres_conf() {
  local i
  for i in $(seq 1 "$NODES"); do
    echo "NodeName=n$i Name=gpu File=$DEV/n$i/nvidia[0-$((GPUS - 1))]"
  done
}

write_plugstack_conf() {
  if [ "$PLUGSTACK" = default ]; then
    printf 'optional %s default=on socket=%s\n' "$REPO/spank/marduk_spank.so" \
      "$RUN/agent-%n.sock"
  elif [ -n "$PLUGSTACK" ]; then
    printf '%s\n' "$PLUGSTACK"
  fi
}

# build_spank: the default plugstack loads marduk's SPANK plugin; build it (needs gcc and
# libslurm-dev, which install_packages provides).
build_spank() {
  [ "$PLUGSTACK" = default ] || return 0
  make -s -C "$REPO/spank" >&2
}

# install_if_changed SRC DST: replace DST by SRC when they differ; return 0 if replaced
install_if_changed() {
  if cmp -s "$1" "$2"; then rm -f "$1"; return 1; fi
  mv "$1" "$2"
  chmod 644 "$2"
}

write_configs() {
  local changed=1 tmp
  tmp=$(mktemp -d)
  write_slurm_conf >"$tmp/slurm.conf"
  write_gres_conf >"$tmp/gres.conf"
  write_plugstack_conf >"$tmp/plugstack.conf"
  for f in slurm.conf gres.conf plugstack.conf; do
    install_if_changed "$tmp/$f" "$ETC/$f" && changed=0
  done
  rmdir "$tmp"
  printf 'export SLURM_CONF=%s\n' "$SLURM_CONF" >"$BASE/env.sh"
  return $changed
}

any_slurm_daemon_alive() {
  local f
  live_pid "$RUN/slurmctld.pid" slurmctld >/dev/null && return 0
  for f in "$RUN"/slurmd-*.pid; do
    [ -e "$f" ] && live_pid "$f" slurmd >/dev/null && return 0
  done
  return 1
}

start_daemons() {
  local i fresh=0
  # Saved state is wiped only on a cold start: a slurmctld restarted under running slurmds
  # (the "controller was down" test) must keep its jobs.
  any_slurm_daemon_alive || fresh=1
  if ! live_pid "$RUN/munged.pid" munged >/dev/null; then
    munged --socket="$MUNGE/sock/munge.socket" --key-file="$MUNGE/munge.key" \
      --pid-file="$RUN/munged.pid" --log-file="$LOG/munged.log" --seed-file="$STATE/munged.seed"
  fi
  for _ in $(seq 50); do [ -S "$MUNGE/sock/munge.socket" ] && break; sleep 0.1; done
  if ! live_pid "$RUN/slurmctld.pid" slurmctld >/dev/null; then
    [ "$fresh" = 1 ] && rm -rf "${STATE:?}/ctld/"*
    say "starting slurmctld on port $CTLD_PORT"
    slurmctld -f "$SLURM_CONF"
  fi
  for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.1; done
  for i in $(seq 1 "$NODES"); do
    live_pid "$RUN/slurmd-n$i.pid" slurmd >/dev/null && continue
    [ "$fresh" = 1 ] && rm -rf "${STATE:?}/n$i/"*
    slurmd -f "$SLURM_CONF" -N "n$i"
  done
}

wait_idle() {
  local deadline states idle
  deadline=$(($(date +%s) + TIMEOUT_S))
  while :; do
    # A node may be drained on purpose; only "not yet registered" states mean wait.
    states=$(sinfo -h -N -p debug -o '%N %t' 2>/dev/null | sort -u || true)
    idle=$(printf '%s\n' "$states" | awk '$2 !~ /[*~#!%]$/ && $2 !~ /^unk/' | grep -c . || true)
    [ "$idle" -ge "$NODES" ] && return 0
    if [ "$(date +%s)" -ge "$deadline" ]; then
      say "timeout: nodes not up after ${TIMEOUT_S}s:"
      printf '%s\n' "$states" >&2
      tail -n 20 "$LOG/slurmctld.log" >&2 || true
      exit 1
    fi
    sleep 0.2
  done
}

cmd_up() {
  local t0
  t0=$(date +%s.%N)
  require_root
  install_packages
  build_spank
  prepare_dirs
  if write_configs && any_slurm_daemon_alive; then
    say "config changed while daemons run: restarting the cluster"
    cmd_down
  fi
  start_daemons
  wait_idle
  say "up: $NODES nodes with gpu:$GPUS, $EXTRA extra, in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s"
  echo "export SLURM_CONF=$SLURM_CONF"
}

cancel_jobs() {
  local jobs
  live_pid "$RUN/slurmctld.pid" slurmctld >/dev/null || return 0
  jobs=$(squeue -h -o %i 2>/dev/null || true)
  [ -z "$jobs" ] && return 0
  say "cancelling jobs: ${jobs//$'\n'/ }"
  # shellcheck disable=SC2086
  scancel $jobs 2>/dev/null || true
  for _ in $(seq 150); do # KillWait=5, so 15 s is plenty
    [ -z "$(squeue -h -t R,CG,S -o %i 2>/dev/null)" ] && return 0
    sleep 0.1
  done
  say "jobs still running after 15 s; stopping daemons anyway"
}

cmd_down() {
  local f
  require_root
  cancel_jobs
  for f in "$RUN"/slurmd-*.pid; do [ -e "$f" ] && stop_daemon "$f" slurmd; done
  stop_daemon "$RUN/slurmctld.pid" slurmctld
  stop_daemon "$RUN/munged.pid" munged
  say "down"
}

cmd_status() {
  local f name pid
  for f in "$RUN"/munged.pid "$RUN"/slurmctld.pid "$RUN"/slurmd-*.pid; do
    [ -e "$f" ] || continue
    name=$(basename "$f" .pid)
    case $name in slurmd-*) comm=slurmd ;; *) comm=$name ;; esac
    if pid=$(live_pid "$f" "$comm"); then echo "$name running (pid $pid)"; else echo "$name stopped"; fi
  done
  if live_pid "$RUN/slurmctld.pid" slurmctld >/dev/null; then
    sinfo
  else
    echo "slurmctld is not running"
    return 1
  fi
}

main() {
  case ${1:-} in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$SLURM_CONF" ;;
  *)
    echo "usage: $0 up|down|status|env   (see the header of this script for the environment)" >&2
    exit 2
    ;;
  esac
}

main "$@"
