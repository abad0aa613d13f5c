#!/bin/bash
# Fault-tolerant TorchFT job, rendered by `marduk sbatch` (marduk_slurm/domain/sbatch.py).
# 4 replica group(s) x 2 node(s), 1 spare group(s), up to 5 restart(s).
#SBATCH --job-name=llama-ft
#SBATCH --nodes=10
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --partition=gpu
#SBATCH --time=24:00:00
#SBATCH --account=ml
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --qos=high
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
set -uo pipefail

NUM_GROUPS=4
NODES_PER_GROUP=2
MAX_RESTARTS=5
POLL_S=1.0
LIGHTHOUSE_PORT=29500
MASTER_PORT_BASE=29600
SRUN_GRES=(--gres=gpu:8)
# shellcheck disable=SC2016  # quoted on purpose: arguments reach the program literally
TRAIN_CMD=(torchrun --nproc-per-node=8 /shared/train.py --lr 3e-4 --name 'run one' --note 'it'"'"'s $HOME')
export MARDUK_NATS_URL=nats://nats.example:4222

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
torchft_lighthouse --bind "$LIGHTHOUSE_ADDR:$LIGHTHOUSE_PORT" --min_replicas 1 \
  --quorum_tick_ms 100 --join_timeout_ms 10000 \
  --heartbeat_timeout_ms 2000 &
LIGHTHOUSE_PID=$!
log "lighthouse (pid $LIGHTHOUSE_PID) on $LIGHTHOUSE_NODE at $TORCHFT_LIGHTHOUSE"

declare -a GROUP_NODES GROUP_PID GROUP_STATE GROUP_RESTARTS
FREE_NODES=()
RESTARTS=0

# shellcheck disable=SC2317  # called from the trap below
stop_all() {
  local g
  for g in "${!GROUP_PID[@]}"; do
    [ "${GROUP_STATE[$g]}" = running ] && kill -TERM "${GROUP_PID[$g]}" 2>/dev/null
  done
  for g in "${!GROUP_PID[@]}"; do wait "${GROUP_PID[$g]}" 2>/dev/null; done
}
# The batch script gets TERM on scancel or at the time limit: pass it to the steps.
trap 'log "terminated: stopping all groups"; stop_all; exit 143' TERM INT
trap 'kill "$LIGHTHOUSE_PID" 2>/dev/null' EXIT

# A replica that starts before the lighthouse listens would fail to join; wait for the port.
wait_lighthouse() {
  local _
  for _ in $(seq 300); do
    (exec 3<>"/dev/tcp/$LIGHTHOUSE_ADDR/$LIGHTHOUSE_PORT") 2>/dev/null && return 0
    kill -0 "$LIGHTHOUSE_PID" 2>/dev/null || return 1
    sleep 0.1
  done
  log "lighthouse not listening after 30 s; starting the groups anyway"
}
if ! wait_lighthouse; then
  log "lighthouse exited before listening; giving up"
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
      --job-name=llama-ft-rg"$g" "${TRAIN_CMD[@]}"
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

# release NODE...: usable nodes go back to the spare pool.
release() {
  local n
  for n in "$@"; do node_usable "$n" && FREE_NODES+=("$n"); done
  return 0
}

# place_group G KEEP: choose nodes for group G. With KEEP=1 (a crash) its usable nodes stay;
# otherwise (told to leave) all of them are left for good, since the one being drained may
# not show DRAIN yet. Returns 1, owning no node, when too few healthy nodes are free.
place_group() {
  local g=$1 keep=$2 n chosen=()
  for n in ${GROUP_NODES[$g]}; do
    [ "$keep" = 1 ] && node_usable "$n" && chosen+=("$n")
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

respawn() {
  local g=$1 keep=$2
  if [ "$RESTARTS" -ge "$MAX_RESTARTS" ]; then
    log "group $g: restarts exhausted ($RESTARTS of $MAX_RESTARTS); not respawning"
    GROUP_STATE[g]=abandoned
    return
  fi
  if ! place_group "$g" "$keep"; then
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
    log "group $g: told to leave (exit $rc); respawning on other nodes"
    respawn "$g" 0
    ;;
  *)
    log "group $g: crashed (exit $rc); respawning"
    respawn "$g" 1
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

# -- supervise -----------------------------------------------------------------------------
# Polling rather than `wait -n`: it needs no bash >= 5.1 and sees every exit status.
while :; do
  for ((g = 0; g < NUM_GROUPS; g++)); do
    if [ "${GROUP_STATE[$g]}" = running ] && ! kill -0 "${GROUP_PID[$g]}" 2>/dev/null; then
      wait "${GROUP_PID[$g]}"
      on_exit "$g" $?
    fi
  done
  # After all exits: a group that finished just now may have freed a node for a waiting one.
  running=0
  for ((g = 0; g < NUM_GROUPS; g++)); do
    [ "${GROUP_STATE[$g]}" = waiting ] && respawn "$g" 0
    [ "${GROUP_STATE[$g]}" = running ] && running=$((running + 1))
  done
  [ "$running" -gt 0 ] || break
  sleep "$POLL_S"
done

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
