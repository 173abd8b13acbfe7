"""The saga aggregate: every command is a legal move recorded as one event, or refused.

The property tests drive the aggregate with random command sequences and check
each against `Rules`, an independent statement of the legal moves (DESIGN §3),
then replay every accepted history, in memory and through each real store.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pgserver import PgServer

from saga_es import IllegalTransition, Saga, SagaApplication
from saga_es.aggregate import replay, verify_events
from saga_es.machine import (
    COMPENSATED,
    COMPENSATING,
    COMPLETED,
    PENDING,
    RUNNING,
    STATES,
    STUCK,
)

STEPS = ["a", "b", "c"]

Command = tuple[Any, ...]


def new_saga(steps: list[str] | None = None, compensable: list[str] | None = None) -> Saga:
    steps = list(STEPS if steps is None else steps)
    return Saga.start(
        id=uuid4(),
        name="order",
        definition_version=1,
        steps=steps,
        compensable=list(steps if compensable is None else compensable),
        key=None,
        context_type="builtins:dict",
        context={"seed": 1},
    )


def do(saga: Saga, command: Command) -> None:
    """Run one command on the saga; each changes the context a little, to replay it too."""
    name, *args = command
    if name == "start_step":
        saga.start_step(*args)
    elif name == "complete_step":
        step, attempt = args
        removed = ["seed"] if step == "b" else []
        saga.complete_step(
            step, attempt, changes={f"{step}_done": attempt}, removed=removed, result=step
        )
    elif name == "fail_step":
        step, attempt, retry, compensate = args
        saga.fail_step(
            step,
            attempt,
            error_type="BoomError",
            error_message=f"{step} broke",
            will_retry=retry,
            compensate=compensate,
        )
    elif name == "reconcile_step":
        step, attempt, took_effect = args
        saga.reconcile_step(step, attempt, took_effect=took_effect)
    elif name == "start_compensation":
        saga.start_compensation(*args)
    elif name == "complete_compensation":
        step, attempt = args
        saga.complete_compensation(step, attempt, changes={f"{step}_undone": True}, removed=[])
    elif name == "fail_compensation":
        step, attempt, retry = args
        saga.fail_compensation(
            step, attempt, error_type="UndoError", error_message="no", will_retry=retry
        )
    elif name == "reconcile_compensation":
        step, attempt, took_effect = args
        saga.reconcile_compensation(step, attempt, took_effect=took_effect)
    elif name == "complete":
        saga.complete()
    elif name == "compensate":
        saga.compensate()
    elif name == "halt":
        saga.halt(args[0], error_type="UndoError", error_message="no")
    else:
        raise AssertionError(name)


TRIGGER_OF = {
    "start_step": "start_step",
    "complete_step": "complete_step",
    "fail_step": "fail_step",
    "reconcile_step": "reconcile_step",
    "start_compensation": "start_compensation",
    "complete_compensation": "complete_compensation",
    "fail_compensation": "fail_compensation",
    "reconcile_compensation": "reconcile_compensation",
    "complete": "complete_saga",
    "compensate": "compensate_saga",
    "halt": "halt_saga",
}


@dataclass
class Rules:
    """The legal moves of a saga, stated without `saga_es.machine`.

    - Steps run one at a time, in order; each attempt is the previous one plus one.
    - While an attempt is in flight, the only new start is that step's next attempt
      (recovery re-running an attempt whose outcome is unknown).
    - An attempt in flight may complete, fail (staying `running` only if it will be
      retried) or be reconciled; a reconcile without effect ends the flight.
    - Compensations run in one strict order: the steps that completed (or failed with
      `compensate`), latest first, skipping steps without a compensation and steps
      already compensated. The same in-flight rule holds for them.
    - A compensation that fails for good stops every further compensation: the only
      way out is `halt`, naming that step. The saga is compensated only when nothing is
      due or in flight.
    - A step or compensation in flight may `halt` the saga too: a poison step, whose
      outcome was lost on too many resumptions.
    """

    steps: list[str]
    compensable: list[str]
    status: str = PENDING
    done: list[str] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)
    flight: tuple[str, int] | None = None
    undo: list[str] = field(default_factory=list)  # steps with an effect, latest first
    undo_attempts: dict[str, int] = field(default_factory=dict)
    undo_flight: tuple[str, int] | None = None
    undone: list[str] = field(default_factory=list)
    failure: str | None = None  # the step whose compensation failed for good

    def due(self) -> str | None:
        """The compensation that must run next."""
        for step in self.undo:
            if step in self.compensable and step not in self.undone:
                return step
        return None

    def outcome(self, command: Command) -> str | None:
        """The state `command` leads to, or None if it is illegal."""
        name, *args = command
        running, compensating = self.status == RUNNING, self.status == COMPENSATING
        if name == "start_step":
            step, attempt = args
            if self.status not in (PENDING, RUNNING):
                return None
            if self.flight is not None:  # only the re-run of the attempt in flight
                return RUNNING if self.flight == (step, attempt - 1) else None
            legal = (
                len(self.done) < len(self.steps)
                and step == self.steps[len(self.done)]
                and attempt == self.attempts.get(step, 0) + 1
            )
            return RUNNING if legal else None
        if name in ("complete_step", "reconcile_step"):
            step, attempt = args[:2]
            return RUNNING if running and self.flight == (step, attempt) else None
        if name == "fail_step":
            step, attempt, retry, _ = args
            if not (running and self.flight == (step, attempt)):
                return None
            return RUNNING if retry else COMPENSATING
        if name == "complete":
            legal = running and self.flight is None and self.done == self.steps
            return COMPLETED if legal else None
        if name == "start_compensation":
            step, attempt = args
            if not compensating or self.failure is not None:
                return None
            if self.undo_flight is not None:
                return COMPENSATING if self.undo_flight == (step, attempt - 1) else None
            legal = step == self.due() and attempt == self.undo_attempts.get(step, 0) + 1
            return COMPENSATING if legal else None
        if name in ("complete_compensation", "fail_compensation", "reconcile_compensation"):
            step, attempt = args[:2]
            return COMPENSATING if compensating and self.undo_flight == (step, attempt) else None
        if name == "compensate":
            legal = (
                compensating
                and self.undo_flight is None
                and self.failure is None
                and self.due() is None
            )
            return COMPENSATED if legal else None
        if name == "halt":
            (step,) = args
            failed_for_good = compensating and self.undo_flight is None and self.failure == step
            poison = (running and self.flight is not None and self.flight[0] == step) or (
                compensating and self.undo_flight is not None and self.undo_flight[0] == step
            )
            return STUCK if failed_for_good or poison else None
        raise AssertionError(name)

    def apply(self, command: Command) -> str:
        """Make the legal `command`'s move; the new state."""
        to_state = self.outcome(command)
        assert to_state is not None
        name, *args = command
        if name == "start_step":
            self.flight = (args[0], args[1])
            self.attempts[args[0]] = args[1]
        elif name == "complete_step":
            self.flight = None
            self.done.append(args[0])
            self.undo.insert(0, args[0])
        elif name == "fail_step":
            self.flight = None
            if args[3]:
                self.undo.insert(0, args[0])
        elif name == "reconcile_step":
            if not args[2]:
                self.flight = None
        elif name == "start_compensation":
            self.undo_flight = (args[0], args[1])
            self.undo_attempts[args[0]] = args[1]
        elif name == "complete_compensation":
            self.undo_flight = None
            self.undone.append(args[0])
        elif name == "fail_compensation":
            self.undo_flight = None
            if not args[2]:
                self.failure = args[0]
        elif name == "reconcile_compensation" and not args[2]:
            self.undo_flight = None
        self.status = to_state
        return to_state

    def agrees_with(self, saga: Saga) -> None:
        """The saga's own bookkeeping says what the rules say."""
        assert saga.status == self.status
        assert saga.completed == self.done
        assert saga.attempts == self.attempts
        assert saga.in_flight == dict([self.flight] if self.flight else [])
        assert saga.to_compensate == self.undo
        assert saga.compensating == dict([self.undo_flight] if self.undo_flight else [])
        assert saga.compensation_attempts == self.undo_attempts
        assert saga.compensated == self.undone
        assert saga.compensation_failure == self.failure
        assert saga.next_compensation == self.due()


def all_commands(steps: list[str]) -> list[Command]:
    names = [*steps, "x"]  # "x" is no step of the saga
    commands: list[Command] = []
    for step in names:
        for attempt in (1, 2, 3):
            commands += [
                ("start_step", step, attempt),
                ("complete_step", step, attempt),
                ("fail_step", step, attempt, False, False),
                ("fail_step", step, attempt, False, True),
                ("fail_step", step, attempt, True, False),
                ("fail_step", step, attempt, True, True),
                ("reconcile_step", step, attempt, True),
                ("reconcile_step", step, attempt, False),
                ("start_compensation", step, attempt),
                ("complete_compensation", step, attempt),
                ("fail_compensation", step, attempt, False),
                ("fail_compensation", step, attempt, True),
                ("reconcile_compensation", step, attempt, True),
                ("reconcile_compensation", step, attempt, False),
            ]
        commands.append(("halt", step))
    return [*commands, ("complete",), ("compensate",)]


COMMANDS = all_commands(STEPS)


def state_of(saga: Saga) -> dict[str, Any]:
    """Everything a saga holds, except the events not yet saved."""
    return {k: v for k, v in vars(saga).items() if k != "_pending_events"}


def assert_refused(saga: Saga, command: Command) -> IllegalTransition:
    """`command` raises IllegalTransition and leaves the saga exactly as it was."""
    before = copy.deepcopy(state_of(saga))
    pending = list(saga.pending_events)
    version, status = saga.version, saga.status
    with pytest.raises(IllegalTransition) as caught:
        do(saga, command)
    error = caught.value
    assert (error.saga_id, error.state, error.trigger) == (saga.id, status, TRIGGER_OF[command[0]])
    assert saga.pending_events == pending
    assert [id(e) for e in saga.pending_events] == [id(e) for e in pending]
    assert saga.version == version
    assert state_of(saga) == before
    return error


# -- examples --------------------------------------------------------------------------


def drive(
    *commands: Command, steps: list[str] | None = None, compensable: list[str] | None = None
) -> Saga:
    saga = new_saga(steps, compensable)
    for command in commands:
        do(saga, command)
    return saga


def rules_after(
    history: list[Command], steps: list[str] | None = None, compensable: list[str] | None = None
) -> Rules:
    steps = list(STEPS if steps is None else steps)
    rules = Rules(steps, list(steps if compensable is None else compensable))
    for done in history:
        rules.apply(done)
    return rules


A_RUNNING = [("start_step", "a", 1)]
A_RERUN = [*A_RUNNING, ("start_step", "a", 2)]
A_NO_EFFECT = [*A_RUNNING, ("reconcile_step", "a", 1, False)]
A_DONE = [*A_RUNNING, ("complete_step", "a", 1)]
ALL_DONE = [*A_DONE, ("start_step", "b", 1), ("complete_step", "b", 1)]
ALL_DONE += [("start_step", "c", 1), ("complete_step", "c", 1)]
C_FAILED = [*ALL_DONE[:4], ("start_step", "c", 1), ("fail_step", "c", 1, False, False)]
C_FAILED_WITH_EFFECT = [*C_FAILED[:-1], ("fail_step", "c", 1, False, True)]
B_UNDOING = [*C_FAILED, ("start_compensation", "b", 1)]
B_RERUN = [*B_UNDOING, ("start_compensation", "b", 2)]
B_UNDONE = [*B_UNDOING, ("complete_compensation", "b", 1)]
A_UNDONE = [*B_UNDONE, ("start_compensation", "a", 1), ("complete_compensation", "a", 1)]
B_FAILED_FOR_GOOD = [*B_UNDOING, ("fail_compensation", "b", 1, False)]

ILLEGAL: dict[str, tuple[list[Command], list[Command]]] = {
    "pending": (
        [],
        [
            ("start_step", "b", 1),
            ("start_step", "a", 2),
            ("start_step", "x", 1),
            ("complete_step", "a", 1),
            ("fail_step", "a", 1, False, False),
            ("reconcile_step", "a", 1, True),
            ("complete",),
            ("start_compensation", "a", 1),
            ("reconcile_compensation", "a", 1, True),
            ("compensate",),
            ("halt", "a"),
        ],
    ),
    "step in flight": (
        A_RUNNING,
        [
            ("start_step", "a", 1),
            ("start_step", "a", 3),
            ("start_step", "b", 1),
            ("start_step", "b", 2),
            ("complete_step", "a", 2),
            ("complete_step", "b", 1),
            ("fail_step", "a", 3, False, False),
            ("reconcile_step", "a", 2, True),
            ("reconcile_step", "b", 1, False),
            ("complete",),
            ("start_compensation", "a", 1),
            ("complete_compensation", "a", 1),
            ("reconcile_compensation", "a", 1, False),
        ],
    ),
    "step re-run while in flight": (
        A_RERUN,
        [
            ("start_step", "a", 2),
            ("start_step", "a", 4),
            ("complete_step", "a", 1),
            ("fail_step", "a", 1, True, False),
            ("reconcile_step", "a", 1, True),
            ("start_step", "b", 1),
        ],
    ),
    "step reconciled without effect": (
        A_NO_EFFECT,
        [
            ("complete_step", "a", 1),
            ("fail_step", "a", 1, False, False),
            ("reconcile_step", "a", 1, False),
            ("start_step", "a", 1),
            ("start_step", "b", 1),
            ("complete",),
        ],
    ),
    "between steps": (
        A_DONE,
        [
            ("start_step", "a", 2),
            ("start_step", "c", 1),
            ("complete_step", "a", 1),
            ("reconcile_step", "a", 1, True),
            ("complete",),
            ("compensate",),
        ],
    ),
    "every step done": (ALL_DONE, [("start_step", "c", 2), ("start_step", "x", 1)]),
    "completed": (
        [*ALL_DONE, ("complete",)],
        [
            ("complete",),
            ("start_step", "a", 2),
            ("fail_step", "c", 1, False, False),
            ("start_compensation", "c", 1),
            ("compensate",),
            ("halt", "c"),
        ],
    ),
    "compensating": (
        C_FAILED,
        [
            ("start_step", "c", 2),
            ("complete_step", "c", 1),
            ("reconcile_step", "c", 1, True),
            ("complete",),
            ("start_compensation", "c", 1),  # it failed without effect: nothing to undo
            ("start_compensation", "a", 1),  # "b" completed later: it comes first
            ("start_compensation", "b", 2),
            ("complete_compensation", "b", 1),
            ("reconcile_compensation", "b", 1, True),
            ("compensate",),  # "b" and "a" are still due
            ("halt", "b"),  # nothing has failed
        ],
    ),
    "failed with an effect to undo": (
        C_FAILED_WITH_EFFECT,
        [("start_compensation", "b", 1), ("start_compensation", "a", 1), ("compensate",)],
    ),
    "compensation in flight": (
        B_UNDOING,
        [
            ("start_compensation", "a", 1),
            ("start_compensation", "b", 1),
            ("start_compensation", "b", 3),
            ("complete_compensation", "a", 1),
            ("complete_compensation", "b", 2),
            ("fail_compensation", "b", 2, False),
            ("reconcile_compensation", "b", 2, True),
            ("reconcile_compensation", "a", 1, False),
            ("compensate",),
            ("halt", "a"),  # only the compensation in flight may halt the saga, as poison
        ],
    ),
    "compensation re-run while in flight": (
        B_RERUN,
        [
            ("start_compensation", "b", 2),
            ("start_compensation", "a", 1),
            ("complete_compensation", "b", 1),
            ("reconcile_compensation", "b", 1, True),
        ],
    ),
    "compensated out of order": (
        B_UNDONE,
        [
            ("start_compensation", "b", 2),
            ("complete_compensation", "b", 1),
            ("start_compensation", "a", 2),
            ("compensate",),
        ],
    ),
    "compensation failed for good": (
        B_FAILED_FOR_GOOD,
        [
            ("start_compensation", "b", 2),
            ("start_compensation", "a", 1),
            ("complete_compensation", "b", 1),
            ("compensate",),
            ("halt", "a"),
            ("halt", "x"),
        ],
    ),
    "compensated": (
        [*A_UNDONE, ("compensate",)],
        [("start_compensation", "a", 2), ("compensate",), ("halt", "a"), ("start_step", "c", 2)],
    ),
    "stuck": (
        [*B_FAILED_FOR_GOOD, ("halt", "b")],
        [
            ("start_compensation", "b", 2),
            ("start_compensation", "a", 1),
            ("compensate",),
            ("halt", "b"),
        ],
    ),
}


@pytest.mark.parametrize(
    ("history", "command"),
    [
        pytest.param(history, command, id=f"{where}-{'-'.join(map(str, command))}")
        for where, (history, commands) in ILLEGAL.items()
        for command in commands
    ],
)
def test_an_illegal_move_raises_and_appends_nothing(
    history: list[Command], command: Command
) -> None:
    saga = drive(*history)
    assert rules_after(history).outcome(command) is None  # the example itself is right
    assert_refused(saga, command)


def test_a_step_without_a_compensation_is_passed_over_in_the_strict_order() -> None:
    history = [*C_FAILED]
    saga = drive(*history, compensable=["a", "c"])
    rules = rules_after(history, compensable=["a", "c"])
    assert saga.to_compensate == ["b", "a"]
    assert saga.next_compensation == "a"
    for command in [("start_compensation", "b", 1), ("compensate",)]:
        assert rules.outcome(command) is None
        assert_refused(saga, command)
    do(saga, ("start_compensation", "a", 1))
    do(saga, ("complete_compensation", "a", 1))
    assert saga.next_compensation is None
    saga.compensate()
    assert saga.status == COMPENSATED
    assert saga.compensated == ["a"]


def test_a_saga_starts_pending_with_its_data() -> None:
    saga = new_saga(compensable=["a", "c"])
    assert saga.status == PENDING
    assert saga.version == 1
    (started,) = saga.pending_events
    assert isinstance(started, Saga.SagaStarted)
    assert started.to_state == PENDING
    assert started.compensable == ["a", "c"]
    assert (saga.name, saga.definition_version, saga.steps) == ("order", 1, STEPS)
    assert saga.compensable == ["a", "c"]
    assert saga.context == {"seed": 1}
    assert saga.next_compensation is None
    assert not saga.is_terminal


def test_every_event_records_the_state_it_leads_to() -> None:
    saga = drive(*A_UNDONE)
    saga.compensate()
    assert [(type(e).__name__, e.to_state) for e in saga.pending_events] == [
        ("SagaStarted", PENDING),
        ("StepStarted", RUNNING),
        ("StepCompleted", RUNNING),
        ("StepStarted", RUNNING),
        ("StepCompleted", RUNNING),
        ("StepStarted", RUNNING),
        ("StepFailed", COMPENSATING),
        ("CompensationStarted", COMPENSATING),
        ("CompensationRan", COMPENSATING),
        ("CompensationStarted", COMPENSATING),
        ("CompensationRan", COMPENSATING),
        ("SagaCompensated", COMPENSATED),
    ]
    assert saga.status == COMPENSATED
    assert saga.is_terminal
    assert saga.compensated == ["b", "a"]
    assert saga.error == {"step": "c", "type": "BoomError", "message": "c broke"}


def test_a_completed_saga_holds_each_steps_result_and_changes() -> None:
    saga = drive(*ALL_DONE, ("complete",))
    assert saga.status == COMPLETED
    assert saga.is_terminal
    assert saga.completed == STEPS
    assert saga.results == {"a": "a", "b": "b", "c": "c"}
    assert saga.context == {"a_done": 1, "b_done": 1, "c_done": 1}  # "b" removed "seed"


def test_a_retried_step_starts_again_with_the_next_attempt() -> None:
    saga = drive(*A_RUNNING, ("fail_step", "a", 1, True, False), ("start_step", "a", 2))
    assert saga.status == RUNNING
    assert saga.in_flight == {"a": 2}
    assert saga.step_key("a") == f"{saga.id}:a"
    assert_refused(saga, ("complete_step", "a", 1))


def test_an_attempt_in_flight_is_re_run_as_the_next_attempt_and_only_that_one_ends() -> None:
    saga = drive(*A_RERUN)
    assert isinstance(saga.pending_events[-1], Saga.StepStarted)
    assert (saga.in_flight, saga.attempts) == ({"a": 2}, {"a": 2})
    assert_refused(saga, ("complete_step", "a", 1))  # the older attempt's outcome is too late
    do(saga, ("complete_step", "a", 2))
    assert (saga.in_flight, saga.completed, saga.context) == ({}, ["a"], {"seed": 1, "a_done": 2})


def test_a_reconciled_attempt_with_effect_stays_in_flight_until_it_completes() -> None:
    saga = drive(*A_RUNNING, ("reconcile_step", "a", 1, True))
    reconciled = saga.pending_events[-1]
    assert isinstance(reconciled, Saga.StepReconciled)
    assert (reconciled.step, reconciled.attempt, reconciled.took_effect) == ("a", 1, True)
    assert reconciled.to_state == RUNNING
    assert saga.in_flight == {"a": 1}
    do(saga, ("complete_step", "a", 1))
    assert saga.completed == ["a"]
    assert saga.to_compensate == ["a"]


def test_a_reconciled_attempt_without_effect_ends_and_the_next_attempt_may_start() -> None:
    saga = drive(*A_NO_EFFECT)
    assert saga.in_flight == {}
    assert saga.completed == []
    assert saga.to_compensate == []
    do(saga, ("start_step", "a", 2))
    assert saga.in_flight == {"a": 2}


def test_a_failure_with_an_effect_is_compensated_first() -> None:
    saga = drive(*C_FAILED_WITH_EFFECT)
    failed = saga.pending_events[-1]
    assert isinstance(failed, Saga.StepFailed)
    assert (failed.compensate, failed.will_retry, failed.to_state) == (True, False, COMPENSATING)
    assert saga.to_compensate == ["c", "b", "a"]
    order = []
    while saga.next_compensation is not None:
        step = saga.next_compensation
        order.append(step)
        do(saga, ("start_compensation", step, 1))
        do(saga, ("complete_compensation", step, 1))
    saga.compensate()
    assert order == ["c", "b", "a"]
    assert saga.status == COMPENSATED
    assert saga.completed == ["a", "b"]  # "c" failed: it never completed


def test_a_compensation_in_flight_is_re_run_or_reconciled_like_an_action() -> None:
    saga = drive(*B_RERUN)
    assert (saga.compensating, saga.compensation_attempts) == ({"b": 2}, {"b": 2})
    do(saga, ("reconcile_compensation", "b", 2, False))
    assert saga.compensating == {}
    assert saga.next_compensation == "b"
    do(saga, ("start_compensation", "b", 3))
    do(saga, ("reconcile_compensation", "b", 3, True))
    reconciled = saga.pending_events[-1]
    assert isinstance(reconciled, Saga.CompensationReconciled)
    assert (reconciled.step, reconciled.attempt, reconciled.took_effect) == ("b", 3, True)
    assert saga.compensating == {"b": 3}
    do(saga, ("complete_compensation", "b", 3))
    assert (saga.compensated, saga.next_compensation) == (["b"], "a")


def test_a_retried_compensation_is_still_the_one_due() -> None:
    saga = drive(*B_UNDOING, ("fail_compensation", "b", 1, True))
    assert saga.compensation_failure is None
    assert saga.next_compensation == "b"
    assert_refused(saga, ("start_compensation", "a", 1))
    do(saga, ("start_compensation", "b", 2))
    assert saga.compensating == {"b": 2}


def test_stuck_keeps_the_error_that_stopped_it() -> None:
    saga = drive(*B_FAILED_FOR_GOOD)
    assert saga.compensation_failure == "b"
    do(saga, ("halt", "b"))
    assert saga.status == STUCK
    assert not saga.is_terminal
    assert saga.error == {"step": "b", "type": "UndoError", "message": "no"}
    assert isinstance(saga.pending_events[-1], Saga.SagaStuck)


def test_a_saga_halts_only_on_the_step_whose_compensation_failed() -> None:
    # SagaStuck names the step that stopped the saga; naming another one would record
    # an error that never happened (the failure was on "b").
    saga = drive(*B_FAILED_FOR_GOOD)
    with pytest.raises(IllegalTransition):
        do(saga, ("halt", "a"))


def test_replay_gives_the_live_state_without_asking_the_machine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    saga = drive(
        *A_RERUN,
        ("reconcile_step", "a", 2, True),
        ("complete_step", "a", 2),
        ("start_step", "b", 1),
        ("fail_step", "b", 1, False, True),
        ("start_compensation", "b", 1),
        ("reconcile_compensation", "b", 1, False),
        ("start_compensation", "b", 2),
        ("complete_compensation", "b", 2),
        ("start_compensation", "a", 1),
        ("complete_compensation", "a", 1),
    )
    saga.compensate()

    def refuse(*args: Any, **kwargs: Any) -> str:
        raise AssertionError("replay asked the machine")

    monkeypatch.setattr("saga_es.machine.check", refuse)
    replayed = replay(None, saga.pending_events)
    assert replayed is not None
    assert state_of(replayed) == state_of(saga)
    for n in range(1, len(saga.pending_events) + 1):
        partial = replay(None, saga.pending_events[:n])
        assert partial is not None
        assert partial.version == n
        assert partial.status == saga.pending_events[n - 1].to_state


def test_the_saga_holds_no_machine() -> None:
    saga = drive(*A_DONE)
    for value in vars(saga).values():
        assert type(value).__module__.split(".")[0] not in ("transitions", "saga_es")
    copy.deepcopy(saga)  # cheap: plain data


# -- the verifier ----------------------------------------------------------------------


def forged(saga: Saga, event_class: type[Saga.Event], **data: Any) -> Saga.Event:
    """An event appended to `saga`'s stream by hand, as a buggy writer would, unchecked."""
    return event_class(  # type: ignore[call-arg]
        originator_id=saga.id,
        originator_version=saga.version + 1,
        timestamp=event_class.create_timestamp(),
        **data,
    )


def test_verify_accepts_every_history_the_aggregate_wrote() -> None:
    for history in ([*ALL_DONE, ("complete",)], B_RERUN, A_NO_EFFECT, [*B_FAILED_FOR_GOOD]):
        saga = drive(*history)
        assert verify_events(saga.pending_events) is None


@pytest.mark.parametrize(
    ("history", "event_class", "data", "move", "reason"),
    [
        pytest.param(
            A_DONE,
            Saga.StepCompleted,
            {"step": "b", "attempt": 1, "changes": {}, "removed": [], "result": None},
            "complete_step",
            "'b' was not started",
            id="completed-but-never-started",
        ),
        pytest.param(
            A_DONE,
            Saga.StepStarted,
            {"step": "c", "attempt": 1},
            "start_step",
            "next step is 'b'",
            id="a-step-skipped",
        ),
        pytest.param(
            A_RUNNING,
            Saga.SagaCompleted,
            {},
            "complete_saga",
            "still in flight",
            id="completed-with-a-step-in-flight",
        ),
        pytest.param(
            C_FAILED,
            Saga.CompensationStarted,
            {"step": "a", "attempt": 1},
            "start_compensation",
            "next compensation is 'b'",
            id="compensated-out-of-order",
        ),
        pytest.param(
            A_DONE,
            Saga.StepStarted,
            {"step": "b", "attempt": 1, "to_state": COMPLETED},
            "start_step",
            "records state 'completed'; the machine leads to 'running'",
            id="wrong-to_state",
        ),
    ],
)
def test_verify_reports_the_first_move_the_machine_refuses(
    history: list[Command],
    event_class: type[Saga.Event],
    data: dict[str, Any],
    move: str,
    reason: str,
) -> None:
    saga = drive(*history)
    data = {"to_state": saga.status, **data}
    events = [*saga.pending_events, forged(saga, event_class, **data)]
    problem = verify_events(events)
    assert problem is not None
    assert (problem.saga_id, problem.version, problem.move) == (saga.id, len(events), move)
    assert reason in problem.reason
    assert str(saga.id) in str(problem)


def test_verify_reports_a_stream_that_does_not_start_with_saga_started() -> None:
    saga = drive(*A_DONE)
    problem = verify_events(saga.pending_events[1:])
    assert problem is not None
    assert (problem.saga_id, problem.version, problem.move) == (saga.id, 2, "start_step")


# -- properties ------------------------------------------------------------------------

compensables = st.lists(st.sampled_from(STEPS), unique=True).map(sorted)


def accept(saga: Saga, rules: Rules, command: Command) -> None:
    """Run a command that `rules` call legal; check the event and the saga's bookkeeping."""
    expected = rules.outcome(command)
    assert expected is not None
    rerun = (rules.flight, rules.undo_flight) != (None, None) and command[0].startswith("start")
    pending, version = len(saga.pending_events), saga.version
    do(saga, command)
    assert rules.apply(command) == expected
    assert len(saga.pending_events) == pending + 1
    assert saga.version == version + 1
    assert saga.pending_events[-1].to_state == expected == saga.status
    rules.agrees_with(saga)
    event(f"accepted {command[0]}{' (re-run)' if rerun else ''} -> {expected}")


def play(data: st.DataObject, saga: Saga, rules: Rules, on_accept: Callable[[], None]) -> None:
    """Random commands, three in four legal ones so histories get deep.

    Some histories first complete a few steps, so that compensations get exercised too.
    A legal command is drawn by its name first, so that each kind of move is as likely
    (there are four ways to fail a step and one to complete it).
    """
    for step in STEPS[: data.draw(st.integers(0, len(STEPS) - 1), label="steps done first")]:
        for command in [("start_step", step, 1), ("complete_step", step, 1)]:
            accept(saga, rules, command)
            on_accept()
    for _ in range(data.draw(st.integers(0, 40), label="length")):
        legal = [c for c in COMMANDS if rules.outcome(c) is not None]
        if legal and data.draw(st.integers(0, 3), label="legal?") > 0:
            name = data.draw(st.sampled_from(sorted({c[0] for c in legal})), label="move")
            pool = [c for c in legal if c[0] == name]
        else:
            pool = COMMANDS
        command = data.draw(st.sampled_from(pool), label="command")
        if rules.outcome(command) is None:
            assert_refused(saga, command)
            continue
        accept(saga, rules, command)
        on_accept()


@settings(max_examples=400, deadline=None)
@given(data=st.data(), compensable=compensables)
def test_random_command_sequences_follow_the_rules_and_replay(
    data: st.DataObject, compensable: list[str]
) -> None:
    saga = new_saga(compensable=compensable)
    rules = Rules(list(STEPS), compensable)
    play(data, saga, rules, lambda: None)
    replayed = replay(None, saga.pending_events)
    assert replayed is not None
    assert state_of(replayed) == state_of(saga)
    assert verify_events(saga.pending_events) is None


@settings(max_examples=200, deadline=None)
@given(data=st.data(), compensable=compensables)
def test_the_verifier_reports_an_event_whose_recorded_state_was_changed(
    data: st.DataObject, compensable: list[str]
) -> None:
    saga = new_saga(compensable=compensable)
    play(data, saga, Rules(list(STEPS), compensable), lambda: None)
    events = list(saga.pending_events)
    n = data.draw(st.integers(0, len(events) - 1), label="tampered")
    other = data.draw(st.sampled_from([s for s in STATES if s != events[n].to_state]))
    events[n] = copy.copy(events[n])
    object.__setattr__(events[n], "to_state", other)
    problem = verify_events(events)
    assert problem is not None
    assert (problem.saga_id, problem.version) == (saga.id, n + 1)
    assert problem.move == type(events[n]).trigger


@pytest.fixture(scope="module", params=["popo", "sqlite", "postgres"])
def shared_app(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SagaApplication]:
    """One application per store for the whole module (hypothesis runs many examples)."""
    database = None
    server: PgServer | None = None
    if request.param == "popo":
        env = {"PERSISTENCE_MODULE": "eventsourcing.popo"}
    elif request.param == "sqlite":
        folder: Path = tmp_path_factory.mktemp("roundtrip")
        env = {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(folder / "s.db")}
    else:
        server = request.getfixturevalue("pg_server")
        database = server.acquire_database()
        env = server.env(database)
    app = SagaApplication(env=env)
    try:
        yield app
    finally:
        app.close()
        if server is not None and database is not None:
            server.release_database(database)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_accepted_histories_replay_the_same_through_a_store(
    shared_app: SagaApplication, data: st.DataObject
) -> None:
    app = shared_app
    compensable = data.draw(compensables, label="compensable")
    saga = new_saga(compensable=compensable)
    rules = Rules(list(STEPS), compensable)
    accepted: list[Saga.Event] = list(saga.pending_events)

    def accept() -> None:
        accepted.append(saga.pending_events[-1])
        if data.draw(st.booleans(), label="save now?"):
            app.save(saga)

    play(data, saga, rules, accept)
    app.save(saga)
    assert not saga.pending_events

    stored = app.get(saga.id)
    assert state_of(stored) == state_of(saga)
    assert app.saga_events(saga.id) == accepted
    version = data.draw(st.integers(1, len(accepted)), label="version")
    as_of = app.get(saga.id, version=version)
    expected = replay(None, accepted[:version])
    assert expected is not None
    assert state_of(as_of) == state_of(expected)
