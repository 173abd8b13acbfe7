"""The runner: actions and compensations, sync or async, written ahead, one commit per boundary."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

import pytest
from conftest import CommitSpy

from saga_es import (
    CompensationFailed,
    CompensationStarted,
    Retry,
    Saga,
    SagaApplication,
    SagaDefinition,
    SagaStuck,
    Step,
    StepFailed,
    StepStarted,
    SystemClock,
)
from saga_es import runner as saga_runner
from saga_es.aggregate import verify_events

MODES = ("run", "arun", "stream")
KINDS = ("sync", "async")

Body = Callable[[Any, str], Any]


class NoRooms(Exception):
    pass


def as_kind(body: Body, kind: str) -> Body:
    """`body` as a plain function, or as an async one that yields to the loop first."""
    if kind == "sync":
        return body

    async def action(context: Any, key: str) -> Any:
        await asyncio.sleep(0)
        return body(context, key)

    return action


def execute(
    app: SagaApplication, definition: SagaDefinition, context: Any, mode: str, key: str | None
) -> Saga:
    """Run a saga through `app.run`, `app.arun` or `app.stream`; the saga as stored after."""
    if mode == "run":
        return app.run(definition, context, key=key)
    if mode == "arun":
        return asyncio.run(app.arun(definition, context, key=key))

    async def consume() -> Any:
        ids = {update.saga_id async for update in app.stream(definition, context, key=key)}
        (saga_id,) = ids
        return saga_id

    return app.get(asyncio.run(consume()))


class Trip:
    """A definition whose callables append to `log`: ("do" | "undo", step, key)."""

    def __init__(
        self,
        steps: str,
        *,
        kind: str = "sync",
        fail: str = "",
        no_undo: str = "",
        bad_undo: str = "",
        check: Callable[[str, str], None] | None = None,
    ) -> None:
        self.log: list[tuple[str, str, str]] = []
        self.contexts: list[Any] = []
        made = []
        for name in steps:
            made.append(
                Step(
                    name,
                    as_kind(self._do(name, name in fail, check), kind),
                    compensation=None
                    if name in no_undo
                    else as_kind(self._undo(name, name in bad_undo, check), kind),
                )
            )
        self.definition = SagaDefinition("trip", made)

    def _do(self, name: str, fail: bool, check: Callable[[str, str], None] | None) -> Body:
        def action(context: Any, key: str) -> Any:
            if check:
                check("do", name)
            self.log.append(("do", name, key))
            self.contexts.append(dict(context))
            context[name] = "done"
            if fail:
                raise NoRooms(f"{name}: no rooms left")
            return f"{name}-ref"

        return action

    def _undo(self, name: str, fail: bool, check: Callable[[str, str], None] | None) -> Body:
        def compensation(context: Any, key: str) -> None:
            if check:
                check("undo", name)
            self.log.append(("undo", name, key))
            context[name] = "undone"
            if fail:
                raise RuntimeError(f"cannot cancel {name}")

        return compensation

    def steps(self, what: str | None = None) -> list[str]:
        return [step for kind, step, _ in self.log if what in (None, kind)]


def event_names(app: SagaApplication, saga: Saga) -> list[str]:
    return [type(e).__name__ for e in app.saga_events(saga.id)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_a_saga_whose_steps_succeed_runs_each_once_in_order_and_completes(
    app: SagaApplication, mode: str, kind: str
) -> None:
    trip = Trip("abc", kind=kind)
    saga = execute(app, trip.definition, {"customer": "ada"}, mode, None)
    assert saga.status == "completed"
    assert trip.log == [("do", s, f"{saga.id}:{s}") for s in "abc"]
    assert trip.contexts == [
        {"customer": "ada"},
        {"customer": "ada", "a": "done"},
        {"customer": "ada", "a": "done", "b": "done"},
    ]
    assert event_names(app, saga) == [
        "SagaStarted",
        *["StepStarted", "StepCompleted"] * 3,
        "SagaCompleted",
    ]
    stored = app.get(saga.id)
    assert stored.status == "completed"
    assert stored.results == {"a": "a-ref", "b": "b-ref", "c": "c-ref"}
    assert stored.context == {"customer": "ada", "a": "done", "b": "done", "c": "done"}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_a_failing_step_is_recorded_and_completed_steps_are_compensated_in_reverse(
    app: SagaApplication, mode: str, kind: str
) -> None:
    trip = Trip("abcd", kind=kind, fail="c")
    saga = execute(app, trip.definition, {}, mode, None)
    assert saga.status == "compensated"
    assert [(what, step) for what, step, _ in trip.log] == [
        ("do", "a"),
        ("do", "b"),
        ("do", "c"),
        ("undo", "b"),
        ("undo", "a"),
    ]
    history = app.saga_events(saga.id)
    assert [type(e).__name__ for e in history] == [
        "SagaStarted",
        *["StepStarted", "StepCompleted"] * 2,
        "StepStarted",
        "StepFailed",
        *["CompensationStarted", "CompensationRan"] * 2,
        "SagaCompensated",
    ]
    (failed,) = [e for e in history if isinstance(e, StepFailed)]
    assert (failed.step, failed.attempt) == ("c", 1)
    assert (failed.error_type, failed.error_message) == ("NoRooms", "c: no rooms left")
    assert failed.will_retry is False
    stored = app.get(saga.id)
    assert stored.compensated == ["b", "a"]
    assert stored.error == {"step": "c", "type": "NoRooms", "message": "c: no rooms left"}
    assert stored.context == {"a": "undone", "b": "undone"}  # c's own change is not kept
    assert "d" not in trip.steps()


@pytest.mark.parametrize(
    ("message", "stored"),
    [("no\x00rooms", "no\\x00rooms"), ("no \ud800 rooms", "no \\ud800 rooms")],
    ids=["nul", "surrogate"],
)
def test_an_error_message_no_store_can_hold_is_recorded_escaped(
    app: SagaApplication, reader: SagaApplication, message: str, stored: str
) -> None:
    def fail(context: Any, key: str) -> None:
        raise NoRooms(message)

    def undo_fail(context: Any, key: str) -> None:
        raise NoRooms(message)

    definition = SagaDefinition(
        "escaped", [Step("a", lambda c, k: None, lambda c, k: None), Step("b", fail)]
    )
    saga = app.run(definition, {})
    assert saga.status == "compensated"
    assert reader.get(saga.id).error == {"step": "b", "type": "NoRooms", "message": stored}
    stuck = SagaDefinition(
        "escaped-stuck", [Step("a", lambda c, k: None, undo_fail), Step("b", fail)]
    )
    saga = app.run(stuck, {})
    assert saga.status == "stuck"
    assert reader.get(saga.id).error == {"step": "a", "type": "NoRooms", "message": stored}
    assert reader.verify() == []


@pytest.mark.parametrize("mode", MODES)
def test_steps_without_compensation_are_passed_over(app: SagaApplication, mode: str) -> None:
    trip = Trip("abcd", fail="d", no_undo="b")
    saga = execute(app, trip.definition, {}, mode, None)
    assert saga.status == "compensated"
    assert trip.steps("undo") == ["c", "a"]
    started = [e.step for e in app.saga_events(saga.id) if isinstance(e, CompensationStarted)]
    assert started == ["c", "a"]
    assert app.get(saga.id).compensated == ["c", "a"]


def test_when_no_completed_step_has_a_compensation_the_saga_is_compensated_at_once(
    app: SagaApplication,
) -> None:
    trip = Trip("ab", fail="b", no_undo="a")
    saga = app.run(trip.definition, {})
    assert saga.status == "compensated"
    assert trip.steps("undo") == []
    assert event_names(app, saga)[-2:] == ["StepFailed", "SagaCompensated"]


@pytest.mark.parametrize("mode", MODES)
def test_a_failing_first_step_compensates_nothing(app: SagaApplication, mode: str) -> None:
    trip = Trip("abc", fail="a")
    saga = execute(app, trip.definition, {}, mode, None)
    assert saga.status == "compensated"
    assert [(w, s) for w, s, _ in trip.log] == [("do", "a")]
    assert event_names(app, saga) == ["SagaStarted", "StepStarted", "StepFailed", "SagaCompensated"]


@pytest.mark.parametrize(
    ("message", "stored"), [("bad\x00byte", "bad\\x00byte"), ("bad \udc80", "bad \\udc80")]
)
@pytest.mark.parametrize("mode", MODES)
def test_an_error_message_some_store_cannot_keep_is_stored_escaped_on_every_store(
    app: SagaApplication, mode: str, message: str, stored: str
) -> None:
    """A NUL (PostgreSQL) or a lone surrogate (not UTF-8) must not leave the saga running."""

    def fail(context: Any, key: str) -> None:
        raise ValueError(message)

    def undo(context: Any, key: str) -> None:
        raise RuntimeError(message)

    definition = SagaDefinition("odd", [Step("a", lambda c, k: None, undo), Step("b", fail)])
    saga = execute(app, definition, {}, mode, None)
    assert app.get(saga.id).status == "stuck"
    history = app.saga_events(saga.id)
    assert [e.error_message for e in history if isinstance(e, StepFailed)] == [stored]
    assert [e.error_message for e in history if isinstance(e, CompensationFailed)] == [stored]
    assert app.get(saga.id).error == {"step": "a", "type": "RuntimeError", "message": stored}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_a_compensation_that_raises_leaves_the_saga_stuck(
    app: SagaApplication, mode: str, kind: str
) -> None:
    trip = Trip("abc", kind=kind, fail="c", bad_undo="b")
    saga = execute(app, trip.definition, {}, mode, None)
    assert saga.status == "stuck"
    assert not saga.is_terminal
    assert [(w, s) for w, s, _ in trip.log] == [
        ("do", "a"),
        ("do", "b"),
        ("do", "c"),
        ("undo", "b"),
    ]
    history = app.saga_events(saga.id)
    assert [type(e).__name__ for e in history][-3:] == [
        "CompensationStarted",
        "CompensationFailed",
        "SagaStuck",
    ]
    failed = history[-2]
    assert isinstance(failed, CompensationFailed)
    assert (failed.step, failed.error_type) == ("b", "RuntimeError")
    stuck = history[-1]
    assert isinstance(stuck, SagaStuck)
    assert (stuck.step, stuck.error_type, stuck.error_message) == (
        "b",
        "RuntimeError",
        "cannot cancel b",
    )
    stored = app.get(saga.id)
    assert stored.status == "stuck"
    assert stored.compensated == []
    assert stored.error == {"step": "b", "type": "RuntimeError", "message": "cannot cancel b"}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_each_call_gets_a_key_per_step_and_saga(app: SagaApplication, mode: str, kind: str) -> None:
    first, second = Trip("abc", kind=kind), Trip("abc", kind=kind)
    one = execute(app, first.definition, {}, mode, "order-1")
    two = execute(app, second.definition, {}, mode, "order-2")
    keys_one = [key for _, _, key in first.log]
    keys_two = [key for _, _, key in second.log]
    assert len(set(keys_one)) == 3
    assert not set(keys_one) & set(keys_two)
    # The key is derived from what is stored, so a later reader (recovery) gets the same one.
    assert keys_one == [app.get(one.id).step_key(s) for s in "abc"]
    assert keys_two == [app.get(two.id).step_key(s) for s in "abc"]


def test_the_key_is_the_same_on_every_attempt_of_a_step(app: SagaApplication) -> None:
    trip = Trip("ab")
    saga = Saga.start(
        id=SagaApplication.saga_id("trip", "k"),
        name="trip",
        definition_version=1,
        steps=["a", "b"],
        compensable=trip.definition.compensable,
        key="k",
        context_type="builtins:dict",
        context={},
    )
    saga_runner.begin(saga)
    first = saga_runner.next_call(saga, trip.definition)
    assert first is not None
    saga.fail_step("a", 1, error_type="E", error_message="m", will_retry=True)
    saga.start_step("a", 2)
    app.save(saga)
    retry = saga_runner.next_call(app.get(saga.id), trip.definition)
    assert retry is not None
    assert (first.attempt, retry.attempt) == (1, 2)
    assert first.key == retry.key
    saga.complete_step("a", 2, changes={}, removed=[])
    saga.start_step("b", 1)
    other = saga_runner.next_call(saga, trip.definition)
    assert other is not None
    assert other.key != first.key


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_each_start_is_durable_before_its_callable_runs(
    app: SagaApplication, reader: SagaApplication, mode: str, kind: str
) -> None:
    saga_id = SagaApplication.saga_id("trip", "write-ahead")
    seen: list[tuple[str, str, str, int, int]] = []

    def check(what: str, step: str) -> None:
        # Read what is stored, through another application where the store allows it.
        last = reader.saga_events(saga_id)[-1]
        seen.append((what, step, type(last).__name__, last.step, last.attempt))

    trip = Trip("abc", kind=kind, fail="c", check=check)
    saga = execute(app, trip.definition, {}, mode, "write-ahead")
    assert saga.id == saga_id
    assert seen == [
        ("do", "a", "StepStarted", "a", 1),
        ("do", "b", "StepStarted", "b", 1),
        ("do", "c", "StepStarted", "c", 1),
        ("undo", "b", "CompensationStarted", "b", 1),
        ("undo", "a", "CompensationStarted", "a", 1),
    ]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [1, 2, 5])
def test_a_k_step_saga_that_succeeds_costs_k_plus_one_commits(
    app: SagaApplication, commits: CommitSpy, k: int, mode: str
) -> None:
    trip = Trip("abcde"[:k])
    saga = execute(app, trip.definition, {}, mode, None)
    assert saga.status == "completed"
    assert commits.count == k + 1
    assert commits.calls == [
        ["SagaStarted", "StepStarted"],
        *[["StepCompleted", "StepStarted"]] * (k - 1),
        ["StepCompleted", "SagaCompleted"],
    ]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("j", [1, 2, 4])
def test_a_saga_failing_at_step_j_costs_two_j_commits(
    app: SagaApplication, commits: CommitSpy, j: int, mode: str
) -> None:
    # Forward: the start, then one commit per boundary up to the failure (j commits).
    # Backward: the failure with the first compensation's start, then one commit per
    # compensation boundary (j commits): each boundary, forward and backward, is one commit.
    steps = "abcde"[:j]
    trip = Trip(steps + "z", fail=steps[-1])
    saga = execute(app, trip.definition, {}, mode, None)
    assert saga.status == "compensated"
    assert commits.count == 2 * j
    backward = [["StepFailed", "CompensationStarted"]] if j > 1 else []
    backward += [["CompensationRan", "CompensationStarted"]] * (j - 2)
    backward += [["CompensationRan", "SagaCompensated"]] if j > 1 else []
    assert commits.calls == [
        ["SagaStarted", "StepStarted"],
        *[["StepCompleted", "StepStarted"]] * (j - 1),
        *(backward or [["StepFailed", "SagaCompensated"]]),
    ]


def test_a_stuck_saga_costs_one_commit_per_boundary_too(
    app: SagaApplication, commits: CommitSpy
) -> None:
    saga = app.run(Trip("abc", fail="c", bad_undo="b").definition, {})
    assert saga.status == "stuck"
    assert commits.calls == [
        ["SagaStarted", "StepStarted"],
        ["StepCompleted", "StepStarted"],
        ["StepCompleted", "StepStarted"],
        ["StepFailed", "CompensationStarted"],
        ["CompensationFailed", "SagaStuck"],
    ]


def test_run_awaits_async_steps_even_inside_a_running_event_loop(app: SagaApplication) -> None:
    trip = Trip("ab", kind="async")

    async def main() -> Saga:
        return app.run(trip.definition, {})  # blocking call from a coroutine

    saga = asyncio.run(main())
    assert saga.status == "completed"
    assert trip.steps() == ["a", "b"]


def test_arun_awaits_async_steps_on_the_loop_and_runs_sync_steps_in_threads(
    app: SagaApplication,
) -> None:
    threads: dict[str, int] = {}

    def sync_step(context: Any, key: str) -> None:
        threads["sync"] = threading.get_ident()

    async def async_step(context: Any, key: str) -> None:
        threads["async"] = threading.get_ident()

    async def main() -> tuple[Saga, int]:
        definition = SagaDefinition("mixed", [Step("s", sync_step), Step("a", async_step)])
        return await app.arun(definition, {}), threading.get_ident()

    saga, loop_thread = asyncio.run(main())
    assert saga.status == "completed"
    assert threads["async"] == loop_thread
    assert threads["sync"] != loop_thread


def test_only_started_steps_are_in_the_history(app: SagaApplication) -> None:
    trip = Trip("abc", fail="b")
    saga = app.run(trip.definition, {})
    started = [e.step for e in app.saga_events(saga.id) if isinstance(e, StepStarted)]
    assert started == ["a", "b"]


# -- resuming: what recovery appends first, decided from the saga and its definition ------


def noop(context: Any, key: str) -> None:
    pass


def resumable(
    recovery: str | None = None,
    compensation_recovery: str | None = None,
    reconcile: Body | None = None,
    reconcile_compensation: Body | None = None,
) -> SagaDefinition:
    """Three steps; "b" carries the policies under test; "a" and "b" have compensations."""
    b = Step(
        "b",
        noop,
        noop,
        recovery=recovery,
        reconcile=reconcile,
        compensation_recovery=compensation_recovery,
        reconcile_compensation=reconcile_compensation,
    )
    return SagaDefinition("resume", [Step("a", noop, noop), b, Step("c", noop)])


def saved(
    definition: SagaDefinition, *moves: Callable[[Saga], None], into: list[Any] | None = None
) -> Saga:
    """A saga of `definition` after `moves`, as if just read back (nothing pending).

    Its events so far are appended to `into`, if given.
    """
    saga = Saga.start(
        id=SagaApplication.saga_id(definition.name, "resume"),
        name=definition.name,
        definition_version=definition.version,
        steps=definition.step_names,
        compensable=definition.compensable,
        key="resume",
        context_type="builtins:dict",
        context={"n": 0},
    )
    for move in moves:
        move(saga)
    events = saga.collect_events()
    if into is not None:
        into.extend(events)
    return saga


def started(step: str, attempt: int = 1) -> Callable[[Saga], None]:
    return lambda saga: saga.start_step(step, attempt)


def completed(step: str, attempt: int = 1) -> Callable[[Saga], None]:
    return lambda saga: saga.complete_step(step, attempt, changes={step: 1}, removed=[])


def failed(step: str, attempt: int = 1, retry: bool = False) -> Callable[[Saga], None]:
    return lambda saga: saga.fail_step(
        step, attempt, error_type="E", error_message="m", will_retry=retry
    )


def undoing(step: str, attempt: int = 1) -> Callable[[Saga], None]:
    return lambda saga: saga.start_compensation(step, attempt)


def undone(step: str, attempt: int = 1) -> Callable[[Saga], None]:
    return lambda saga: saga.complete_compensation(step, attempt, changes={}, removed=[])


A_DONE_B_IN_FLIGHT = (started("a"), completed("a"), started("b"))
B_UNDO_IN_FLIGHT = (*A_DONE_B_IN_FLIGHT, completed("b"), started("c"), failed("c"), undoing("b"))


def appended(saga: Saga) -> list[tuple[Any, ...]]:
    """The pending events, as (name, step, attempt) and the fields that matter."""
    rows: list[tuple[Any, ...]] = []
    for e in saga.pending_events:
        data = vars(e)
        row: tuple[Any, ...] = (type(e).__name__, data.get("step"), data.get("attempt"))
        if "compensate" in data:
            row += (data["error_type"], data["will_retry"], data["compensate"])
        elif "error_type" in data and "will_retry" in data:
            row += (data["error_type"], data["will_retry"])
        rows.append(row)
    return rows


def test_resuming_a_pending_saga_starts_its_first_step() -> None:
    definition = resumable()
    saga = saved(definition)
    assert saga.status == "pending"
    assert saga_runner.resume(saga, definition) == []
    assert appended(saga) == [("StepStarted", "a", 1)]


def test_resuming_a_step_in_flight_with_retry_starts_its_next_attempt_with_the_same_key() -> None:
    definition = resumable(recovery="retry")
    saga = saved(definition, *A_DONE_B_IN_FLIGHT)
    first = saga_runner.next_call(saga, definition)
    assert saga_runner.resume(saga, definition) == []
    assert appended(saga) == [("StepStarted", "b", 2)]
    call = saga_runner.next_call(saga, definition)
    assert call is not None
    assert first is not None
    assert (call.step.name, call.kind, call.attempt, call.key) == ("b", "action", 2, first.key)


def test_retry_is_the_default_recovery() -> None:
    definition = resumable()
    assert definition.step("b").recovery == "retry"
    saga = saved(definition, *A_DONE_B_IN_FLIGHT)
    saga_runner.resume(saga, definition)
    assert appended(saga) == [("StepStarted", "b", 2)]


def test_resuming_with_fail_records_an_unknown_outcome_and_compensates_what_came_before() -> None:
    definition = resumable(recovery="fail")
    saga = saved(definition, *A_DONE_B_IN_FLIGHT)
    assert saga_runner.resume(saga, definition) == []
    assert appended(saga) == [
        ("StepFailed", "b", 1, "OutcomeUnknown", False, False),
        ("CompensationStarted", "a", 1),
    ]
    assert saga.status == "compensating"


def test_resuming_with_fail_on_the_first_step_ends_the_saga_compensated() -> None:
    step = Step("a", noop, noop, recovery="fail")
    definition = SagaDefinition("resume", [step])
    saga = saved(definition, started("a"))
    saga_runner.resume(saga, definition)
    assert appended(saga) == [
        ("StepFailed", "a", 1, "OutcomeUnknown", False, False),
        ("SagaCompensated", None, None),
    ]


def test_resuming_with_compensate_undoes_the_steps_own_effect_first() -> None:
    definition = resumable(recovery="compensate")
    saga = saved(definition, *A_DONE_B_IN_FLIGHT)
    assert saga_runner.resume(saga, definition) == []
    assert appended(saga) == [
        ("StepFailed", "b", 1, "OutcomeUnknown", False, True),
        ("CompensationStarted", "b", 1),
    ]
    assert saga.to_compensate == ["b", "a"]


def test_resuming_with_reconcile_appends_nothing_and_returns_the_reconcile_call() -> None:
    definition = resumable(reconcile=lambda context, key: True)
    assert definition.step("b").recovery == "reconcile"
    saga = saved(definition, *A_DONE_B_IN_FLIGHT)
    [call] = saga_runner.resume(saga, definition)
    assert saga.pending_events == []
    assert call is not None
    assert (call.step.name, call.kind, call.attempt, call.key) == (
        "b",
        "reconcile",
        1,
        saga.step_key("b"),
    )


@pytest.mark.parametrize(
    ("moves", "expected"),
    [
        pytest.param(
            (*A_DONE_B_IN_FLIGHT, failed("b", 1, retry=True)),
            [("StepStarted", "b", 2)],
            id="a-retry-was-due",
        ),
        pytest.param(
            (*A_DONE_B_IN_FLIGHT, lambda saga: saga.reconcile_step("b", 1, took_effect=False)),
            [("StepStarted", "b", 2)],
            id="reconciled-without-effect",
        ),
        pytest.param(
            (*A_DONE_B_IN_FLIGHT, completed("b")),
            [("StepStarted", "c", 1)],
            id="between-steps",
        ),
        pytest.param(
            (*A_DONE_B_IN_FLIGHT, completed("b"), started("c"), completed("c")),
            [("SagaCompleted", None, None)],
            id="every-step-done",
        ),
    ],
)
def test_resuming_with_nothing_in_flight_goes_on_forward(
    moves: tuple[Callable[[Saga], None], ...], expected: list[tuple[Any, ...]]
) -> None:
    definition = resumable(recovery="fail")  # no policy applies: nothing is in doubt
    saga = saved(definition, *moves)
    assert saga_runner.resume(saga, definition) == []
    assert appended(saga) == expected


def test_resuming_a_compensation_in_flight_with_retry_starts_its_next_attempt() -> None:
    definition = resumable()
    assert definition.step("b").compensation_recovery == "retry"
    saga = saved(definition, *B_UNDO_IN_FLIGHT)
    assert saga_runner.resume(saga, definition) == []
    assert appended(saga) == [("CompensationStarted", "b", 2)]
    call = saga_runner.next_call(saga, definition)
    assert call is not None
    assert (call.kind, call.attempt, call.key) == ("compensation", 2, saga.step_key("b"))


def test_resuming_a_compensation_in_flight_with_fail_leaves_the_saga_stuck() -> None:
    definition = resumable(compensation_recovery="fail")
    saga = saved(definition, *B_UNDO_IN_FLIGHT)
    assert saga_runner.resume(saga, definition) == []
    assert appended(saga) == [
        ("CompensationFailed", "b", 1, "OutcomeUnknown", False),
        ("SagaStuck", "b", None),
    ]
    assert saga.status == "stuck"
    assert saga.compensated == []


def test_resuming_a_compensation_in_flight_with_reconcile_returns_the_call() -> None:
    definition = resumable(reconcile_compensation=lambda context, key: False)
    assert definition.step("b").compensation_recovery == "reconcile"
    saga = saved(definition, *B_UNDO_IN_FLIGHT)
    [call] = saga_runner.resume(saga, definition)
    assert saga.pending_events == []
    assert call is not None
    assert (call.step.name, call.kind, call.attempt) == ("b", "reconcile_compensation", 1)


@pytest.mark.parametrize(
    ("moves", "expected"),
    [
        pytest.param(
            (*A_DONE_B_IN_FLIGHT, failed("b")),
            [("CompensationStarted", "a", 1)],
            id="failure-recorded-first-compensation-not-started",
        ),
        pytest.param(
            (*B_UNDO_IN_FLIGHT, undone("b")),
            [("CompensationStarted", "a", 1)],
            id="between-compensations",
        ),
        pytest.param(
            (*B_UNDO_IN_FLIGHT, undone("b"), undoing("a"), undone("a")),
            [("SagaCompensated", None, None)],
            id="everything-compensated",
        ),
        pytest.param(
            (
                *B_UNDO_IN_FLIGHT,
                lambda saga: saga.fail_compensation(
                    "b", 1, error_type="E", error_message="m", will_retry=True
                ),
            ),
            [("CompensationStarted", "b", 2)],
            id="a-compensation-retry-was-due",
        ),
    ],
)
def test_resuming_with_no_compensation_in_flight_goes_on_backward(
    moves: tuple[Callable[[Saga], None], ...], expected: list[tuple[Any, ...]]
) -> None:
    definition = resumable(compensation_recovery="fail")  # nothing is in doubt
    saga = saved(definition, *moves)
    assert saga_runner.resume(saga, definition) == []
    assert appended(saga) == expected


@pytest.mark.parametrize("end", ["completed", "compensated", "stuck"])
def test_resuming_a_saga_that_has_ended_appends_nothing(end: str) -> None:
    definition = resumable()
    tails: dict[str, tuple[Callable[[Saga], None], ...]] = {
        "completed": (
            *A_DONE_B_IN_FLIGHT,
            completed("b"),
            started("c"),
            completed("c"),
            lambda saga: saga.complete(),
        ),
        "compensated": (
            *B_UNDO_IN_FLIGHT,
            undone("b"),
            undoing("a"),
            undone("a"),
            lambda saga: saga.compensate(),
        ),
        "stuck": (
            *B_UNDO_IN_FLIGHT,
            lambda saga: saga.fail_compensation(
                "b", 1, error_type="E", error_message="m", will_retry=False
            ),
            lambda saga: saga.halt("b", error_type="E", error_message="m"),
        ),
    }
    saga = saved(definition, *tails[end])
    assert saga.status == end
    assert saga_runner.resume(saga, definition) == []
    assert saga.pending_events == []


def test_resuming_a_saga_whose_step_is_not_in_the_definition_raises_and_appends_nothing() -> None:
    definition = resumable()
    saga = saved(definition, *A_DONE_B_IN_FLIGHT)
    other = SagaDefinition("resume", [Step("a", noop), Step("x", noop)])
    with pytest.raises(Exception, match="no step 'b'"):
        saga_runner.resume(saga, other)
    assert saga.pending_events == []


# -- settling a reconcile: what the answer appends -------------------------------------


def reconcile_outcome(saga: Saga, result: Any = None, error: Exception | None = None) -> Any:
    state = {**saga.context_state, "checked": True}
    return saga_runner.Outcome(state=None if error else state, result=result, error=error)


def no_check(state: Any, result: Any) -> None:
    pass


def test_a_reconcile_that_says_it_took_effect_completes_the_attempt_with_its_changes() -> None:
    definition = resumable(reconcile=lambda context, key: True)
    saga = saved(definition, *A_DONE_B_IN_FLIGHT)
    [call] = saga_runner.resume(saga, definition)
    assert call is not None
    saga_runner.settle(saga, definition, call, reconcile_outcome(saga, True), no_check)
    assert appended(saga) == [
        ("StepReconciled", "b", 1),
        ("StepCompleted", "b", 1),
        ("StepStarted", "c", 1),
    ]
    reconciled, completed_b, _ = saga.pending_events
    assert reconciled.took_effect is True  # type: ignore[attr-defined]
    assert completed_b.changes == {"checked": True}  # type: ignore[attr-defined]
    assert saga.context_state == {"n": 0, "a": 1, "checked": True}


def test_a_reconcile_that_says_no_effect_starts_the_next_attempt_and_keeps_no_changes() -> None:
    definition = resumable(reconcile=lambda context, key: False)
    saga = saved(definition, *A_DONE_B_IN_FLIGHT)
    [call] = saga_runner.resume(saga, definition)
    assert call is not None
    saga_runner.settle(saga, definition, call, reconcile_outcome(saga, False), no_check)
    assert appended(saga) == [("StepReconciled", "b", 1), ("StepStarted", "b", 2)]
    assert saga.pending_events[0].took_effect is False  # type: ignore[attr-defined]
    assert saga.context_state == {"n": 0, "a": 1}


def test_a_compensation_reconcile_either_way() -> None:
    for took_effect, tail in [
        (True, [("CompensationRan", "b", 1), ("CompensationStarted", "a", 1)]),
        (False, [("CompensationStarted", "b", 2)]),
    ]:
        definition = resumable(reconcile_compensation=noop)
        saga = saved(definition, *B_UNDO_IN_FLIGHT)
        [call] = saga_runner.resume(saga, definition)
        assert call is not None
        outcome = reconcile_outcome(saga, took_effect)
        saga_runner.settle(saga, definition, call, outcome, no_check)
        assert appended(saga) == [("CompensationReconciled", "b", 1), *tail]


def test_a_reconcile_that_raises_appends_nothing() -> None:
    definition = resumable(reconcile=lambda context, key: True)
    saga = saved(definition, *A_DONE_B_IN_FLIGHT)
    [call] = saga_runner.resume(saga, definition)
    assert call is not None
    boom = ConnectionError("supplier unreachable")
    with pytest.raises(saga_runner.ReconcileError) as caught:
        saga_runner.settle(saga, definition, call, reconcile_outcome(saga, error=boom), no_check)
    assert (caught.value.saga_id, caught.value.step, caught.value.error) == (saga.id, "b", boom)
    assert saga.pending_events == []
    assert saga.in_flight == {"b": 1}


def test_every_history_resume_writes_passes_the_verifier() -> None:
    definitions = [
        resumable(),
        resumable(recovery="fail"),
        resumable(recovery="compensate"),
        resumable(compensation_recovery="fail"),
    ]
    for definition in definitions:
        for moves in (A_DONE_B_IN_FLIGHT, B_UNDO_IN_FLIGHT):
            history: list[Any] = []
            saga = saved(definition, *moves, into=history)
            saga_runner.resume(saga, definition)
            assert saga.pending_events
            assert verify_events([*history, *saga.pending_events]) is None


@pytest.mark.parametrize("mode", ["run", "arun"])
def test_a_second_cancel_landing_while_the_runner_obeys_the_first_is_obeyed_too(
    app: SagaApplication, mode: str
) -> None:
    """Two people cancel one saga: the runner loses its append twice and still finishes it."""
    saga_id = SagaApplication.saga_id("twice", "k")
    undone: list[str] = []
    ran: list[str] = []

    def reserve(context: Any, key: str) -> None:
        app.cancel(saga_id, by="ada", reason="first")
        context["reserved"] = True

    definition = SagaDefinition(
        "twice",
        [
            Step("reserve", reserve, lambda c, k: undone.append("reserve")),
            Step("ship", lambda c, k: ran.append("ship")),
        ],
    )
    get = app.get
    reloads: list[int] = []

    def reload(saga_id: Any, version: int | None = None) -> Saga:
        saga = get(saga_id, version)
        if saga.cancel_requested is not None and not reloads:  # the runner, after its lost append
            reloads.append(saga.version)
            app.cancel(saga_id, by="bob", reason="second")  # lands before its next append
        return saga

    app.get = reload  # type: ignore[method-assign]
    if mode == "run":
        saga = app.run(definition, {}, key="k")
    else:
        saga = asyncio.run(app.arun(definition, {}, key="k"))
    assert reloads
    assert saga.status == "cancelled"
    assert get(saga_id).status == "cancelled"
    assert undone == ["reserve"]
    assert ran == []
    assert [r.event for r in app.history(saga_id)].count("CancelRequested") == 2
    assert app.verify() == []


@pytest.mark.parametrize("mode", ["run", "arun"])
def test_a_cancel_during_a_retry_wait_is_finished_by_the_cancel_and_logged_as_one(
    app: SagaApplication, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With nothing in flight the cancel compensates; the runner's lost start is no take-over."""
    saga_id = SagaApplication.saga_id("waits", "k")
    undone: list[str] = []
    attempts: list[str] = []

    def flaky(context: Any, key: str) -> None:
        attempts.append(key)
        raise RuntimeError("try again later")

    definition = SagaDefinition(
        "waits",
        [
            Step("reserve", lambda c, k: None, lambda c, k: undone.append("reserve")),
            Step("pay", flaky, retry=Retry(attempts=3, delay=1.0, jitter=0)),
        ],
    )

    class CancelDuringTheWait(SystemClock):
        def sleep(self, seconds: float) -> None:
            app.cancel(saga_id, by="ada", reason="changed my mind")

        async def asleep(self, seconds: float) -> None:
            await asyncio.to_thread(self.sleep, seconds)

    app.clock = CancelDuringTheWait()
    with caplog.at_level(logging.INFO, logger="saga_es"):
        if mode == "run":
            saga = app.run(definition, {}, key="k")
        else:
            saga = asyncio.run(app.arun(definition, {}, key="k"))
    assert saga.status == app.get(saga_id).status == "cancelled"
    assert len(attempts) == 1  # no attempt started after the cancel
    assert undone == ["reserve"]
    assert app.verify() == []
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"saga {saga_id} was cancelled by ada" in m for m in messages), messages
    assert not any("taken over" in m for m in messages), messages
