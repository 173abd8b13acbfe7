"""SQLite: the same table and rowid notification log, with less Python per save.

On an SQLite file a commit (WAL, synchronous=FULL) costs ~0.15 ms here, and the
Python around it decides how close a saga gets to that floor. eventsourcing's
`SQLiteApplicationRecorder` borrows a pool connection under the pool's locks for
every save and runs BEGIN, one INSERT per event and COMMIT. `SQLiteWriterRecorder`
opens one connection for writing and keeps it, under a lock of its own (SQLite
lets one writer write at a time anyway), and writes a step's boundary with ONE
autocommit statement, `INSERT ... VALUES (...), (...)`: one implicit transaction,
all rows or none, one durable commit. A save that starts or ends a saga is BEGIN,
that statement, its status rows, COMMIT; so is a save whose states are ciphered or
compressed, with the rows the application passes. Larger saves (more than
`MAX_ROWS_PER_STATEMENT` events) and saves carrying a tracking record use
eventsourcing's own insert code inside BEGIN/COMMIT on the same connection.

The table, the rowid notification log, durability and errors are eventsourcing's;
readers keep using the pool; `close()` closes the writer's connection (the
application's `close()` calls it). In-memory databases, whose readers and writers the pool
must keep apart, take the stock path. `SagaApplication` uses this recorder on
SQLite unless `APPLICATION_RECORDER_TOPIC` names another; set it to
`eventsourcing.sqlite:SQLiteApplicationRecorder` for the stock one.
"""

from __future__ import annotations

import functools
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.persistence import (
    ConnectionPoolClosedError,
    OperationalError,
    ProcessRecorder,
    StoredEvent,
    Tracking,
)
from eventsourcing.sqlite import (
    SQLITE3_DEFAULT_LOCK_TIMEOUT,
    SQLiteApplicationRecorder,
    SQLiteConnection,
    SQLiteCursor,
    SQLiteDatastore,
    SQLiteTrackingRecorder,
)

from saga_es.errors import persistence_error
from saga_es.status import ENDING_EVENTS as _ENDING_EVENTS
from saga_es.status import IN_FLIGHT_STATES, SagaStatus, StatusQuery, where

MAX_ROWS_PER_STATEMENT = 500
"""Saves of up to this many events are one INSERT statement (4 bound values a row)."""

WRITER_RECORDER_TOPIC = "saga_es.sqlite:SQLiteWriterRecorder"
"""What `SagaApplication` sets `APPLICATION_RECORDER_TOPIC` to on SQLite by default."""

STOCK_RECORDER_TOPIC = "eventsourcing.sqlite:SQLiteApplicationRecorder"
"""Set `APPLICATION_RECORDER_TOPIC` to this for eventsourcing's own recorder."""


class SQLiteWriterRecorder(SQLiteApplicationRecorder):
    """Writes a step's boundary as one statement, through a connection of its own."""

    def __init__(
        self,
        datastore: SQLiteDatastore,
        events_table_name: str = "stored_events",
    ) -> None:
        super().__init__(datastore, events_table_name)
        self._writer: SQLiteConnection | None = None
        self._own_writer = False  # True once `_open_writer` has opened `_writer`
        self._writer_lock = threading.Lock()
        self._statements: dict[int, str] = {}

    wants_status_rows = False
    """The status rows are derived from the saga events saved, in the same transaction.

    They are read from JSON only: when the mapper ciphers or compresses the states,
    `SagaApplication` sets this to True on the recorder and passes the rows itself
    (`insert_events(..., saga_statuses=[...])`), written in the same transaction.
    """

    @property
    def status_table_name(self) -> str:
        """The status projection's table: one row per saga."""
        return f"{self.events_table_name}_status"

    def construct_create_table_statements(self) -> list[str]:
        """Eventsourcing's table, plus the status projection's tables and view.

        Every page a commit dirties is written to the WAL and synced, so the projection
        touches nothing between a saga's first and last commit: a row per saga (WITHOUT
        ROWID, no secondary index) is written when the saga starts and when it ends, and
        the ids of the sagas in flight sit in a table of their own. The view `<status>_live`
        reads an in-flight saga's status, step, version and time off its latest event (by
        the primary key), so a reader never sees a stale row, and listing the sagas in
        flight costs time proportional to them. Earlier releases kept the rows with
        triggers, which cost every insert; they are dropped (see `_projections`).
        """
        table, status, flight = self.events_table_name, self.status_table_name, self.flight
        # The latest event that says which state it leads to (a malformed record does not).
        latest = (
            f"SELECT CAST(e.state AS TEXT) FROM {table} e WHERE e.originator_id = s.saga_id "
            "AND substr(e.state, 1, 1) = X'7B' AND json_valid(CAST(e.state AS TEXT)) "
            "AND json_extract(CAST(e.state AS TEXT), '$.to_state') IS NOT NULL "
            "ORDER BY e.originator_version DESC LIMIT 1"
        )
        # The step of the latest event that names one (a cancel request, say, names none).
        latest_step = (
            f"SELECT json_extract(CAST(e.state AS TEXT), '$.step') FROM {table} e "
            "WHERE e.originator_id = s.saga_id AND substr(e.state, 1, 1) = X'7B' "
            "AND json_valid(CAST(e.state AS TEXT)) "
            "AND json_extract(CAST(e.state AS TEXT), '$.step') IS NOT NULL "
            "ORDER BY e.originator_version DESC LIMIT 1"
        )
        return [
            *super().construct_create_table_statements(),
            f"CREATE TABLE IF NOT EXISTS {status} ("
            "saga_id TEXT PRIMARY KEY, name TEXT, definition_version INTEGER, key TEXT, "
            "status TEXT, step TEXT, version INTEGER, started_at TEXT, updated_at TEXT) "
            "WITHOUT ROWID",
            f"CREATE TABLE IF NOT EXISTS {flight} (saga_id TEXT PRIMARY KEY) WITHOUT ROWID",
            *(
                f"DROP TRIGGER IF EXISTS {status}_{name}"
                for name in ("from_start", "ends", "resumes")
            ),
            f"CREATE VIEW IF NOT EXISTS {status}_live AS "
            "SELECT saga_id, name, definition_version, key, "
            "COALESCE(json_extract(j, '$.to_state'), status) AS status, "
            f"CASE WHEN j IS NULL THEN step ELSE {self._LIVE_STEP} END AS step, "
            "COALESCE(v, version) AS version, started_at, "
            "COALESCE(json_extract(j, '$.timestamp._data_'), updated_at) AS updated_at "
            "FROM (SELECT s.*, "
            f"CASE WHEN f.saga_id IS NOT NULL THEN ({latest}) END AS j, "
            f"CASE WHEN f.saga_id IS NOT NULL THEN ({latest_step}) END AS js, "
            f"CASE WHEN f.saga_id IS NOT NULL THEN (SELECT MAX(m.originator_version) "
            f"FROM {table} m WHERE m.originator_id = s.saga_id) END AS v "
            f"FROM {status} s LEFT JOIN {flight} f ON f.saga_id = s.saga_id)",
        ]

    _LIVE_STEP = "js"
    """How the `_live` view reads an in-flight saga's step; an older view is replaced."""

    def _create_table(self, c: SQLiteCursor) -> None:
        # CREATE VIEW IF NOT EXISTS keeps a view from an earlier release: drop it first, in
        # the same transaction, so no reader ever finds the view missing.
        live = f"{self.status_table_name}_live"
        c.execute("SELECT sql FROM sqlite_master WHERE type = 'view' AND name = ?", [live])
        row = c.fetchone()
        if row is not None and f"ELSE {self._LIVE_STEP} END AS step" not in row[0]:
            c.execute(f"DROP VIEW {live}")
        super()._create_table(c)

    @property
    def flight(self) -> str:
        """The table of the ids of the sagas in flight."""
        return f"{self.status_table_name}_in_flight"

    @functools.cached_property
    def _projections(self) -> dict[str, tuple[str, ...]]:
        """Per topic that moves a saga in or out of flight, what keeps its status rows.

        Run with the event's values (`:id`, `:version`, `:state`) in the save's own
        transaction, after its INSERT, and only for those topics: a step's boundary writes
        its events alone. (Triggers, as earlier releases had, cost every row inserted even
        when they did nothing.) Only a JSON state is read: a ciphered or compressed one
        (whose first byte may be '{' by chance) is left to the rows the application passes
        (`saga_statuses`).
        """
        table, status, flight = self.events_table_name, self.status_table_name, self.flight
        state = "CAST(:state AS TEXT)"
        at = f"json_extract({state}, '$.timestamp._data_')"
        json = f"substr(:state, 1, 1) = X'7B' AND json_valid({state})"
        started = f"{json} AND json_extract({state}, '$.to_state') IS NOT NULL AND {at} IS NOT NULL"
        # The step of an ending event that names none is its predecessor's.
        previous_step = (
            f"(SELECT json_extract(CAST(p.state AS TEXT), '$.step') FROM {table} p "
            "WHERE p.originator_id = :id AND p.originator_version = :version - 1 "
            "AND substr(p.state, 1, 1) = X'7B')"
        )
        ends = (
            f"UPDATE {status} SET status = COALESCE(json_extract({state}, '$.to_state'), "
            f"status), step = COALESCE(json_extract({state}, '$.step'), {previous_step}, step), "
            f"version = :version, updated_at = COALESCE({at}, updated_at) "
            f"WHERE saga_id = :id AND version < :version AND {json}",
            f"DELETE FROM {flight} WHERE saga_id = :id AND {json}",
        )
        return {
            "saga_es:SagaStarted": (
                f"INSERT OR REPLACE INTO {status} SELECT :id, json_extract({state}, '$.name'), "
                f"json_extract({state}, '$.definition_version'), json_extract({state}, '$.key'), "
                f"json_extract({state}, '$.to_state'), NULL, :version, {at}, {at} "
                f"WHERE {started}",
                f"INSERT OR IGNORE INTO {flight} SELECT :id WHERE {started}",
            ),
            # A person resolving a stuck saga puts it back in flight.
            "saga_es:SagaResolved": (f"INSERT OR IGNORE INTO {flight} SELECT :id WHERE {json}",),
            **{f"saga_es:{event}": ends for event in _ENDING_EVENTS},
        }

    def _project(
        self, c: sqlite3.Cursor | sqlite3.Connection, events: Sequence[StoredEvent]
    ) -> None:
        """Keep the status rows for those of `events` that move a saga in or out of flight."""
        projections = self._projections
        for s in events:
            statements = projections.get(s.topic)
            if statements:
                originator_id = s.originator_id
                values = {
                    "id": originator_id.hex if isinstance(originator_id, UUID) else originator_id,
                    "version": s.originator_version,
                    "state": s.state,
                }
                for statement in statements:
                    c.execute(statement, values)

    def select_statuses(self, query: StatusQuery) -> list[SagaStatus]:
        """The page of rows `query` asks for, ordered by (started_at, saga_id)."""
        if set(query.statuses) == set(IN_FLIGHT_STATES):
            return self._select_in_flight(query)
        filters, params = where(
            query,
            "?",
            saga_id=lambda saga_id: saga_id.hex,
            when=lambda moment: moment.isoformat(),
        )
        if query.in_flight_only:
            # Only sagas in flight can match: start from their ids, not from every saga.
            only = f" AND s.saga_id IN (SELECT saga_id FROM {self.flight})"
            filters = filters.replace(" ORDER BY", only + " ORDER BY", 1)
        statement = (
            f"SELECT s.* FROM {self.status_table_name}_live s"
            + filters.format(table=self.status_table_name)
            + " LIMIT ?"
        )
        with self.datastore.transaction(commit=False) as c:
            c.execute(statement, [*params, query.limit])
            return [_status(row) for row in c.fetchall()]

    def _select_in_flight(self, query: StatusQuery) -> list[SagaStatus]:
        """Every saga in flight matching the other filters: recovery's and workers' listing.

        Being in the in-flight table says the status; the other filters (name, key, start,
        cursor) never change after a saga starts. So the page is chosen on the plain
        tables, and only its rows are read off their latest events.
        """
        filters, params = where(
            replace(query, statuses=()),
            "?",
            saga_id=lambda saga_id: saga_id.hex,
            when=lambda moment: moment.isoformat(),
        )
        status, live = self.status_table_name, f"{self.status_table_name}_live"
        page = (
            f"SELECT s.saga_id FROM {status} s JOIN {self.flight} f ON f.saga_id = s.saga_id"
            + filters.format(table=status)
            + " LIMIT ?"
        )
        statement = (
            f"SELECT s.* FROM {live} s WHERE s.saga_id IN ({page}) ORDER BY s.started_at, s.saga_id"
        )
        with self.datastore.transaction(commit=False) as c:
            c.execute(statement, [*params, query.limit])
            return [_status(row) for row in c.fetchall()]

    def select_positions(self, saga_id: UUID) -> dict[int, int]:
        """Each of the saga's versions, with its position in the notification log."""
        statement = (
            f"SELECT originator_version, rowid FROM {self.events_table_name} WHERE originator_id=?"
        )
        with self.datastore.transaction(commit=False) as c:
            c.execute(statement, [saga_id.hex])
            return {row[0]: row[1] for row in c.fetchall()}

    def count_statuses(self) -> dict[tuple[str, str], int]:
        """Number of sagas per (definition name, status)."""
        statement = (
            f"SELECT name, status, COUNT(*) FROM {self.status_table_name}_live GROUP BY 1, 2"
        )
        with self.datastore.transaction(commit=False) as c:
            c.execute(statement)
            return {(row[0], row[1]): row[2] for row in c.fetchall()}

    def write_statuses(self, rows: Sequence[SagaStatus]) -> None:
        """Upsert rows on their own."""
        with self.datastore.transaction(commit=True) as c:
            self._upsert_statuses(c.sqlite_cursor, rows)

    def _upsert_statuses(self, c: sqlite3.Cursor, rows: Sequence[SagaStatus]) -> None:
        """Write rows (and the in-flight ids) in the caller's transaction; a saga's last wins."""
        rows = list({row.saga_id: row for row in rows}.values())
        flight = [(row.saga_id.hex,) for row in rows if row.status in IN_FLIGHT_STATES]
        ended = [(row.saga_id.hex,) for row in rows if row.status not in IN_FLIGHT_STATES]
        if flight:
            c.executemany(f"INSERT OR IGNORE INTO {self.flight} VALUES (?)", flight)
        if ended:
            c.executemany(f"DELETE FROM {self.flight} WHERE saga_id = ?", ended)
        c.executemany(
            f"INSERT OR REPLACE INTO {self.status_table_name} VALUES (?,?,?,?,?,?,?,?,?)",
            [
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
                )
                for row in rows
            ],
        )

    def delete_statuses(self) -> None:
        """Remove every row."""
        with self.datastore.transaction(commit=True) as c:
            c.execute(f"DELETE FROM {self.status_table_name}")
            c.execute(f"DELETE FROM {self.flight}")

    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        """Insert the events in one transaction on the writer connection; their rowids.

        `saga_statuses=[...]` (given when the states are ciphered or compressed, so SQL
        cannot read them) are upserted in the same transaction.
        """
        pool = self.datastore.pool
        if pool.is_sqlite_memory_mode:
            return super().insert_events(stored_events, **kwargs)
        one_statement = (
            0 < len(stored_events) <= MAX_ROWS_PER_STATEMENT and kwargs.get("tracking") is None
        )
        statuses: Sequence[SagaStatus] = kwargs.get("saga_statuses") or ()
        with self._writer_lock:
            writer = self._writer
            if writer is None or writer.closed:
                if pool.closed:  # `close()` ran: reopening would leak a connection nobody closes
                    raise ConnectionPoolClosedError("the application's SQLite store was closed")
                writer = self._writer = self._open_writer()
            if one_statement:  # the common case, straight on the driver's connection
                try:
                    projections = self._projections
                    if statuses or any(s.topic in projections for s in stored_events):
                        # The events' statement and the status rows: one transaction.
                        conn = writer._sqlite_conn
                        conn.execute("BEGIN")
                        rowids = self._insert_in_one_statement(writer, stored_events)
                        self._project(conn, stored_events)
                        if statuses:
                            self._upsert_statuses(conn.cursor(), statuses)
                        conn.commit()
                        return rowids
                    return self._insert_in_one_statement(writer, stored_events)
                except sqlite3.Error as e:
                    writer.rollback()
                    raise persistence_error(e) from e
                except BaseException:
                    writer.rollback()
                    raise
            cursor = writer.cursor()
            ids: Sequence[int] | None
            try:
                cursor.execute("BEGIN")
                ids = self._insert_events(cursor, stored_events, **kwargs)
                writer.commit()
            except sqlite3.Error as e:
                writer.rollback()
                raise persistence_error(e) from e
            except BaseException:
                writer.rollback()
                raise
            finally:
                cursor.sqlite_cursor.close()
            return ids

    def _open_writer(self) -> SQLiteConnection:
        """The connection saves go through: one of its own, closed by `close()`.

        The pool's connections cache one prepared statement. A save that starts or ends a
        saga runs several (the events' INSERT, then its status rows), so each would be
        prepared again on every such save: the writer has a statement cache instead.
        """
        pool = self.datastore.pool
        conn = sqlite3.connect(
            pool.db_name,
            uri=True,
            check_same_thread=False,
            isolation_level=None,  # autocommit: transactions are explicit
            cached_statements=32,
            timeout=pool.lock_timeout or SQLITE3_DEFAULT_LOCK_TIMEOUT,
        )
        conn.execute("PRAGMA journal_mode=WAL")  # as the pool's (it is the file's already)
        self._own_writer = True
        return SQLiteConnection(conn, max_age=None)

    def close(self) -> None:
        """Close the writer's connection, if it opened one."""
        with self._writer_lock:
            writer, self._writer = self._writer, None
            if writer is not None and self._own_writer:
                writer.close()
            self._own_writer = False

    def _insert_events(
        self, c: SQLiteCursor, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        """The events as eventsourcing inserts them, their status rows, the rows given."""
        ids = super()._insert_events(c, stored_events, **kwargs)
        self._project(c.sqlite_cursor, stored_events)
        statuses: Sequence[SagaStatus] = kwargs.get("saga_statuses") or ()
        if statuses:
            self._upsert_statuses(c.sqlite_cursor, statuses)
        return ids

    def _insert_in_one_statement(
        self, writer: SQLiteConnection, stored_events: Sequence[StoredEvent]
    ) -> list[int]:
        count = len(stored_events)
        statement = self._statements.get(count)
        if statement is None:
            rows = ",".join(["(?,?,?,?)"] * count)
            statement = f"INSERT INTO {self.events_table_name} VALUES {rows}"
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
        cursor = writer._sqlite_conn.execute(statement, params)
        # One statement's rows take consecutive rowids in VALUES order (one writer at a
        # time), and `lastrowid` is its last row.
        last = cursor.lastrowid
        assert last is not None
        return list(range(last - count + 1, last + 1))


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


class SQLiteSagaProcessRecorder(SQLiteTrackingRecorder, SQLiteWriterRecorder, ProcessRecorder):
    """`SQLiteWriterRecorder` plus a tracking table: the recorder of a `SagaProcess`.

    A save that carries a tracking record inserts the events, their status rows and the
    tracking row in one transaction on the writer connection, so a domain
    event whose processing committed is never processed again. The tracking table is
    named by the caller (`SagaProcess` uses `<name>_tracking`) instead of eventsourcing's
    fixed `tracking`, so that process applications can share one SQLite file.
    """

    def __init__(
        self,
        datastore: SQLiteDatastore,
        *,
        events_table_name: str = "stored_events",
        tracking_table_name: str = "tracking",
    ) -> None:
        self.tracking_table_name = tracking_table_name  # the create statements name it
        super().__init__(datastore, events_table_name=events_table_name)
        table = tracking_table_name
        if self.datastore.single_row_tracking:
            self.insert_tracking_statement = (
                f"INSERT INTO {table} VALUES (:application_name, :notification_id) "
                "ON CONFLICT (application_name) DO UPDATE SET notification_id = :notification_id "
                f"WHERE {table}.notification_id < :notification_id RETURNING notification_id"
            )
        else:
            self.insert_tracking_statement = (
                f"INSERT INTO {table} VALUES (:application_name, :notification_id)"
            )
        self.select_max_tracking_id_statement = (
            f"SELECT MAX(notification_id) FROM {table} WHERE application_name=?"
        )

    def construct_create_table_statements(self) -> list[str]:
        """The events table with its status projection, and the tracking table."""
        # Past eventsourcing's tracking recorder, whose statement names the table `tracking`.
        statements = super(SQLiteTrackingRecorder, self).construct_create_table_statements()
        key = (
            "application_name"
            if self.datastore.single_row_tracking
            else "application_name, notification_id"
        )
        statements.append(
            f"CREATE TABLE IF NOT EXISTS {self.tracking_table_name} ("
            f"application_name TEXT, notification_id INTEGER, PRIMARY KEY ({key})) WITHOUT ROWID"
        )
        return statements

    def _create_table(self, c: SQLiteCursor) -> None:
        # eventsourcing's version migrates a multi-row table literally named `tracking`.
        if (
            self.datastore.single_row_tracking
            and self.tracking_table_exists
            and not self.tracking_migration_previous
        ):
            raise OperationalError(
                f"{self.tracking_table_name} holds multi-row tracking; set SINGLE_ROW_TRACKING=no"
            )
        super(SQLiteTrackingRecorder, self)._create_table(c)
        if self.datastore.single_row_tracking and not self.tracking_table_exists:
            self._insert_tracking(c, Tracking(self.table_migration_identifier, 1))
            self.tracking_migration_current = 1

    def _insert_events(
        self, c: SQLiteCursor, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        ids = super()._insert_events(c, stored_events, **kwargs)
        tracking: Tracking | None = kwargs.get("tracking")
        if tracking is not None:
            self._insert_tracking(c, tracking)
        return ids
