"""Drives a saga through its definition: callables in, events out, one commit per boundary.

The decisions (what ran, what runs next) are plain functions over the saga and
its definition, shared by the sync and the async driver; the drivers only call
the user's code and save. Write-ahead holds on both paths: a `StepStarted` or
`CompensationStarted` is saved before its callable runs, and each boundary's
outcome and next start are appended together, so they cost one commit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from saga_es.aggregate import Saga
from saga_es.context import State, diff, from_state, to_state
from saga_es.definition import Action, SagaDefinition, Step
from saga_es.errors import ContextError

Save = Callable[[Saga], Sequence[Saga.Event]]
"""Saves a saga's pending events in one transaction and returns them."""
AsyncSave = Callable[[Saga], Awaitable[Sequence[Saga.Event]]]
Check = Callable[[State, Any], None]
"""Raises `ContextError` if context changes or a result cannot be stored."""


@dataclass(frozen=True)
class Call:
    """The callable a saga runs next; its start is already written ahead."""

    step: Step
    compensating: bool
    attempt: int
    key: str

    @property
    def fn(self) -> Action:
        """The step's action, or its compensation."""
        if self.compensating:
            assert self.step.compensation is not None
            return self.step.compensation
        return self.step.action

    @property
    def is_async(self) -> bool:
        """Whether `fn` must be awaited."""
        return self.step.compensation_is_async if self.compensating else self.step.action_is_async


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


def next_call(saga: Saga, definition: SagaDefinition) -> Call | None:
    """The call whose start is recorded but whose outcome is not, if any."""
    for step, attempt in saga.in_flight.items():
        return Call(definition.step(step), False, attempt, saga.step_key(step))
    for step, attempt in saga.compensating.items():
        return Call(definition.step(step), True, attempt, saga.step_key(step))
    return None


def settle(
    saga: Saga, definition: SagaDefinition, call: Call, outcome: Outcome, check: Check
) -> None:
    """Append the call's outcome and the start of whatever runs next (or the end)."""
    step, attempt = call.step.name, call.attempt
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
    if not call.compensating:
        if error is None:
            saga.complete_step(
                step, attempt, changes=changes, removed=removed, result=outcome.result
            )
            _advance(saga)
        else:
            saga.fail_step(step, attempt, **_error_fields(error), will_retry=False)
            _compensate_next(saga, definition)
    elif error is None:
        saga.complete_compensation(step, attempt, changes=changes, removed=removed)
        _compensate_next(saga, definition)
    else:
        saga.fail_compensation(step, attempt, **_error_fields(error), will_retry=False)
        saga.halt(step, **_error_fields(error))


def _advance(saga: Saga) -> None:
    if len(saga.completed) < len(saga.steps):
        step = saga.steps[len(saga.completed)]
        saga.start_step(step, saga.attempts.get(step, 0) + 1)
    else:
        saga.complete()


def _compensate_next(saga: Saga, definition: SagaDefinition) -> None:
    for step in saga.to_compensate[saga.compensation_cursor :]:
        if definition.step(step).compensation is not None:
            saga.start_compensation(step, saga.compensation_attempts.get(step, 0) + 1)
            return
    saga.compensate()


def _error_fields(error: Exception) -> dict[str, str]:
    return {"error_type": type(error).__name__, "error_message": str(error)}


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


# -- the two drivers -------------------------------------------------------------------


def run(saga: Saga, definition: SagaDefinition, save: Save, check: Check) -> Saga:
    """Drive `saga` (with its start pending) to the end, blocking."""
    save(saga)
    while (call := next_call(saga, definition)) is not None:
        settle(saga, definition, call, invoke(call, saga), check)
        save(saga)
    return saga


async def arun(
    saga: Saga, definition: SagaDefinition, save: AsyncSave, check: Check
) -> AsyncIterator[Sequence[Saga.Event]]:
    """Drive `saga` to the end, yielding the events of each commit once it is durable."""
    yield await save(saga)
    while (call := next_call(saga, definition)) is not None:
        settle(saga, definition, call, await ainvoke(call, saga), check)
        yield await save(saga)
