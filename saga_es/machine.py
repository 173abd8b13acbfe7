"""The legal moves of every saga, as one `transitions` machine shared by all sagas.

    new ─start_saga─► pending ─start_step─► running ─complete_saga─► completed
                                              │ ▲ start_step / complete_step / reconcile_step /
                                              │ │ fail_step (will retry)
                                              └─┘
                                              │ fail_step / time_out_saga
                                              ▼
                                         compensating ─compensate_saga─► compensated
                                              │ ▲ start_ / complete_ / fail_ /
                                              │ │ reconcile_compensation; parallel
                                              │ │ members settling after a failure
                                              │ └─resolve_saga── stuck
                                              └─halt_saga─────► stuck

A step's new attempt may start while its previous attempt is in flight only as that
attempt's direct successor: recovery re-running an attempt whose outcome is unknown.
Several steps are in flight at once only as members of one `Parallel` group, and no
compensation starts while any of them is.

The machine holds no saga: `check` hands it a throw-away probe carrying the
saga's state, so no Machine, model list or callback is ever attached to a saga
(which keeps sagas cheap to copy, snapshot and replay). Guards read the saga's
data (which step is in flight, which comes next) and say why they refuse.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol
from uuid import UUID

from transitions import EventData, Machine, MachineError

from saga_es.errors import IllegalTransition

NEW = "new"
PENDING = "pending"
RUNNING = "running"
COMPENSATING = "compensating"
COMPLETED = "completed"
COMPENSATED = "compensated"
STUCK = "stuck"
CANCELLED = "cancelled"

STATES = (NEW, PENDING, RUNNING, COMPENSATING, COMPLETED, COMPENSATED, STUCK, CANCELLED)

RETRY = "retry"
MARK_COMPENSATED = "mark-compensated"
RESOLUTIONS = (RETRY, MARK_COMPENSATED)
"""How a person may resolve a stuck saga: run the failed compensation again, or record
that they undid the step by hand."""
TERMINAL_STATES = frozenset({COMPLETED, COMPENSATED, CANCELLED})
"""States a saga never leaves: nothing is left to run."""


class SagaState(Protocol):
    """What the guards read from a saga."""

    @property
    def id(self) -> UUID:
        """The saga's id, for error messages."""

    @property
    def next_compensation(self) -> str | None:
        """The step whose compensation is due next, if any."""

    status: str
    steps: list[str]
    completed: list[str]
    attempts: dict[str, int]
    in_flight: dict[str, int]
    compensating: dict[str, int]
    compensation_attempts: dict[str, int]
    compensation_failure: str | None


class _Probe:
    """The machine's model for one check: it receives the new state, the saga does not."""

    __slots__ = ("reason", "saga", "state")

    def __init__(self, saga: SagaState) -> None:
        self.saga = saga
        self.state = saga.status
        self.reason = ""


def _refuse(probe: _Probe, reason: str) -> bool:
    probe.reason = reason
    return False


def _may_start(
    probe: _Probe, kind: str, step: str, attempt: int, flying: dict[str, int], last: int
) -> bool:
    """Shared rule for starting an action or a compensation.

    A new attempt may start while the previous one is still in flight only as its
    direct successor: that is recovery re-running an attempt whose outcome is unknown.
    """
    if flying:
        (busy, busy_attempt), *_ = flying.items()
        if busy == step and attempt == busy_attempt + 1:
            return True
        return _refuse(probe, f"{kind} {busy!r} is still in flight (attempt {busy_attempt})")
    if attempt != last + 1:
        return _refuse(probe, f"{kind} {step!r} is on attempt {last + 1}, not {attempt}")
    return True


def _group_of(saga: SagaState, step: str) -> Sequence[str]:
    """The members of `step`'s parallel group: just `[step]` outside one."""
    for group in getattr(saga, "groups", ()):
        if step in group:
            return group  # type: ignore[no-any-return]
    return (step,)


def _step_may_start(ev: Any) -> bool:
    probe: _Probe = ev.model
    saga = probe.saga
    step, attempt = ev.kwargs["step"], ev.kwargs["attempt"]
    if getattr(saga, "cancel_requested", None):
        return _refuse(probe, "its cancel was requested: no step starts")
    if step in saga.in_flight:
        return _may_start(probe, "step", step, attempt, {step: saga.in_flight[step]}, 0)
    completed = saga.completed
    if len(completed) >= len(saga.steps):
        return _refuse(probe, "every step has completed")
    if not saga.in_flight and not getattr(saga, "groups", None):  # the usual case: in order
        expected = saga.steps[len(completed)]
        if step != expected:
            return _refuse(probe, f"the next step is {expected!r}, not {step!r}")
        return _may_start(probe, "step", step, attempt, {}, saga.attempts.get(step, 0))
    if len(completed) == 0 or saga.steps[len(completed) - 1] in completed:
        expected = saga.steps[len(completed)]  # the usual case: steps complete in order
    else:
        expected = next(s for s in saga.steps if s not in completed)
    group = _group_of(saga, expected)
    for busy, busy_attempt in saga.in_flight.items():
        if busy not in group or step not in group:
            return _refuse(probe, f"step {busy!r} is still in flight (attempt {busy_attempt})")
    if step not in group or step in completed:
        due = " or ".join(repr(s) for s in group if s not in completed)
        return _refuse(probe, f"the next step is {due}, not {step!r}")
    return _may_start(probe, "step", step, attempt, {}, saga.attempts.get(step, 0))


def _in_flight(probe: _Probe, kind: str, step: str, attempt: int, flying: dict[str, int]) -> bool:
    if step not in flying:
        return _refuse(probe, f"{kind} {step!r} was not started")
    if attempt != flying[step]:
        return _refuse(probe, f"{kind} {step!r} is on attempt {flying[step]}, not {attempt}")
    return True


def _step_in_flight(ev: Any) -> bool:
    probe: _Probe = ev.model
    step = ev.kwargs["step"]
    attempt = ev.kwargs.get("attempt", probe.saga.in_flight.get(step))
    return _in_flight(probe, "step", step, attempt, probe.saga.in_flight)


def _will_retry(ev: Any) -> bool:
    return bool(ev.kwargs.get("will_retry"))


def _gives_up(ev: Any) -> bool:
    """A parallel member still in flight when the saga turned back cannot be retried."""
    if ev.kwargs.get("will_retry"):
        return _refuse(ev.model, "the saga is compensating: nothing is retried")
    return True


def _nothing_in_flight(ev: Any) -> bool:
    probe: _Probe = ev.model
    if probe.saga.in_flight:
        return _refuse(probe, f"step {next(iter(probe.saga.in_flight))!r} is still in flight")
    return True


def _all_steps_completed(ev: Any) -> bool:
    probe: _Probe = ev.model
    saga = probe.saga
    if saga.in_flight:
        return _refuse(probe, f"step {next(iter(saga.in_flight))!r} is still in flight")
    missing = [s for s in saga.steps if s not in saga.completed]
    if missing:
        return _refuse(probe, f"step {missing[0]!r} has not completed")
    return True


def _compensation_may_start(ev: Any) -> bool:
    probe: _Probe = ev.model
    saga = probe.saga
    step, attempt = ev.kwargs["step"], ev.kwargs["attempt"]
    if saga.in_flight:
        return _refuse(probe, f"step {next(iter(saga.in_flight))!r} is still in flight")
    if saga.compensation_failure is not None:
        return _refuse(
            probe, f"compensation of {saga.compensation_failure!r} failed; the saga is halting"
        )
    if not saga.compensating:
        due = saga.next_compensation
        if due is None:
            return _refuse(probe, "no compensation is due")
        if step != due:
            return _refuse(probe, f"the next compensation is {due!r}, not {step!r}")
    last = saga.compensation_attempts.get(step, 0)
    return _may_start(probe, "compensation of", step, attempt, saga.compensating, last)


def _compensation_in_flight(ev: Any) -> bool:
    probe: _Probe = ev.model
    step = ev.kwargs["step"]
    attempt = ev.kwargs.get("attempt", probe.saga.compensating.get(step))
    return _in_flight(probe, "compensation of", step, attempt, probe.saga.compensating)


def _not_cancelled(ev: Any) -> bool:
    """A saga whose cancel was requested ends `cancelled`, not `compensated`."""
    if getattr(ev.model.saga, "cancel_requested", None):
        return _refuse(ev.model, "its cancel was requested: it ends cancelled")
    return True


def _carries_the_first_steps(ev: Any) -> bool:
    """A fork carries over exactly the steps before the one it starts from, in order."""
    probe: _Probe = ev.model
    saga = probe.saga
    carried = list(ev.kwargs.get("carried", ()))
    if saga.completed or saga.in_flight:
        return _refuse(probe, "a saga is forked before any of its own steps")
    if carried != saga.steps[: len(carried)] or len(carried) >= len(saga.steps):
        return _refuse(probe, f"{carried} are not the steps before one of {saga.steps}")
    if ev.kwargs.get("from_step") != saga.steps[len(carried)]:
        return _refuse(probe, f"the step after {carried} is {saga.steps[len(carried)]!r}")
    return True


def _a_child(ev: Any) -> bool:
    """Only a child saga is reverted, and only by the parent step that started it."""
    probe: _Probe = ev.model
    key = getattr(probe.saga, "key", None) or ""
    expected = f"{ev.kwargs.get('parent_saga_id')}:{ev.kwargs.get('parent_step')}"
    if key != expected:
        return _refuse(probe, f"it is not the child of {expected!r}")
    return True


def _cancel_requested(ev: Any) -> bool:
    if not getattr(ev.model.saga, "cancel_requested", None):
        return _refuse(ev.model, "no cancel was requested")
    return True


def _fully_compensated(ev: Any) -> bool:
    probe: _Probe = ev.model
    saga = probe.saga
    if saga.in_flight:
        return _refuse(probe, f"step {next(iter(saga.in_flight))!r} is still in flight")
    if saga.compensating:
        return _refuse(probe, f"compensation of {next(iter(saga.compensating))!r} is in flight")
    if saga.compensation_failure is not None:
        return _refuse(probe, f"compensation of {saga.compensation_failure!r} failed")
    if saga.next_compensation is not None:
        return _refuse(probe, f"step {saga.next_compensation!r} is not compensated yet")
    return True


def _compensation_failed(ev: Any) -> bool:
    probe: _Probe = ev.model
    saga = probe.saga
    if saga.compensating:
        return _refuse(probe, f"compensation of {next(iter(saga.compensating))!r} is in flight")
    if saga.compensation_failure is None:
        return _refuse(probe, "no compensation has failed")
    if ev.kwargs.get("step") != saga.compensation_failure:
        return _refuse(probe, f"the compensation that failed is {saga.compensation_failure!r}")
    return True


def _poisoned(ev: Any) -> bool:
    """A step or compensation whose outcome stayed unknown through too many resumptions."""
    probe: _Probe = ev.model
    saga = probe.saga
    step = ev.kwargs.get("step")
    if step in saga.in_flight or step in saga.compensating:
        return True
    if probe.reason:  # keep why the usual halt was refused: it says more
        return False
    return _refuse(probe, f"step {step!r} is not in flight")


def _resolvable(ev: Any) -> bool:
    probe: _Probe = ev.model
    saga = probe.saga
    action = ev.kwargs.get("action")
    if action not in RESOLUTIONS:
        return _refuse(probe, f"resolve with one of {', '.join(RESOLUTIONS)}, not {action!r}")
    step = ev.kwargs.get("step")
    if step in saga.in_flight or step in saga.compensating:
        return True  # a poison step
    if step != saga.compensation_failure:
        return _refuse(probe, f"the compensation that failed is {saga.compensation_failure!r}")
    return True


def _resumes_forward(ev: Any) -> bool:
    """Retrying a poison step of a saga still going forward goes on forward."""
    return ev.kwargs.get("action") == RETRY and ev.kwargs.get("step") in ev.model.saga.in_flight


TRANSITIONS: list[dict[str, Any]] = [
    {"trigger": "start_saga", "source": NEW, "dest": PENDING},
    {
        "trigger": "start_step",
        "source": [PENDING, RUNNING],
        "dest": RUNNING,
        "conditions": _step_may_start,
    },
    {"trigger": "complete_step", "source": RUNNING, "dest": RUNNING, "conditions": _step_in_flight},
    {
        "trigger": "fail_step",
        "source": RUNNING,
        "dest": RUNNING,
        "conditions": [_step_in_flight, _will_retry],
    },
    {
        "trigger": "fail_step",
        "source": RUNNING,
        "dest": COMPENSATING,
        "conditions": _step_in_flight,
    },
    {
        "trigger": "reconcile_step",
        "source": RUNNING,
        "dest": RUNNING,
        "conditions": _step_in_flight,
    },
    {
        "trigger": "time_out_saga",
        "source": RUNNING,
        "dest": COMPENSATING,
        "conditions": _nothing_in_flight,
    },
    {
        "trigger": "complete_saga",
        "source": RUNNING,
        "dest": COMPLETED,
        "conditions": _all_steps_completed,
    },
    {
        "trigger": "revert_saga",
        "source": COMPLETED,
        "dest": COMPENSATING,
        "conditions": _a_child,
    },
    {
        "trigger": "fork_saga",
        "source": PENDING,
        "dest": PENDING,
        "conditions": _carries_the_first_steps,
    },
    *(
        {"trigger": "request_cancel", "source": state, "dest": state}
        for state in (PENDING, RUNNING, COMPENSATING)
    ),
    {
        "trigger": "start_compensation",
        "source": RUNNING,
        "dest": COMPENSATING,
        "conditions": [_cancel_requested, _nothing_in_flight, _compensation_may_start],
    },
    {
        "trigger": "cancel_saga",
        "source": [PENDING, RUNNING, COMPENSATING],
        "dest": CANCELLED,
        "conditions": [_cancel_requested, _fully_compensated],
    },
    {
        "trigger": "complete_step",
        "source": COMPENSATING,
        "dest": COMPENSATING,
        "conditions": _step_in_flight,
    },
    {
        "trigger": "fail_step",
        "source": COMPENSATING,
        "dest": COMPENSATING,
        "conditions": [_step_in_flight, _gives_up],
    },
    {
        "trigger": "reconcile_step",
        "source": COMPENSATING,
        "dest": COMPENSATING,
        "conditions": _step_in_flight,
    },
    {
        "trigger": "start_compensation",
        "source": COMPENSATING,
        "dest": COMPENSATING,
        "conditions": _compensation_may_start,
    },
    {
        "trigger": "complete_compensation",
        "source": COMPENSATING,
        "dest": COMPENSATING,
        "conditions": _compensation_in_flight,
    },
    {
        "trigger": "fail_compensation",
        "source": COMPENSATING,
        "dest": COMPENSATING,
        "conditions": _compensation_in_flight,
    },
    {
        "trigger": "reconcile_compensation",
        "source": COMPENSATING,
        "dest": COMPENSATING,
        "conditions": _compensation_in_flight,
    },
    {
        "trigger": "compensate_saga",
        "source": COMPENSATING,
        "dest": COMPENSATED,
        "conditions": [_not_cancelled, _fully_compensated],
    },
    {
        "trigger": "halt_saga",
        "source": COMPENSATING,
        "dest": STUCK,
        "conditions": _compensation_failed,
    },
    {
        "trigger": "halt_saga",
        "source": COMPENSATING,
        "dest": STUCK,
        "conditions": _poisoned,
    },
    {
        "trigger": "halt_saga",
        "source": RUNNING,
        "dest": STUCK,
        "conditions": _poisoned,
    },
    {
        "trigger": "resolve_saga",
        "source": STUCK,
        "dest": RUNNING,
        "conditions": [_resolvable, _resumes_forward],
    },
    {
        "trigger": "resolve_saga",
        "source": STUCK,
        "dest": COMPENSATING,
        "conditions": _resolvable,
    },
]

MACHINE = Machine(
    model=None,
    states=list(STATES),
    transitions=TRANSITIONS,
    initial=NEW,
    auto_transitions=False,
    send_event=True,
)
"""Built once at import; every saga is checked against it."""

TRIGGERS: tuple[str, ...] = tuple(MACHINE.events)


def _is_plain(fsm: Machine) -> bool:
    """True when a trigger can do no more than pick a transition and run its conditions.

    That holds while the machine has no callbacks anywhere, no queue, no final state and
    raises on invalid triggers; `check` then asks the machine's own transition table and
    conditions directly, skipping the trigger engine's callback and logging calls (about
    7 µs of a 9 µs trigger, a third of a POPO saga's time), with the same outcome.
    """
    if fsm.has_queue or fsm.ignore_invalid_triggers:
        return False
    machine_callbacks = (
        fsm.prepare_event,
        fsm.before_state_change,
        fsm.after_state_change,
        fsm.finalize_event,
        fsm.on_exception,
        fsm.on_final,
    )
    if any(machine_callbacks):
        return False
    for state in fsm.states.values():
        if state.on_enter or state.on_exit or state.final or state.ignore_invalid_triggers:
            return False
    return not any(
        transition.prepare or transition.before or transition.after
        for event in fsm.events.values()
        for transitions in event.transitions.values()
        for transition in transitions
    )


_PLAIN = _is_plain(MACHINE)
_STATES: Mapping[str, Any] = MACHINE.states


class _Guarded:
    """What a guard is handed on the fast path: the probe and the trigger's data.

    The guards above read only these two of transitions' `EventData`; building the
    whole `EventData` for each check costs more than the guards themselves.
    """

    __slots__ = ("kwargs", "model")

    def __init__(self, model: _Probe, kwargs: Mapping[str, Any]) -> None:
        self.model = model
        self.kwargs = kwargs


Moves = tuple[tuple[str, tuple[tuple[Any, bool], ...]], ...]


def _moves(fsm: Machine) -> dict[tuple[str, str], Moves]:
    """Per (trigger, source state): each transition's destination and (guard, target) pairs.

    Read from the machine's own table once, in its order, for `check`; empty unless the
    machine is plain and every guard is a function (a guard named by a string is
    resolved on the model by transitions at each trigger).
    """
    if not _is_plain(fsm):
        return {}
    table: dict[tuple[str, str], Moves] = {}
    for trigger, event in fsm.events.items():
        for source, transitions in event.transitions.items():
            moves = []
            for transition in transitions:
                conditions = tuple((c.func, c.target) for c in transition.conditions)
                if not all(callable(func) for func, _ in conditions):
                    return {}
                moves.append((transition.dest or source, conditions))
            table[trigger, source] = tuple(moves)
    return table


_MOVES = _moves(MACHINE)


def check(saga: SagaState, trigger: str, data: Mapping[str, Any]) -> str:
    """The state `trigger` leads `saga` to, or `IllegalTransition` if it is not legal.

    Nothing on the saga changes: the caller records the move as an event.
    """
    moves = _MOVES.get((trigger, saga.status))
    if moves is not None:
        probe = _Probe(saga)
        guarded = _Guarded(probe, data)
        for to_state, conditions in moves:
            for condition, target in conditions:
                if condition(guarded) != target:
                    break
            else:
                return to_state
        raise IllegalTransition(saga.id, saga.status, trigger, probe.reason)
    event = MACHINE.events.get(trigger)
    if event is None:
        raise IllegalTransition(saga.id, saga.status, trigger, "unknown trigger")
    probe = _Probe(saga)
    if not _PLAIN:
        try:
            ok = event.trigger(probe, **data)
        except MachineError:
            raise IllegalTransition(saga.id, saga.status, trigger) from None
        if not ok:
            raise IllegalTransition(saga.id, saga.status, trigger, probe.reason)
        return probe.state
    # What `event.trigger` does on a plain machine: the first transition from this state
    # whose conditions all hold, in declaration order, wins.
    status = saga.status
    state = _STATES.get(status) or MACHINE.get_state(status)  # unknown: ValueError, as there
    candidates = event.transitions.get(status)  # .get: never grow the defaultdict
    if candidates is None:
        raise IllegalTransition(saga.id, status, trigger)
    event_data = EventData(state, event, MACHINE, probe, args=(), kwargs=dict(data))
    for transition in candidates:
        event_data.transition = transition
        for condition in transition.conditions:
            if not condition.check(event_data):
                break
        else:
            dest: str = transition.dest or status
            return dest
    raise IllegalTransition(saga.id, status, trigger, probe.reason)


def legal_triggers(state: str) -> Sequence[str]:
    """Triggers the machine accepts from `state`, before guards are asked."""
    return tuple(MACHINE.get_triggers(state))
