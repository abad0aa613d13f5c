"""Pure rules of live configuration: validation, the apply step, late joiners, batch and lr."""

from __future__ import annotations

import pytest

from marduk_slurm.cli.jobs import parse_assignments
from marduk_slurm.domain import config_revision as cr
from marduk_slurm.domain import exit_codes
from marduk_slurm.domain import messages as m
from marduk_slurm.runtime.config import ConfigApplier


def test_validate_accepts_known_optimizer_and_user_keys() -> None:
    got = cr.validate_changes({"lr": 3e-4, "weight_decay": 0, "optim.momentum": 0.9,
                               "batch_size": 32, "keep_global_batch": True, "max_steps": 10,
                               "checkpoint": "/c/x.pt", "user.augment": {"flip": True}})
    assert got["lr"] == 3e-4 and got["weight_decay"] == 0.0 and got["user.augment"]["flip"]


@pytest.mark.parametrize("changes, word", [
    ({"learning_rate": 1}, "unknown config key 'learning_rate'"),
    ({"lr": 0}, "lr must be a finite number > 0"),
    ({"lr": float("nan")}, "lr must be"),
    ({"lr": "fast"}, "lr must be a number"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"batch_size": True}, "batch_size must be an integer"),
    ({"max_steps": 1.5}, "max_steps must be an integer"),
    ({"checkpoint": ""}, "checkpoint must be a non-empty path"),
    ({"user.": 1}, "unknown config key"),
    ({"optim.params": []}, "optim.params cannot be changed"),
    ({}, "no changes"),
])
def test_validate_rejects_with_the_key_named(changes: dict[str, object], word: str) -> None:
    with pytest.raises(ValueError, match=word.replace("(", r"\(")):
        cr.validate_changes(changes)


def test_apply_step_is_ahead_of_the_fastest_replica_by_steps_and_time() -> None:
    now = 1000.0
    replicas = [cr.ReplicaProgress(100, 100.0, now), cr.ReplicaProgress(98, 100.0, now),
                cr.ReplicaProgress(90, 100.0, now - 0.5)]  # 90 + 5 steps since its heartbeat
    # fastest at 100, 1 s at 100 ms/step = 10 steps > 2 steps
    assert cr.choose_apply_at_step(replicas, now) == 110
    slow = [cr.ReplicaProgress(7, 5000.0, now)]
    assert cr.choose_apply_at_step(slow, now) == 9  # 2 steps already exceed 1 s
    assert cr.choose_apply_at_step([], now) == 0
    stale = [cr.ReplicaProgress(100, 100.0, now - 2.0)]  # 20 steps since its last beat
    assert cr.choose_apply_at_step(stale, now) == 130


def test_latest_config_folds_state_and_keeps_one_shots_only_while_ahead() -> None:
    revs = [{"revision": 1, "apply_at_step": 10, "changes": {"lr": 0.1, "checkpoint": "/a"}},
            {"revision": 2, "apply_at_step": 50, "changes": {"lr": 0.2, "max_steps": 9}},
            {"revision": 3, "apply_at_step": 80, "changes": {"checkpoint": "/b"}}]
    ahead = cr.latest_config(revs, job_step=70)
    assert ahead == {"revision": 3, "apply_at_step": 80,
                     "changes": {"lr": 0.2, "max_steps": 9, "checkpoint": "/b"}}
    assert "checkpoint" not in cr.latest_config(revs, job_step=90)["changes"]  # type: ignore[index]
    assert cr.latest_config([], 0) is None


@pytest.mark.parametrize("global_batch, n, micro, plan", [
    (256, 4, 64, (64, 1)), (256, 2, 64, (64, 2)), (256, 3, 64, (43, 2)), (256, 1, 64, (64, 4)),
    (256, 8, 64, (32, 1)), (10, 3, 64, (4, 1)),
])
def test_batch_plan_holds_the_global_batch(global_batch: int, n: int, micro: int,
                                           plan: tuple[int, int]) -> None:
    got = cr.batch_plan(global_batch, n, micro)
    assert (got.micro_batch, got.accum_steps) == plan
    assert got.micro_batch <= micro
    assert global_batch <= got.global_batch < global_batch + n * got.accum_steps


def test_lr_scaling_rules() -> None:
    assert cr.scale_lr(0.1, 256, 128, "linear") == pytest.approx(0.05)
    assert cr.scale_lr(0.1, 256, 64, "sqrt") == pytest.approx(0.05)
    assert cr.scale_lr(0.1, 256, 64, "none") == 0.1
    with pytest.raises(ValueError):
        cr.scale_lr(0.1, 256, 64, "cubic")  # type: ignore[arg-type]


class FakeOptimizer:
    def __init__(self) -> None:
        self.param_groups = [{"lr": 0.1, "weight_decay": 0.0, "betas": (0.9, 0.99)},
                             {"lr": 0.1, "weight_decay": 0.0, "betas": (0.9, 0.99)}]


def cmd(revision: int, at: int, **changes: object) -> m.JobCommand:
    return m.JobCommand(job_id=1, revision=revision, apply_at_step=at, changes=dict(changes))


def test_applier_applies_due_revisions_in_order_and_hands_state_to_a_healer() -> None:
    opt, seen = FakeOptimizer(), list[object]()
    applier = ConfigApplier(batch_size=32)
    applier.add_optimizer(opt)
    applier.register_handler("augment", seen.append)
    applier.offer(cmd(2, 20, **{"optim.betas": [0.8, 0.9], "user.augment": "flip"}))
    applier.offer(cmd(1, 10, lr=0.5, keep_global_batch=True))
    assert applier.due(9) == []
    for c in applier.due(25):  # a replica that arrives late applies both, oldest first
        applier.apply(c, participants=4)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.5]
    assert opt.param_groups[0]["betas"] == (0.8, 0.9) and seen == ["flip"]
    plan = applier.batch_plan(2)
    assert applier.global_batch == 128 and plan is not None and plan.accum_steps == 2
    applier.offer(cmd(1, 10, lr=0.9))  # a repeat of an applied revision is ignored
    assert applier.due(100) == []

    healer_opt = FakeOptimizer()
    healer = ConfigApplier()
    healer.add_optimizer(healer_opt)
    healer.register_handler("augment", seen.append)
    healer.offer(cmd(2, 20, lr=1.0))
    healer.load_state_dict(applier.state_dict())
    assert healer.revision == 2 and healer.pending == {} and healer_opt.param_groups[0]["lr"] == 0.5
    assert healer.hyperparams()["global_batch"] == 128


def test_applier_reports_a_missing_handler_or_loader() -> None:
    applier = ConfigApplier()
    with pytest.raises(ValueError, match=r"no handler registered for user\.x"):
        applier.apply(cmd(1, 0, **{"user.x": 1}), participants=1)
    with pytest.raises(ValueError, match="no checkpoint loader"):
        applier.apply(cmd(2, 0, checkpoint="/c.pt"), participants=1)
    assert applier.revision == 2  # not retried at every step


def test_cli_assignments_parse_json_values() -> None:
    assert parse_assignments(["lr=3e-4", "batch_size=32", "keep_global_batch=true",
                              "checkpoint=/ckpt/a.pt", "optim.betas=[0.9,0.95]"]) == {
        "lr": 3e-4, "batch_size": 32, "keep_global_batch": True, "checkpoint": "/ckpt/a.pt",
        "optim.betas": [0.9, 0.95]}
    with pytest.raises(ValueError, match="expected key=value"):
        parse_assignments(["lr"])


def test_exit_codes_tell_the_supervisor_what_to_do() -> None:
    assert not exit_codes.should_respawn(exit_codes.EXIT_DONE)
    assert not exit_codes.should_respawn(exit_codes.EXIT_STOP)
    assert exit_codes.should_respawn(exit_codes.EXIT_LEAVE) and exit_codes.should_respawn(1)
    assert exit_codes.describe(75) == "leave" and exit_codes.describe(-9) == "crash"


def test_torchft_timeouts_are_seconds_within_a_day() -> None:
    assert cr.validate_changes({"timeout": 30, "quorum_timeout": 0.5}) == {
        "timeout": 30.0, "quorum_timeout": 0.5}
    for bad in (0, -1, float("nan"), float("inf"), 86401, True, "30", None, [30]):
        with pytest.raises(ValueError, match="timeout"):
            cr.validate_changes({"timeout": bad})


def test_timeouts_go_to_the_manager_and_travel_with_healing() -> None:
    seen: dict[str, float] = {}
    applier = ConfigApplier()
    cmd = m.JobCommand(job_id=7, revision=1, apply_at_step=5,
                       changes={"timeout": 12.5, "quorum_timeout": 45})
    with pytest.raises(ValueError, match="no torchft Manager attached"):
        applier.apply(cmd, participants=2)
    applier = ConfigApplier()
    applier.timeout_setter = seen.__setitem__
    applier.apply(cmd, participants=2)
    assert seen == {"timeout": 12.5, "quorum_timeout": 45.0}
    assert applier.hyperparams()["timeout"] == 12.5
    healed: dict[str, float] = {}  # a replica that heals from this one takes them over
    peer = ConfigApplier()
    peer.timeout_setter = healed.__setitem__
    peer.load_state_dict(applier.state_dict())
    assert healed == seen
