"""A saga's history as an auditor reads it: one typed record per stored event.

Records are built from the stored events one at a time, so one event that cannot be
decoded (an unknown type, a corrupt record) is marked as such and the rest of the
history still reads. The context is followed from `SagaStarted` through each
recorded change, so every record says what each field was before and after.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, time
from typing import Any, NamedTuple

from eventsourcing.persistence import StoredEvent

from saga_es.aggregate import Saga
from saga_es.context import State, apply_diff

REMOVED: Any = type("Removed", (), {"__repr__": lambda self: "<removed>"})()
"""`Change.after` of a field the step removed from the context."""
ABSENT: Any = type("Absent", (), {"__repr__": lambda self: "<absent>"})()
"""`Change.before` of a field the step added to the context."""

_COMMON = frozenset(
    {
        "originator_id",
        "originator_version",
        "timestamp",
        "originator_topic",
        "to_state",
        "step",
        "attempt",
        "error_type",
        "error_message",
        "changes",
        "removed",
    }
)


class Change(NamedTuple):
    """One context field a step or compensation changed.

    A named pair, so `before, after = change` and `change == (before, after)` read as
    the "field: before → after" an auditor writes.
    """

    before: Any
    after: Any


@dataclass(frozen=True)
class EventError:
    """The error an event records: a step's or compensation's, or why it cannot be read."""

    type: str
    message: str


@dataclass(frozen=True)
class HistoryRecord:
    """One event of a saga's stream, with what it did to the context.

    `position` is the event's place in the application's notification log (the order
    across every saga), `version` its place in the saga's own stream. `details` holds
    the event's other fields (`will_retry`, `delay`, `breaker`, `fallback`, `result`,
    `by`, `reason`, ...). A record with `readable=False` stands for a stored event that
    cannot be decoded: its `event` is the stored topic and `error` says why.
    """

    position: int | None
    version: int
    timestamp: datetime | None
    event: str
    step: str | None
    attempt: int | None
    status: str | None
    error: EventError | None = None
    changes: dict[str, Change] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    readable: bool = True

    @property
    def time(self) -> datetime | None:
        """`timestamp`, under the name an auditor asks for."""
        return self.timestamp

    @property
    def event_type(self) -> str:
        """`event`: the event's type, or the stored topic of an unreadable one."""
        return self.event

    @property
    def state(self) -> str | None:
        """`status`: the saga's state right after the event."""
        return self.status

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (see the export schema): `json.dumps` takes them as they are."""
        return {
            "position": self.position,
            "version": self.version,
            "timestamp": None if self.timestamp is None else self.timestamp.isoformat(),
            "event": self.event,
            "step": self.step,
            "attempt": self.attempt,
            "status": self.status,
            "error": None if self.error is None else vars(self.error).copy(),
            "changes": {
                name: {
                    "before": None if change.before is ABSENT else _plain(change.before),
                    "after": None if change.after is REMOVED else _plain(change.after),
                    **({"added": True} if change.before is ABSENT else {}),
                    **({"removed": True} if change.after is REMOVED else {}),
                }
                for name, change in self.changes.items()
            },
            "details": _plain(self.details),
            "readable": self.readable,
        }


def _plain(value: Any) -> Any:
    """`value` with what JSON cannot hold as text: times as ISO 8601, others as `str`."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    return str(value)


def records(
    stored: Iterable[StoredEvent],
    decode: Callable[[StoredEvent], Any],
    positions: dict[int, int] | None = None,
) -> list[HistoryRecord]:
    """The records of one saga's stored events, in order; `decode` maps one to an event."""
    rows: list[HistoryRecord] = []
    state: State = {}
    positions = positions or {}
    for record in stored:
        version = record.originator_version
        try:
            event = decode(record)
        except Exception as e:
            rows.append(
                HistoryRecord(
                    position=positions.get(version),
                    version=version,
                    timestamp=None,
                    event=record.topic,
                    step=None,
                    attempt=None,
                    status=None,
                    error=EventError(type(e).__name__, str(e)),
                    readable=False,
                )
            )
            continue
        row, state = _record(event, state, positions.get(version))
        rows.append(row)
    return rows


def _record(event: Any, state: State, position: int | None) -> tuple[HistoryRecord, State]:
    data = vars(event)
    changes: dict[str, Change] = {}
    if isinstance(event, Saga.SagaStarted):
        changes = {name: Change(ABSENT, value) for name, value in event.context.items()}
        state = dict(event.context)
    elif "changes" in data:
        for name, value in data["changes"].items():
            changes[name] = Change(state.get(name, ABSENT), value)
        for name in data["removed"]:
            changes[name] = Change(state.get(name, ABSENT), REMOVED)
        state = apply_diff(state, data["changes"], data["removed"])
    error = None
    if "error_type" in data:
        error = EventError(data["error_type"], data["error_message"])
    elif isinstance(event, Saga.SagaTimedOut):
        error = EventError("DeadlineExceeded", f"the deadline {event.deadline} passed")
    details = {k: v for k, v in data.items() if k not in _COMMON}
    if isinstance(event, Saga.SagaStarted):
        details.pop("context", None)
    if details.get("child_saga_id", True) is None:  # only a `Step.saga` step names a child
        del details["child_saga_id"]
    record = HistoryRecord(
        position=position,
        version=event.originator_version,
        timestamp=event.timestamp,
        event=type(event).__name__,
        step=data.get("step"),
        attempt=data.get("attempt"),
        status=getattr(event, "to_state", None),
        error=error,
        changes=changes,
        details=details,
    )
    return record, state
