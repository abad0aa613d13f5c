"""The supervisor in the rendered sbatch script, run by bash against fake Slurm commands.

`scontrol` and `srun` are small bash stand-ins on PATH: scontrol answers node names and states
(a node is drained when a marker file exists), srun runs the command once per node of
--nodelist and returns the first failure, like --kill-on-bad-exit. The stand-in training
program follows a per-group plan of exit codes, so each fault is injected deterministically
("group 0 drains its node and crashes on its first run"). No Slurm or root needed; the same
script runs on the real cluster in tests/test_sbatch_live.py.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from marduk_slurm.domain import sbatch

FAKE_SCONTROL = r"""#!/bin/bash
case "$1 $2" in
"show hostnames") printf '%s\n' $FAKE_NODES ;;
"show node")
  node=$4 state=IDLE
  [ -e "$FAKE_SLURM/drained.$node" ] && state=IDLE+DRAIN
  echo "NodeName=$node Arch=x86_64 NodeAddr=127.0.0.1 State=$state Partitions=debug"
  ;;
*) exit 1 ;;
esac
"""

FAKE_SRUN = r"""#!/bin/bash
nodelist=
while [ $# -gt 0 ] && [[ $1 == --* ]]; do
  case $1 in --nodelist=*) nodelist=${1#--nodelist=} ;; esac
  shift
done
echo "$nodelist" >> "$FAKE_SLURM/sruns"
rank=0 pids=()
trap 'kill "${pids[@]}" 2>/dev/null; exit 143' TERM
for node in ${nodelist//,/ }; do
  SLURMD_NODENAME=$node SLURM_PROCID=$rank "$@" &
  pids+=($!)
  rank=$((rank + 1))
done
rc=0
for pid in "${pids[@]}"; do wait "$pid"; s=$?; [ "$rc" = 0 ] && rc=$s; done
exit "$rc"
"""

# Rank 0 takes the next action of its group's plan: an exit code, "drain CODE" (mark its
# node drained first), or "handover CODE" (tell standby 0 to assume the group, as the
# controller would, wait for its marker, then exit CODE; "slow handover CODE" exits 1.5 s
# later). An empty plan means finish (0).
# A standby (MARDUK_STANDBY=1) waits for its assume, writes the marker the runtime writes,
# and goes on with the plan of the group it assumed.
FAKE_TRAIN = r"""#!/bin/bash
if [ -n "${MARDUK_STANDBY:-}" ]; then
  echo "standby $MARDUK_STANDBY_SLOT $SLURMD_NODENAME $MASTER_PORT" >> "$FAKE_SLURM/runs"
  [ -e "$FAKE_SLURM/standby-crash.$MARDUK_STANDBY_SLOT" ] && exit 1
  if [ -e "$FAKE_SLURM/standby-drain.$MARDUK_STANDBY_SLOT" ]; then  # told to stand down
    touch "$FAKE_SLURM/drained.$SLURMD_NODENAME"
    exit 75
  fi
  assume=$FAKE_SLURM/assume.$MARDUK_STANDBY_SLOT
  while [ ! -e "$assume" ]; do sleep 0.05; done
  REPLICA_GROUP_ID=$(cat "$assume")
  marker=$MARDUK_ASSUME_DIR/group-$REPLICA_GROUP_ID.assumed
  echo "$MARDUK_STANDBY_SLOT 0 $SLURMD_NODENAME" > "$marker"
  sleep 0.3  # it heals and trains a while
fi
echo "$REPLICA_GROUP_ID $SLURMD_NODENAME $MASTER_PORT $MARDUK_REPLICA_GROUP $NUM_REPLICA_GROUPS" \
  >> "$FAKE_SLURM/runs"
[ "$SLURM_PROCID" = 0 ] || exit 0
plan=$FAKE_SLURM/plan.$REPLICA_GROUP_ID
action=$(head -n 1 "$plan" 2>/dev/null)
[ -e "$plan" ] && sed -i 1d "$plan"
case $action in
drain\ *) touch "$FAKE_SLURM/drained.$SLURMD_NODENAME"; exit "${action#drain }" ;;
handover\ * | "slow handover "*)
  echo "$REPLICA_GROUP_ID" > "$FAKE_SLURM/assume.0"
  for _ in $(seq 100); do
    [ -e "$FAKE_SLURM/assume/group-$REPLICA_GROUP_ID.assumed" ] && break
    sleep 0.05
  done
  # slow: the leaver hangs on well after the standby that assumed its group has finished
  [[ $action == slow* ]] && sleep 1.5
  exit "${action##* }" ;;
"") exit 0 ;;
undrain\ *)  # undrain NODE SECS: an operator resumes NODE in SECS; this group trains on
  read -r _ node secs <<<"$action"
  sleep "$secs"; rm -f "$FAKE_SLURM/drained.$node"; sleep 8; exit 0 ;;
sleep) sleep 1; exit 0 ;;
sleep\ *) sleep "${action#sleep }"; exit 0 ;;
*) exit "$action" ;;
esac
"""

FAKE_LIGHTHOUSE = f"""#!{sys.executable}
import socket, sys, time
host, port = sys.argv[sys.argv.index("--bind") + 1].rsplit(":", 1)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, int(port)))
s.listen(16)
time.sleep(600)
"""


@dataclass
class Outcome:
    rc: int
    log: str
    sruns: list[str]  # the --nodelist of every srun, in order


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def supervise(tmp_path: Path, plans: dict[int, list[str]], **params: object) -> Outcome:
    fake = tmp_path / "fake"
    bin_dir = fake / "bin"
    bin_dir.mkdir(parents=True)  # fake/ itself may hold a test's markers already
    write_exe(bin_dir / "scontrol", FAKE_SCONTROL)
    write_exe(bin_dir / "srun", FAKE_SRUN)
    train = write_exe(fake / "train.sh", FAKE_TRAIN)
    lighthouse = write_exe(fake / "lighthouse.py", FAKE_LIGHTHOUSE)
    for group, plan in plans.items():
        (fake / f"plan.{group}").write_text("".join(f"{a}\n" for a in plan))
    # The lighthouse here is a stand-in that only listens: no proxy in front of it.
    values = {"replica_groups": 2, "nodes_per_group": 1, "spares": 0, "max_restarts": 3,
              "lighthouse_proxy": False, **params}
    script = sbatch.render({
        "train_script": str(train), "launcher": "", "gpus_per_node": 1, "poll_s": 0.05,
        "lighthouse": str(lighthouse), "lighthouse_port": free_port(), "master_port": 40000,
        "assume_dir": str(fake / "assume"), **values,
    })
    groups, spares, per_group = (int(values[k]) for k in  # type: ignore[call-overload]
                                 ("replica_groups", "spares", "nodes_per_group"))
    total = (groups + spares) * per_group
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_SLURM": str(fake),
           "FAKE_NODES": " ".join(f"n{i}" for i in range(1, total + 1)),
           "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": f"n[1-{total}]", "SLURMD_NODENAME": "n1"}
    job = write_exe(fake / "job.sh", script)
    result = subprocess.run(["bash", str(job)], env=env, capture_output=True, text=True,
                            timeout=60, check=False)
    sruns = (fake / "sruns").read_text().split() if (fake / "sruns").exists() else []
    return Outcome(result.returncode, result.stdout + result.stderr, sruns)


def test_all_groups_finish(tmp_path: Path) -> None:
    out = supervise(tmp_path, {})
    assert out.rc == 0, out.log
    assert sorted(out.sruns) == ["n1", "n2"]
    assert "all groups done after 0 restart(s)" in out.log
    runs = (tmp_path / "fake" / "runs").read_text().splitlines()
    assert sorted(runs) == ["0 n1 40000 0 2", "1 n2 40001 1 2"]  # MASTER_PORT per group


def test_crash_respawns_on_the_same_healthy_node(tmp_path: Path) -> None:
    out = supervise(tmp_path, {1: ["3"]}, spares=1)
    assert out.rc == 0, out.log
    assert "group 1: crashed (exit 3); respawning" in out.log
    assert out.sruns.count("n2") == 2 and "n3" not in out.sruns


def test_crash_on_drained_node_moves_to_a_spare(tmp_path: Path) -> None:
    out = supervise(tmp_path, {0: ["drain 134"]}, spares=1)
    assert out.rc == 0, out.log
    assert "group 0: crashed (exit 134); respawning" in out.log
    assert "group 0: starting on n3" in out.log
    assert out.sruns.count("n1") == 1


def test_leave_moves_to_a_spare_and_never_returns(tmp_path: Path) -> None:
    out = supervise(tmp_path, {1: ["75", "75"]}, spares=2)
    assert out.rc == 0, out.log
    assert out.log.count("group 1: told to leave (exit 75); respawning on other nodes") == 2
    assert [n for n in out.sruns if n != "n1"] == ["n2", "n3", "n4"]


def test_stop_is_not_respawned(tmp_path: Path) -> None:
    out = supervise(tmp_path, {0: ["76"]}, spares=1)
    assert out.rc == 0, out.log
    assert "group 0: told to stop (exit 76); not respawning" in out.log
    assert sorted(out.sruns) == ["n1", "n2"]


def test_restarts_are_counted_over_the_job(tmp_path: Path) -> None:
    out = supervise(tmp_path, {0: ["1", "1"], 1: ["1"]}, max_restarts=2)
    assert out.rc == 1, out.log
    assert "restarts exhausted (2 of 2); not respawning" in out.log
    assert "1 group(s) did not finish after 2 restart(s); exit 1" in out.log


def test_waiting_group_takes_a_node_freed_by_a_finished_group(tmp_path: Path) -> None:
    out = supervise(tmp_path, {0: ["drain 1"], 1: []}, spares=0)
    assert out.rc == 0, out.log
    assert "group 0: no healthy spare node free; waiting" in out.log
    assert out.sruns[-1] == "n2"  # group 1 finished, its node is healthy


def test_gives_up_when_no_healthy_node_is_left(tmp_path: Path) -> None:
    out = supervise(tmp_path, {0: ["drain 1"]}, replica_groups=1)
    assert out.rc == 1, out.log
    assert "group 0: no healthy node left to respawn on; giving up" in out.log


def test_multi_node_group_replaces_only_the_drained_node(tmp_path: Path) -> None:
    out = supervise(tmp_path, {0: ["drain 1"]}, nodes_per_group=2, spares=1)
    assert out.rc == 0, out.log
    assert "group 0: starting on n2,n5" in out.log
    assert sorted(out.sruns[:2]) == ["n1,n2", "n3,n4"]


def test_lighthouse_that_dies_fails_the_job(tmp_path: Path) -> None:
    out = supervise(tmp_path, {}, lighthouse="/bin/false")
    assert out.rc == 1
    assert "lighthouse (or its proxy) exited before listening; giving up" in out.log
    assert out.sruns == []


def test_a_standby_assumes_the_group_that_leaves_and_the_pool_is_refilled(
        tmp_path: Path) -> None:
    # Group 0 trains on meanwhile: a standby is refilled only while the job is not ending.
    out = supervise(tmp_path, {0: ["sleep 2"], 1: ["handover 75"]}, spares=2, hot_spares=1)
    assert out.rc == 0, out.log
    assert "standby 0: starting on n3" in out.log
    assert ("group 1: told to leave (exit 75); assumed by standby 0 on n3, not respawned"
            in out.log)
    assert "standby 1: starting on n4" in out.log  # the free spare keeps one standing by
    assert sorted(out.sruns) == ["n1", "n2", "n3", "n4"]  # no cold respawn of group 1
    assert "all groups done after 0 restart(s)" in out.log
    runs = (tmp_path / "fake" / "runs").read_text().splitlines()
    # standby s has MASTER_PORT master_port + groups + s; slot 0 went on as group 1
    assert {"standby 0 n3 40002", "standby 1 n4 40003", "1 n3 40002  2"} <= set(runs)


def test_without_a_takeover_the_group_is_respawned_cold_after_the_grace(
        tmp_path: Path) -> None:
    out = supervise(tmp_path, {1: ["75"]}, spares=2, hot_spares=1, assume_grace_s=1)
    assert out.rc == 0, out.log
    assert "group 1: no standby assumed it within 1 s; respawning cold" in out.log
    assert "group 1: starting on n4" in out.log
    assert sorted(out.sruns) == ["n1", "n2", "n3", "n4"]


def test_a_standby_that_crashes_gives_its_node_to_a_new_standby(tmp_path: Path) -> None:
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "standby-crash.0").touch()
    out = supervise(tmp_path, {0: ["sleep"], 1: ["sleep"]}, spares=1, hot_spares=1)
    assert out.rc == 0, out.log
    assert "standby 0: exited (1) before assuming a group" in out.log
    assert "standby 1: starting on n3" in out.log
    assert "all groups done after 0 restart(s)" in out.log


def test_hot_spares_are_some_of_the_spares() -> None:
    with pytest.raises(ValueError, match=r"hot_spares \(2\) exceeds spares \(1\)"):
        sbatch.render({"train_script": "t.py", "replica_groups": 2, "spares": 1,
                       "hot_spares": 2})


def test_two_faults_at_once_one_standby_the_other_group_respawns_cold(tmp_path: Path) -> None:
    # Group 1 hands over to the one standby (n3); group 0 leaves too. The free spare (n4) goes
    # to the group that still has none, before any new standby: groups come first.
    out = supervise(tmp_path, {0: ["75"], 1: ["handover 75"]}, spares=2, hot_spares=1,
                    assume_grace_s=1)
    assert out.rc == 0, out.log
    assert "group 1: told to leave (exit 75); assumed by standby 0 on n3" in out.log
    assert "group 0: starting on n4" in out.log
    assert "all groups done after 1 restart(s)" in out.log


def test_with_no_free_node_a_group_takes_a_standby_s_nodes(tmp_path: Path) -> None:
    # No standby is told to assume group 0 (no controller here); once the grace is over it
    # needs a node, and the only one is the standby's: the standby stops, the group starts.
    out = supervise(tmp_path, {0: ["75"], 1: ["sleep 4"]}, spares=1, hot_spares=1,
                    assume_grace_s=1)
    assert out.rc == 0, out.log
    assert "standby 0: stopped to free n3 for group 0" in out.log
    assert "group 0: starting on n3" in out.log
    assert "all groups done after 1 restart(s)" in out.log


def test_a_standby_told_to_stand_down_is_replaced_away_from_its_drained_node(
        tmp_path: Path) -> None:
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "standby-drain.0").touch()  # its node is drained; it exits 75
    out = supervise(tmp_path, {0: ["sleep"], 1: ["sleep"]}, spares=2, hot_spares=1)
    assert out.rc == 0, out.log
    assert "standby 0: exited (75) before assuming a group" in out.log
    assert "standby 1: starting on n4" in out.log
    assert "standby 2" not in out.log and "on n3" not in out.log.split("standby 0: exited")[1]


def test_no_new_standby_once_a_group_has_finished(tmp_path: Path) -> None:
    # Group 1 hands over to the standby on n3 and finishes there while group 0 still trains:
    # the job is ending, so the node it frees is not given to a new standby.
    out = supervise(tmp_path, {0: ["sleep 2"], 1: ["handover 75"]}, spares=1, hot_spares=1)
    assert out.rc == 0, out.log
    assert "group 1: told to leave (exit 75); assumed by standby 0 on n3" in out.log
    assert "group 1: finished (exit 0)" in out.log
    assert "standby 1" not in out.log
    assert sorted(out.sruns) == ["n1", "n2", "n3"]


def test_a_standby_that_finishes_before_the_group_it_assumed_has_exited_is_adopted(
        tmp_path: Path) -> None:
    # The leaver hangs on; the standby assumes its group, trains and finishes first. Its exit
    # is the group's: no cold respawn, and its node is not taken for "never assumed".
    out = supervise(tmp_path, {0: ["sleep 3"], 1: ["slow handover 75"]}, spares=1,
                    hot_spares=1)
    assert out.rc == 0, out.log
    assert "exited (0) before assuming" not in out.log
    assert "group 1: told to leave (exit 75); assumed by standby 0 on n3" in out.log
    assert "group 1: finished (exit 0)" in out.log
    assert sorted(out.sruns) == ["n1", "n2", "n3"]
    assert "all groups done after 0 restart(s)" in out.log


def test_a_waiting_group_starts_on_a_node_once_it_is_resumed(tmp_path: Path) -> None:
    # Group 0 drains its own node and leaves; no spare: it waits. Its node is resumed while
    # group 1 still trains, and group 0 starts there again.
    out = supervise(tmp_path, {0: ["drain 75"], 1: ["undrain n1 2"]})
    assert out.rc == 0, out.log
    assert "group 0: no healthy spare node free; waiting" in out.log
    assert "n1: usable again (resumed); back in the spare pool" in out.log
    assert sorted(out.sruns[:2]) == ["n1", "n2"] and out.sruns[2:] == ["n1"]
    assert "all groups done after 1 restart(s)" in out.log


def test_a_node_that_never_showed_drained_is_not_taken_back(tmp_path: Path) -> None:
    # Group 0 is told to leave (exit 75) but its node never shows drained: the job does not
    # put a group back on a node it was sent away from, whatever Slurm says: it waits for
    # the node group 1 frees when it finishes.
    out = supervise(tmp_path, {0: ["75"], 1: ["sleep 7"]})
    assert out.rc == 0, out.log
    assert "back in the spare pool" not in out.log
    assert sorted(out.sruns[:2]) == ["n1", "n2"] and out.sruns[2:] == ["n2"]
