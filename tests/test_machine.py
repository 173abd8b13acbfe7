"""The one state machine shared by every saga: its moves, its guards, and what it leaves alone."""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any
from uuid import uuid4

import pytest
from transitions import Machine

from saga_es import TERMINAL_STATES, IllegalTransition, Saga, SagaError
from saga_es import machine as m
from saga_es.machine import MACHINE, TRIGGERS, check, legal_triggers


class Probe(SimpleNamespace):
    """What the guards read from a saga, as a plain object (the machine needs no aggregate)."""

    @property
    def next_compensation(self) -> str | None:
        """Stated here as the rule reads: latest first, compensable, not yet compensated."""
        for step in self.to_compensate:
            if step in self.compensable and step not in self.compensated:
                return str(step)
        return None


def probe(status: str, **data: Any) -> Probe:
    fields: dict[str, Any] = {
        "id": uuid4(),
        "status": status,
        "steps": ["a", "b"],
        "compensable": ["a", "b"],
        "completed": [],
        "attempts": {},
        "in_flight": {},
        "to_compensate": [],
        "compensating": {},
        "compensation_attempts": {},
        "compensated": [],
        "compensation_failure": None,
    }
    fields.update(data)
    return Probe(**fields)


def test_one_machine_is_built_once_and_holds_no_saga() -> None:
    assert isinstance(MACHINE, Machine)
    assert m.MACHINE is MACHINE
    assert MACHINE.models == []
    saga = probe(m.PENDING)
    check(saga, "start_step", {"step": "a", "attempt": 1})
    with pytest.raises(IllegalTransition):
        check(saga, "complete_saga", {})
    assert MACHINE.models == []


def test_the_triggers_are_the_saga_moves_and_no_auto_transitions() -> None:
    assert set(TRIGGERS) == {
        "start_saga",
        "start_step",
        "complete_step",
        "fail_step",
        "reconcile_step",
        "complete_saga",
        "start_compensation",
        "complete_compensation",
        "fail_compensation",
        "reconcile_compensation",
        "compensate_saga",
        "halt_saga",
        "time_out_saga",
        "resolve_saga",
        "request_cancel",
        "cancel_saga",
        "fork_saga",
        "revert_saga",
    }
    assert not [t for t in TRIGGERS if t.startswith("to_")]


@pytest.mark.parametrize(
    ("state", "triggers"),
    [
        (m.NEW, {"start_saga"}),
        (m.PENDING, {"start_step", "request_cancel", "cancel_saga", "fork_saga"}),
        (
            m.RUNNING,
            {
                "start_step",
                "complete_step",
                "fail_step",
                "reconcile_step",
                "complete_saga",
                "time_out_saga",
                "halt_saga",
                "request_cancel",
                "start_compensation",
                "cancel_saga",
            },
        ),
        (
            m.COMPENSATING,
            {
                "start_compensation",
                "complete_compensation",
                "fail_compensation",
                "reconcile_compensation",
                "compensate_saga",
                "halt_saga",
                "complete_step",
                "fail_step",
                "reconcile_step",
                "request_cancel",
                "cancel_saga",
            },
        ),
        (m.COMPLETED, {"revert_saga"}),
        (m.COMPENSATED, set()),
        (m.STUCK, {"resolve_saga"}),
    ],
)
def test_legal_triggers_by_state(state: str, triggers: set[str]) -> None:
    assert set(legal_triggers(state)) == triggers


def test_terminal_states_are_completed_compensated_and_cancelled() -> None:
    assert frozenset({m.COMPLETED, m.COMPENSATED, m.CANCELLED}) == TERMINAL_STATES
    assert m.STUCK not in TERMINAL_STATES


def test_every_saga_event_class_is_one_trigger_and_has_a_stable_topic() -> None:
    classes = [
        Saga.SagaStarted,
        Saga.StepStarted,
        Saga.StepCompleted,
        Saga.StepFailed,
        Saga.StepReconciled,
        Saga.CompensationStarted,
        Saga.CompensationRan,
        Saga.CompensationFailed,
        Saga.CompensationReconciled,
        Saga.SagaCompleted,
        Saga.SagaCompensated,
        Saga.SagaStuck,
        Saga.SagaTimedOut,
        Saga.SagaResolved,
        Saga.CancelRequested,
        Saga.SagaCancelled,
        Saga.SagaForked,
        Saga.SagaReverted,
    ]
    assert sorted(c.trigger for c in classes) == sorted(TRIGGERS)
    for cls in classes:
        assert f"saga_es:{cls.__name__}" == cls.TOPIC


def test_check_returns_the_destination_and_changes_nothing() -> None:
    saga = probe(m.RUNNING, in_flight={"a": 1}, attempts={"a": 1})
    before = copy.deepcopy(vars(saga))
    assert check(saga, "fail_step", {"step": "a", "attempt": 1, "will_retry": True}) == m.RUNNING
    assert (
        check(saga, "fail_step", {"step": "a", "attempt": 1, "will_retry": False}) == m.COMPENSATING
    )
    assert check(saga, "complete_step", {"step": "a", "attempt": 1}) == m.RUNNING
    assert check(saga, "reconcile_step", {"step": "a", "attempt": 1, "took_effect": False}) == (
        m.RUNNING
    )
    assert check(saga, "start_step", {"step": "a", "attempt": 2}) == m.RUNNING
    assert vars(saga) == before


def test_an_unknown_trigger_is_illegal() -> None:
    saga = probe(m.RUNNING)
    with pytest.raises(IllegalTransition) as caught:
        check(saga, "teleport", {})
    error = caught.value
    assert (error.saga_id, error.state, error.trigger) == (saga.id, m.RUNNING, "teleport")
    assert error.reason == "unknown trigger"


def test_a_move_from_the_wrong_state_names_saga_state_and_trigger() -> None:
    saga = probe(m.COMPLETED)
    with pytest.raises(IllegalTransition) as caught:
        check(saga, "start_step", {"step": "a", "attempt": 1})
    error = caught.value
    assert isinstance(error, SagaError)
    assert (error.saga_id, error.state, error.trigger) == (saga.id, m.COMPLETED, "start_step")
    assert str(saga.id) in str(error)
    assert "completed" in str(error)
    assert "start_step" in str(error)


# A saga whose step "b" failed after "a" completed: "a" is due for compensation.
B_FAILED = {"completed": ["a"], "attempts": {"a": 1, "b": 1}, "to_compensate": ["a"]}
# Three steps, all completed, then "d" failed: compensations are due in the order c, b, a.
THREE_DONE = {
    "steps": ["a", "b", "c", "d"],
    "compensable": ["a", "b", "c"],
    "completed": ["a", "b", "c"],
    "attempts": {"a": 1, "b": 1, "c": 1, "d": 1},
    "to_compensate": ["c", "b", "a"],
}


@pytest.mark.parametrize(
    ("saga", "trigger", "data", "reason"),
    [
        (probe(m.PENDING), "start_step", {"step": "b", "attempt": 1}, "next step is 'a'"),
        (probe(m.PENDING), "start_step", {"step": "a", "attempt": 2}, "attempt 1, not 2"),
        (
            probe(m.RUNNING, in_flight={"a": 1}, attempts={"a": 1}),
            "start_step",
            {"step": "a", "attempt": 3},
            "still in flight",
        ),
        (
            probe(m.RUNNING, in_flight={"a": 2}, attempts={"a": 2}),
            "start_step",
            {"step": "a", "attempt": 2},
            "still in flight",
        ),
        (
            probe(m.RUNNING, in_flight={"a": 1}, attempts={"a": 1}),
            "start_step",
            {"step": "b", "attempt": 1},
            "still in flight",
        ),
        (
            probe(m.RUNNING, in_flight={"a": 1}, attempts={"a": 1}),
            "start_step",
            {"step": "b", "attempt": 2},
            "still in flight",
        ),
        (
            probe(m.RUNNING, in_flight={"a": 2}, attempts={"a": 2}),
            "complete_step",
            {"step": "a", "attempt": 1},
            "on attempt 2",
        ),
        (probe(m.RUNNING), "complete_step", {"step": "a", "attempt": 1}, "was not started"),
        (
            probe(m.RUNNING, in_flight={"a": 1}, attempts={"a": 1}),
            "fail_step",
            {"step": "b", "attempt": 1, "will_retry": False},
            "was not started",
        ),
        (
            probe(m.RUNNING, completed=["a"], attempts={"a": 1}),
            "reconcile_step",
            {"step": "a", "attempt": 1, "took_effect": True},
            "was not started",
        ),
        (
            probe(m.RUNNING, in_flight={"a": 2}, attempts={"a": 2}),
            "reconcile_step",
            {"step": "a", "attempt": 1, "took_effect": False},
            "on attempt 2",
        ),
        (
            probe(m.RUNNING, completed=["a", "b"]),
            "start_step",
            {"step": "b", "attempt": 2},
            "every step has completed",
        ),
        (probe(m.RUNNING, completed=["a"]), "complete_saga", {}, "'b' has not completed"),
        (
            probe(m.RUNNING, completed=["a"], in_flight={"b": 1}),
            "complete_saga",
            {},
            "'b' is still in flight",
        ),
        (
            probe(m.COMPENSATING, **B_FAILED),
            "start_compensation",
            {"step": "b", "attempt": 1},
            "next compensation is 'a', not 'b'",
        ),
        (
            probe(m.COMPENSATING, **THREE_DONE),
            "start_compensation",
            {"step": "b", "attempt": 1},
            "next compensation is 'c', not 'b'",
        ),
        (
            probe(m.COMPENSATING, **{**THREE_DONE, "compensated": ["c"]}),
            "start_compensation",
            {"step": "a", "attempt": 1},
            "next compensation is 'b', not 'a'",
        ),
        (
            probe(m.COMPENSATING, **{**THREE_DONE, "compensated": ["c"]}),
            "start_compensation",
            {"step": "c", "attempt": 1},
            "next compensation is 'b', not 'c'",
        ),
        (
            probe(
                m.COMPENSATING, **{**THREE_DONE, "compensable": ["a", "c"], "compensated": ["c"]}
            ),
            "start_compensation",
            {"step": "b", "attempt": 1},
            "next compensation is 'a', not 'b'",
        ),
        (
            probe(m.COMPENSATING, **B_FAILED, compensated=["a"]),
            "start_compensation",
            {"step": "a", "attempt": 1},
            "no compensation is due",
        ),
        (
            probe(m.COMPENSATING, **B_FAILED, compensable=[]),
            "start_compensation",
            {"step": "a", "attempt": 1},
            "no compensation is due",
        ),
        (
            probe(m.COMPENSATING, **B_FAILED, compensation_attempts={"a": 1}),
            "start_compensation",
            {"step": "a", "attempt": 1},
            "on attempt 2, not 1",
        ),
        (
            probe(
                m.COMPENSATING, **B_FAILED, compensating={"a": 1}, compensation_attempts={"a": 1}
            ),
            "start_compensation",
            {"step": "a", "attempt": 3},
            "still in flight",
        ),
        (
            probe(
                m.COMPENSATING, **THREE_DONE, compensating={"c": 1}, compensation_attempts={"c": 1}
            ),
            "start_compensation",
            {"step": "b", "attempt": 1},
            "'c' is still in flight",
        ),
        (
            probe(
                m.COMPENSATING, **B_FAILED, compensation_attempts={"a": 1}, compensation_failure="a"
            ),
            "start_compensation",
            {"step": "a", "attempt": 2},
            "compensation of 'a' failed",
        ),
        (
            probe(
                m.COMPENSATING, **B_FAILED, compensating={"a": 1}, compensation_attempts={"a": 1}
            ),
            "compensate_saga",
            {},
            "in flight",
        ),
        (
            probe(m.COMPENSATING, **B_FAILED),
            "compensate_saga",
            {},
            "step 'a' is not compensated yet",
        ),
        (
            probe(
                m.COMPENSATING, **B_FAILED, compensation_attempts={"a": 1}, compensation_failure="a"
            ),
            "compensate_saga",
            {},
            "compensation of 'a' failed",
        ),
        (
            probe(m.COMPENSATING, **B_FAILED),
            "halt_saga",
            {"step": "a"},
            "no compensation has failed",
        ),
        (
            probe(m.COMPENSATING, **B_FAILED, compensation_attempts={"a": 1}),
            "halt_saga",
            {"step": "a"},
            "no compensation has failed",
        ),
        (
            probe(
                m.COMPENSATING,
                **THREE_DONE,
                compensation_attempts={"c": 1},
                compensation_failure="c",
            ),
            "halt_saga",
            {"step": "b"},
            "the compensation that failed is 'c'",
        ),
        (
            probe(
                m.COMPENSATING, **B_FAILED, compensating={"a": 1}, compensation_attempts={"a": 1}
            ),
            "halt_saga",
            {"step": "b"},  # a poison compensation halts with its own step, not another's
            "in flight",
        ),
        (
            probe(m.COMPENSATING, **B_FAILED),
            "complete_compensation",
            {"step": "a", "attempt": 1},
            "was not started",
        ),
        (
            probe(m.COMPENSATING, **B_FAILED),
            "reconcile_compensation",
            {"step": "a", "attempt": 1, "took_effect": True},
            "was not started",
        ),
        (
            probe(
                m.COMPENSATING, **B_FAILED, compensating={"a": 2}, compensation_attempts={"a": 2}
            ),
            "fail_compensation",
            {"step": "a", "attempt": 1, "will_retry": False},
            "on attempt 2",
        ),
    ],
)
def test_guards_refuse_with_a_reason(saga: Any, trigger: str, data: Any, reason: str) -> None:
    before = copy.deepcopy(vars(saga))
    with pytest.raises(IllegalTransition, match=reason) as caught:
        check(saga, trigger, data)
    assert caught.value.reason
    assert caught.value.state == saga.status
    assert caught.value.trigger == trigger
    assert vars(saga) == before


@pytest.mark.parametrize(
    ("saga", "trigger", "data", "dest"),
    [
        pytest.param(
            probe(m.RUNNING, in_flight={"a": 1}, attempts={"a": 1}),
            "start_step",
            {"step": "a", "attempt": 2},
            m.RUNNING,
            id="re-run an attempt in flight as its direct successor",
        ),
        pytest.param(
            probe(m.RUNNING, completed=["a"], attempts={"a": 1, "b": 2}),
            "start_step",
            {"step": "b", "attempt": 3},
            m.RUNNING,
            id="next attempt of the next step",
        ),
        pytest.param(
            probe(m.RUNNING, in_flight={"a": 1}, attempts={"a": 1}),
            "reconcile_step",
            {"step": "a", "attempt": 1, "took_effect": True},
            m.RUNNING,
            id="reconcile the attempt in flight",
        ),
        pytest.param(
            probe(m.RUNNING, in_flight={"a": 1}, attempts={"a": 1}),
            "fail_step",
            {"step": "a", "attempt": 1, "will_retry": False, "compensate": True},
            m.COMPENSATING,
            id="fail and compensate",
        ),
        pytest.param(
            probe(m.COMPENSATING, **THREE_DONE),
            "start_compensation",
            {"step": "c", "attempt": 1},
            m.COMPENSATING,
            id="latest completed first",
        ),
        pytest.param(
            probe(m.COMPENSATING, **{**THREE_DONE, "compensable": ["a"]}),
            "start_compensation",
            {"step": "a", "attempt": 1},
            m.COMPENSATING,
            id="past steps without a compensation",
        ),
        pytest.param(
            probe(
                m.COMPENSATING, **THREE_DONE, compensating={"c": 1}, compensation_attempts={"c": 1}
            ),
            "start_compensation",
            {"step": "c", "attempt": 2},
            m.COMPENSATING,
            id="re-run a compensation in flight as its direct successor",
        ),
        pytest.param(
            probe(m.COMPENSATING, **THREE_DONE, compensation_attempts={"c": 1}),
            "start_compensation",
            {"step": "c", "attempt": 2},
            m.COMPENSATING,
            id="retry a failed compensation",
        ),
        pytest.param(
            probe(
                m.COMPENSATING, **THREE_DONE, compensating={"c": 1}, compensation_attempts={"c": 1}
            ),
            "reconcile_compensation",
            {"step": "c", "attempt": 1, "took_effect": False},
            m.COMPENSATING,
            id="reconcile the compensation in flight",
        ),
        pytest.param(
            probe(m.COMPENSATING, **{**THREE_DONE, "compensated": ["c", "b", "a"]}),
            "compensate_saga",
            {},
            m.COMPENSATED,
            id="everything compensated",
        ),
        pytest.param(
            probe(m.COMPENSATING, **{**THREE_DONE, "compensable": []}),
            "compensate_saga",
            {},
            m.COMPENSATED,
            id="nothing to compensate",
        ),
        pytest.param(
            probe(
                m.COMPENSATING,
                **THREE_DONE,
                compensation_attempts={"c": 1},
                compensation_failure="c",
            ),
            "halt_saga",
            {"step": "c"},
            m.STUCK,
            id="halt after a final compensation failure",
        ),
    ],
)
def test_legal_moves_lead_where_the_table_says(
    saga: Any, trigger: str, data: Any, dest: str
) -> None:
    before = copy.deepcopy(vars(saga))
    assert check(saga, trigger, data) == dest
    assert vars(saga) == before
