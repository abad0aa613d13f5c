"""Node and job states parsed from what Slurm prints."""

from __future__ import annotations

import pytest

from marduk_slurm.domain.slurm_state import JobState, NodeBase, NodeFlag, NodeState


@pytest.mark.parametrize(
    ("text", "base", "flags"),
    [
        ("IDLE", NodeBase.IDLE, NodeFlag.NONE),
        ("IDLE+DRAIN", NodeBase.IDLE, NodeFlag.DRAIN),
        ("MIXED+DRAIN", NodeBase.MIXED, NodeFlag.DRAIN),
        ("DOWN+NOT_RESPONDING", NodeBase.DOWN, NodeFlag.NOT_RESPONDING),
        ("DOWN+DRAIN+NOT_RESPONDING", NodeBase.DOWN, NodeFlag.DRAIN | NodeFlag.NOT_RESPONDING),
        ("FUTURE+DRAIN", NodeBase.FUTURE, NodeFlag.DRAIN),
        ("ALLOCATED+COMPLETING", NodeBase.ALLOCATED, NodeFlag.COMPLETING),
        ("IDLE+CLOUD+POWERED_DOWN", NodeBase.IDLE, NodeFlag.CLOUD | NodeFlag.POWERED_DOWN),
        # sinfo %t short forms
        ("idle*", NodeBase.IDLE, NodeFlag.NOT_RESPONDING),
        ("mix", NodeBase.MIXED, NodeFlag.NONE),
        ("alloc", NodeBase.ALLOCATED, NodeFlag.NONE),
        ("drng", NodeBase.MIXED, NodeFlag.DRAIN),
        ("drain", NodeBase.IDLE, NodeFlag.DRAIN),
        ("down*", NodeBase.DOWN, NodeFlag.NOT_RESPONDING),
        ("idle~", NodeBase.IDLE, NodeFlag.POWERED_DOWN),
        ("unk*", NodeBase.UNKNOWN, NodeFlag.NOT_RESPONDING),
    ],
)
def test_node_state_from_str(text: str, base: NodeBase, flags: NodeFlag) -> None:
    state = NodeState.from_str(text)
    assert (state.base, state.flags) == (base, flags)


def test_node_state_from_sinfo_json_parts() -> None:
    # 22.05: state string plus state_flags; 23.x+: one list
    assert NodeState.from_parts("mixed", ["DRAIN"]) == NodeState.from_str("MIXED+DRAIN")
    assert NodeState.from_parts(["MIXED", "DRAIN"]) == NodeState.from_str("MIXED+DRAIN")


def test_unknown_flags_are_kept_not_fatal() -> None:
    state = NodeState.from_str("IDLE+DRAIN+SOMETHING_NEW")
    assert state.is_drained()
    assert state.other_flags == {"SOMETHING_NEW"}
    assert str(state) == "IDLE+DRAIN+SOMETHING_NEW"


@pytest.mark.parametrize("text", ["", "+", "BANANA", "*"])
def test_bad_node_state_raises(text: str) -> None:
    with pytest.raises(ValueError, match="node state"):
        NodeState.from_str(text)


@pytest.mark.parametrize(
    ("text", "drained", "draining", "available"),
    [
        ("IDLE", False, False, True),
        ("MIXED", False, False, True),
        ("ALLOCATED", False, False, True),
        ("IDLE+DRAIN", True, False, False),
        ("MIXED+DRAIN", False, True, False),
        ("ALLOCATED+DRAIN", False, True, False),
        ("IDLE+DRAIN+COMPLETING", False, True, False),
        ("DOWN+DRAIN+NOT_RESPONDING", True, False, False),
        ("DOWN", False, False, False),
        ("IDLE+NOT_RESPONDING", False, False, False),
        ("FUTURE", False, False, False),
        ("IDLE+MAINTENANCE", False, False, False),
    ],
)
def test_node_state_predicates(text: str, drained: bool, draining: bool, available: bool) -> None:
    state = NodeState.from_str(text)
    assert state.is_drained() is drained
    assert state.is_draining() is draining
    assert state.is_available() is available


@pytest.mark.parametrize(
    ("text", "state", "terminal"),
    [
        ("RUNNING", JobState.RUNNING, False),
        ("PENDING", JobState.PENDING, False),
        ("COMPLETING", JobState.COMPLETING, False),
        ("CANCELLED by 0", JobState.CANCELLED, True),
        ("cancelled", JobState.CANCELLED, True),
        ("COMPLETED", JobState.COMPLETED, True),
        ("NODE_FAIL", JobState.NODE_FAIL, True),
        ("OUT_OF_MEMORY", JobState.OUT_OF_MEMORY, True),
        ("REQUEUED", JobState.REQUEUED, False),
        ("PD", JobState.PENDING, False),
        ("CG", JobState.COMPLETING, False),
        ("TO", JobState.TIMEOUT, True),
    ],
)
def test_job_state(text: str, state: JobState, terminal: bool) -> None:
    parsed = JobState.from_str(text)
    assert parsed is state
    assert parsed.is_terminal() is terminal


def test_job_state_active() -> None:
    assert JobState.RUNNING.is_active()
    assert JobState.COMPLETING.is_active()
    assert not JobState.PENDING.is_active()
    assert not JobState.COMPLETED.is_active()


@pytest.mark.parametrize("text", ["", "   ", "BANANA"])
def test_bad_job_state_raises(text: str) -> None:
    with pytest.raises(ValueError, match="job state"):
        JobState.from_str(text)
