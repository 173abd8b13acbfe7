"""Drives a saga through its definition: callables in, events out, one commit per boundary.

The decisions (what ran, what runs next, how to resume, whether to retry or fall
back) are plain functions over the saga and its definition, shared by the sync and
the async driver; the drivers only call the user's code, wait and save. Write-ahead
holds on every path: a `StepStarted` or `CompensationStarted` is saved before its
callable runs, and each boundary's outcome and next start are appended together, so
they cost one commit. A retry that waits first commits its failure, waits, then
commits its new start, so a crash while waiting never leaves a start that did not run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, TypedDict

from eventsourcing.persistence import IntegrityError

from saga_es import tracing
from saga_es.aggregate import Saga
from saga_es.breaker import CLOSED, HALF_OPEN, OPEN
from saga_es.clock import SYSTEM_CLOCK, Clock
from saga_es.context import State, diff, from_state, storable_text, to_state
from saga_es.definition import (
    COMPENSATE,
    CURRENT_APP,
    FAIL,
    RECONCILE,
    RETRY,
    SagaDefinition,
    Step,
    _is_async,
)
from saga_es.errors import (
    CircuitOpen,
    ContextError,
    DefinitionError,
    SagaError,
    StepCancelled,
    StepTimeout,
)
from saga_es.machine import COMPENSATING, PENDING, RUNNING, STUCK

Save = Callable[[Saga], Sequence[Saga.Event]]
"""Saves a saga's pending events in one transaction and returns them."""
AsyncSave = Callable[[Saga], Awaitable[Sequence[Saga.Event]]]
Check = Callable[[State, Any], None]
"""Raises `ContextError` if context changes or a result cannot be stored."""

ACTION = "action"
COMPENSATION = "compensation"
RECONCILE_ACTION = "reconcile"
RECONCILE_COMPENSATION = "reconcile_compensation"

CANCEL_POLL_INTERVAL = 0.2
"""Seconds between looks at the store for a cancel while a `cancellable` action runs."""

Watch = Callable[[], Awaitable[None]]
"""Returns once a cancel of the saga is stored: what a `cancellable` action races."""


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
    asking whether an interrupted one took effect. `fallback`: the step's fallback
    (or the fallback's compensation) rather than its primary action.
    """

    step: Step
    kind: str
    attempt: int
    key: str
    fallback: bool = False

    @property
    def fn(self) -> Callable[[Any, str], Any]:
        """The user's callable for this call."""
        step = self.step
        if self.kind == ACTION:
            fn = step.fallback if self.fallback else step.action
        elif self.kind == COMPENSATION:
            fn = step.fallback_compensation if self.fallback else step.compensation
        elif self.kind == RECONCILE_ACTION:
            fn = step.reconcile
        else:
            fn = step.reconcile_compensation
        if fn is None:  # the definition changed under a stored saga
            what = f"fallback {self.kind}" if self.fallback else self.kind
            raise DefinitionError(f"step {step.name!r} has no {what} in this definition")
        return fn

    @property
    def is_async(self) -> bool:
        """Whether `fn` must be awaited (decided once, at definition time, for the hot path)."""
        if self.kind == ACTION and not self.fallback:
            return self.step.action_is_async
        if self.kind == COMPENSATION and not self.fallback:
            return self.step.compensation_is_async
        return _is_async(self.fn)


@dataclass(frozen=True)
class Outcome:
    """What a call did: the context state it left, its result, or the error it raised.

    `base` is the state the call was given: a parallel member's changes are taken
    against it, not against what its siblings have recorded since. `breaker` is the
    step's breaker state after the call; `took_effect` is set when a timed-out action
    was reconciled.
    """

    state: State | None = None
    base: State | None = None
    result: Any = None
    error: Exception | None = None
    breaker: str | None = None
    took_effect: bool | None = None


# -- decisions: pure, on the saga and its definition ----------------------------------


def begin(saga: Saga) -> None:
    """Write ahead the first step's start (every member's, for a parallel group)."""
    _advance(saga, None)


def resume(
    saga: Saga, definition: SagaDefinition, max_resumptions: int | None = None
) -> list[Call]:
    """Append what resuming an interrupted saga starts with; maybe reconciles to call first.

    A call whose start is recorded but whose outcome is not may or may not have taken
    effect: its step's recovery policy decides (re-run it as a new attempt, fail it,
    fail and compensate it, or ask its reconcile function). A retry that was waiting
    for its delay starts at once. A call re-run `max_resumptions` times already whose
    outcome is lost again is a poison step: the saga is stuck, for a person to resolve.
    """
    if saga.status == PENDING:
        _advance(saga, None)
    elif saga.status == RUNNING:
        flying = list(saga.in_flight.items())
        policies = {step: definition.step(step).recovery for step, _ in flying}
        if saga.cancel_requested:  # nothing runs again: an interrupted call may have run
            for step, attempt in flying:
                _fail_unknown(saga, definition.step(step), attempt, str(policies[step]))
            _compensate_next(saga)
            return []
        if any(policy in (FAIL, COMPENSATE) for policy in policies.values()):
            for step, attempt in flying:  # one member gives up: the whole group turns back
                _fail_unknown(saga, definition.step(step), attempt, str(policies[step]))
            _compensate_next(saga)
            return []
        for step, attempt in flying:
            if policies[step] == RETRY and _poisoned(saga, step, max_resumptions):
                saga.halt(step, **_poison(step, attempt, saga.resumptions.get(step, 0)))
                return []
        calls = []
        for step, attempt in flying:
            fallback = step in saga.on_fallback
            if policies[step] == RECONCILE:
                key = saga.step_key(step)
                calls.append(Call(definition.step(step), RECONCILE_ACTION, attempt, key, fallback))
            else:
                saga.start_step(step, attempt + 1, fallback=fallback)
        if not flying and saga.retrying:
            _restart(saga, None)
        elif not flying:
            _advance(saga, None)
        return calls
    elif saga.status == COMPENSATING:
        for step, attempt in list(saga.in_flight.items()):  # not written by saga_es itself
            _fail_unknown(saga, definition.step(step), attempt, FAIL)
        for step, attempt in saga.compensating.items():
            policy = definition.step(step).compensation_recovery
            if policy == RECONCILE:
                key = saga.step_key(step)
                fallback = step in saga.on_fallback
                return [Call(definition.step(step), RECONCILE_COMPENSATION, attempt, key, fallback)]
            if policy == RETRY:
                if _poisoned(saga, f"compensation:{step}", max_resumptions):
                    done = saga.resumptions.get(f"compensation:{step}", 0)
                    saga.halt(step, **_poison(f"the compensation of {step!r}", attempt, done))
                    return []
                saga.start_compensation(step, attempt + 1)
            else:
                assert policy == FAIL
                saga.fail_compensation(step, attempt, **_unknown(attempt), will_retry=False)
                saga.halt(step, **_unknown(attempt))
            return []
        _compensate_next(saga)
    return []


def next_calls(saga: Saga, definition: SagaDefinition) -> list[Call]:
    """The calls whose start is recorded but whose outcome is not (none once stuck)."""
    if saga.status == STUCK:  # a poison step stays in flight for a person to resolve
        return []
    fallbacks = saga.on_fallback
    if saga.in_flight:
        return [
            Call(definition.step(step), ACTION, attempt, saga.step_key(step), step in fallbacks)
            for step, attempt in saga.in_flight.items()
        ]
    return [
        Call(definition.step(step), COMPENSATION, attempt, saga.step_key(step), step in fallbacks)
        for step, attempt in saga.compensating.items()
    ]


def next_call(saga: Saga, definition: SagaDefinition) -> Call | None:
    """The first of `next_calls`, if any."""
    calls = next_calls(saga, definition)
    return calls[0] if calls else None


def settle(
    saga: Saga,
    definition: SagaDefinition,
    call: Call,
    outcome: Outcome,
    check: Check,
    now: datetime | None = None,
) -> float | None:
    """Append the call's outcome and the start of whatever runs next (or the end).

    Returns the seconds to wait before a retry starts, when one must wait: the driver
    saves, waits, then calls `restart`.
    """
    step, attempt = call.step.name, call.attempt
    if call.kind in (RECONCILE_ACTION, RECONCILE_COMPENSATION):
        if outcome.error is not None:
            raise ReconcileError(saga.id, step, outcome.error)
        took_effect = bool(outcome.result)
        if call.kind == RECONCILE_ACTION:
            saga.reconcile_step(step, attempt, took_effect=took_effect)
            if not took_effect:
                saga.start_step(step, attempt + 1, fallback=call.fallback)
                return None
        else:
            saga.reconcile_compensation(step, attempt, took_effect=took_effect)
            if not took_effect:
                saga.start_compensation(step, attempt + 1)
                return None
        outcome = Outcome(state=outcome.state, base=outcome.base)  # record it as the call's own
    elif outcome.took_effect:  # a timed-out action that its reconcile says took effect
        saga.reconcile_step(step, attempt, took_effect=True)
        outcome = Outcome(state=outcome.state, base=outcome.base)  # what reconcile found
    changes: State = {}
    removed: list[str] = []
    error = outcome.error
    if error is None:
        assert outcome.state is not None
        base = saga.context_state if outcome.base is None else outcome.base
        changes, removed = diff(base, outcome.state)
        try:
            check(changes, outcome.result)
        except ContextError as e:
            error = e
    if call.kind in (ACTION, RECONCILE_ACTION):
        if error is None:
            saga.complete_step(
                step, attempt, changes=changes, removed=removed, result=outcome.result
            )
            if not saga.in_flight and not saga.retrying:
                if saga.status == RUNNING:
                    _advance(saga, now)
                else:  # the last parallel member left in flight when the group turned back
                    _compensate_next(saga)
            return None
        return _fail_action(saga, call, outcome, error, now)
    if error is None:
        saga.complete_compensation(step, attempt, changes=changes, removed=removed)
        _compensate_next(saga)
        return None
    retry = call.step.compensation_retries
    if not isinstance(error, ContextError) and retry.retries(error, attempt):
        delay = retry.wait(attempt)
        fields = _error_fields(error)
        saga.fail_compensation(step, attempt, **fields, will_retry=True, delay=delay)
        if delay > 0:
            return delay
        _compensate_next(saga)
        return None
    saga.fail_compensation(step, attempt, **_error_fields(error), will_retry=False)
    saga.halt(step, **_error_fields(error))
    return None


def restart(saga: Saga, now: datetime | None = None) -> None:
    """Start the attempts whose retry delay has passed (or turn back at the deadline)."""
    _restart(saga, now)


def resolve(saga: Saga, action: str, *, by: str, reason: str) -> None:
    """Append a person's resolution of a stuck saga and what follows it.

    A failed compensation is run again or counted as done by hand, then compensation
    goes on. A poison step is run again as a new attempt (`retry`), or counted as
    having left no effect (`mark-compensated`) so the saga compensates what came before.
    """
    flying = [*saga.in_flight, *saga.compensating]
    step = saga.compensation_failure or (flying[0] if flying else saga.step) or ""
    saga.resolve(step, action=action, by=by, reason=reason)
    if step in saga.in_flight:  # retry of a poison step: a new attempt, same key
        saga.start_step(step, saga.in_flight[step] + 1, fallback=step in saga.on_fallback)
    elif step in saga.compensating:
        saga.start_compensation(step, saga.compensating[step] + 1)
    else:
        _compensate_next(saga)


def cancel(saga: Saga, *, by: str, reason: str) -> bool:
    """Append a cancel request; and, when no call is in flight, what it leads to now.

    True if the caller must drive the saga on (its compensations); False if a worker
    holds a call in flight and will obey the request at its next append.
    """
    saga.request_cancel(by=by, reason=reason)
    if saga.in_flight or saga.compensating:
        return False
    _advance(saga, None)
    return True


def _poisoned(saga: Saga, key: str, max_resumptions: int | None) -> bool:
    return max_resumptions is not None and saga.resumptions.get(key, 0) >= max_resumptions


def _poison(what: str, attempt: int, resumptions: int) -> _ErrorFields:
    return {
        "error_type": "PoisonStep",
        "error_message": (
            f"{what if what.startswith('the ') else repr(what)} lost its outcome again on "
            f"attempt {attempt}, after {resumptions} resumption(s): left for a person to resolve"
        ),
    }


def cancelled(saga: Saga, call: Call, cause: str) -> None:
    """Record a parallel member cut off because its group turned back: outcome unknown."""
    error = StepCancelled(call.step.name, call.attempt, cause)
    _fail_unknown(saga, call.step, call.attempt, str(call.step.recovery), str(error), error)


def _fail_action(
    saga: Saga, call: Call, outcome: Outcome, error: Exception, now: datetime | None
) -> float | None:
    step, name, attempt = call.step, call.step.name, call.attempt
    fields = _error_fields(error)
    # A cut attempt may have taken effect (unless reconciled): only `retry` runs it again.
    unknown = isinstance(error, (StepTimeout, StepCancelled)) and outcome.took_effect is None
    past_deadline = _past_deadline(saga, now) or (isinstance(error, StepTimeout) and error.deadline)
    retry = step.retries
    # Neither a member settled after its group turned back, nor a cancelled saga, goes on.
    forward = saga.status == RUNNING and not saga.cancel_requested
    may_retry = (
        forward
        and not call.fallback
        and not past_deadline
        and not isinstance(error, ContextError)
        and not (isinstance(error, CircuitOpen) and step.fallback is not None)
        and not (unknown and step.recovery != RETRY)
        and retry.retries(error, attempt)
    )
    if may_retry:
        delay = retry.wait(attempt)
        if saga.deadline is None or now is None or _seconds(saga.deadline, now) > delay:
            saga.fail_step(
                name, attempt, **fields, will_retry=True, delay=delay, **_breaker(outcome)
            )
            if delay > 0:
                return delay
            saga.start_step(name, attempt + 1)
            return None
    if (
        forward
        and step.fallback is not None
        and not call.fallback
        and not unknown
        and not past_deadline
        and isinstance(error, (CircuitOpen, step.fallback_on))
        and not isinstance(error, ContextError)
    ):
        saga.fail_step(name, attempt, **fields, will_retry=True, **_breaker(outcome))
        saga.start_step(name, attempt + 1, fallback=True)
        return None
    if unknown:
        _fail_unknown(saga, step, attempt, str(step.recovery), fields["error_message"], error)
    else:
        undo = _undo_of(step, call.fallback) is not None and step.compensate_on_failure
        saga.fail_step(
            name, attempt, **fields, will_retry=False, compensate=undo, **_breaker(outcome)
        )
    if not saga.in_flight:
        _compensate_next(saga)
    return None


def _fail_unknown(
    saga: Saga,
    step: Step,
    attempt: int,
    policy: str,
    message: str | None = None,
    error: Exception | None = None,
) -> None:
    """Fail an attempt whose outcome nobody knows; undo it unless its policy says it took none."""
    fallback = step.name in saga.on_fallback
    undo = policy != FAIL and _undo_of(step, fallback) is not None
    fields = _unknown(attempt)
    if error is not None:
        fields["error_type"] = type(error).__name__
    if message is not None:
        fields["error_message"] = message
    saga.fail_step(step.name, attempt, **fields, will_retry=False, compensate=undo)


def _undo_of(step: Step, fallback: bool) -> Any:
    return step.fallback_compensation if fallback else step.compensation


def _breaker(outcome: Outcome) -> dict[str, Any]:
    return {"breaker": outcome.breaker} if outcome.breaker is not None else {}


def _seconds(deadline: datetime, now: datetime) -> float:
    return (deadline - now).total_seconds()


def _past_deadline(saga: Saga, now: datetime | None) -> bool:
    return saga.deadline is not None and now is not None and now >= saga.deadline


def _advance(saga: Saga, now: datetime | None) -> None:
    """Start the next step (every member, for a group), end the saga, or turn back."""
    completed = saga.completed
    if saga.cancel_requested:  # the step boundary where a cancelled saga stops
        _compensate_next(saga)
        return
    if len(completed) >= len(saga.steps):
        saga.complete()
        return
    if _past_deadline(saga, now):
        saga.time_out()
        _compensate_next(saga)
        return
    if not saga.groups:  # the usual case: one step after another
        step = saga.steps[len(completed)]
        saga.start_step(step, saga.attempts.get(step, 0) + 1)
        return
    if not completed or saga.steps[len(completed) - 1] in completed:
        due = saga.steps[len(completed)]
    else:
        due = next(s for s in saga.steps if s not in completed)
    for step in saga.group_of(due):
        if step not in completed and step not in saga.in_flight:
            saga.start_step(step, saga.attempts.get(step, 0) + 1)


def _restart(saga: Saga, now: datetime | None) -> None:
    if (saga.cancel_requested and not saga.in_flight) or saga.status == COMPENSATING:
        _compensate_next(saga)
    elif saga.status == RUNNING:
        if not saga.in_flight and _past_deadline(saga, now):
            saga.time_out()
            _compensate_next(saga)
            return
        for step in list(saga.retrying):
            saga.start_step(step, saga.attempts.get(step, 0) + 1, fallback=step in saga.on_fallback)


def _compensate_next(saga: Saga) -> None:
    step = saga.next_compensation
    if step is None:
        saga.cancel() if saga.cancel_requested else saga.compensate()
    else:
        saga.start_compensation(step, saga.compensation_attempts.get(step, 0) + 1)


class _ErrorFields(TypedDict):
    error_type: str
    error_message: str


def _error_fields(error: Exception) -> _ErrorFields:
    return {"error_type": type(error).__name__, "error_message": storable_text(str(error))}


def _unknown(attempt: int) -> _ErrorFields:
    return {
        "error_type": "OutcomeUnknown",
        "error_message": f"attempt {attempt} was interrupted before its outcome was recorded",
    }


# -- calling user code -----------------------------------------------------------------


class _Cut(Exception):
    """The call outlived its time limit."""


def _limit(call: Call, saga: Saga, clock: Clock) -> tuple[float | None, bool]:
    """Seconds an action may run, and whether the saga's deadline (not the step) sets it."""
    if call.kind != ACTION:
        return None, False
    timeout = call.step.timeout
    if saga.deadline is not None:
        remaining = max(0.0, _seconds(saga.deadline, clock.now()))
        if timeout is None or remaining < timeout:
            return remaining, True
    return timeout, False


def _breaker_of(call: Call) -> Any:
    return call.step.breaker if call.kind == ACTION and not call.fallback else None


def invoke(
    call: Call, saga: Saga, clock: Clock = SYSTEM_CLOCK, watch: Watch | None = None
) -> Outcome:
    """Run the call on a fresh copy of the recorded context, blocking.

    With `watch`, a `cancellable` step's async action is cancelled once it returns.
    """
    if tracing._tracer is None:
        return _invoke(call, saga, clock, watch)
    with tracing.attempt_span(saga, call.step.name, call.kind, call.attempt) as span:
        outcome = _invoke(call, saga, clock, watch)
        tracing.record_outcome(span, outcome.error)
        return outcome


def _watched(call: Call, watch: Watch | None) -> Watch | None:
    """`watch`, if this call is one a cancel may cut: a cancellable step's async action."""
    if watch is None or call.kind != ACTION or not call.step.cancellable or not call.is_async:
        return None
    return watch


def _invoke(call: Call, saga: Saga, clock: Clock, watch: Watch | None = None) -> Outcome:
    step = call.step
    watch = _watched(call, watch)
    if step.breaker is None and step.timeout is None and saga.deadline is None and not watch:
        base = saga.context_state  # no policy needs the clock: the common, fast path
        context = from_state(saga.context_type, base)
        try:
            if call.is_async:
                result = _run_coroutine(call.fn(context, call.key))
            else:
                result = call.fn(context, call.key)
            return Outcome(state=to_state(context), base=base, result=result)
        except Exception as e:
            return Outcome(error=e)
    breaker = _breaker_of(call)
    admitted = CLOSED if breaker is None else breaker.admit(clock.monotonic())
    if admitted is None:
        return Outcome(error=CircuitOpen(breaker.name), breaker=OPEN)
    limit, by_deadline = _limit(call, saga, clock)
    base = saga.context_state
    context = from_state(saga.context_type, base)
    try:
        if limit is not None and limit <= 0:
            raise _Cut
        if call.is_async:
            coro = call.fn(context, call.key)
            if limit is not None:
                coro = _cut_after(coro, limit)
            result = _run_coroutine(coro if watch is None else _until_cancelled(coro, watch))
        elif limit is None:
            result = call.fn(context, call.key)
        else:
            result = _call_in_thread(call.fn, context, call.key, limit)
        outcome = Outcome(state=to_state(context), base=base, result=result)
    except _Cut:
        outcome = Outcome(
            error=StepTimeout(call.step.name, call.attempt, limit or 0, deadline=by_deadline)
        )
    except _Cancelled:
        outcome = Outcome(error=_cancel_error(call))
    except Exception as e:
        outcome = Outcome(error=e)
    except BaseException:
        if admitted == HALF_OPEN:
            breaker.abandon_trial()
        raise
    outcome = _record_breaker(breaker, outcome, clock)
    if _must_reconcile(call, outcome):
        reconcile = replace(call, kind=RECONCILE_ACTION)
        answer = invoke(reconcile, saga, clock)
        if answer.error is not None:
            raise ReconcileError(saga.id, call.step.name, answer.error)
        outcome = replace(
            outcome, took_effect=bool(answer.result), state=answer.state, base=answer.base
        )
    return outcome


async def ainvoke(
    call: Call, saga: Saga, clock: Clock = SYSTEM_CLOCK, watch: Watch | None = None
) -> Outcome:
    """Run the call on a fresh copy of the recorded context; sync code goes to a thread."""
    if tracing._tracer is None:
        return await _ainvoke(call, saga, clock, watch)
    with tracing.attempt_span(saga, call.step.name, call.kind, call.attempt) as span:
        outcome = await _ainvoke(call, saga, clock, watch)
        tracing.record_outcome(span, outcome.error)
        return outcome


async def _ainvoke(call: Call, saga: Saga, clock: Clock, watch: Watch | None = None) -> Outcome:
    watch = _watched(call, watch)
    breaker = _breaker_of(call)
    admitted = CLOSED if breaker is None else breaker.admit(clock.monotonic())
    if admitted is None:
        return Outcome(error=CircuitOpen(breaker.name), breaker=OPEN)
    limit, by_deadline = _limit(call, saga, clock)
    base = saga.context_state
    context = from_state(saga.context_type, base)
    try:
        if limit is not None and limit <= 0:
            raise _Cut
        if call.is_async:
            pending = call.fn(context, call.key)
        else:
            pending = _in_daemon_thread(call.fn, context, call.key)
        if limit is not None:
            pending = _cut_after(pending, limit)
        result = await (pending if watch is None else _until_cancelled(pending, watch))
        outcome = Outcome(state=to_state(context), base=base, result=result)
    except _Cut:
        outcome = Outcome(
            error=StepTimeout(call.step.name, call.attempt, limit or 0, deadline=by_deadline)
        )
    except _Cancelled:
        outcome = Outcome(error=_cancel_error(call))
    except Exception as e:
        outcome = Outcome(error=e)
    except BaseException:  # cancelled, e.g. because a sibling in its group failed
        if admitted == HALF_OPEN:
            breaker.abandon_trial()
        raise
    outcome = _record_breaker(breaker, outcome, clock)
    if _must_reconcile(call, outcome):
        answer = await ainvoke(replace(call, kind=RECONCILE_ACTION), saga, clock)
        if answer.error is not None:
            raise ReconcileError(saga.id, call.step.name, answer.error)
        outcome = replace(
            outcome, took_effect=bool(answer.result), state=answer.state, base=answer.base
        )
    return outcome


def _record_breaker(breaker: Any, outcome: Outcome, clock: Clock) -> Outcome:
    if breaker is None:
        return outcome
    now = clock.monotonic()
    state = breaker.record_failure(now) if outcome.error else breaker.record_success(now)
    return replace(outcome, breaker=state)


def _must_reconcile(call: Call, outcome: Outcome) -> bool:
    return (
        call.kind == ACTION
        and isinstance(outcome.error, (StepTimeout, StepCancelled))
        and call.step.recovery == RECONCILE
    )


class _Cancelled(Exception):
    """The saga was cancelled while its cancellable action ran: the action was cancelled."""


def _cancel_error(call: Call) -> StepCancelled:
    return StepCancelled(call.step.name, call.attempt, "the saga was cancelled")


async def _until_cancelled(pending: Awaitable[Any], watch: Watch) -> Any:
    """Await `pending`; if `watch` returns first (a cancel is stored), cancel it instead."""
    action = asyncio.ensure_future(pending)
    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait((action, watcher), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this call itself was cancelled (a sibling failed, say)
        action.cancel()
        watcher.cancel()
        raise
    if not action.done():  # the cancel came first
        action.cancel()
        await asyncio.gather(action, return_exceptions=True)
    watcher.cancel()
    await asyncio.gather(watcher, return_exceptions=True)
    if action.cancelled():
        raise _Cancelled
    return action.result()  # it ended before the cancel could cut it: its outcome stands


def watch_for_cancel(
    saga_id: Any, reload: Callable[[Any], Saga] | None, interval: float = CANCEL_POLL_INTERVAL
) -> Watch | None:
    """A `Watch` that looks at the stored saga every `interval` seconds (None without `reload`).

    The cancel may come from another process: only the store can tell.
    """
    if reload is None:
        return None
    load = reload

    async def watch() -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                stored = await asyncio.to_thread(load, saga_id)
            except Exception:  # the store is away: the action runs on; look again later
                continue
            if stored.cancel_requested is not None:
                return

    return watch


async def _cut_after(pending: Awaitable[Any], seconds: float) -> Any:
    """Await `pending` for at most `seconds`: a coroutine is cancelled, a thread abandoned."""
    try:
        return await asyncio.wait_for(pending, seconds)
    except TimeoutError:
        raise _Cut from None


async def _in_daemon_thread(fn: Callable[[Any, str], Any], context: Any, key: str) -> Any:
    """`asyncio.to_thread`, but on a daemon thread of its own.

    A call cut by a timeout or a sibling's failure is abandoned, not joined: the
    default executor would make `asyncio.run` wait for it at shutdown.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    run_in_context = contextvars.copy_context().run

    def deliver(result: Any, error: BaseException | None) -> None:
        if future.cancelled():
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)

    def target() -> None:
        try:
            result, error = run_in_context(fn, context, key), None
        except BaseException as e:
            result, error = None, e
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(deliver, result, error)

    threading.Thread(target=target, name=f"saga_es step {key}", daemon=True).start()
    return await future


def _call_in_thread(fn: Callable[[Any, str], Any], context: Any, key: str, seconds: float) -> Any:
    """Call `fn` in a daemon thread; past `seconds`, give up on it and discard its result."""
    box: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            box["result"] = fn(context, key)
        except BaseException as e:
            box["error"] = e
        finally:
            done.set()

    run_in_context = contextvars.copy_context().run
    threading.Thread(
        target=lambda: run_in_context(target), name=f"saga_es step {key}", daemon=True
    ).start()
    if not done.wait(seconds):
        raise _Cut
    if "error" in box:
        raise box["error"]
    return box["result"]


def _run_coroutine(coro: Coroutine[Any, Any, Any]) -> Any:
    """Await `coro` from sync code, even when this thread already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


# -- the drivers: the saga's latest events are saved; `first` holds reconciles ---------


def _is_group(saga: Saga, calls: Sequence[Call]) -> bool:
    return (
        bool(saga.groups and calls)
        and calls[0].kind == ACTION
        and len(saga.group_of(calls[0].step.name)) > 1
    )


_OBEY_ATTEMPTS = 5
"""Appends a runner may lose to cancels (each a `CancelRequested`) while recording one call."""


def _obey(
    saga: Saga,
    reload: Callable[[Any], Saga] | None,
    definition: SagaDefinition,
    call: Call,
    outcome: Outcome,
    check: Check,
    now: datetime | None,
) -> Saga:
    """After a lost append: the stored saga, with this call settled on it, if a cancel won.

    A cancel appended by another process moves the version on; the worker still owns
    the call it was running, so it records that call's outcome on the stored saga and
    goes on compensating. Anything else that won the append is another worker's: raise.
    """
    if reload is None:
        raise IntegrityError(f"saga {saga.id} was appended to by another writer")
    stored = reload(saga.id)
    flying = stored.in_flight if call.kind == ACTION else stored.compensating
    if not stored.cancel_requested or flying.get(call.step.name) != call.attempt:
        raise IntegrityError(f"saga {saga.id} was taken over at version {stored.version}")
    settle(stored, definition, call, outcome, check, now)
    return stored


def run(
    saga: Saga,
    definition: SagaDefinition,
    save: Save,
    check: Check,
    first: Sequence[Call] = (),
    clock: Clock = SYSTEM_CLOCK,
    reload: Callable[[Any], Saga] | None = None,
) -> Saga:
    """Drive `saga` to the end, blocking; a parallel group runs on an event loop.

    With `reload`, a cancel that another process appended meanwhile is obeyed.
    """
    token = CURRENT_APP.set(getattr(save, "__self__", None))  # for nested sagas' steps
    try:
        return _run(saga, definition, save, check, first, clock, reload)
    finally:
        CURRENT_APP.reset(token)


def _run(
    saga: Saga,
    definition: SagaDefinition,
    save: Save,
    check: Check,
    first: Sequence[Call],
    clock: Clock,
    reload: Callable[[Any], Saga] | None,
) -> Saga:
    for call in first:
        settle(saga, definition, call, invoke(call, saga, clock), check, clock.now())
    if first:
        save(saga)
    watch = watch_for_cancel(saga.id, reload)
    while True:
        calls = next_calls(saga, definition)
        if _is_group(saga, calls):

            async def asave(saga: Saga) -> Sequence[Saga.Event]:
                return await asyncio.to_thread(save, saga)

            group = _group(saga, definition, asave, check, clock, calls, reload, watch)
            _run_coroutine(_drain(group))
            continue
        if not calls:
            if saga.retrying and saga.status in (RUNNING, COMPENSATING):
                _restart(saga, clock.now())
                save(saga)
                continue
            return saga
        call = calls[0]
        outcome = invoke(call, saga, clock, watch)
        now = None if saga.deadline is None else clock.now()  # after the call: it took time
        delay = settle(saga, definition, call, outcome, check, now)
        try:
            save(saga)
        except IntegrityError:
            for _ in range(_OBEY_ATTEMPTS):  # each loss is to one more cancel, else _obey raises
                saga = _obey(saga, reload, definition, call, outcome, check, now)
                try:
                    save(saga)
                    break
                except IntegrityError:
                    continue
            else:
                raise IntegrityError(f"saga {saga.id}: kept losing its append to cancels")
            continue
        if delay is not None:
            clock.sleep(delay)
            _restart(saga, clock.now())
            save(saga)


async def arun(
    saga: Saga,
    definition: SagaDefinition,
    save: AsyncSave,
    check: Check,
    first: Sequence[Call] = (),
    clock: Clock = SYSTEM_CLOCK,
    reload: Callable[[Any], Saga] | None = None,
) -> AsyncIterator[Sequence[Saga.Event]]:
    """Drive `saga` to the end, yielding the events of each commit once it is durable."""
    CURRENT_APP.set(getattr(save, "__self__", None))  # this task's context: nested sagas' steps
    for call in first:
        settle(saga, definition, call, await ainvoke(call, saga, clock), check, clock.now())
    if first:
        yield await save(saga)
    watch = watch_for_cancel(saga.id, reload)
    while True:
        calls = next_calls(saga, definition)
        if _is_group(saga, calls):
            async for events in _group(saga, definition, save, check, clock, calls, reload, watch):
                yield events
            continue
        if not calls:
            if saga.retrying and saga.status in (RUNNING, COMPENSATING):
                _restart(saga, clock.now())
                yield await save(saga)
                continue
            return
        call = calls[0]
        outcome = await ainvoke(call, saga, clock, watch)
        now = clock.now()
        delay = settle(saga, definition, call, outcome, check, now)
        try:
            events = await save(saga)
        except IntegrityError:
            for _ in range(_OBEY_ATTEMPTS):  # each loss is to one more cancel, else _obey raises
                saga = await asyncio.to_thread(
                    _obey, saga, reload, definition, call, outcome, check, now
                )
                try:
                    events = await save(saga)
                    break
                except IntegrityError:
                    continue
            else:
                raise IntegrityError(f"saga {saga.id}: kept losing its append to cancels")
            yield events
            continue
        yield events
        if delay is not None:
            await clock.asleep(delay)
            _restart(saga, clock.now())
            yield await save(saga)


async def _drain(events: AsyncIterator[Any]) -> None:
    async for _ in events:
        pass


_DONE = object()


async def _group(
    saga: Saga,
    definition: SagaDefinition,
    save: AsyncSave,
    check: Check,
    clock: Clock,
    calls: Sequence[Call],
    reload: Callable[[Any], Saga] | None = None,
    watch: Watch | None = None,
) -> AsyncIterator[Sequence[Saga.Event]]:
    """Run a parallel group's members concurrently, each settled and saved as it ends.

    One lock orders the members' appends. When a member fails for good, the others are
    cancelled; those that had already finished are settled with their own outcome, the
    rest as cancelled (outcome unknown), all in the failing member's commit. A cancel
    another process appends meanwhile is obeyed as `_obey` obeys it for one step: the
    group takes on the stored saga, records its commit there, and the members still
    running end on their own (a `cancellable` one is cut) before compensation starts.
    """
    lock = asyncio.Lock()
    commits: asyncio.Queue[Any] = asyncio.Queue()
    finished: dict[str, tuple[Call, Outcome]] = {}
    answers: dict[tuple[str, int], bool] = {}  # reconciles asked, not asked again on a redo
    tasks: dict[str, asyncio.Task[None]] = {}
    lost: list[BaseException] = []
    cut: list[str] = []  # the failed member whose group was turned back, if one was

    def stop(error: BaseException) -> None:
        # The saga in memory is now past the store (another worker appended, say):
        # a later member's save would put its events after the newer ones, unchecked.
        lost.append(error)
        if not isinstance(error, asyncio.CancelledError):  # the group is ending anyway
            commits.put_nowait(error)

    async def adopt(before: tuple[str, dict[str, int]], strict: bool = True) -> None:
        """Take on the stored saga if only cancels were appended since `before`; else raise.

        `before` is the saga's status and calls in flight: a cancel changes neither (it
        clears the retries), anything else appended (a take-over) does. The saga is taken
        on in place, so that the driver holding the same object goes on from it too; its
        events were all collected by its last save: none is pending to lose.
        """
        if reload is None:
            if strict:
                raise IntegrityError(f"saga {saga.id} was appended to by another writer")
            return
        try:
            stored = await asyncio.to_thread(reload, saga.id)
        except Exception:
            if strict:
                raise
            return  # the store is away: the commit will find out
        if stored.cancel_requested and (stored.status, stored.in_flight) == before:
            vars(saga).clear()
            vars(saga).update(vars(stored))
        elif strict:
            raise IntegrityError(f"saga {saga.id} was taken over at version {stored.version}")

    async def commit(record: Callable[..., Awaitable[float | None]], *args: Any) -> float | None:
        """`record(*args)` a boundary on the saga and save it; after a cancel won, on the stored."""
        before = (saga.status, dict(saga.in_flight))
        for _ in range(_OBEY_ATTEMPTS + 1):  # each loss is to one more cancel, else adopt raises
            delay = await record(*args)
            try:
                if saga.pending_events:
                    commits.put_nowait(await save(saga))
                return delay
            except IntegrityError:
                pass
            except BaseException as e:
                stop(e)
                raise
            try:
                await adopt(before)
            except BaseException as e:
                stop(e)
                raise
        error = IntegrityError(f"saga {saga.id}: kept losing its append to cancels")
        stop(error)
        raise error

    async def turn_back(failed: str) -> None:
        cut.append(failed)
        others = [task for step, task in tasks.items() if step != failed]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        cause = f"step {failed!r} of its group failed"
        for call in next_calls(saga, definition):
            done = finished.get(call.step.name)
            if done is not None and done[0] == call:
                settle(saga, definition, call, done[1], check, clock.now())
            elif call.step.recovery == RECONCILE:
                asked = (call.step.name, call.attempt)
                if asked not in answers:
                    answer = await ainvoke(replace(call, kind=RECONCILE_ACTION), saga, clock)
                    if answer.error is not None:
                        raise ReconcileError(saga.id, call.step.name, answer.error)
                    answers[asked] = bool(answer.result)
                error = StepCancelled(call.step.name, call.attempt, cause)
                outcome = Outcome(error=error, took_effect=answers[asked])
                settle(saga, definition, call, outcome, check, clock.now())
            else:
                cancelled(saga, call, cause)
        if not saga.in_flight and not saga.compensating and saga.status == COMPENSATING:
            _compensate_next(saga)

    async def ended(call: Call, outcome: Outcome) -> float | None:
        """Settle a member's call; a failure for good turns the group back."""
        delay = settle(saga, definition, call, outcome, check, clock.now())
        # A cancelled saga lets its other members end on their own, as one step does:
        # the group turns back only for a failure (or did so before the cancel was seen).
        if saga.status == COMPENSATING and saga.in_flight and (cut or not saga.cancel_requested):
            await turn_back(call.step.name)
        return delay

    async def restart(name: str) -> float | None:
        """Start a member's next attempt, once its retry delay is over."""
        if not saga.cancel_requested:  # else the driver turns back once the members end
            saga.start_step(name, saga.attempts[name] + 1)
        return None

    async def member(call: Call | None) -> None:
        while call is not None:
            name = call.step.name
            outcome = await ainvoke(call, saga, clock, watch)
            finished[name] = (call, outcome)
            async with lock:
                if lost or saga.in_flight.get(name) != call.attempt:
                    return
                if isinstance(outcome.error, StepCancelled) and not saga.cancel_requested:
                    # Cut by a stored cancel: take that on first, lest the cut be taken
                    # for a failure that turns the group back.
                    await adopt((saga.status, dict(saga.in_flight)), strict=False)
                delay = await commit(ended, call, outcome)
            if delay is not None:
                await clock.asleep(delay)
                async with lock:
                    if lost or saga.status != RUNNING or saga.cancel_requested:
                        return
                    if name not in saga.retrying:
                        return
                    await commit(restart, name)
            attempt = saga.in_flight.get(name)
            call = (
                None
                if attempt is None
                else replace(call, attempt=attempt, fallback=name in saga.on_fallback)
            )

    async def all_members() -> None:
        results = await asyncio.gather(*tasks.values(), return_exceptions=True)
        for result in results:  # members cancelled by `turn_back` are no error
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                commits.put_nowait(result)
        commits.put_nowait(_DONE)

    for call in calls:
        tasks[call.step.name] = asyncio.create_task(member(call))
    watcher = asyncio.create_task(all_members())
    try:
        while (item := await commits.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        for task in tasks.values():
            task.cancel()
        watcher.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*tasks.values(), watcher, return_exceptions=True)
