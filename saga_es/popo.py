"""In memory: eventsourcing's POPO recorder, plus the saga status projection.

The status rows live in a dict updated under the recorder's own lock, in the
same call that appends the events, so a reader never sees one without the other.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.persistence import IntegrityError, StoredEvent
from eventsourcing.popo import POPOApplicationRecorder, POPOProcessRecorder

from saga_es.status import SagaStatus, StatusQuery

RECORDER_TOPIC = "saga_es.popo:POPOSagaRecorder"


class POPOSagaRecorder(POPOApplicationRecorder):
    """POPO events and notification log, with one status row per saga."""

    wants_status_rows = True

    def __init__(self) -> None:
        super().__init__()
        self._statuses: dict[UUID, SagaStatus] = {}
        self._last_positions: tuple[object, dict[int, int]] = (None, {})
        """The last saga id saved (the object) and its index: a saga saves again and again."""

    def _assert_uniqueness(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> None:
        """The checks of eventsourcing; one saga's id is made a str once, not twice per event."""
        positions = self._positions_of_one(stored_events)
        if positions is None:
            super()._assert_uniqueness(stored_events, **kwargs)
            return
        versions = set()
        for s in stored_events:
            if s.originator_version in positions:
                raise IntegrityError(f"Stored event already recorded: {s}")
            versions.add(s.originator_version)
        if len(versions) < len(stored_events):
            raise IntegrityError(f"Stored events are not unique: {stored_events}")

    def _update_table(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        positions = self._positions_of_one(stored_events)
        if positions is None:
            ids = super()._update_table(stored_events, **kwargs)
        else:
            table, ids = self._stored_events, []
            for s in stored_events:
                table.append(s)
                positions[s.originator_version] = len(table) - 1
                ids.append(len(table))
        self._write_status_rows(kwargs)
        return ids

    def _positions_of_one(self, stored_events: Sequence[StoredEvent]) -> dict[int, int] | None:
        """The index of the one saga all `stored_events` belong to (None if not just one)."""
        if not stored_events:
            return None
        originator_id = stored_events[0].originator_id
        for s in stored_events:
            if s.originator_id is not originator_id:
                return None
        last_id, positions = self._last_positions
        if originator_id is not last_id:
            positions = self._stored_events_index[str(originator_id)]
            self._last_positions = (originator_id, positions)
        return positions

    def _write_status_rows(self, kwargs: dict[str, Any]) -> None:
        for row in kwargs.get("saga_statuses", ()):
            self._statuses[row.saga_id] = row

    def select_statuses(self, query: StatusQuery) -> list[SagaStatus]:
        """The page of rows `query` asks for, ordered by (started_at, saga_id)."""
        with self._database_lock:
            rows = sorted(self._statuses.values(), key=_order)
            start = self._statuses.get(query.after) if query.after is not None else None
        if query.after is not None:  # an unknown cursor ends the listing, as in SQL
            rows = [] if start is None else [row for row in rows if _order(row) > _order(start)]
        return [row for row in rows if query.matches(row)][: query.limit]

    def select_positions(self, saga_id: UUID) -> dict[int, int]:
        """Each of the saga's versions, with its position in the notification log."""
        with self._database_lock:
            return {
                event.originator_version: i
                for i, event in enumerate(self._stored_events, 1)
                if event.originator_id == saga_id
            }

    def count_statuses(self) -> dict[tuple[str, str], int]:
        """Number of sagas per (definition name, status)."""
        with self._database_lock:
            return dict(Counter((row.name, row.status) for row in self._statuses.values()))

    def write_statuses(self, rows: Sequence[SagaStatus]) -> None:
        """Upsert rows on their own."""
        with self._database_lock:
            for row in rows:
                self._statuses[row.saga_id] = row

    def delete_statuses(self) -> None:
        """Remove every row."""
        with self._database_lock:
            self._statuses.clear()


def _order(row: SagaStatus) -> tuple[datetime, str]:
    return row.started_at, str(row.saga_id)


class POPOSagaProcessRecorder(POPOSagaRecorder, POPOProcessRecorder):
    """`POPOSagaRecorder` with eventsourcing's tracking: a `SagaProcess`'s recorder in memory.

    A save carrying a tracking record appends the events, the status rows and the tracking
    position under one lock, or none of them (a position already recorded is refused).
    Events go through eventsourcing's own checks and table, along with the tracking.
    """

    _assert_uniqueness = POPOProcessRecorder._assert_uniqueness

    def _update_table(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        ids = POPOProcessRecorder._update_table(self, stored_events, **kwargs)
        self._write_status_rows(kwargs)
        return ids
