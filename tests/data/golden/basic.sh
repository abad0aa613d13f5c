#!/bin/bash
# shellcheck disable=SC2030,SC2031  # each step sets its own environment in its subshell
# Fault-tolerant TorchFT job, rendered by `marduk sbatch` (marduk_slurm/domain/sbatch.py).
# 2 replica group(s) x 1 node(s), 0 spare group(s) (0 hot), up to 3 restart(s).
#SBATCH --job-name=marduk-torchft
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#
# The supervisor below starts one srun step per replica group and decides, for each step
# that ends, from its exit code:
#   0              the group finished             -> its nodes become spares
#   75             told to leave (node draining)  -> respawn on other nodes
#   76             told to stop                   -> not respawned
#   anything else  crashed                        -> respawn, same nodes unless drained
# A node that Slurm reports DRAIN, DOWN or FAIL is never used again. The job exits 0 when
# every group finished or was told to stop, 1 when a group could not be respawned.
# MAX_RESTARTS counts respawns of all groups together. Needs bash >= 4.4.
#
# Hot spares: NUM_STANDBYS spare node sets run the training script as standbys
# (MARDUK_STANDBY=1): imported and model-built, outside torchft's quorum. When the controller
# sends a group away it tells a standby to assume it; the standby writes
# $ASSUME_DIR/group-<g>.assumed and the supervisor, instead of respawning group g, follows it
# in the standby's step. Without a marker (no standby free, controller away) it waits up to
# ASSUME_GRACE_S for one, then respawns cold. A free healthy spare refills the standby pool.
set -uo pipefail

NUM_GROUPS=2
NODES_PER_GROUP=1
MAX_RESTARTS=3
POLL_S=1.0
NUM_STANDBYS=0
ASSUME_GRACE_S=5
LIGHTHOUSE_PORT=29510
MASTER_PORT_BASE=29600
SRUN_GRES=(--gres=gpu:8)
# shellcheck disable=SC2016  # quoted on purpose: arguments reach the program literally
TRAIN_CMD=(python3 train.py)
ASSUME_DIR="${SLURM_SUBMIT_DIR:-$PWD}/.marduk-job-$SLURM_JOB_ID"

log() { printf '%s marduk-supervisor: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"; }

# node_field NODE FIELD: one field of `scontrol show node`, empty when Slurm cannot say.
node_field() {
  scontrol show node -o "$1" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p" | head -n 1
}

# node_usable NODE: true unless Slurm reports it drained, down or failed (or cannot be asked).
node_usable() {
  local state
  state=$(node_field "$1" State)
  [ -n "$state" ] && [[ ! $state =~ DRAIN|DOWN|FAIL ]]
}

node_addr() {
  local addr
  addr=$(node_field "$1" NodeAddr)
  echo "${addr:-$1}"
}

now_s() { printf '%(%s)T' -1; }

mapfile -t ALL_NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
if [ "${#ALL_NODES[@]}" -lt $((NUM_GROUPS * NODES_PER_GROUP)) ]; then
  log "allocation has ${#ALL_NODES[@]} nodes, need $((NUM_GROUPS * NODES_PER_GROUP)); giving up"
  exit 1
fi

# -- lighthouse ----------------------------------------------------------------------------
LIGHTHOUSE_NODE=${SLURMD_NODENAME:-${ALL_NODES[0]}}
LIGHTHOUSE_ADDR=''
[ -n "$LIGHTHOUSE_ADDR" ] || LIGHTHOUSE_ADDR=$(node_addr "$LIGHTHOUSE_NODE")
export TORCHFT_LIGHTHOUSE="http://$LIGHTHOUSE_ADDR:$LIGHTHOUSE_PORT"
# The Managers talk to marduk's liveness proxy, which keeps each replica alive at the real
# lighthouse for the job's heartbeat timeout (--long-timeout-ms) and drops one at once when
# marduk tells it to leave; the real lighthouse, on loopback, runs with a short timeout.
REAL_LIGHTHOUSE="127.0.0.1:$((LIGHTHOUSE_PORT + 1))"
torchft_lighthouse --bind "$REAL_LIGHTHOUSE" --min_replicas 1 \
  --quorum_tick_ms 25 --join_timeout_ms 10000 \
  --heartbeat_timeout_ms 150 &
LIGHTHOUSE_PID=$!
marduk lighthouse-proxy --listen "$LIGHTHOUSE_ADDR:$LIGHTHOUSE_PORT" \
  --lighthouse "$REAL_LIGHTHOUSE" --long-timeout-ms 1000 \
  --lighthouse-timeout-ms 150 --job "$SLURM_JOB_ID" &
PROXY_PID=$!
log "lighthouse (pid $LIGHTHOUSE_PID) at $REAL_LIGHTHOUSE behind its proxy (pid $PROXY_PID) on $LIGHTHOUSE_NODE at $TORCHFT_LIGHTHOUSE"

declare -a GROUP_NODES GROUP_PID GROUP_STATE GROUP_RESTARTS GROUP_DEADLINE
declare -a STANDBY_NODES STANDBY_PID STANDBY_STATE
FREE_NODES=()
RESTARTS=0
STANDBY_STARTS=0

stop_standbys() {
  local s
  for s in "${!STANDBY_PID[@]}"; do
    [ "${STANDBY_STATE[$s]}" = standby ] && kill -TERM "${STANDBY_PID[$s]}" 2>/dev/null
  done
  for s in "${!STANDBY_PID[@]}"; do
    [ "${STANDBY_STATE[$s]}" = standby ] && wait "${STANDBY_PID[$s]}" 2>/dev/null
  done
  return 0
}

# shellcheck disable=SC2317  # called from the trap below
stop_all() {
  local g
  for g in "${!GROUP_PID[@]}"; do
    [ "${GROUP_STATE[$g]}" = running ] && kill -TERM "${GROUP_PID[$g]}" 2>/dev/null
  done
  stop_standbys
  for g in "${!GROUP_PID[@]}"; do wait "${GROUP_PID[$g]}" 2>/dev/null; done
}
# The batch script gets TERM on scancel or at the time limit: pass it to the steps.
trap 'log "terminated: stopping all groups"; stop_all; exit 143' TERM INT
trap 'kill "$LIGHTHOUSE_PID" "$PROXY_PID" 2>/dev/null' EXIT

# A replica that starts before the lighthouse listens would fail to join; wait for the port.
wait_lighthouse() {
  local _
  for _ in $(seq 300); do
    (exec 3<>"/dev/tcp/$LIGHTHOUSE_ADDR/$LIGHTHOUSE_PORT") 2>/dev/null && return 0
    kill -0 "$LIGHTHOUSE_PID" 2>/dev/null && kill -0 "$PROXY_PID" 2>/dev/null || return 1
    sleep 0.1
  done
  log "lighthouse not listening after 30 s; starting the groups anyway"
}
if ! wait_lighthouse; then
  log "lighthouse (or its proxy) exited before listening; giving up"
  exit 1
fi

# -- replica groups ------------------------------------------------------------------------
start_group() {
  local g=$1 nodes first
  nodes=${GROUP_NODES[$g]}
  first=${nodes%% *}
  log "group $g: starting on ${nodes// /,} (restart ${GROUP_RESTARTS[$g]} of the group, $RESTARTS of $MAX_RESTARTS in the job)"
  (
    export REPLICA_GROUP_ID=$g NUM_REPLICA_GROUPS=$NUM_GROUPS
    export MASTER_ADDR MASTER_PORT=$((MASTER_PORT_BASE + g))
    MASTER_ADDR=$(node_addr "$first")
    export MARDUK_JOB_ID=$SLURM_JOB_ID MARDUK_REPLICA_GROUP=$g
    exec srun --nodes="$NODES_PER_GROUP" --ntasks="$NODES_PER_GROUP" --ntasks-per-node=1 \
      "${SRUN_GRES[@]}" --exact --kill-on-bad-exit=1 --nodelist="${nodes// /,}" \
      --job-name=marduk-torchft-rg"$g" "${TRAIN_CMD[@]}"
  ) &
  GROUP_PID[g]=$!
  GROUP_STATE[g]=running
}

# take_spare: set SPARE to the first usable node of the pool and remove it from the pool.
take_spare() {
  local i
  for i in "${!FREE_NODES[@]}"; do
    if node_usable "${FREE_NODES[$i]}"; then
      SPARE=${FREE_NODES[$i]}
      unset 'FREE_NODES[i]'
      FREE_NODES=("${FREE_NODES[@]}")
      return 0
    fi
  done
  return 1
}

# release NODE...: usable nodes go back to the spare pool; the others are set aside.
release() {
  local n
  for n in "$@"; do
    if node_usable "$n"; then FREE_NODES+=("$n"); else set_aside "$n"; fi
  done
  return 0
}

# Nodes the job stopped using because they were drained (or were about to be: a group told
# to leave). One comes back to the spare pool once Slurm has shown it unusable and then
# usable again, that is, once an operator resumed it; a waiting group can then start there.
# Slurm is asked about them every SET_ASIDE_CHECK_S, not at every poll.
declare -A SET_ASIDE=()
SET_ASIDE_CHECK_S=5
NEXT_SET_ASIDE_CHECK=0
set_aside() { [ -n "$1" ] && SET_ASIDE[$1]=left; }

check_set_aside() {
  local n
  [ "${#SET_ASIDE[@]}" -gt 0 ] && [ "$(now_s)" -ge "$NEXT_SET_ASIDE_CHECK" ] || return 0
  NEXT_SET_ASIDE_CHECK=$(($(now_s) + SET_ASIDE_CHECK_S))
  for n in "${!SET_ASIDE[@]}"; do
    if ! node_usable "$n"; then
      SET_ASIDE[$n]=unusable
    elif [ "${SET_ASIDE[$n]}" = unusable ]; then
      unset 'SET_ASIDE[$n]'
      FREE_NODES+=("$n")
      log "$n: usable again (resumed); back in the spare pool"
    fi
  done
}

# place_group G KEEP: choose nodes for group G. With KEEP=1 (a crash) its usable nodes stay;
# otherwise (told to leave) all of them are set aside, since the one being drained may not
# show DRAIN yet. Returns 1, owning no node, when too few healthy nodes are free.
place_group() {
  local g=$1 keep=$2 n chosen=()
  for n in ${GROUP_NODES[$g]}; do
    if [ "$keep" = 1 ] && node_usable "$n"; then chosen+=("$n"); else set_aside "$n"; fi
  done
  GROUP_NODES[g]=""
  while [ "${#chosen[@]}" -lt "$NODES_PER_GROUP" ]; do
    if ! take_spare; then
      FREE_NODES+=("${chosen[@]}")
      return 1
    fi
    chosen+=("$SPARE")
  done
  GROUP_NODES[g]="${chosen[*]}"
}

# -- hot spares ----------------------------------------------------------------------------
# A standby runs the training script in its own step; slot numbers are never reused, so a
# new standby never takes the TCPStore port of one that now trains as a group.
start_standby() {
  local nodes=$1 s=$STANDBY_STARTS first
  first=${nodes%% *}
  STANDBY_STARTS=$((STANDBY_STARTS + 1))
  STANDBY_NODES[s]=$nodes
  log "standby $s: starting on ${nodes// /,}"
  (
    export MARDUK_STANDBY=1 MARDUK_STANDBY_SLOT=$s MARDUK_ASSUME_DIR=$ASSUME_DIR
    export NUM_REPLICA_GROUPS=$NUM_GROUPS MARDUK_JOB_ID=$SLURM_JOB_ID
    export MASTER_ADDR MASTER_PORT=$((MASTER_PORT_BASE + NUM_GROUPS + s))
    MASTER_ADDR=$(node_addr "$first")
    exec srun --nodes="$NODES_PER_GROUP" --ntasks="$NODES_PER_GROUP" --ntasks-per-node=1 \
      "${SRUN_GRES[@]}" --exact --kill-on-bad-exit=1 --nodelist="${nodes// /,}" \
      --job-name=marduk-torchft-sb"$s" "${TRAIN_CMD[@]}"
  ) &
  STANDBY_PID[s]=$!
  STANDBY_STATE[s]=standby
}

# refill_standbys: start standbys on free healthy nodes until NUM_STANDBYS stand by again.
# Groups come first: no new standby while a group waits for nodes or for its standby.
# None once a group has finished or was told to stop: the job is ending, and a standby
# started now would only hold a node until the end.
refill_standbys() {
  local s g ready=0 chosen=()
  for ((g = 0; g < NUM_GROUPS; g++)); do
    case ${GROUP_STATE[$g]} in
    waiting | pending* | "done" | stopped) return 0 ;;
    esac
  done
  for s in "${!STANDBY_STATE[@]}"; do
    [ "${STANDBY_STATE[$s]}" = standby ] && ready=$((ready + 1))
  done
  while [ "$ready" -lt "$NUM_STANDBYS" ] && [ "$STANDBY_STARTS" -lt $((NUM_STANDBYS + MAX_RESTARTS)) ]; do
    chosen=()
    while [ "${#chosen[@]}" -lt "$NODES_PER_GROUP" ]; do
      if ! take_spare; then
        FREE_NODES+=("${chosen[@]}")
        return 0
      fi
      chosen+=("$SPARE")
    done
    start_standby "${chosen[*]}"
    ready=$((ready + 1))
  done
}

# marked SLOT: a group's marker names standby SLOT (it assumed that group).
marked() {
  local f slot _
  for f in "$ASSUME_DIR"/group-*.assumed; do
    [ -f "$f" ] || continue
    read -r slot _ <"$f"
    [ "$slot" = "$1" ] && return 0
  done
  return 1
}

# check_standbys: a standby that ended before assuming a group gives its nodes back. One
# that ended after it assumed (it may finish training before the group it replaced has even
# exited) is left for adopt, which reads its exit status as the group's.
check_standbys() {
  local s rc nodes
  for s in "${!STANDBY_PID[@]}"; do
    if [ "${STANDBY_STATE[$s]}" = standby ] && ! kill -0 "${STANDBY_PID[$s]}" 2>/dev/null; then
      marked "$s" && continue
      wait "${STANDBY_PID[$s]}"
      rc=$?
      log "standby $s: exited ($rc) before assuming a group"
      STANDBY_STATE[s]=gone
      read -r -a nodes <<<"${STANDBY_NODES[$s]}"
      release "${nodes[@]}"
    fi
  done
}

# adopt G WHY: if a standby assumed group G (its marker names the slot), the group lives in
# the standby's step from now on. Returns 1 when no live standby assumed it.
adopt() {
  local g=$1 why=$2 marker slot _
  marker="$ASSUME_DIR/group-$g.assumed"
  [ -f "$marker" ] || return 1
  read -r slot _ <"$marker"
  rm -f "$marker"
  # A standby that already ended after it assumed is adopted too: the group loop reaps it
  # and reads its exit status as the group's.
  if [[ ! $slot =~ ^[0-9]+$ ]] || [ "${STANDBY_STATE[$slot]:-}" != standby ]; then
    log "group $g: marker names standby ${slot:-?}, which is not standing by; ignoring it"
    return 1
  fi
  STANDBY_STATE[slot]=assumed
  GROUP_NODES[g]=${STANDBY_NODES[$slot]}
  GROUP_PID[g]=${STANDBY_PID[$slot]}
  GROUP_STATE[g]=running
  log "group $g: $why; assumed by standby $slot on ${GROUP_NODES[$g]// /,}, not respawned"
}

# replace_group G KEEP WHY: after group G's step ended, follow the standby that assumed it;
# otherwise give the controller ASSUME_GRACE_S to name one (while standbys stand by), then
# respawn. KEEP as in place_group.
replace_group() {
  local g=$1 keep=$2 why=$3 s ready=0 nodes
  read -r -a nodes <<<"${GROUP_NODES[$g]}"
  if adopt "$g" "$why"; then
    [ "$keep" = 1 ] && release "${nodes[@]}"
    return
  fi
  log "group $g: $why; respawning${4:+ $4}"
  for s in "${!STANDBY_STATE[@]}"; do
    [ "${STANDBY_STATE[$s]}" = standby ] && ready=$((ready + 1))
  done
  if [ "$ready" -gt 0 ] && [ "$ASSUME_GRACE_S" -gt 0 ]; then
    GROUP_STATE[g]=pending$keep
    GROUP_DEADLINE[g]=$(($(now_s) + ASSUME_GRACE_S))
    return
  fi
  respawn "$g" "$keep"
}

# check_pending: a group waiting for its standby's marker is adopted, or respawned cold.
check_pending() {
  local g keep nodes
  for ((g = 0; g < NUM_GROUPS; g++)); do
    [[ ${GROUP_STATE[$g]} == pending* ]] || continue
    keep=${GROUP_STATE[$g]#pending}
    read -r -a nodes <<<"${GROUP_NODES[$g]}"
    if adopt "$g" "waited for its standby"; then
      [ "$keep" = 1 ] && release "${nodes[@]}"
    elif [ "$(now_s)" -ge "${GROUP_DEADLINE[$g]}" ]; then
      log "group $g: no standby assumed it within ${ASSUME_GRACE_S} s; respawning cold"
      respawn "$g" "$keep"
    fi
  done
}

# reclaim_standby G: a group that needs nodes takes a standing-by standby's: the standby
# stops and its nodes go back to the spare pool. Returns 1 when none is standing by.
reclaim_standby() {
  local g=$1 s nodes
  for s in "${!STANDBY_STATE[@]}"; do
    [ "${STANDBY_STATE[$s]}" = standby ] || continue
    kill -TERM "${STANDBY_PID[$s]}" 2>/dev/null
    wait "${STANDBY_PID[$s]}" 2>/dev/null
    STANDBY_STATE[s]=gone
    log "standby $s: stopped to free ${STANDBY_NODES[$s]// /,} for group $g"
    read -r -a nodes <<<"${STANDBY_NODES[$s]}"
    release "${nodes[@]}"
    return 0
  done
  return 1
}

respawn() {
  local g=$1 keep=$2
  if [ "$RESTARTS" -ge "$MAX_RESTARTS" ]; then
    log "group $g: restarts exhausted ($RESTARTS of $MAX_RESTARTS); not respawning"
    GROUP_STATE[g]=abandoned
    return
  fi
  if ! place_group "$g" "$keep" && ! { reclaim_standby "$g" && place_group "$g" "$keep"; }; then
    [ "${GROUP_STATE[$g]}" = waiting ] || log "group $g: no healthy spare node free; waiting"
    GROUP_STATE[g]=waiting
    return
  fi
  RESTARTS=$((RESTARTS + 1))
  GROUP_RESTARTS[g]=$((GROUP_RESTARTS[g] + 1))
  start_group "$g"
}

on_exit() {
  local g=$1 rc=$2 nodes
  read -r -a nodes <<<"${GROUP_NODES[$g]}"
  case $rc in
  0)
    log "group $g: finished (exit 0)"
    GROUP_STATE[g]="done"
    release "${nodes[@]}"
    ;;
  76)
    log "group $g: told to stop (exit $rc); not respawning"
    GROUP_STATE[g]=stopped
    release "${nodes[@]}"
    ;;
  75)
    replace_group "$g" 0 "told to leave (exit $rc)" "on other nodes"
    ;;
  *)
    replace_group "$g" 1 "crashed (exit $rc)"
    ;;
  esac
}

for ((g = 0; g < NUM_GROUPS; g++)); do
  GROUP_NODES[g]="${ALL_NODES[*]:g*NODES_PER_GROUP:NODES_PER_GROUP}"
  GROUP_RESTARTS[g]=0
done
FREE_NODES=("${ALL_NODES[@]:NUM_GROUPS*NODES_PER_GROUP}")
log "job $SLURM_JOB_ID: $NUM_GROUPS group(s) of $NODES_PER_GROUP node(s); spares: ${FREE_NODES[*]:-none}"
for ((g = 0; g < NUM_GROUPS; g++)); do start_group "$g"; done
if [ "$NUM_STANDBYS" -gt 0 ]; then
  mkdir -p "$ASSUME_DIR" || log "cannot create $ASSUME_DIR: standbys cannot report takeovers"
  rm -f "$ASSUME_DIR"/group-*.assumed
  refill_standbys
fi

# -- supervise -----------------------------------------------------------------------------
# Polling rather than `wait -n`: it needs no bash >= 5.1 and sees every exit status.
while :; do
  for ((g = 0; g < NUM_GROUPS; g++)); do
    if [ "${GROUP_STATE[$g]}" = running ] && ! kill -0 "${GROUP_PID[$g]}" 2>/dev/null; then
      wait "${GROUP_PID[$g]}"
      on_exit "$g" $?
    fi
  done
  check_pending
  check_set_aside
  # After all exits: a group that finished just now may have freed a node for a waiting one.
  running=0
  for ((g = 0; g < NUM_GROUPS; g++)); do
    [ "${GROUP_STATE[$g]}" = waiting ] && respawn "$g" 0
    [[ ${GROUP_STATE[$g]} == running || ${GROUP_STATE[$g]} == pending* ]] &&
      running=$((running + 1))
  done
  [ "$running" -gt 0 ] || break
  if [ "$NUM_STANDBYS" -gt 0 ]; then
    check_standbys
    refill_standbys
  fi
  sleep "$POLL_S"
done
stop_standbys

failed=0
for ((g = 0; g < NUM_GROUPS; g++)); do
  case ${GROUP_STATE[$g]} in
  "done" | stopped) ;;
  waiting)
    log "group $g: no healthy node left to respawn on; giving up"
    failed=$((failed + 1))
    ;;
  *) failed=$((failed + 1)) ;;
  esac
done
if [ "$failed" -gt 0 ]; then
  log "job $SLURM_JOB_ID: $failed group(s) did not finish after $RESTARTS restart(s); exit 1"
  exit 1
fi
log "job $SLURM_JOB_ID: all groups done after $RESTARTS restart(s)"
exit 0
