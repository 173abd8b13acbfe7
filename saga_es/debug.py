"""Re-running one recorded step in isolation: the tool for debugging a failure locally.

The step's action (or compensation) is called with the context exactly as the saga
recorded it when that call started, and nothing is appended to the saga's stream: the
saga's history stays what happened, and the caller sees what the code does now.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from uuid import UUID

from saga_es.aggregate import Saga
from saga_es.context import State, diff, from_state, to_state
from saga_es.definition import SagaDefinition
from saga_es.errors import StepNotReached
from saga_es.history import ABSENT, REMOVED, Change
from saga_es.runner import _run_coroutine

if TYPE_CHECKING:
    from saga_es.application import SagaApplication


@dataclass(frozen=True)
class RerunResult:
    """What one isolated call did: its result or error, and its effect on the context."""

    saga_id: UUID
    step: str
    kind: str
    """`"action"`, `"fallback"` or `"compensation"`: which callable ran."""
    version: int
    """The saga version whose context the call was given."""
    key: str
    context_before: State
    context_after: State | None = None
    changes: dict[str, Change] = field(default_factory=dict)
    result: Any = None
    error: Exception | None = None
    traceback: str = ""

    @property
    def ok(self) -> bool:
        """True if the call returned instead of raising."""
        return self.error is None


def rerun_step(
    app: SagaApplication,
    saga_id: UUID | str,
    step: str,
    version: int | None = None,
    *,
    compensation: bool = False,
) -> RerunResult:
    """Call `step`'s action (or compensation) with the context it was given; append nothing.

    Without `version`, the context is the one its latest attempt started with; with
    it, the saga's context as of that version. The call gets the step's own
    idempotency key, so it meets the same deduplication the real attempts met.
    """
    saga = app.get(saga_id)
    definition = app.definition(saga.name, saga.definition_version)
    what = "the compensation of" if compensation else "step"
    at = _start_version(app, saga, step, compensation) if version is None else version
    if at is None or step not in (saga.compensation_attempts if compensation else saga.attempts):
        raise StepNotReached(saga.id, step, what)
    then = app.get(saga.id, version=at)
    kind, fn = _callable(saga.id, definition, step, compensation, step in then.on_fallback)
    before = dict(then.context_state)
    context = from_state(then.context_type, before)
    key = saga.step_key(step)
    try:
        returned = fn(context, key)
        if hasattr(returned, "__await__"):
            returned = _run_coroutine(returned)
    except Exception as e:
        trace = "".join(traceback.format_exception(e))
        return RerunResult(saga.id, step, kind, at, key, before, error=e, traceback=trace)
    after = to_state(context)
    changed, removed = diff(before, after)
    changes = {name: Change(before.get(name, ABSENT), value) for name, value in changed.items()}
    changes.update({name: Change(before[name], REMOVED) for name in removed})
    return RerunResult(saga.id, step, kind, at, key, before, after, changes, returned)


def _start_version(app: SagaApplication, saga: Saga, step: str, compensation: bool) -> int | None:
    """The version of the latest start of `step`'s action (or compensation), if any."""
    wanted = Saga.CompensationStarted if compensation else Saga.StepStarted
    found = None
    for event in app.events.get(saga.id):
        if isinstance(event, wanted) and event.step == step:
            found = event.originator_version
    return found


def _callable(
    saga_id: UUID, definition: SagaDefinition, step: str, compensation: bool, fallback: bool
) -> tuple[str, Any]:
    declared = definition.step(step)
    if compensation:
        fn = declared.fallback_compensation if fallback else declared.compensation
        if fn is None:
            raise StepNotReached(saga_id, step, "a compensation for")
        return "compensation", fn
    if fallback and declared.fallback is not None:
        return "fallback", declared.fallback
    return "action", declared.action
