"""SQLite: the same table and rowid notification log, with less Python per save.

On an SQLite file a commit (WAL, synchronous=FULL) costs ~0.15 ms here, and the
Python around it decides how close a saga gets to that floor. eventsourcing's
`SQLiteApplicationRecorder` borrows a pool connection under the pool's locks for
every save and runs BEGIN, one INSERT per event and COMMIT. `SQLiteWriterRecorder`
borrows one connection once and keeps it for writing, under a lock of its own
(SQLite lets one writer write at a time anyway), and writes a save's events with
ONE autocommit statement, `INSERT ... VALUES (...), (...) RETURNING rowid`: one
implicit transaction, all rows or none, one durable commit. Larger saves (more
than `MAX_ROWS_PER_STATEMENT` events) and saves carrying a tracking record use
eventsourcing's own insert code inside BEGIN/COMMIT on the same connection.

The table, the rowid notification log, durability and errors are eventsourcing's;
readers keep using the pool, which still owns the writer connection and closes it
with the application. In-memory databases, whose readers and writers the pool
must keep apart, take the stock path. `SagaApplication` uses this recorder on
SQLite unless `APPLICATION_RECORDER_TOPIC` names another; set it to
`eventsourcing.sqlite:SQLiteApplicationRecorder` for the stock one.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.persistence import (
    DatabaseError,
    DataError,
    IntegrityError,
    InterfaceError,
    InternalError,
    NotSupportedError,
    OperationalError,
    PersistenceError,
    ProgrammingError,
    StoredEvent,
)
from eventsourcing.sqlite import (
    SQLiteApplicationRecorder,
    SQLiteConnection,
    SQLiteCursor,
    SQLiteDatastore,
)

from saga_es.status import SagaStatus, where

MAX_ROWS_PER_STATEMENT = 500
"""Saves of up to this many events are one INSERT statement (4 bound values a row)."""

WRITER_RECORDER_TOPIC = "saga_es.sqlite:SQLiteWriterRecorder"
"""What `SagaApplication` sets `APPLICATION_RECORDER_TOPIC` to on SQLite by default."""

STOCK_RECORDER_TOPIC = "eventsourcing.sqlite:SQLiteApplicationRecorder"
"""Set `APPLICATION_RECORDER_TOPIC` to this for eventsourcing's own recorder."""

# The order matters: subclasses before their bases, as eventsourcing's own translation.
_ERRORS: tuple[tuple[type[sqlite3.Error], type[PersistenceError]], ...] = (
    (sqlite3.InterfaceError, InterfaceError),
    (sqlite3.DataError, DataError),
    (sqlite3.OperationalError, OperationalError),
    (sqlite3.IntegrityError, IntegrityError),
    (sqlite3.InternalError, InternalError),
    (sqlite3.ProgrammingError, ProgrammingError),
    (sqlite3.NotSupportedError, NotSupportedError),
    (sqlite3.DatabaseError, DatabaseError),
)


def _translate(error: sqlite3.Error) -> PersistenceError:
    """The eventsourcing error for a driver error, as `SQLiteTransaction` makes it."""
    for driver_error, persistence_error in _ERRORS:
        if isinstance(error, driver_error):
            return persistence_error(error)
    return PersistenceError(error)


class SQLiteWriterRecorder(SQLiteApplicationRecorder):
    """Writes each save as one statement, through a connection borrowed from the pool once."""

    def __init__(
        self,
        datastore: SQLiteDatastore,
        events_table_name: str = "stored_events",
    ) -> None:
        super().__init__(datastore, events_table_name)
        self._writer: SQLiteConnection | None = None
        self._writer_lock = threading.Lock()
        self._statements: dict[int, str] = {}

    wants_status_rows = False
    """The status rows are derived from each saga event by a trigger, in the same transaction."""

    @property
    def status_table_name(self) -> str:
        """The status projection's table: one row per saga."""
        return f"{self.events_table_name}_status"

    def construct_create_table_statements(self) -> list[str]:
        """Eventsourcing's table, plus the status projection and the trigger that keeps it."""
        table, status = self.events_table_name, self.status_table_name
        state = "CAST(NEW.state AS TEXT)"
        at = f"json_extract({state}, '$.timestamp._data_')"
        return [
            *super().construct_create_table_statements(),
            f"CREATE TABLE IF NOT EXISTS {status} ("
            "saga_id TEXT PRIMARY KEY, name TEXT, definition_version INTEGER, key TEXT, "
            "status TEXT, step TEXT, version INTEGER, started_at TEXT, updated_at TEXT)",
            f"CREATE INDEX IF NOT EXISTS {status}_by_status ON {status} "
            "(status, started_at, saga_id)",
            f"CREATE INDEX IF NOT EXISTS {status}_by_name ON {status} (name, started_at, saga_id)",
            f"CREATE INDEX IF NOT EXISTS {status}_by_key ON {status} (key)",
            f"CREATE INDEX IF NOT EXISTS {status}_by_start ON {status} (started_at, saga_id)",
            f"CREATE TRIGGER IF NOT EXISTS {status}_from_events AFTER INSERT ON {table} "
            f"WHEN NEW.topic LIKE 'saga_es:%' AND json_valid({state}) BEGIN "
            f"INSERT INTO {status} (saga_id, name, definition_version, key, status, step, "
            "version, started_at, updated_at) VALUES (NEW.originator_id, "
            f"json_extract({state}, '$.name'), json_extract({state}, '$.definition_version'), "
            f"json_extract({state}, '$.key'), json_extract({state}, '$.to_state'), "
            f"json_extract({state}, '$.step'), NEW.originator_version, {at}, {at}) "
            "ON CONFLICT (saga_id) DO UPDATE SET status = excluded.status, "
            f"step = COALESCE(excluded.step, {status}.step), version = excluded.version, "
            f"updated_at = excluded.updated_at WHERE excluded.version > {status}.version; "
            "END",
        ]

    def select_statuses(
        self,
        *,
        statuses: Sequence[str] = (),
        name: str | None = None,
        key: str | None = None,
        started_after: datetime | None = None,
        started_before: datetime | None = None,
        after: UUID | None = None,
        limit: int = 100,
    ) -> list[SagaStatus]:
        """Rows matching every filter, ordered by (started_at, saga_id)."""
        filters, params = where(
            "?",
            statuses=statuses,
            name=name,
            key=key,
            started_after=started_after,
            started_before=started_before,
            after=after,
            saga_id=lambda saga_id: saga_id.hex,
            when=lambda moment: moment.isoformat(),
        )
        statement = (
            f"SELECT * FROM {self.status_table_name} s"
            + filters.format(table=self.status_table_name)
            + " LIMIT ?"
        )
        with self.datastore.transaction(commit=False) as c:
            c.execute(statement, [*params, limit])
            return [_status(row) for row in c.fetchall()]

    def count_statuses(self) -> dict[tuple[str, str], int]:
        """Number of sagas per (definition name, status)."""
        statement = f"SELECT name, status, COUNT(*) FROM {self.status_table_name} GROUP BY 1, 2"
        with self.datastore.transaction(commit=False) as c:
            c.execute(statement)
            return {(row[0], row[1]): row[2] for row in c.fetchall()}

    def write_statuses(self, rows: Sequence[SagaStatus]) -> None:
        """Upsert rows on their own."""
        statement = f"INSERT OR REPLACE INTO {self.status_table_name} VALUES (?,?,?,?,?,?,?,?,?)"
        with self.datastore.transaction(commit=True) as c:
            for row in rows:
                c.execute(
                    statement,
                    (
                        row.saga_id.hex,
                        row.name,
                        row.definition_version,
                        row.key,
                        row.status,
                        row.step,
                        row.version,
                        row.started_at.isoformat(),
                        row.updated_at.isoformat(),
                    ),
                )

    def delete_statuses(self) -> None:
        """Remove every row."""
        with self.datastore.transaction(commit=True) as c:
            c.execute(f"DELETE FROM {self.status_table_name}")

    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        """Insert the events in one transaction on the writer connection; their rowids."""
        pool = self.datastore.pool
        if pool.is_sqlite_memory_mode:
            return super().insert_events(stored_events, **kwargs)
        one_statement = (
            0 < len(stored_events) <= MAX_ROWS_PER_STATEMENT and kwargs.get("tracking") is None
        )
        with self._writer_lock:
            writer = self._writer
            if writer is None or writer.closed:
                writer = self._writer = pool.get_connection()
            cursor = writer.cursor()
            ids: Sequence[int] | None
            try:
                if one_statement:
                    ids = self._insert_in_one_statement(cursor, stored_events)
                else:
                    cursor.execute("BEGIN")
                    ids = self._insert_events(cursor, stored_events, **kwargs)
                    writer.commit()
            except sqlite3.Error as e:
                writer.rollback()
                raise _translate(e) from e
            except BaseException:
                writer.rollback()
                raise
            finally:
                cursor.sqlite_cursor.close()
            return ids

    def _insert_in_one_statement(
        self, cursor: SQLiteCursor, stored_events: Sequence[StoredEvent]
    ) -> list[int]:
        count = len(stored_events)
        statement = self._statements.get(count)
        if statement is None:
            rows = ",".join(["(?,?,?,?)"] * count)
            statement = f"INSERT INTO {self.events_table_name} VALUES {rows} RETURNING rowid"
            self._statements[count] = statement
        params: list[Any] = []
        for s in stored_events:
            originator_id = s.originator_id
            params += (
                originator_id.hex if isinstance(originator_id, UUID) else originator_id,
                s.originator_version,
                s.topic,
                s.state,
            )
        cursor.execute(statement, params)
        # One statement's rows take consecutive rowids in VALUES order; RETURNING
        # may list them in any order.
        return sorted(row[0] for row in cursor.fetchall())


def _status(row: Any) -> SagaStatus:
    return SagaStatus(
        saga_id=UUID(row[0]),
        name=row[1],
        definition_version=row[2],
        key=row[3],
        status=row[4],
        step=row[5],
        version=row[6],
        started_at=datetime.fromisoformat(row[7]),
        updated_at=datetime.fromisoformat(row[8]),
    )
