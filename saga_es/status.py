"""The status projection: one row per saga, derived from its events.

Each row is computed from the saga after the events being saved have been applied,
and written by the recorder in the same transaction as those events, so it can
never disagree with the stream; `SagaApplication.rebuild_status()` recomputes
every row from the events. Recovery and queries read it instead of replaying
streams: listing the sagas in flight costs time proportional to those sagas.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable
from uuid import UUID

from saga_es import machine
from saga_es.aggregate import Saga

IN_FLIGHT_STATES = (machine.PENDING, machine.RUNNING, machine.COMPENSATING)
"""States recovery resumes: neither terminal nor waiting for a person."""
ENDING_EVENTS = ("SagaCompleted", "SagaCompensated", "SagaStuck", "SagaCancelled")
"""Events after which a saga is no longer in flight."""


def _steady_topics() -> tuple[str, ...]:
    keeps: dict[str, bool] = {}
    for move in machine.TRANSITIONS:
        sources = move["source"] if isinstance(move["source"], list) else [move["source"]]
        steady = all(source == move["dest"] for source in sources)
        keeps[move["trigger"]] = keeps.get(move["trigger"], True) and steady
    topics: list[str] = []
    for event in vars(Saga).values():
        if isinstance(event, type) and issubclass(event, Saga.Event):
            topic, trigger = vars(event).get("TOPIC"), vars(event).get("trigger")
            if topic and keeps.get(trigger or "", False):
                topics.append(topic)
    return tuple(sorted(topics))


STEADY_TOPICS = _steady_topics()
"""Topics of the events every move of which leaves the saga in the state it was in.

So the state such an event names is also the saga's state before it (from the machine).
"""


@dataclass(frozen=True)
class SagaStatus:
    """Where one saga stands, as of its latest event."""

    saga_id: UUID
    name: str
    definition_version: int
    key: str | None
    status: str
    step: str | None
    """The step named by the saga's latest event that names one (the one in flight, if any)."""
    version: int
    started_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, saga: Saga) -> SagaStatus:
        """The row for `saga` as it is now (one per save: built as `__init__` would, faster)."""
        row = object.__new__(cls)
        object.__setattr__(
            row,
            "__dict__",
            {
                "saga_id": saga.id,
                "name": saga.name,
                "definition_version": saga.definition_version,
                "key": saga.key,
                "status": saga.status,
                "step": saga.step,
                "version": saga.version,
                "started_at": saga.created_on,
                "updated_at": saga.modified_on,
            },
        )
        return row


def saga_log_fields(saga: Saga) -> dict[str, Any]:
    """The `extra` fields of a log record about `saga` as it stands, at its latest step.

    The attempt is that step's latest, of its compensation while the saga compensates.
    """
    step = saga.step
    attempts = saga.compensation_attempts if saga.status == machine.COMPENSATING else saga.attempts
    attempt = attempts.get(step) if step is not None else None
    return {"saga_id": str(saga.id), "saga_name": saga.name, "step": step, "attempt": attempt}


@dataclass(frozen=True)
class StatusQuery:
    """Which status rows to read: those matching every filter given, oldest first.

    A page holds up to `limit` rows after the row of saga `after` (the last one of the
    previous page). Naive datetimes are taken as UTC, as eventsourcing's timestamps are.
    """

    statuses: tuple[str, ...] = ()
    name: str | None = None
    key: str | None = None
    started_after: datetime | None = None
    started_before: datetime | None = None
    after: UUID | None = None
    limit: int = 100

    def __post_init__(self) -> None:
        for name in ("started_after", "started_before"):
            moment = getattr(self, name)
            if moment is not None:  # naive: UTC; aware: the same instant in UTC
                utc = (
                    moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
                )
                object.__setattr__(self, name, utc)

    @property
    def in_flight_only(self) -> bool:
        """Only sagas in flight can match: a store may start from their ids alone."""
        return bool(self.statuses) and set(self.statuses) <= set(IN_FLIGHT_STATES)

    def matches(self, row: SagaStatus) -> bool:
        """Whether `row` passes every filter (the page bounds, `after` and `limit`, aside)."""
        return (
            (not self.statuses or row.status in self.statuses)
            and (self.name is None or row.name == self.name)
            and (self.key is None or row.key == self.key)
            and (self.started_after is None or row.started_at > self.started_after)
            and (self.started_before is None or row.started_at < self.started_before)
        )


@runtime_checkable
class StatusRecorder(Protocol):
    """What a recorder offers on top of eventsourcing's: the status rows.

    The rows are written in the same transaction as the events: either derived by the
    database from the saga events inserted (SQLite: statements the recorder runs for the
    events that start or end a saga; PostgreSQL: the insert function; both read each
    event's JSON), or, when the recorder's `wants_status_rows`
    is true (POPO always; SQLite and PostgreSQL when the states are ciphered or
    compressed), computed by the application and passed as
    `insert_events(stored_events, saga_statuses=[...])`.
    """

    wants_status_rows: bool

    def select_statuses(self, query: StatusQuery) -> list[SagaStatus]:
        """The page of rows `query` asks for, ordered by (started_at, saga_id)."""

    def select_positions(self, saga_id: UUID) -> dict[int, int]:
        """Each of the saga's versions, with its position in the notification log."""

    def count_statuses(self) -> dict[tuple[str, str], int]:
        """Number of sagas per (definition name, status)."""

    def write_statuses(self, rows: Sequence[SagaStatus]) -> None:
        """Upsert rows on their own (rebuilding the projection)."""

    def delete_statuses(self) -> None:
        """Remove every row (before a rebuild)."""


def where(
    query: StatusQuery,
    placeholder: str,
    *,
    saga_id: Callable[[UUID], Any] = str,
    when: Callable[[datetime], Any] = lambda t: t,
) -> tuple[str, list[Any]]:
    """The filter and order (`WHERE ... ORDER BY ...`) of `query` in SQL.

    `placeholder` is the driver's (`?` or `%s`); `saga_id` and `when` convert values to
    the column types. The status table is aliased `s`; `{table}` stands for its name.
    """
    clauses: list[str] = []
    params: list[Any] = []
    if query.statuses:
        clauses.append(f"s.status IN ({', '.join([placeholder] * len(query.statuses))})")
        params += query.statuses
    for column, value in (("s.name", query.name), ("s.key", query.key)):
        if value is not None:
            clauses.append(f"{column} = {placeholder}")
            params.append(value)
    if query.started_after is not None:
        clauses.append(f"s.started_at > {placeholder}")
        params.append(when(query.started_after))
    if query.started_before is not None:
        clauses.append(f"s.started_at < {placeholder}")
        params.append(when(query.started_before))
    if query.after is not None:
        clauses.append(
            "(s.started_at, s.saga_id) > "
            f"(SELECT p.started_at, p.saga_id FROM {{table}} p WHERE p.saga_id = {placeholder})"
        )
        params.append(saga_id(query.after))
    filters = " WHERE " + " AND ".join(clauses) if clauses else ""
    return filters + " ORDER BY s.started_at, s.saga_id", params
