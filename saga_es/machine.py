"""The legal moves of every saga, as one `transitions` machine shared by all sagas.

    new ─start_saga─► pending ─start_step─► running ─complete_saga─► completed
                                              │ ▲ start_step / complete_step / fail_step (retry)
                                              └─┘
                                              │ fail_step
                                              ▼
                                         compensating ─compensate_saga─► compensated
                                              │ start_ / complete_ / fail_compensation
                                              └─halt_saga─► stuck

The machine holds no saga: `check` hands it a throw-away probe carrying the
saga's state, so no Machine, model list or callback is ever attached to a saga
(which keeps sagas cheap to copy, snapshot and replay). Guards read the saga's
data (which step is in flight, which comes next) and say why they refuse.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol
from uuid import UUID

from transitions import Machine, MachineError

from saga_es.errors import IllegalTransition

NEW = "new"
PENDING = "pending"
RUNNING = "running"
COMPENSATING = "compensating"
COMPLETED = "completed"
COMPENSATED = "compensated"
STUCK = "stuck"

STATES = (NEW, PENDING, RUNNING, COMPENSATING, COMPLETED, COMPENSATED, STUCK)
TERMINAL_STATES = frozenset({COMPLETED, COMPENSATED})
"""States a saga never leaves: nothing is left to run."""


class SagaState(Protocol):
    """What the guards read from a saga."""

    @property
    def id(self) -> UUID:
        """The saga's id, for error messages."""

    status: str
    steps: list[str]
    completed: list[str]
    attempts: dict[str, int]
    in_flight: dict[str, int]
    compensating: dict[str, int]
    compensation_attempts: dict[str, int]
    to_compensate: list[str]
    compensation_cursor: int


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


def _step_may_start(ev: Any) -> bool:
    probe: _Probe = ev.model
    saga = probe.saga
    step, attempt = ev.kwargs["step"], ev.kwargs["attempt"]
    if saga.in_flight:
        return _refuse(probe, f"step {next(iter(saga.in_flight))!r} is still in flight")
    if len(saga.completed) >= len(saga.steps):
        return _refuse(probe, "every step has completed")
    expected = saga.steps[len(saga.completed)]
    if step != expected:
        return _refuse(probe, f"the next step is {expected!r}, not {step!r}")
    want = saga.attempts.get(step, 0) + 1
    if attempt != want:
        return _refuse(probe, f"step {step!r} is on attempt {want}, not {attempt}")
    return True


def _step_in_flight(ev: Any) -> bool:
    probe: _Probe = ev.model
    step = ev.kwargs["step"]
    if step not in probe.saga.in_flight:
        return _refuse(probe, f"step {step!r} was not started")
    if ev.kwargs.get("attempt", probe.saga.in_flight[step]) != probe.saga.in_flight[step]:
        return _refuse(probe, f"step {step!r} is on attempt {probe.saga.in_flight[step]}")
    return True


def _will_retry(ev: Any) -> bool:
    return bool(ev.kwargs.get("will_retry"))


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
    if saga.compensating:
        return _refuse(probe, f"compensation of {next(iter(saga.compensating))!r} is in flight")
    if step not in saga.to_compensate:
        return _refuse(probe, f"step {step!r} has no effect to compensate")
    if saga.to_compensate.index(step) < saga.compensation_cursor:
        return _refuse(probe, f"step {step!r} is out of reverse order or already compensated")
    want = saga.compensation_attempts.get(step, 0) + 1
    if attempt != want:
        return _refuse(probe, f"compensation of {step!r} is on attempt {want}, not {attempt}")
    return True


def _compensation_in_flight(ev: Any) -> bool:
    probe: _Probe = ev.model
    step = ev.kwargs["step"]
    if step not in probe.saga.compensating:
        return _refuse(probe, f"compensation of {step!r} was not started")
    return True


def _no_compensation_in_flight(ev: Any) -> bool:
    probe: _Probe = ev.model
    if probe.saga.compensating:
        step = next(iter(probe.saga.compensating))
        return _refuse(probe, f"compensation of {step!r} is in flight")
    return True


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
        "trigger": "complete_saga",
        "source": RUNNING,
        "dest": COMPLETED,
        "conditions": _all_steps_completed,
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
        "trigger": "compensate_saga",
        "source": COMPENSATING,
        "dest": COMPENSATED,
        "conditions": _no_compensation_in_flight,
    },
    {
        "trigger": "halt_saga",
        "source": COMPENSATING,
        "dest": STUCK,
        "conditions": _no_compensation_in_flight,
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


def check(saga: SagaState, trigger: str, data: Mapping[str, Any]) -> str:
    """The state `trigger` leads `saga` to, or `IllegalTransition` if it is not legal.

    Nothing on the saga changes: the caller records the move as an event.
    """
    event = MACHINE.events.get(trigger)
    if event is None:
        raise IllegalTransition(saga.id, saga.status, trigger, "unknown trigger")
    probe = _Probe(saga)
    try:
        ok = event.trigger(probe, **data)
    except MachineError:
        raise IllegalTransition(saga.id, saga.status, trigger) from None
    if not ok:
        raise IllegalTransition(saga.id, saga.status, trigger, probe.reason)
    return probe.state


def legal_triggers(state: str) -> Sequence[str]:
    """Triggers the machine accepts from `state`, before guards are asked."""
    return tuple(MACHINE.get_triggers(state))
