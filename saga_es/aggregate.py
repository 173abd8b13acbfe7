"""A saga as an event-sourced aggregate: its events, and how each one changes it.

Each command asks the shared state machine (`saga_es.machine`) first; only a
legal move becomes an event, and every event records the state it leads to.
Events' `apply` only assigns data, so replay runs no machine and no user code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing import domain as _es_domain
from eventsourcing.domain import Aggregate, CanMutateAggregate, DomainEvent
from eventsourcing.utils import get_topic

from saga_es import machine
from saga_es.context import State, apply_diff, from_state
from saga_es.errors import IllegalTransition

KEY_NAMESPACE = uuid5(NAMESPACE_URL, "https://saga-es/keys")
"""Saga ids derived from a business key are uuid5 in this namespace."""


def keyed_id(name: str, key: str) -> UUID:
    """The id of the saga of definition `name` started under business `key`."""
    return uuid5(KEY_NAMESPACE, f"{name}\x00{key}")


class Saga(Aggregate):
    """One saga's state, rebuilt from its own stream of events.

    `class_version` and the `upcast_v<n>_v<n+1>` methods (here and on the events) let
    streams and snapshots written by earlier releases read back in today's shape.
    """

    TOPIC = "saga_es:Saga"
    class_version = 5

    @staticmethod
    def upcast_v1_v2(state: dict[str, Any]) -> None:
        """Snapshots before parallel groups, fallbacks, deadlines and retries."""
        state.setdefault("groups", [])
        state.setdefault("fallback_compensable", [])
        state.setdefault("deadline", None)
        state.setdefault("on_fallback", [])
        state.setdefault("retrying", {})
        state.setdefault("resumptions", {})
        state.setdefault("cancel_requested", None)
        state.setdefault("forked_from", None)

    @staticmethod
    def upcast_v2_v3(state: dict[str, Any]) -> None:
        """Snapshots before nested sagas named their parent."""
        state.setdefault("parent_saga_id", None)
        state.setdefault("parent_step", None)

    @staticmethod
    def upcast_v3_v4(state: dict[str, Any]) -> None:
        """Snapshots before a parent's step named the child saga it starts."""
        state.setdefault("children", {})

    @staticmethod
    def upcast_v4_v5(state: dict[str, Any]) -> None:
        """Snapshots before a fork kept the keys its carried-over steps ran with."""
        forked: dict[str, Any] = state.get("forked_from") or {}
        steps: list[str] = state.get("steps", [])
        carried = steps[: steps.index(forked["from_step"])] if forked else []
        state.setdefault("carried_keys", {s: f"{forked['saga_id']}:{s}" for s in carried})

    class Event(Aggregate.Event):
        """Base of every saga event: it names the state the saga is in after it."""

        trigger: ClassVar[str]
        to_state: str

        def apply(self, aggregate: Any) -> None:
            """Let subclasses add their data in `evolve` (seeing the state before), then move."""
            self.evolve(aggregate)
            aggregate.status = self.to_state
            step = self.__dict__.get("step")
            if step is not None:
                aggregate.step = step

        def evolve(self, saga: Saga) -> None:
            """Change the saga's data; nothing else (it runs on replay too)."""

    class SagaStarted(Event, Aggregate.Created):
        """The saga exists: its definition, steps, business key and initial context.

        A nested saga also names the parent saga and the step that started it.
        """

        TOPIC = "saga_es:SagaStarted"
        trigger = "start_saga"
        class_version = 4
        name: str
        definition_version: int
        steps: list[str]
        compensable: list[str]
        key: str | None
        context_type: str
        context: dict[str, Any]
        parallel: list[list[str]] = dataclasses.field(default_factory=list)
        fallback_compensable: list[str] = dataclasses.field(default_factory=list)
        deadline: datetime | None = None
        parent_saga_id: str | None = None
        parent_step: str | None = None
        children: dict[str, str] = dataclasses.field(default_factory=dict)
        """Each `Step.saga` step, with the name of the definition its child saga runs."""

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            """Before parallel groups, fallbacks and deadlines."""
            state.setdefault("parallel", [])
            state.setdefault("fallback_compensable", [])
            state.setdefault("deadline", None)

        @staticmethod
        def upcast_v2_v3(state: dict[str, Any]) -> None:
            """Before nested sagas named their parent in their first event."""
            state.setdefault("parent_saga_id", None)
            state.setdefault("parent_step", None)

        @staticmethod
        def upcast_v3_v4(state: dict[str, Any]) -> None:
            """Before a saga recorded which of its steps start child sagas."""
            state.setdefault("children", {})

        def evolve(self, saga: Saga) -> None:
            """Record what the saga is made of."""
            saga.name = self.name
            saga.definition_version = self.definition_version
            saga.steps = list(self.steps)
            saga.compensable = list(self.compensable)
            saga.key = self.key
            saga.context_type = self.context_type
            saga.context_state = dict(self.context)
            saga.groups = [list(group) for group in self.parallel]
            saga.fallback_compensable = list(self.fallback_compensable)
            saga.deadline = self.deadline
            saga.parent_saga_id = self.parent_saga_id
            saga.parent_step = self.parent_step
            saga.children = dict(self.children)

    Created = SagaStarted

    class StepStarted(Event):
        """Written ahead: the step's action (or its `fallback`) is about to run."""

        TOPIC = "saga_es:StepStarted"
        trigger = "start_step"
        class_version = 3
        step: str
        attempt: int
        fallback: bool = False
        child_saga_id: str | None = None
        """The saga a `Step.saga` step runs: the other end of its `parent_saga_id`."""

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            """Before fallbacks: every attempt ran the primary action."""
            state.setdefault("fallback", False)

        @staticmethod
        def upcast_v2_v3(state: dict[str, Any]) -> None:
            """Before a nested step's start named its child saga."""
            state.setdefault("child_saga_id", None)

        def evolve(self, saga: Saga) -> None:
            """Mark the step as in flight on this attempt."""
            if self.step in saga.in_flight:  # a resumption: the last attempt's outcome is lost
                saga.resumptions[self.step] = saga.resumptions.get(self.step, 0) + 1
            saga.in_flight[self.step] = self.attempt
            saga.attempts[self.step] = self.attempt
            saga.retrying.pop(self.step, None)
            if self.fallback:
                if self.step not in saga.on_fallback:
                    saga.on_fallback.append(self.step)
            elif self.step in saga.on_fallback:
                saga.on_fallback.remove(self.step)

    class StepCompleted(Event):
        """The action took effect; what it changed in the context, and what it returned."""

        TOPIC = "saga_es:StepCompleted"
        trigger = "complete_step"
        step: str
        attempt: int
        changes: dict[str, Any]
        removed: list[str]
        result: Any

        def evolve(self, saga: Saga) -> None:
            """Mark the step done and due for compensation; fold in its changes."""
            del saga.in_flight[self.step]
            saga.completed.append(self.step)
            saga.to_compensate.insert(0, self.step)
            saga.context_state = apply_diff(saga.context_state, self.changes, self.removed)
            if self.result is not None:
                saga.results[self.step] = self.result

    class StepFailed(Event):
        """The action raised (or timed out); `will_retry` says whether another attempt follows.

        `delay` is the wait before that attempt, `breaker` the state of the step's circuit
        breaker after this failure. `compensate` says the failed action may have left an
        effect that its own compensation must undo (it is then compensated first).
        """

        TOPIC = "saga_es:StepFailed"
        trigger = "fail_step"
        class_version = 2
        step: str
        attempt: int
        error_type: str
        error_message: str
        will_retry: bool
        compensate: bool
        delay: float = 0.0
        breaker: str | None = None

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            """Before retry delays and circuit breakers."""
            state.setdefault("delay", 0.0)
            state.setdefault("breaker", None)

        def evolve(self, saga: Saga) -> None:
            """Clear the step's flight and keep the error for readers."""
            del saga.in_flight[self.step]
            if self.will_retry:
                saga.retrying[self.step] = self.delay
            else:  # the saga turns back: no other member's retry will start
                saga.retrying.clear()
            if self.compensate:
                saga.to_compensate.insert(0, self.step)
            if saga.status == machine.COMPENSATING:
                return  # a parallel member settled after the failure that turned the saga back
            saga.error = {
                "step": self.step,
                "type": self.error_type,
                "message": self.error_message,
            }

    class StepReconciled(Event):
        """Recovery asked the step whether an interrupted attempt took effect.

        If it did, `StepCompleted` follows for that attempt; if not, a new attempt starts.
        """

        TOPIC = "saga_es:StepReconciled"
        trigger = "reconcile_step"
        step: str
        attempt: int
        took_effect: bool

        def evolve(self, saga: Saga) -> None:
            """An attempt without effect is over; one with effect awaits its completion."""
            if not self.took_effect:
                del saga.in_flight[self.step]

    class CompensationStarted(Event):
        """Written ahead: the step's compensation is about to run (this attempt)."""

        TOPIC = "saga_es:CompensationStarted"
        trigger = "start_compensation"
        step: str
        attempt: int

        def evolve(self, saga: Saga) -> None:
            """Mark the compensation in flight; earlier-ordered ones stay closed."""
            if self.step in saga.compensating:
                key = f"compensation:{self.step}"
                saga.resumptions[key] = saga.resumptions.get(key, 0) + 1
            saga.compensating[self.step] = self.attempt
            saga.compensation_attempts[self.step] = self.attempt
            saga.retrying.pop(self.step, None)

    class CompensationRan(Event):
        """The compensation took effect; what it changed in the context."""

        TOPIC = "saga_es:CompensationRan"
        trigger = "complete_compensation"
        step: str
        attempt: int
        changes: dict[str, Any]
        removed: list[str]

        def evolve(self, saga: Saga) -> None:
            """Mark the step compensated and fold in the compensation's changes."""
            del saga.compensating[self.step]
            saga.compensated.append(self.step)
            saga.context_state = apply_diff(saga.context_state, self.changes, self.removed)

    class CompensationFailed(Event):
        """The compensation raised; `will_retry` says whether another attempt follows.

        `delay` is the wait before that attempt.
        """

        TOPIC = "saga_es:CompensationFailed"
        trigger = "fail_compensation"
        class_version = 2
        step: str
        attempt: int
        error_type: str
        error_message: str
        will_retry: bool
        delay: float = 0.0

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            """Before retry delays."""
            state.setdefault("delay", 0.0)

        def evolve(self, saga: Saga) -> None:
            """Clear the compensation's flight; a final failure awaits a person."""
            del saga.compensating[self.step]
            if self.will_retry:
                saga.retrying[self.step] = self.delay
            else:
                saga.compensation_failure = self.step

    class CompensationReconciled(Event):
        """Recovery asked the step whether an interrupted compensation took effect."""

        TOPIC = "saga_es:CompensationReconciled"
        trigger = "reconcile_compensation"
        step: str
        attempt: int
        took_effect: bool

        def evolve(self, saga: Saga) -> None:
            """A compensation without effect is over; one with effect awaits `CompensationRan`."""
            if not self.took_effect:
                del saga.compensating[self.step]

    class SagaCompleted(Event):
        """Every step completed."""

        TOPIC = "saga_es:SagaCompleted"
        trigger = "complete_saga"

        def evolve(self, saga: Saga) -> None:
            """A completed saga has no error: its retried failures stay in its history."""
            saga.error = None

    class SagaCompensated(Event):
        """A step failed and every completed step has been compensated."""

        TOPIC = "saga_es:SagaCompensated"
        trigger = "compensate_saga"

    class SagaTimedOut(Event):
        """The saga's deadline passed between steps: it compensates instead of going on."""

        TOPIC = "saga_es:SagaTimedOut"
        trigger = "time_out_saga"
        deadline: datetime

        def evolve(self, saga: Saga) -> None:
            """Keep why the saga turned back; no retry will start."""
            saga.retrying.clear()
            saga.error = {
                "step": "",
                "type": "DeadlineExceeded",
                "message": f"the saga's deadline {self.deadline.isoformat()} passed",
            }

    class SagaResolved(Event):
        """A person resolved a stuck saga: who, why, and how (`retry` or `mark-compensated`).

        `retry` runs the failed compensation again (a new attempt); `mark-compensated`
        records that the person undid the step by hand. Compensation then goes on.
        """

        TOPIC = "saga_es:SagaResolved"
        trigger = "resolve_saga"
        step: str
        action: str
        by: str
        reason: str

        def evolve(self, saga: Saga) -> None:
            """Lift the halt; a step undone by hand counts as compensated.

            For a poison step (its attempt still in flight), `mark-compensated` closes
            that attempt: the person says it left no effect, or undid it.
            """
            saga.compensation_failure = None
            if self.action != machine.MARK_COMPENSATED:
                return
            if self.step in saga.in_flight:
                del saga.in_flight[self.step]
                saga.retrying.clear()
                return
            saga.compensating.pop(self.step, None)
            saga.compensated.append(self.step)

    class SagaReverted(Event):
        """A child saga that completed is undone because its parent compensates the step."""

        TOPIC = "saga_es:SagaReverted"
        trigger = "revert_saga"
        parent_saga_id: str
        parent_step: str

    class SagaForked(Event):
        """The saga continues another one from `from_step`: the steps before it are carried over.

        They are recorded as completed here, not run again; the source saga's stream is
        never changed. The context this saga started with is the source's as recorded
        right before `from_step` first started (at `source_version`).
        """

        TOPIC = "saga_es:SagaForked"
        trigger = "fork_saga"
        class_version = 2
        source_saga_id: str
        source_version: int
        from_step: str
        carried: list[str]
        keys: dict[str, str] = dataclasses.field(default_factory=dict)
        """The idempotency key each carried-over step's action ran with (in the source, or
        in the saga the source carried it from): its compensation here gets the same key."""
        fallbacks: list[str] = dataclasses.field(default_factory=list)
        """The carried-over steps whose fallback took effect: undone by its compensation."""

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            """Before a fork kept how its carried-over steps ran: keyed in the source."""
            source = state["source_saga_id"]
            state.setdefault("keys", {step: f"{source}:{step}" for step in state["carried"]})
            state.setdefault("fallbacks", [])

        def evolve(self, saga: Saga) -> None:
            """The carried-over steps count as completed, and are compensated if this one fails.

            Each keeps the key it ran with, and its fallback if that took effect, so undoing
            it here undoes what was done there (a nested step reverts the source's child).
            """
            saga.forked_from = {
                "saga_id": self.source_saga_id,
                "version": self.source_version,
                "from_step": self.from_step,
            }
            for step in self.carried:
                saga.completed.append(step)
                saga.to_compensate.insert(0, step)
            saga.carried_keys = dict(self.keys)
            saga.on_fallback.extend(s for s in self.fallbacks if s not in saga.on_fallback)

    class CancelRequested(Event):
        """Someone asked the saga to stop: who and why.

        Appended under the saga's version check, so the worker running it meets it at
        its next append: no further step starts, what completed is compensated, and the
        saga ends `cancelled`.
        """

        TOPIC = "saga_es:CancelRequested"
        trigger = "request_cancel"
        by: str
        reason: str

        def evolve(self, saga: Saga) -> None:
            """Remember the request; no retry will start."""
            saga.cancel_requested = {"by": self.by, "reason": self.reason}
            saga.retrying.clear()

    class SagaCancelled(Event):
        """The cancelled saga is done: whatever completed has been compensated."""

        TOPIC = "saga_es:SagaCancelled"
        trigger = "cancel_saga"

    class SagaStuck(Event):
        """A person must finish the saga.

        Either a compensation exhausted its tries, or a step's (or compensation's)
        outcome stayed unknown through too many resumptions: a poison step, whose
        attempt is left in flight for `resolve` to re-run or close.
        """

        TOPIC = "saga_es:SagaStuck"
        trigger = "halt_saga"
        step: str
        error_type: str
        error_message: str

        def evolve(self, saga: Saga) -> None:
            """Keep the error that stopped the saga."""
            saga.error = {
                "step": self.step,
                "type": self.error_type,
                "message": self.error_message,
            }

    def __init__(self) -> None:
        self.status = machine.NEW
        self.step: str | None = None
        self.name = ""
        self.definition_version = 0
        self.steps: list[str] = []
        self.compensable: list[str] = []
        self.key: str | None = None
        self.context_type = ""
        self.context_state: State = {}
        self.completed: list[str] = []
        self.results: dict[str, Any] = {}
        self.attempts: dict[str, int] = {}
        self.in_flight: dict[str, int] = {}
        self.to_compensate: list[str] = []
        self.compensating: dict[str, int] = {}
        self.compensation_attempts: dict[str, int] = {}
        self.compensated: list[str] = []
        self.compensation_failure: str | None = None
        self.error: dict[str, str] | None = None
        self.groups: list[list[str]] = []
        self.fallback_compensable: list[str] = []
        self.deadline: datetime | None = None
        self.on_fallback: list[str] = []
        self.retrying: dict[str, float] = {}
        self.cancel_requested: dict[str, str] | None = None
        self.forked_from: dict[str, Any] | None = None
        self.carried_keys: dict[str, str] = {}
        """A fork's carried-over steps, with the idempotency key each ran with."""
        self.parent_saga_id: str | None = None
        """The saga whose step `parent_step` started this one (a nested saga), else None."""
        self.parent_step: str | None = None
        self.children: dict[str, str] = {}
        """Each step that runs a child saga, with that saga's definition name."""
        self.resumptions: dict[str, int] = {}
        """Attempts started over one whose outcome was lost, per step (`compensation:<step>`
        for compensations): what makes a poison step."""

    # -- commands: each is one legal move, recorded as one event ----------------------

    @classmethod
    def start(
        cls,
        *,
        id: UUID,
        name: str,
        definition_version: int,
        steps: list[str],
        compensable: list[str],
        key: str | None,
        context_type: str,
        context: State,
        parallel: list[list[str]] | None = None,
        fallback_compensable: list[str] | None = None,
        deadline: datetime | None = None,
        parent_saga_id: str | None = None,
        parent_step: str | None = None,
        children: dict[str, str] | None = None,
    ) -> Saga:
        """A new saga, `pending` until its first step starts (`parent_*`: a nested saga's).

        `children` maps each step that runs a child saga to that saga's definition name.
        """
        to_state = machine.check(_Unborn(id), cls.SagaStarted.trigger, {})
        payload = {
            "to_state": to_state,
            "name": name,
            "definition_version": definition_version,
            "steps": steps,
            "compensable": compensable,
            "key": key,
            "context_type": context_type,
            "context": context,
            "parallel": parallel or [],
            "fallback_compensable": fallback_compensable or [],
            "deadline": deadline,
            "parent_saga_id": parent_saga_id,
            "parent_step": parent_step,
            "children": children or {},
        }
        header = {
            "originator_id": id,
            "originator_version": cls.INITIAL_VERSION,
            "timestamp": cls.SagaStarted.create_timestamp(),
            "originator_topic": get_topic(cls),
        }
        event = _build(cls.SagaStarted, header, payload)
        if event is None:
            return cls._create(cls.SagaStarted, id=id, **payload)
        saga = event.mutate(None)  # what `_create` does with the event it builds
        assert isinstance(saga, cls)
        saga.pending_events.append(event)
        return saga

    def start_step(self, step: str, attempt: int, *, fallback: bool = False) -> None:
        """Record, ahead of running it, that `step`'s action (or fallback) is about to run."""
        child = self.children.get(step)
        child_saga_id = None if child is None else str(keyed_id(child, f"{self.id}:{step}"))
        self._move(
            self.StepStarted,
            step=step,
            attempt=attempt,
            fallback=fallback,
            child_saga_id=child_saga_id,
        )

    def complete_step(
        self,
        step: str,
        attempt: int,
        *,
        changes: State,
        removed: list[str],
        result: Any = None,
    ) -> None:
        """Record that `step`'s action took effect."""
        self._move(
            self.StepCompleted,
            step=step,
            attempt=attempt,
            changes=changes,
            removed=removed,
            result=result,
        )

    def fail_step(
        self,
        step: str,
        attempt: int,
        *,
        error_type: str,
        error_message: str,
        will_retry: bool,
        compensate: bool = False,
        delay: float = 0.0,
        breaker: str | None = None,
    ) -> None:
        """Record that `step`'s action raised (`compensate`: its effect must be undone)."""
        self._move(
            self.StepFailed,
            step=step,
            attempt=attempt,
            error_type=error_type,
            error_message=error_message,
            will_retry=will_retry,
            compensate=compensate,
            delay=delay,
            breaker=breaker,
        )

    def reconcile_step(self, step: str, attempt: int, *, took_effect: bool) -> None:
        """Record whether an interrupted attempt of `step` took effect."""
        self._move(self.StepReconciled, step=step, attempt=attempt, took_effect=took_effect)

    def reconcile_compensation(self, step: str, attempt: int, *, took_effect: bool) -> None:
        """Record whether an interrupted compensation of `step` took effect."""
        self._move(self.CompensationReconciled, step=step, attempt=attempt, took_effect=took_effect)

    def start_compensation(self, step: str, attempt: int) -> None:
        """Record, ahead of running it, that `step`'s compensation is about to run."""
        self._move(self.CompensationStarted, step=step, attempt=attempt)

    def complete_compensation(
        self, step: str, attempt: int, *, changes: State, removed: list[str]
    ) -> None:
        """Record that `step`'s compensation took effect."""
        self._move(
            self.CompensationRan, step=step, attempt=attempt, changes=changes, removed=removed
        )

    def fail_compensation(
        self,
        step: str,
        attempt: int,
        *,
        error_type: str,
        error_message: str,
        will_retry: bool,
        delay: float = 0.0,
    ) -> None:
        """Record that `step`'s compensation raised."""
        self._move(
            self.CompensationFailed,
            step=step,
            attempt=attempt,
            error_type=error_type,
            error_message=error_message,
            will_retry=will_retry,
            delay=delay,
        )

    def complete(self) -> None:
        """Record that the saga completed."""
        self._move(self.SagaCompleted)

    def compensate(self) -> None:
        """Record that the saga is fully compensated."""
        self._move(self.SagaCompensated)

    def halt(self, step: str, *, error_type: str, error_message: str) -> None:
        """Record that the saga is stuck on `step`'s compensation."""
        self._move(self.SagaStuck, step=step, error_type=error_type, error_message=error_message)

    def revert(self, *, parent_saga_id: str, parent_step: str) -> None:
        """Record that the parent step that started this saga is compensating it."""
        self._move(self.SagaReverted, parent_saga_id=parent_saga_id, parent_step=parent_step)

    def fork(
        self,
        *,
        source_saga_id: str,
        source_version: int,
        from_step: str,
        carried: list[str],
        keys: dict[str, str] | None = None,
        fallbacks: list[str] | None = None,
    ) -> None:
        """Record that this saga continues another from `from_step`, carrying the steps before."""
        self._move(
            self.SagaForked,
            source_saga_id=source_saga_id,
            source_version=source_version,
            from_step=from_step,
            carried=carried,
            keys={step: f"{source_saga_id}:{step}" for step in carried} if keys is None else keys,
            fallbacks=[] if fallbacks is None else fallbacks,
        )

    def request_cancel(self, *, by: str, reason: str) -> None:
        """Record that `by` asked the saga to stop, and why."""
        self._move(self.CancelRequested, by=by, reason=reason)

    def cancel(self) -> None:
        """Record that the cancelled saga is done."""
        self._move(self.SagaCancelled)

    def time_out(self) -> None:
        """Record that the saga's deadline passed before its next step could start."""
        self._move(self.SagaTimedOut, deadline=self.deadline)

    def resolve(self, step: str, *, action: str, by: str, reason: str) -> None:
        """Record a person's resolution of the stuck compensation of `step`."""
        self._move(self.SagaResolved, step=step, action=action, by=by, reason=reason)

    def _move(self, event_class: type[Saga.Event], **data: Any) -> None:
        to_state = machine.check(self, event_class.trigger, data)
        version = self.version + 1
        timestamp = event_class.create_timestamp()
        header = {
            "originator_id": self.id,
            "originator_version": version,
            "timestamp": timestamp,
            "to_state": to_state,
        }
        event = _build(event_class, header, data)
        if event is None or event_class.mutate is not CanMutateAggregate.mutate:
            self.trigger_event(event_class, to_state=to_state, **data)  # or its TypeError
            return
        event.apply(self)  # `mutate`, less its checks of the id and version set above
        self.version = version
        self.modified_on = timestamp
        self.pending_events.append(event)

    # -- reading ---------------------------------------------------------------------

    @property
    def context(self) -> Any:
        """The context as of this version, as an object of the type the saga started with."""
        return from_state(self.context_type, self.context_state)

    @property
    def next_compensation(self) -> str | None:
        """The step to compensate next: in reverse order of completion, past steps without one.

        A step whose fallback took effect is undone by the fallback's compensation.
        """
        for step in self.to_compensate:
            if step in self.compensated:
                continue
            owners = self.fallback_compensable if step in self.on_fallback else self.compensable
            if step in owners:
                return step
        return None

    def group_of(self, step: str) -> list[str]:
        """The members of `step`'s parallel group; just `[step]` outside a group."""
        for group in self.groups:
            if step in group:
                return group
        return [step]

    @property
    def is_terminal(self) -> bool:
        """True once nothing is left to run (`completed` or `compensated`)."""
        return self.status in machine.TERMINAL_STATES

    def step_key(self, step: str) -> str:
        """The idempotency key of `step` in this saga: the same on every attempt.

        A fork's carried-over step keeps the key it ran with, so its compensation meets it.
        """
        return self.carried_keys.get(step) or f"{self.id}:{step}"


_CHECK_TOPIC: Callable[[type], None] | None = getattr(
    _es_domain, "_check_explicit_topic_is_registered", None
)
"""eventsourcing's own check of an explicit topic; private, so events take `__init__` without it."""
_MISSING: Any = dataclasses.MISSING
_Field = tuple[str, Any, Any]
"""A field's name, its default and its default factory (`_MISSING` where it has none)."""
_LAYOUTS: dict[type, tuple[_Field, ...] | None] = {}
"""Per event class (so bounded by the classes defined): see `_layout`."""
_NAMES: dict[type, list[str]] = {}
"""The field names of each event class that has a layout, in order."""


def _layout(event_class: type[Saga.Event]) -> tuple[_Field, ...] | None:
    """The fields of `event_class`, in the order its `__init__` sets them.

    None when `__init__` does more than assign fields and fill in defaults (a field
    kept out of `__init__`, another `__post_init__`): then events are built by
    `__init__`. The explicit topic is checked here once, rather than on every event.
    """
    try:
        return _LAYOUTS[event_class]
    except KeyError:
        pass
    fields = dataclasses.fields(event_class)
    plain = (
        _CHECK_TOPIC is not None
        and all(f.init for f in fields)
        and event_class.__post_init__ is DomainEvent.__post_init__
        and event_class.__name__ != "Event"
    )
    layout = tuple((f.name, f.default, f.default_factory) for f in fields) if plain else None
    if layout is not None:
        assert _CHECK_TOPIC is not None
        _CHECK_TOPIC(event_class)
        _NAMES[event_class] = [name for name, _, _ in layout]
    _LAYOUTS[event_class] = layout
    return layout


def _build(
    event_class: type[Saga.Event], header: dict[str, Any], data: dict[str, Any]
) -> Saga.Event | None:
    """The event `event_class(**header, **data)` builds, without its frozen `__init__`.

    None where the general path must build it (or raise its `TypeError`).
    """
    layout = _layout(event_class)
    if layout is None or type(header["originator_id"]) is not UUID:
        return None
    state = header | data
    if len(state) == len(header) + len(data) and list(state) == _NAMES[event_class]:
        # The usual case: every field given once, in order.
        event = object.__new__(event_class)
        object.__setattr__(event, "__dict__", state)
        return event
    state = {}
    given = 0
    for name, default, factory in layout:
        if name in header:
            state[name] = header[name]
        elif name in data:
            state[name] = data[name]
            given += 1
        elif default is not _MISSING:
            state[name] = default
        elif factory is not _MISSING:
            state[name] = factory()
        else:
            return None  # a required field is missing
    if given != len(data) or not header.keys() <= state.keys():  # an unknown or repeated name
        return None
    event = object.__new__(event_class)
    object.__setattr__(event, "__dict__", state)
    return event


class _Unborn:
    """The machine's view of a saga before its first event: nothing started, nothing due."""

    def __init__(self, saga_id: UUID) -> None:
        self.id = saga_id
        self.status = machine.NEW
        self.steps: list[str] = []
        self.completed: list[str] = []
        self.attempts: dict[str, int] = {}
        self.in_flight: dict[str, int] = {}
        self.compensating: dict[str, int] = {}
        self.compensation_attempts: dict[str, int] = {}
        self.compensation_failure: str | None = None
        self.next_compensation: str | None = None
        self.groups: list[list[str]] = []


@dataclass(frozen=True)
class StreamProblem:
    """Why a stored stream is not one the state machine would have written."""

    saga_id: UUID
    version: int
    move: str
    reason: str

    def __str__(self) -> str:
        return f"saga {self.saga_id} v{self.version}: {self.move}: {self.reason}"


_BASE_FIELDS = frozenset(
    {"originator_id", "originator_version", "timestamp", "to_state", "originator_topic"}
)


def verify_events(events: Iterable[Any]) -> StreamProblem | None:
    """Replay `events` through the state machine; the first move it would refuse, if any.

    Unlike `replay`, this asks the machine before each event, and checks that the
    state each event records is the one the machine leads to.
    """
    return replay_checked(None, events)[1]


def replay_checked(
    saga: Saga | None, events: Iterable[Any]
) -> tuple[Saga | None, StreamProblem | None]:
    """Apply `events` to `saga` (None: from the start), asking the machine first for each.

    Returns the saga as far as the events were legal, and the first problem, if any.
    """
    for event in events:
        saga_id, version = event.originator_id, event.originator_version
        trigger = getattr(type(event), "trigger", None)
        if not isinstance(event, Saga.Event) or trigger is None:
            return saga, StreamProblem(saga_id, version, type(event).__name__, "not a saga event")
        data = {k: v for k, v in vars(event).items() if k not in _BASE_FIELDS}
        try:
            probe = saga if saga is not None else _Unborn(saga_id)
            to_state = machine.check(probe, trigger, data)
        except IllegalTransition as e:
            reason = e.reason or f"not legal from {e.state}"
            return saga, StreamProblem(saga_id, version, trigger, reason)
        if to_state != event.to_state:
            reason = f"records state {event.to_state!r}; the machine leads to {to_state!r}"
            return saga, StreamProblem(saga_id, version, trigger, reason)
        try:
            saga = event.mutate(saga)
        except Exception as e:
            return saga, StreamProblem(saga_id, version, trigger, f"cannot be applied: {e}")
    return saga, None


def replay(saga: Saga | None, events: Iterable[Any]) -> Saga | None:
    """Project events onto a saga without eventsourcing's per-event Protocol check."""
    for event in events:
        saga = event.mutate(saga)
    return saga


SagaEvent = Saga.Event
SagaStarted = Saga.SagaStarted
StepStarted = Saga.StepStarted
StepCompleted = Saga.StepCompleted
StepFailed = Saga.StepFailed
StepReconciled = Saga.StepReconciled
CompensationStarted = Saga.CompensationStarted
CompensationRan = Saga.CompensationRan
CompensationFailed = Saga.CompensationFailed
CompensationReconciled = Saga.CompensationReconciled
SagaCompleted = Saga.SagaCompleted
SagaCompensated = Saga.SagaCompensated
SagaStuck = Saga.SagaStuck
SagaTimedOut = Saga.SagaTimedOut
SagaResolved = Saga.SagaResolved
SagaForked = Saga.SagaForked
SagaReverted = Saga.SagaReverted
CancelRequested = Saga.CancelRequested
SagaCancelled = Saga.SagaCancelled
