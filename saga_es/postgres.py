"""PostgreSQL: a save in one round trip, keeping eventsourcing's gapless notification log.

eventsourcing's `PostgresApplicationRecorder` saves in a pipelined transaction
(BEGIN; SET LOCAL lock_timeout; LOCK TABLE; NOTIFY; INSERT; sync; COMMIT). Its
table lock keeps the integer notification log gapless for followers reading by
id, but the shape of the exchange, not the lock, costs it about 60% of the
commit floor (see the shared notes, section 13).

`PostgresOneCallRecorder` does the same work inside a plpgsql function, called
as ONE statement on an autocommit connection: the call's own transaction takes
the table lock, notifies, inserts the rows and returns their notification ids,
and commits when the statement ends, so the lock is held until the commit is
flushed and ids still commit in order. The table, the composite type, the
notification log and `select_notifications` are eventsourcing's, unchanged; a
version conflict fails the whole statement (eventsourcing's `IntegrityError`,
nothing written).

It also keeps one pool connection for its saves (under a lock of its own: the
table lock lets one writer in at a time anyway) instead of borrowing one per
save, which costs more Python after each commit than the round trip it wraps.
`close()` gives it back; `SagaApplication.close()` calls it. With a pool of one
connection it borrows per save, so readers are never starved.

`SagaApplication` uses it on PostgreSQL unless `APPLICATION_RECORDER_TOPIC` names
another recorder; set it to `eventsourcing.postgres:PostgresApplicationRecorder`
for the stock one.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from datetime import UTC
from typing import Any
from uuid import UUID

import psycopg
from eventsourcing.persistence import (
    InterfaceError,
    OperationalError,
    StoredEvent,
)
from eventsourcing.postgres import (
    PostgresAggregateRecorder,
    PostgresApplicationRecorder,
    PostgresDatastore,
)
from eventsourcing.utils import Environment, retry
from psycopg import Connection
from psycopg.errors import DuplicateObject
from psycopg.rows import DictRow
from psycopg.sql import SQL, Identifier
from psycopg.types.composite import register_composite

from saga_es.errors import ConfigurationError, persistence_error
from saga_es.settings import configuration_error
from saga_es.status import SagaStatus, StatusQuery, where

ONE_CALL_RECORDER_TOPIC = "saga_es.postgres:PostgresOneCallRecorder"
"""What `SagaApplication` sets `APPLICATION_RECORDER_TOPIC` to on PostgreSQL by default."""

STOCK_RECORDER_TOPIC = "eventsourcing.postgres:PostgresApplicationRecorder"
"""Set `APPLICATION_RECORDER_TOPIC` to this for eventsourcing's own recorder."""


class _CreatesInTurn(PostgresAggregateRecorder):
    """Creates its tables under an advisory lock, so applications may start at once."""

    def create_table(self) -> None:
        """Create what is missing, in one transaction under an advisory lock.

        Creators take turns, so two CREATE TYPE, CREATE TABLE IF NOT EXISTS or CREATE
        OR REPLACE FUNCTION never collide ("tuple concurrently updated", notes 12).
        A type that exists already is skipped inside a savepoint, as eventsourcing does
        in a transaction of its own.
        """
        with self.datastore.transaction(commit=True) as curs:
            curs.execute(
                SQL("SELECT pg_advisory_xact_lock(hashtext({key}))").format(
                    key=f"saga_es:create_table:{self.datastore.schema}"
                )
            )
            for statement in self.sql_create_statements:
                if "CREATE TYPE" in statement.as_string():
                    with contextlib.suppress(DuplicateObject), curs.connection.transaction():
                        curs.execute(statement, prepare=False)
            self._create_table(curs)
        self.datastore.register_type_adapters()


class PostgresSnapshotRecorder(_CreatesInTurn):
    """eventsourcing's snapshot table, created in turn with the events table."""


class PostgresOneCallRecorder(_CreatesInTurn, PostgresApplicationRecorder):
    """Saves events with one autocommit call of a function that locks, notifies and inserts."""

    def __init__(
        self,
        datastore: PostgresDatastore,
        *,
        events_table_name: str = "stored_events",
    ) -> None:
        super().__init__(datastore, events_table_name=events_table_name)
        self.insert_function_name = f"{events_table_name}_insert"
        self.check_identifier_length(self.insert_function_name)
        schema = Identifier(self.datastore.schema)
        function = Identifier(self.insert_function_name)
        table = Identifier(self.events_table_name)
        self.sql_create_statements.append(
            SQL(
                "CREATE OR REPLACE FUNCTION {schema}.{function}"
                "(events {schema}.{event_type}[], timeout text) "
                "RETURNS SETOF bigint LANGUAGE plpgsql AS $BODY$ "
                "BEGIN "
                "PERFORM set_config('lock_timeout', timeout, true); "
                "LOCK TABLE {schema}.{table} IN EXCLUSIVE MODE; "
                "NOTIFY {channel}; "
                "RETURN QUERY "
                "INSERT INTO {schema}.{table} (originator_id, originator_version, topic, state) "
                "SELECT originator_id, originator_version, topic, state FROM unnest(events) "
                "RETURNING notification_id; "
                "PERFORM {schema}.{status_function}(events); "
                "END; "
                "$BODY$"
            ).format(
                schema=schema,
                function=function,
                event_type=Identifier(self.stored_event_type_name),
                table=table,
                channel=Identifier(self.channel_name),
                status_function=Identifier(f"{events_table_name}_status_from_events"),
            )
        )
        self._add_status_projection()
        self.insert_call_statement = SQL(
            "SELECT {schema}.{function}(%s, %s) AS notification_id"
        ).format(schema=schema, function=function)
        # Passed on each call (as stock's SET LOCAL does), not baked into the function
        # that every application on this table shares.
        self.lock_timeout = f"{self.datastore.lock_timeout}s"
        self._writer: Connection[DictRow] | None = None
        self._writer_lock = threading.Lock()

    wants_status_rows = False
    """The insert function derives the status rows from the saved events, in its transaction."""

    def _add_status_projection(self) -> None:
        """The status table, and the function that derives its rows from saga events."""
        self.status_table_name = f"{self.events_table_name}_status"
        self.check_identifier_length(f"{self.status_table_name}_by_status")
        ids = {
            "schema": Identifier(self.datastore.schema),
            "table": Identifier(self.events_table_name),
            "status": Identifier(self.status_table_name),
            "function": Identifier(f"{self.status_table_name}_from_events"),
            "event_type": Identifier(self.stored_event_type_name),
            "id_type": Identifier(self.datastore.originator_id_type),
        }
        self._status = ids
        statements = [
            "CREATE TABLE IF NOT EXISTS {schema}.{status} ("
            "saga_id {id_type} PRIMARY KEY, name text, definition_version integer, key text, "
            "status text, step text, version bigint, started_at timestamptz, "
            "updated_at timestamptz)",
            "CREATE INDEX IF NOT EXISTS {by_status} ON {schema}.{status} "
            "(status, started_at, saga_id)",
            "CREATE INDEX IF NOT EXISTS {by_name} ON {schema}.{status} (name, started_at, saga_id)",
            "CREATE INDEX IF NOT EXISTS {by_key} ON {schema}.{status} (key)",
            "CREATE INDEX IF NOT EXISTS {by_start} ON {schema}.{status} (started_at, saga_id)",
            # Called by the insert function, in its statement's transaction, once per save,
            # set-based over the saved rows: each saga's latest event gives its status,
            # version and time; its latest event naming a step gives the step; a
            # SagaStarted gives the rest. Only JSON states ('{' first) are read: a ciphered
            # or compressed state is opaque here.
            "CREATE OR REPLACE FUNCTION {schema}.{function}(events {schema}.{event_type}[]) "
            # plpgsql, not sql: it keeps the statement's plan for the session.
            "RETURNS void LANGUAGE plpgsql AS $BODY$ BEGIN "
            "WITH saga_rows AS ("
            "SELECT n.originator_id AS id, n.originator_version AS v, n.topic, "
            "convert_from(n.state, 'UTF8')::jsonb AS s FROM unnest(events) n "
            "WHERE n.topic LIKE 'saga_es:%' AND get_byte(n.state, 0) = 123), "
            "latest AS (SELECT DISTINCT ON (id) id, v, s FROM saga_rows "
            "WHERE s ? 'to_state' AND s ? 'timestamp' ORDER BY id, v DESC), "
            "steps AS (SELECT DISTINCT ON (id) id, s->>'step' AS step FROM saga_rows "
            "WHERE s ? 'step' ORDER BY id, v DESC), "
            "starts AS (SELECT id, s FROM saga_rows WHERE topic = 'saga_es:SagaStarted') "
            "INSERT INTO {schema}.{status} AS t (saga_id, name, definition_version, key, "
            "status, step, version, started_at, updated_at) "
            "SELECT l.id, st.s->>'name', (st.s->>'definition_version')::integer, "
            "st.s->>'key', l.s->>'to_state', sp.step, l.v, "
            "(COALESCE(st.s, l.s)->'timestamp'->>'_data_')::timestamptz, "
            "(l.s->'timestamp'->>'_data_')::timestamptz "
            "FROM latest l LEFT JOIN starts st USING (id) LEFT JOIN steps sp USING (id) "
            "ON CONFLICT (saga_id) DO UPDATE SET status = EXCLUDED.status, "
            "step = COALESCE(EXCLUDED.step, t.step), version = EXCLUDED.version, "
            "updated_at = EXCLUDED.updated_at WHERE t.version < EXCLUDED.version; "
            "END; $BODY$",
        ]
        names = {
            f"by_{suffix}": Identifier(f"{self.status_table_name}_by_{suffix}")
            for suffix in ("status", "name", "key", "start")
        }
        for statement in statements:
            self.sql_create_statements.append(SQL(statement).format(**ids, **names))

    def select_statuses(self, query: StatusQuery) -> list[SagaStatus]:
        """The page of rows `query` asks for, ordered by (started_at, saga_id)."""
        filters, params = where(query, "%s", saga_id=self._saga_id)
        table = SQL("{schema}.{status}").format(**self._status).as_string()
        statement = f"SELECT * FROM {table} s{filters.format(table=table)} LIMIT %s"
        with self.datastore.transaction(commit=False) as curs:
            curs.execute(statement.encode(), [*params, query.limit])
            return [_status(row) for row in curs.fetchall()]

    def select_positions(self, saga_id: UUID) -> dict[int, int]:
        """Each of the saga's versions, with its position in the notification log."""
        statement = SQL(
            "SELECT originator_version, notification_id FROM {schema}.{table} "
            "WHERE originator_id = %s"
        ).format(**self._status)
        with self.datastore.transaction(commit=False) as curs:
            curs.execute(statement, [self._saga_id(saga_id)])
            return {row["originator_version"]: row["notification_id"] for row in curs.fetchall()}

    def count_statuses(self) -> dict[tuple[str, str], int]:
        """Number of sagas per (definition name, status)."""
        statement = SQL(
            "SELECT name, status, COUNT(*) AS n FROM {schema}.{status} GROUP BY 1, 2"
        ).format(**self._status)
        with self.datastore.transaction(commit=False) as curs:
            curs.execute(statement)
            return {(row["name"], row["status"]): row["n"] for row in curs.fetchall()}

    def write_statuses(self, rows: Sequence[SagaStatus]) -> None:
        """Upsert rows on their own."""
        statement = SQL(
            "INSERT INTO {schema}.{status} VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (saga_id) DO UPDATE SET name = EXCLUDED.name, "
            "definition_version = EXCLUDED.definition_version, key = EXCLUDED.key, "
            "status = EXCLUDED.status, step = EXCLUDED.step, version = EXCLUDED.version, "
            "started_at = EXCLUDED.started_at, updated_at = EXCLUDED.updated_at"
        ).format(**self._status)
        with self.datastore.transaction(commit=True) as curs:
            for row in rows:
                curs.execute(
                    statement,
                    (
                        self._saga_id(row.saga_id),
                        row.name,
                        row.definition_version,
                        row.key,
                        row.status,
                        row.step,
                        row.version,
                        row.started_at,
                        row.updated_at,
                    ),
                )

    def delete_statuses(self) -> None:
        """Remove every row."""
        with self.datastore.transaction(commit=True) as curs:
            curs.execute(SQL("DELETE FROM {schema}.{status}").format(**self._status))

    def _saga_id(self, saga_id: UUID) -> UUID | str:
        return saga_id if self.datastore.originator_id_type == "uuid" else str(saga_id)

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        """Insert the events in one statement; their notification ids, in order."""
        if not stored_events:
            return None
        rows = [
            self.construct_pg_stored_event(s.originator_id, s.originator_version, s.topic, s.state)
            for s in stored_events
        ]
        params = (rows, self.lock_timeout)
        if self.datastore.pool.max_size < 2:  # keeping the only connection would starve reads
            with self.datastore.get_connection() as conn, conn.cursor() as curs:
                curs.execute(self.insert_call_statement, params, prepare=True)
                return [row["notification_id"] for row in curs.fetchall()]
        with self._writer_lock:
            conn = self._writer or self._take_writer()
            try:
                curs = conn.execute(self.insert_call_statement, params, prepare=True)
                return [row["notification_id"] for row in curs.fetchall()]
            except psycopg.Error as e:
                if conn.broken or conn.closed:
                    self._give_back_writer()  # the retry takes a fresh one
                raise persistence_error(e) from e

    def _take_writer(self) -> Connection[DictRow]:
        datastore = self.datastore
        try:
            timeout = datastore.pool_open_timeout
            datastore.pool.open(timeout is not None, timeout or 30.0)
            conn = datastore.pool.getconn()
        except psycopg.Error as e:
            raise persistence_error(e) from e
        for info in datastore.psycopg_type_adapters.values():
            if not conn.adapters.types.get(info.oid):
                register_composite(info, conn)
        self._writer = conn
        return conn

    def _give_back_writer(self) -> None:
        conn, self._writer = self._writer, None
        if conn is not None:
            try:
                self.datastore.pool.putconn(conn)
            except Exception:  # a closed pool, or not its connection any more
                conn.close()

    def close(self) -> None:
        """Give the connection kept for saves back to the pool."""
        with self._writer_lock:
            self._give_back_writer()


def _status(row: DictRow) -> SagaStatus:
    return SagaStatus(
        saga_id=UUID(str(row["saga_id"])),
        name=row["name"],
        definition_version=row["definition_version"],
        key=row["key"],
        status=row["status"],
        step=row["step"],
        version=row["version"],
        started_at=row["started_at"].astimezone(UTC),
        updated_at=row["updated_at"].astimezone(UTC),
    )


def check_settings(env: Environment) -> None:
    """Fail fast, naming the setting, where the pool would only time out."""
    for name in ("POSTGRES_DBNAME", "POSTGRES_HOST", "POSTGRES_USER"):
        if env.get(name) == "":
            raise ConfigurationError(name, "is set but empty")
        if env.get(name) is None:
            return  # eventsourcing names a missing setting itself
    if env.get("POSTGRES_GET_PASSWORD_TOPIC"):
        return
    try:
        timeout = max(1, min(int(env.get("POSTGRES_CONNECT_TIMEOUT") or 5), 5))
    except ValueError:
        return
    try:
        psycopg.connect(
            dbname=env.get("POSTGRES_DBNAME"),
            host=env.get("POSTGRES_HOST"),
            port=env.get("POSTGRES_PORT") or "5432",
            user=env.get("POSTGRES_USER"),
            password=env.get("POSTGRES_PASSWORD") or "",
            connect_timeout=timeout,
        ).close()
    except psycopg.OperationalError as e:
        where = f"{env.get('POSTGRES_HOST')}:{env.get('POSTGRES_PORT') or '5432'}"
        reason = " ".join(str(e).split()) or type(e).__name__
        message = f"cannot connect to PostgreSQL at {where}: {reason}"
        raise configuration_error(RuntimeError(message), env) from None
