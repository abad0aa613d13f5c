"""The drill's figures read from what happened, not from values that make them come out right:
steps lost from the training log (attempts thrown away, steps redone by a group that came back
from an older state), and a batch step printed as Slurm names it in the history timeline."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from marduk_slurm.adapters.store import Store
from marduk_slurm.controller import inbound
from marduk_slurm.controller.decisions import Policy
from marduk_slurm.domain import messages as m

from harness import load_drill


@pytest.fixture(scope="module")
def drill() -> ModuleType:
    return load_drill()


def log(*lines: str) -> str:
    return "\n".join(lines) + "\n"


BEFORE_FAULT = (
    "group 0: replica job5_rg0:a on n1",
    "group 1: replica job5_rg1:b on n2",
    "group 0: first commit at step 1 on n1 t=10.000",
    "group 1: first commit at step 1 on n2 t=10.010",
    "group 1: step 40 not committed on n2 t=19.000",  # before the fault: not counted
)


def test_a_group_that_healed_to_the_survivors_step_redid_nothing(drill: ModuleType) -> None:
    output = log(*BEFORE_FAULT,
                 "group 0: step 57 not committed on n1 t=20.400",
                 "group 1: exit 75 at step 57 on n2",
                 "group 1: replica job5_rg1:c on n3",
                 "group 1: first commit at step 71 on n3 t=25.000")
    assert drill.step_losses(output, 1, "n2", after=20.0) == (1, 57, 70, 0)


def test_a_group_that_came_back_from_scratch_redid_every_step(drill: ModuleType) -> None:
    output = log(*BEFORE_FAULT,
                 "group 1: exit 75 at step 57 on n2",
                 "group 1: replica job5_rg1:c on n3",
                 "group 1: step 0 not committed on n3 t=24.000",
                 "group 1: first commit at step 1 on n3 t=25.000")
    discarded, left_at, healed_to, redone = drill.step_losses(output, 1, "n2", after=20.0)
    assert (discarded, left_at, healed_to, redone) == (1, 57, 0, 57)


@pytest.mark.parametrize("missing", ["group 1: exit 75 at step 57 on n2",
                                     "group 1: first commit at step 71 on n3 t=25.000"])
def test_a_log_without_the_exit_or_the_return_gives_no_figure(drill: ModuleType,
                                                               missing: str) -> None:
    lines = [*BEFORE_FAULT, "group 1: exit 75 at step 57 on n2",
             "group 1: first commit at step 71 on n3 t=25.000"]
    lines.remove(missing)
    with pytest.raises(ValueError, match="group 1: the log lacks"):
        drill.step_losses(log(*lines), 1, "n2", after=20.0)


def test_the_survivors_longest_step_and_reduced_strength_come_from_their_own_lines(
        drill: ModuleType) -> None:
    output = log(*BEFORE_FAULT,
                 "group 0: slow step 30 took 900 ms on n1 t=15.000",  # before the fault
                 "group 1: slow step 58 took 5000 ms on n2 t=20.300",  # the group that left
                 "group 0: participants 1 at step 58 t=20.350",
                 "group 0: slow step 58 took 390 ms on n1 t=20.350",
                 "group 0: slow step 60 took 180 ms on n1 t=20.600",
                 "group 0: participants 2 at step 63 t=20.900",
                 "group 0: slow step 90 took 700 ms on n1 t=30.000",  # after full strength
                 "group 1: median step 55 ms over 57 steps on n2",
                 "group 0: median step 52 ms over 140 steps on n1")
    assert drill.survivors_during(output, 1, 2, after=20.0, until=20.9) == (390.0, 52.0, 5)
    quiet = log(*BEFORE_FAULT, "group 0: median step 52 ms over 140 steps on n1")
    assert drill.survivors_during(quiet, 1, 2, after=20.0, until=20.9) == (None, 52.0, 0)


def test_the_final_step_is_the_highest_exit_in_the_log(drill: ModuleType) -> None:
    output = log(*BEFORE_FAULT, "group 1: exit 75 at step 57 on n2",
                 "group 0: exit 0 at step 140 on n1", "group 1: exit 0 at step 140 on n3")
    assert drill.final_step(output) == 140
    with pytest.raises(ValueError, match="no exit line"):
        drill.final_step(log(*BEFORE_FAULT))


def test_the_batch_step_is_named_batch_in_the_history(tmp_path: Path, drill: ModuleType
                                                      ) -> None:
    store = Store(tmp_path / "marduk.db")
    store.migrate()
    for msg in (m.StepStart(job_id=5, step_id=m.BATCH_STEP_ID, node="n1", gpu_indices=[0]),
                m.StepEnd(job_id=5, step_id=m.BATCH_STEP_ID, node="n1", exit_status=0),
                m.StepStart(job_id=5, step_id=0, node="n1", gpu_indices=[0])):
        with store.transaction():
            inbound.apply_message(store, msg, 100.0, Policy())
    reasons = [e["reason"] for e in store.events(limit=10)]
    assert sorted(reasons) == ["step 5.0 started on n1", "step 5.batch ended on n1",
                               "step 5.batch started on n1"]
    # The drill's timeline prints these reasons as they are.
    result = drill.DrillResult(history=[{"ts": 100.0, "kind": "step_start", "node": "n1",
                                         "reason": reasons[0]}])
    assert "4294967291" not in drill.summary(result)


def test_the_summary_names_the_timeline_plot_and_what_it_did_not_see(drill: ModuleType
                                                                      ) -> None:
    timeline = {"marks": [{"kind": "fault"}, {"kind": "drain"}, {"kind": "leave"}],
                "missing": ["replace", "heal"]}
    text = drill.summary(drill.DrillResult(timeline=timeline, timeline_plot="/w/t.svg"))
    assert "timeline plot  : /w/t.svg" in text
    assert "marks: fault -> drain -> leave; not seen: replace, heal" in text
    assert "not drawn" in drill.summary(drill.DrillResult())
