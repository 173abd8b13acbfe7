"""Drives a saga through its definition: callables in, events out, one commit per boundary.

The decisions (what ran, what runs next, how to resume) are plain functions over
the saga and its definition, shared by the sync and the async driver; the drivers
only call the user's code and save. Write-ahead holds on both paths: a
`StepStarted` or `CompensationStarted` is saved before its callable runs, and each
boundary's outcome and next start are appended together, so they cost one commit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

from saga_es.aggregate import Saga
from saga_es.context import State, diff, from_state, to_state
from saga_es.definition import COMPENSATE, FAIL, RECONCILE, RETRY, SagaDefinition, Step
from saga_es.errors import ContextError, SagaError
from saga_es.machine import COMPENSATING, PENDING, RUNNING

Save = Callable[[Saga], Sequence[Saga.Event]]
"""Saves a saga's pending events in one transaction and returns them."""
AsyncSave = Callable[[Saga], Awaitable[Sequence[Saga.Event]]]
Check = Callable[[State, Any], None]
"""Raises `ContextError` if context changes or a result cannot be stored."""

ACTION = "action"
COMPENSATION = "compensation"
RECONCILE_ACTION = "reconcile"
RECONCILE_COMPENSATION = "reconcile_compensation"


class ReconcileError(SagaError):
    """Raised when a reconcile function fails: the outcome stays unknown, nothing is appended."""

    def __init__(self, saga_id: Any, step: str, error: Exception) -> None:
        super().__init__(
            f"saga {saga_id}: reconcile of step {step!r} raised "
            f"{type(error).__name__}: {error}; its outcome is still unknown"
        )
        self.saga_id, self.step, self.error = saga_id, step, error


@dataclass(frozen=True)
class Call:
    """The callable a saga runs next.

    An action or a compensation (its start written ahead), or a reconcile function
    asking whether an interrupted one took effect.
    """

    step: Step
    kind: str
    attempt: int
    key: str

    @property
    def fn(self) -> Callable[[Any, str], Any]:
        """The user's callable for this call."""
        fn = {
            ACTION: self.step.action,
            COMPENSATION: self.step.compensation,
            RECONCILE_ACTION: self.step.reconcile,
            RECONCILE_COMPENSATION: self.step.reconcile_compensation,
        }[self.kind]
        assert fn is not None
        return fn

    @property
    def is_async(self) -> bool:
        """Whether `fn` must be awaited (decided once, at definition time, for the hot path)."""
        if self.kind == ACTION:
            return self.step.action_is_async
        if self.kind == COMPENSATION:
            return self.step.compensation_is_async
        return inspect.iscoroutinefunction(self.fn)


@dataclass(frozen=True)
class Outcome:
    """What a call did: the context state it left, its result, or the error it raised."""

    state: State | None = None
    result: Any = None
    error: Exception | None = None


# -- decisions: pure, on the saga and its definition ----------------------------------


def begin(saga: Saga) -> None:
    """Write ahead the first step's start."""
    saga.start_step(saga.steps[0], 1)


def resume(saga: Saga, definition: SagaDefinition) -> Call | None:
    """Append what resuming an interrupted saga starts with; maybe a reconcile to call first.

    A call whose start is recorded but whose outcome is not may or may not have taken
    effect: its step's recovery policy decides (re-run it as a new attempt, fail it,
    fail and compensate it, or ask its reconcile function).
    """
    if saga.status == PENDING:
        begin(saga)
    elif saga.status == RUNNING:
        for step, attempt in saga.in_flight.items():
            policy = definition.step(step).recovery
            if policy == RECONCILE:
                return Call(definition.step(step), RECONCILE_ACTION, attempt, saga.step_key(step))
            if policy == RETRY:
                saga.start_step(step, attempt + 1)
            else:
                compensate = policy == COMPENSATE
                saga.fail_step(
                    step, attempt, **_unknown(attempt), will_retry=False, compensate=compensate
                )
                _compensate_next(saga)
            return None
        _advance(saga)
    elif saga.status == COMPENSATING:
        for step, attempt in saga.compensating.items():
            policy = definition.step(step).compensation_recovery
            if policy == RECONCILE:
                key = saga.step_key(step)
                return Call(definition.step(step), RECONCILE_COMPENSATION, attempt, key)
            if policy == RETRY:
                saga.start_compensation(step, attempt + 1)
            else:
                assert policy == FAIL
                saga.fail_compensation(step, attempt, **_unknown(attempt), will_retry=False)
                saga.halt(step, **_unknown(attempt))
            return None
        _compensate_next(saga)
    return None


def next_call(saga: Saga, definition: SagaDefinition) -> Call | None:
    """The call whose start is recorded but whose outcome is not, if any."""
    for step, attempt in saga.in_flight.items():
        return Call(definition.step(step), ACTION, attempt, saga.step_key(step))
    for step, attempt in saga.compensating.items():
        return Call(definition.step(step), COMPENSATION, attempt, saga.step_key(step))
    return None


def settle(
    saga: Saga, definition: SagaDefinition, call: Call, outcome: Outcome, check: Check
) -> None:
    """Append the call's outcome and the start of whatever runs next (or the end)."""
    step, attempt = call.step.name, call.attempt
    if call.kind in (RECONCILE_ACTION, RECONCILE_COMPENSATION):
        if outcome.error is not None:
            raise ReconcileError(saga.id, step, outcome.error)
        took_effect = bool(outcome.result)
        if call.kind == RECONCILE_ACTION:
            saga.reconcile_step(step, attempt, took_effect=took_effect)
            if not took_effect:
                saga.start_step(step, attempt + 1)
                return
        else:
            saga.reconcile_compensation(step, attempt, took_effect=took_effect)
            if not took_effect:
                saga.start_compensation(step, attempt + 1)
                return
        outcome = Outcome(state=outcome.state)  # it took effect: record it as the call's own
    changes: State = {}
    removed: list[str] = []
    error = outcome.error
    if error is None:
        assert outcome.state is not None
        changes, removed = diff(saga.context_state, outcome.state)
        try:
            check(changes, outcome.result)
        except ContextError as e:
            error = e
    if call.kind in (ACTION, RECONCILE_ACTION):
        if error is None:
            saga.complete_step(
                step, attempt, changes=changes, removed=removed, result=outcome.result
            )
            _advance(saga)
        else:
            fields = _error_fields(error)
            saga.fail_step(step, attempt, **fields, will_retry=False)
            _compensate_next(saga)
    elif error is None:
        saga.complete_compensation(step, attempt, changes=changes, removed=removed)
        _compensate_next(saga)
    else:
        saga.fail_compensation(step, attempt, **_error_fields(error), will_retry=False)
        saga.halt(step, **_error_fields(error))


def _advance(saga: Saga) -> None:
    if len(saga.completed) < len(saga.steps):
        step = saga.steps[len(saga.completed)]
        saga.start_step(step, saga.attempts.get(step, 0) + 1)
    else:
        saga.complete()


def _compensate_next(saga: Saga) -> None:
    step = saga.next_compensation
    if step is None:
        saga.compensate()
    else:
        saga.start_compensation(step, saga.compensation_attempts.get(step, 0) + 1)


class _ErrorFields(TypedDict):
    error_type: str
    error_message: str


def _error_fields(error: Exception) -> _ErrorFields:
    return {"error_type": type(error).__name__, "error_message": str(error)}


def _unknown(attempt: int) -> _ErrorFields:
    return {
        "error_type": "OutcomeUnknown",
        "error_message": f"attempt {attempt} was interrupted before its outcome was recorded",
    }


# -- calling user code -----------------------------------------------------------------


def invoke(call: Call, saga: Saga) -> Outcome:
    """Run the call on a fresh copy of the recorded context, blocking."""
    context = from_state(saga.context_type, saga.context_state)
    try:
        if call.is_async:
            result = _run_coroutine(call.fn(context, call.key))
        else:
            result = call.fn(context, call.key)
        return Outcome(state=to_state(context), result=result)
    except Exception as e:
        return Outcome(error=e)


async def ainvoke(call: Call, saga: Saga) -> Outcome:
    """Run the call on a fresh copy of the recorded context; sync code goes to a thread."""
    context = from_state(saga.context_type, saga.context_state)
    try:
        if call.is_async:
            result = await call.fn(context, call.key)
        else:
            result = await asyncio.to_thread(call.fn, context, call.key)
        return Outcome(state=to_state(context), result=result)
    except Exception as e:
        return Outcome(error=e)


def _run_coroutine(coro: Coroutine[Any, Any, Any]) -> Any:
    """Await `coro` from sync code, even when this thread already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


# -- the two drivers: the saga's latest events are saved; `first` may be a reconcile ---


def run(
    saga: Saga, definition: SagaDefinition, save: Save, check: Check, first: Call | None = None
) -> Saga:
    """Drive `saga` to the end, blocking."""
    call = first or next_call(saga, definition)
    while call is not None:
        settle(saga, definition, call, invoke(call, saga), check)
        save(saga)
        call = next_call(saga, definition)
    return saga


async def arun(
    saga: Saga,
    definition: SagaDefinition,
    save: AsyncSave,
    check: Check,
    first: Call | None = None,
) -> AsyncIterator[Sequence[Saga.Event]]:
    """Drive `saga` to the end, yielding the events of each commit once it is durable."""
    call = first or next_call(saga, definition)
    while call is not None:
        settle(saga, definition, call, await ainvoke(call, saga), check)
        yield await save(saga)
        call = next_call(saga, definition)
