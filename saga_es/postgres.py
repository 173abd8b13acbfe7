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

The same call keeps the status projection (`<events>_status`, a row per saga),
but writes a row only when what filters and indexes read changes: the saga
starts, changes status, or is not in flight. Writing a row on every save cost
about as much server time as the rest of the save: a new row version and five
index entries. The usual boundary (running, then running) is told from its
events alone, and other saves that change no row cost one lookup. The row of a
running or compensating saga is `live`: readers take its step, version and time
from the saga's latest event (`<status>_latest`, by the primary key, only for the
rows of the page they read; the view `<status>_live` shows the table that way).
A pending saga's row is kept exact, so listing submitted sagas reads the table.

It also keeps one pool connection and one cursor for its saves (under a lock of
its own: the table lock lets one writer in at a time anyway) instead of borrowing
one per save, which costs more Python after each commit than the round trip it
wraps, and dumps the events with a dumper of its own. `close()` gives the
connection back; `SagaApplication.close()` calls it. With a pool of one
connection it borrows per save, so readers are never starved.

`SagaApplication` uses it on PostgreSQL unless `APPLICATION_RECORDER_TOPIC` names
another recorder; set it to `eventsourcing.postgres:PostgresApplicationRecorder`
for the stock one.
"""

from __future__ import annotations

import contextlib
import struct
import threading
from collections.abc import Sequence
from contextvars import ContextVar
from datetime import UTC
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
from eventsourcing.persistence import (
    InterfaceError,
    OperationalError,
    ProcessRecorder,
    StoredEvent,
    Tracking,
)
from eventsourcing.postgres import (
    PgStoredEvent,
    PostgresAggregateRecorder,
    PostgresApplicationRecorder,
    PostgresDatastore,
    PostgresTrackingRecorder,
)
from eventsourcing.utils import Environment, TopicError, resolve_topic, retry
from psycopg import Connection, Cursor
from psycopg.adapt import Dumper
from psycopg.errors import DuplicateObject
from psycopg.pq import Format
from psycopg.rows import DictRow, tuple_row
from psycopg.sql import SQL, Identifier, Literal
from psycopg.types.composite import CompositeInfo, register_composite
from psycopg.types.json import Jsonb

from saga_es import machine
from saga_es.errors import ConfigurationError, persistence_error
from saga_es.settings import configuration_error
from saga_es.status import IN_FLIGHT_STATES, STEADY_TOPICS, SagaStatus, StatusQuery, where

_IN_FLIGHT = ", ".join(f"'{state}'" for state in IN_FLIGHT_STATES)
"""The states in flight, as an SQL list."""
LIVE_STATES = (machine.RUNNING, machine.COMPENSATING)
"""The states whose rows are `live`. A pending saga's row is kept exact instead: its
few saves cost little, and the sagas a worker lists are mostly pending ones, whose
rows are then read straight from the table."""
_LIVE = ", ".join(f"'{state}'" for state in LIVE_STATES)
_STEADY = ", ".join(f"'{topic}'" for topic in STEADY_TOPICS)
"""`STEADY_TOPICS`, as an SQL list."""
_LIVE_COLUMNS = (
    "s.saga_id, s.name, s.definition_version, s.key, s.status, "
    "COALESCE(l.step, s.step) AS step, COALESCE(l.version, s.version) AS version, "
    "s.started_at, COALESCE(l.updated_at, s.updated_at) AS updated_at"
)
"""A status row (`s`) as readers see it: a `live` row's step, version and time from `l`."""
_LIVE_JOIN = (
    "LEFT JOIN LATERAL (SELECT * FROM {schema}.{latest}(s.saga_id) WHERE s.live LIMIT 1) l ON true"
)
"""The latest events of `s`'s saga, read only when its row is `live`."""

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
        _apply_tls(datastore)  # before any connection: the pool has not opened yet
        super().__init__(datastore, events_table_name=events_table_name)
        self.insert_function_name = f"{events_table_name}_insert"
        self.check_identifier_length(self.insert_function_name)
        schema = Identifier(self.datastore.schema)
        function = Identifier(self.insert_function_name)
        table = Identifier(self.events_table_name)
        self._add_status_projection()
        # The status rows change only when a saga starts, changes status or ends. The usual
        # boundary is told from its events alone, in plain expressions (no query): one
        # saga's, the first of a kind that never changes the state (`STEADY_TOPICS`), all
        # naming that state, in flight, so the saga's row is `live` already. Any other
        # save asks one query whether a row must change (its saga events in their row's
        # status, in flight, `live`), and only then calls the status function.
        self.sql_create_statements.append(
            SQL(
                "CREATE OR REPLACE FUNCTION {schema}.{function}"
                "(events {schema}.{event_type}[], timeout text) "
                "RETURNS SETOF bigint LANGUAGE plpgsql AS $BODY$ "
                "DECLARE steady boolean; saga_state text; k integer := 1; "
                "BEGIN "
                "PERFORM set_config('lock_timeout', timeout, true); "
                "LOCK TABLE {schema}.{table} IN EXCLUSIVE MODE; "
                "NOTIFY {channel}; "
                "RETURN QUERY "
                "INSERT INTO {schema}.{table} (originator_id, originator_version, topic, state) "
                "SELECT originator_id, originator_version, topic, state FROM unnest(events) "
                "RETURNING notification_id; "
                "steady := events[1].topic IN (" + _STEADY + "); "
                "WHILE steady AND k <= cardinality(events) LOOP "
                "steady := events[k].originator_id = events[1].originator_id "
                "AND events[k].topic LIKE 'saga_es:%' "
                "AND substr(events[k].state, 1, 1) = '\\x7b'; "
                "IF steady AND k = 1 THEN "
                "saga_state := convert_from(events[1].state, 'UTF8')::jsonb->>'to_state'; "
                "steady := saga_state IN (" + _LIVE + "); "
                "ELSIF steady THEN "
                "steady := saga_state = convert_from(events[k].state, 'UTF8')::jsonb->>'to_state'; "
                "END IF; "
                "k := k + 1; "
                "END LOOP; "
                "IF steady THEN RETURN; END IF; "
                "IF EXISTS (SELECT FROM unnest(events) n "
                "LEFT JOIN {schema}.{status} t ON t.saga_id = n.originator_id "
                "WHERE n.topic LIKE 'saga_es:%' AND substr(n.state, 1, 1) = '\\x7b' "
                "AND (t.live IS NOT TRUE OR t.status NOT IN (" + _LIVE + ") "
                "OR t.status IS DISTINCT FROM convert_from(n.state, 'UTF8')::jsonb->>'to_state')) "
                "THEN PERFORM {schema}.{status_function}(events); END IF; "
                "END; "
                "$BODY$"
            ).format(
                schema=schema,
                function=function,
                event_type=Identifier(self.stored_event_type_name),
                table=table,
                channel=Identifier(self.channel_name),
                status=self._status["status"],
                status_function=self._status["function"],
            )
        )
        # Rendered once to bytes (psycopg caches the conversion of a bytes query, not of a
        # composed one), with the events dumped in binary: text dumping of a composite array
        # escapes every field through regular expressions, the costliest part of a save.
        self.insert_call_statement = (
            SQL("SELECT {schema}.{function}(%b, %s) AS notification_id")
            .format(schema=schema, function=function)
            .as_string()
            .encode()
        )
        self.insert_with_statuses_call_statement = (
            SQL("SELECT {schema}.{function}(%b, %s, %s) AS notification_id")
            .format(schema=schema, function=Identifier(self.insert_with_statuses_function_name))
            .as_string()
            .encode()
        )
        # Passed on each call (as stock's SET LOCAL does), not baked into the function
        # that every application on this table shares.
        self.lock_timeout = f"{self.datastore.lock_timeout}s"
        self._writer: Connection[DictRow] | None = None
        # One cursor for every save: a new one per save would look up the events' dumpers
        # again each time, which costs about half of what psycopg spends on a save.
        self._writer_cursor: Cursor[tuple[Any, ...]] | None = None
        self._writer_lock = threading.Lock()

    wants_status_rows = False
    """The insert function derives the status rows from the saved events, in its transaction.

    It reads JSON only: when the mapper ciphers or compresses the states,
    `SagaApplication` sets this to True on the recorder and passes the rows itself
    (`insert_events(..., saga_statuses=[...])`); they go to a second insert function
    that upserts them, in the same call and transaction, instead of reading the events.
    """

    def _add_status_projection(self) -> None:
        """The status table, its `_live` view, and the functions that keep and read them."""
        self.status_table_name = f"{self.events_table_name}_status"
        self.check_identifier_length(f"{self.status_table_name}_by_status")
        ids = {
            "schema": Identifier(self.datastore.schema),
            "table": Identifier(self.events_table_name),
            "status": Identifier(self.status_table_name),
            "function": Identifier(f"{self.status_table_name}_from_events"),
            "latest": Identifier(f"{self.status_table_name}_latest"),
            "live": Identifier(f"{self.status_table_name}_live"),
            "event_type": Identifier(self.stored_event_type_name),
            "id_type": Identifier(self.datastore.originator_id_type),
            "schema_name": Literal(self.datastore.schema),
            "status_name": Literal(self.status_table_name),
        }
        self._status = ids
        statements = [
            "CREATE TABLE IF NOT EXISTS {schema}.{status} ("
            "saga_id {id_type} PRIMARY KEY, name text, definition_version integer, key text, "
            "status text, step text, version bigint, started_at timestamptz, "
            "updated_at timestamptz, live boolean NOT NULL DEFAULT false)",
            "CREATE INDEX IF NOT EXISTS {by_status} ON {schema}.{status} "
            "(status, started_at, saga_id)",
            "CREATE INDEX IF NOT EXISTS {by_name} ON {schema}.{status} (name, started_at, saga_id)",
            "CREATE INDEX IF NOT EXISTS {by_key} ON {schema}.{status} (key)",
            "CREATE INDEX IF NOT EXISTS {by_start} ON {schema}.{status} (started_at, saga_id)",
            # An in-flight saga as of its stored events, for readers: the status, version
            # and time of its latest event that names a state, and the step of its latest
            # event that names one; usually one event, read by the primary key. Only JSON
            # states ('{' first) are read: a ciphered or compressed state is opaque here.
            "CREATE OR REPLACE FUNCTION {schema}.{latest}(saga {id_type}, "
            "OUT status text, OUT step text, OUT version bigint, OUT updated_at timestamptz) "
            "LANGUAGE plpgsql STABLE AS $BODY$ DECLARE e record; j jsonb; BEGIN "
            "FOR e IN SELECT originator_version AS v, state FROM {schema}.{table} "
            "WHERE originator_id = saga AND topic LIKE 'saga_es:%' "
            "AND substr(state, 1, 1) = '\\x7b' "
            "ORDER BY originator_version DESC LOOP "
            "j := convert_from(e.state, 'UTF8')::jsonb; "
            "IF version IS NULL AND j ? 'to_state' AND j ? 'timestamp' THEN "
            "status := j->>'to_state'; version := e.v; "
            "updated_at := (j->'timestamp'->>'_data_')::timestamptz; END IF; "
            "step := COALESCE(step, j->>'step'); "
            "EXIT WHEN version IS NOT NULL AND step IS NOT NULL; "
            "END LOOP; END; $BODY$",
            # A table created by an earlier release lacks `live` (ALTER TABLE would lock the
            # table even when it has it, so it runs only then). That release kept every row
            # exact; from now on, a row in flight whose latest event reads as JSON is live.
            "DO $DO$ DECLARE r record; BEGIN IF NOT EXISTS (SELECT FROM "
            "information_schema.columns WHERE table_schema = {schema_name} "
            "AND table_name = {status_name} AND column_name = 'live') THEN "
            "ALTER TABLE {schema}.{status} ADD COLUMN live boolean NOT NULL DEFAULT false; "
            "FOR r IN SELECT saga_id FROM {schema}.{status} "
            "WHERE status IN (" + _IN_FLIGHT + ") LOOP BEGIN "
            "UPDATE {schema}.{status} SET live = true WHERE saga_id = r.saga_id "
            "AND (SELECT l.version IS NOT NULL FROM {schema}.{latest}(r.saga_id) l); "
            "EXCEPTION WHEN OTHERS THEN NULL; "  # not JSON after all: ciphered
            "END; END LOOP; END IF; END $DO$",
            # Called by the insert function, in its statement's transaction, when a saved
            # event may change a row (see `__init__`). Each saga's latest event gives its
            # status, version and time; the latest naming a step gives the step (else its
            # stored events do); a SagaStarted gives the rest. Set-based over several
            # sagas, it leaves alone the rows already in flight in that status, and `live`.
            "CREATE OR REPLACE FUNCTION {schema}.{function}(events {schema}.{event_type}[]) "
            # plpgsql, not sql: it keeps the statement's plan for the session.
            "RETURNS void LANGUAGE plpgsql AS $BODY$ DECLARE "
            "e {schema}.{event_type} := events[cardinality(events)]; "
            "last_json jsonb; start_json jsonb; "
            "new_step text; k integer := cardinality(events); BEGIN "
            # One saga's events (the runner's saves), the last naming a state and a time:
            # plain statements, much cheaper to start than the set-based one below.
            "WHILE k > 1 AND events[k - 1].originator_id = e.originator_id LOOP "
            "k := k - 1; END LOOP; "
            "IF k = 1 AND e.topic LIKE 'saga_es:%' AND substr(e.state, 1, 1) = '\\x7b' THEN "
            "last_json := convert_from(e.state, 'UTF8')::jsonb; "
            "IF last_json ? 'to_state' AND last_json ? 'timestamp' THEN "
            "new_step := last_json->>'step'; k := cardinality(events) - 1; "
            "WHILE new_step IS NULL AND k > 0 LOOP "
            "IF events[k].topic LIKE 'saga_es:%' AND substr(events[k].state, 1, 1) = '\\x7b' "
            "THEN new_step := convert_from(events[k].state, 'UTF8')::jsonb->>'step'; END IF; "
            "k := k - 1; END LOOP; "
            "IF new_step IS NULL AND events[1].topic <> 'saga_es:SagaStarted' THEN "
            "SELECT p.step INTO new_step FROM {schema}.{latest}(e.originator_id) p; END IF; "
            "UPDATE {schema}.{status} t SET status = last_json->>'to_state', "
            "step = COALESCE(new_step, t.step), version = e.originator_version, "
            "updated_at = (last_json->'timestamp'->>'_data_')::timestamptz, "
            "live = (last_json->>'to_state') IN (" + _LIVE + ") "
            "WHERE t.saga_id = e.originator_id AND t.version < e.originator_version; "
            "IF FOUND THEN RETURN; END IF; "
            "IF events[1].topic = 'saga_es:SagaStarted' "
            "AND substr(events[1].state, 1, 1) = '\\x7b' THEN "
            "start_json := convert_from(events[1].state, 'UTF8')::jsonb; END IF; "
            "INSERT INTO {schema}.{status} AS t (saga_id, name, definition_version, key, "
            "status, step, version, started_at, updated_at, live) VALUES (e.originator_id, "
            "start_json->>'name', (start_json->>'definition_version')::integer, "
            "start_json->>'key', last_json->>'to_state', "
            "new_step, e.originator_version, "
            "(COALESCE(start_json, last_json)->'timestamp'->>'_data_')::timestamptz, "
            "(last_json->'timestamp'->>'_data_')::timestamptz, "
            "(last_json->>'to_state') IN (" + _LIVE + ")) "
            "ON CONFLICT (saga_id) DO NOTHING; "
            "RETURN; END IF; END IF; "
            "WITH saved AS (SELECT n.originator_id AS id, n.originator_version AS v, n.topic, "
            "convert_from(n.state, 'UTF8')::jsonb AS j FROM unnest(events) n "
            "WHERE n.topic LIKE 'saga_es:%' AND substr(n.state, 1, 1) = '\\x7b'), "
            "latest AS (SELECT DISTINCT ON (id) id, v, j FROM saved "
            "WHERE j ? 'to_state' AND j ? 'timestamp' ORDER BY id, v DESC) "
            "INSERT INTO {schema}.{status} AS t (saga_id, name, definition_version, key, "
            "status, step, version, started_at, updated_at, live) "
            "SELECT l.id, st.j->>'name', (st.j->>'definition_version')::integer, "
            "st.j->>'key', l.j->>'to_state', COALESCE((SELECT p.j->>'step' FROM saved p "
            "WHERE p.id = l.id AND p.j->>'step' IS NOT NULL ORDER BY p.v DESC LIMIT 1), "
            "(SELECT p.step FROM {schema}.{latest}(l.id) p)), l.v, "
            "(COALESCE(st.j, l.j)->'timestamp'->>'_data_')::timestamptz, "
            "(l.j->'timestamp'->>'_data_')::timestamptz, "
            "(l.j->>'to_state') IN (" + _LIVE + ") "
            "FROM latest l LEFT JOIN {schema}.{status} o ON o.saga_id = l.id "
            "LEFT JOIN saved st ON st.id = l.id AND st.topic = 'saga_es:SagaStarted' "
            "WHERE o.live IS NOT TRUE OR o.status NOT IN (" + _LIVE + ") "
            "OR o.status IS DISTINCT FROM l.j->>'to_state' "
            "ON CONFLICT (saga_id) DO UPDATE SET status = EXCLUDED.status, "
            "step = COALESCE(EXCLUDED.step, t.step), version = EXCLUDED.version, "
            "updated_at = EXCLUDED.updated_at, live = EXCLUDED.live "
            "WHERE t.version < EXCLUDED.version; "
            "END; $BODY$",
            "CREATE OR REPLACE VIEW {schema}.{live} AS SELECT " + _LIVE_COLUMNS + " "
            "FROM {schema}.{status} s " + _LIVE_JOIN,
        ]
        names = {
            f"by_{suffix}": Identifier(f"{self.status_table_name}_by_{suffix}")
            for suffix in ("status", "name", "key", "start")
        }
        for statement in statements:
            self.sql_create_statements.append(SQL(statement).format(**ids, **names))
        self._live_join = SQL(_LIVE_JOIN).format(**ids).as_string()
        # The insert function for ciphered or compressed states, which SQL cannot read: the
        # application passes the status rows (JSON), upserted in the same transaction.
        self.insert_with_statuses_function_name = f"{self.events_table_name}_insert_statuses"
        self.check_identifier_length(self.insert_with_statuses_function_name)
        self.sql_create_statements.append(
            SQL(
                "CREATE OR REPLACE FUNCTION {schema}.{function}"
                "(events {schema}.{event_type}[], statuses jsonb, timeout text) "
                "RETURNS SETOF bigint LANGUAGE plpgsql AS $BODY$ "
                "BEGIN "
                "PERFORM set_config('lock_timeout', timeout, true); "
                "LOCK TABLE {schema}.{table} IN EXCLUSIVE MODE; "
                "NOTIFY {channel}; "
                "RETURN QUERY "
                "INSERT INTO {schema}.{table} (originator_id, originator_version, topic, state) "
                "SELECT originator_id, originator_version, topic, state FROM unnest(events) "
                "RETURNING notification_id; "
                "INSERT INTO {schema}.{status} AS t (saga_id, name, definition_version, key, "
                "status, step, version, started_at, updated_at) "
                "SELECT * FROM jsonb_to_recordset(statuses) AS r(saga_id {id_type}, name text, "
                "definition_version integer, key text, status text, step text, version bigint, "
                "started_at timestamptz, updated_at timestamptz) "
                "ON CONFLICT (saga_id) DO UPDATE SET name = EXCLUDED.name, "
                "definition_version = EXCLUDED.definition_version, key = EXCLUDED.key, "
                "status = EXCLUDED.status, step = EXCLUDED.step, version = EXCLUDED.version, "
                "started_at = EXCLUDED.started_at, updated_at = EXCLUDED.updated_at, "
                "live = false; "
                "END; "
                "$BODY$"
            ).format(
                **{
                    **ids,
                    "function": Identifier(self.insert_with_statuses_function_name),
                    "channel": Identifier(self.channel_name),
                }
            )
        )

    def select_statuses(self, query: StatusQuery) -> list[SagaStatus]:
        """The page of rows `query` asks for, ordered by (started_at, saga_id)."""
        filters, params = where(query, "%s", saga_id=self._saga_id)
        table = SQL("{schema}.{status}").format(**self._status).as_string()
        # The page is chosen on the table (what the filters read is never stale there);
        # only its rows are then read off their events.
        page = f"SELECT * FROM {table} s{filters.format(table=table)} LIMIT %s"
        statement = (
            f"SELECT {_LIVE_COLUMNS} FROM ({page}) s {self._live_join} "
            "ORDER BY s.started_at, s.saga_id"
        )
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
            "INSERT INTO {schema}.{status} VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (saga_id) DO UPDATE SET name = EXCLUDED.name, "
            "definition_version = EXCLUDED.definition_version, key = EXCLUDED.key, "
            "status = EXCLUDED.status, step = EXCLUDED.step, version = EXCLUDED.version, "
            "started_at = EXCLUDED.started_at, updated_at = EXCLUDED.updated_at, "
            "live = EXCLUDED.live"
        ).format(**self._status)
        # The insert function leaves a live row alone while its saga stays in flight.
        live = not self.wants_status_rows
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
                        live and row.status in LIVE_STATES,
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
        """Insert the events in one statement; their notification ids, in order.

        `saga_statuses=[...]` (given when the states are ciphered or compressed, so the
        insert function cannot read them) are upserted by the same call.
        """
        if not stored_events:
            return None
        statuses: Sequence[SagaStatus] = kwargs.get("saga_statuses") or ()
        if self.datastore.pool.max_size < 2:  # keeping the only connection would starve reads
            rows = [
                self.construct_pg_stored_event(
                    s.originator_id, s.originator_version, s.topic, s.state
                )
                for s in stored_events
            ]
            statement, params = self._insert_call(rows, statuses)
            with self.datastore.get_connection() as conn, conn.cursor() as curs:
                curs.execute(statement, params, prepare=True)
                return [row["notification_id"] for row in curs.fetchall()]
        statement, params = self._insert_call(_EventRows(stored_events), statuses)
        with self._writer_lock:
            conn = self._writer or self._take_writer()
            try:
                cursor = self._writer_cursor or self._new_writer_cursor(conn)
                cursor.execute(statement, params, prepare=True)
                return [row[0] for row in cursor.fetchall()]
            except psycopg.Error as e:
                if conn.broken or conn.closed:
                    self._give_back_writer()  # the retry takes a fresh one
                raise persistence_error(e) from e

    def _insert_call(
        self, rows: Sequence[Any], statuses: Sequence[SagaStatus]
    ) -> tuple[bytes, tuple[Any, ...]]:
        """The statement and parameters that insert `rows` (and the status rows, if any)."""
        if statuses:
            rows_of_statuses = _status_rows(statuses)
            return self.insert_with_statuses_call_statement, (
                rows,
                rows_of_statuses,
                self.lock_timeout,
            )
        return self.insert_call_statement, (rows, self.lock_timeout)

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

    def _new_writer_cursor(self, conn: Connection[DictRow]) -> Cursor[tuple[Any, ...]]:
        info = self.datastore.psycopg_type_adapters[self.stored_event_type_name]
        conn.adapters.register_dumper(_EventRows, _events_dumper(info))
        self._writer_cursor = conn.cursor(row_factory=tuple_row)
        return self._writer_cursor

    def _give_back_writer(self) -> None:
        conn, self._writer, self._writer_cursor = self._writer, None, None
        if conn is not None:
            try:
                self.datastore.pool.putconn(conn)
            except Exception:  # a closed pool, or not its connection any more
                conn.close()

    def close(self) -> None:
        """Give the connection kept for saves back to the pool."""
        with self._writer_lock:
            self._give_back_writer()


class _EventRows(list[StoredEvent]):
    """A save's events, as the insert function's `events` parameter (`_events_dumper`)."""


def _events_dumper(info: CompositeInfo) -> type[Dumper]:
    """Dumps `_EventRows` as an array of the events' composite type, in binary.

    psycopg's own dumpers look up a dumper for every field of every row, which costs
    more Python than the rest of a save; these rows always hold the same four fields.
    """
    id_oid, version_oid, topic_oid, state_oid = info.field_types
    text_ids = id_oid != _UUID_OID
    header = _ARRAY_HEADER.pack(1, 0, info.oid)

    class EventsDumper(Dumper):
        format = Format.BINARY
        oid = info.array_oid

        def dump(self, obj: _EventRows) -> bytes:
            parts = [header, _ARRAY_DIMENSION.pack(len(obj), 1)]
            for event in obj:
                originator_id = event.originator_id
                if text_ids or not isinstance(originator_id, UUID):
                    id_bytes = str(originator_id).encode()
                else:
                    id_bytes = originator_id.bytes
                topic, state = event.topic.encode(), event.state
                fields = b"".join(
                    (
                        _RECORD_HEAD.pack(4, id_oid, len(id_bytes)),
                        id_bytes,
                        _VERSION_FIELD.pack(version_oid, 8, event.originator_version),
                        _FIELD_HEAD.pack(topic_oid, len(topic)),
                        topic,
                        _FIELD_HEAD.pack(state_oid, len(state)),
                        state,
                    )
                )
                parts += (_LENGTH.pack(len(fields)), fields)
            return b"".join(parts)

    return EventsDumper


_UUID_OID = 2950
_ARRAY_HEADER = struct.Struct("!iiI")  # dimensions, has nulls, element type
_ARRAY_DIMENSION = struct.Struct("!ii")  # length, lower bound
_RECORD_HEAD = struct.Struct("!iIi")  # fields, then the first field's type and length
_FIELD_HEAD = struct.Struct("!Ii")  # type, length
_VERSION_FIELD = struct.Struct("!Iiq")
_LENGTH = struct.Struct("!i")


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


def _status_rows(statuses: Sequence[SagaStatus]) -> Jsonb:
    """The rows as the insert function takes them: JSON, one object per saga (the last wins)."""
    latest = {row.saga_id: row for row in statuses}
    return Jsonb(
        [
            {
                "saga_id": str(row.saga_id),
                "name": row.name,
                "definition_version": row.definition_version,
                "key": row.key,
                "status": row.status,
                "step": row.step,
                "version": row.version,
                "started_at": row.started_at.isoformat(),
                "updated_at": row.updated_at.isoformat(),
            }
            for row in latest.values()
        ]
    )


TLS_SETTINGS = {
    "POSTGRES_SSLMODE": "sslmode",
    "POSTGRES_SSLROOTCERT": "sslrootcert",
    "POSTGRES_SSLCERT": "sslcert",
    "POSTGRES_SSLKEY": "sslkey",
    "POSTGRES_SSLCRL": "sslcrl",
}
"""The settings saga_es passes to every PostgreSQL connection, as these libpq options.

eventsourcing reads none of them; unset, libpq's own defaults apply (`PGSSLMODE`, ...
in the process environment, else `sslmode=prefer`).
"""
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")

_TLS_FAILURES = (  # (words in libpq's message, the setting to name), first match wins
    (("root certificate", "certificate verify"), "POSTGRES_SSLROOTCERT"),
    (("private key",), "POSTGRES_SSLKEY"),
    (("certificate file", "client certificate"), "POSTGRES_SSLCERT"),
    (("revocation", "crl"), "POSTGRES_SSLCRL"),
    (("ssl", "tls", "certificate"), "POSTGRES_SSLMODE"),
)

_pending_tls: ContextVar[tuple[tuple[str, ...], dict[str, str]] | None] = ContextVar(
    "saga_es_postgres_tls", default=None
)
"""TLS options `check_settings` read, for the recorder the application builds next."""


def tls_options(env: Environment) -> dict[str, str]:
    """The libpq TLS options the `POSTGRES_SSL*` settings ask for (checked, naming the setting)."""
    options: dict[str, str] = {}
    for setting, option in TLS_SETTINGS.items():
        value = (env.get(setting) or "").strip()
        if not value:
            continue
        if option == "sslmode" and value not in SSL_MODES:
            raise ConfigurationError(
                setting, f"expected one of {', '.join(SSL_MODES)}, got {value!r}"
            )
        is_file = option != "sslmode" and not (option == "sslrootcert" and value == "system")
        if is_file and not Path(value).expanduser().is_file():
            raise ConfigurationError(setting, f"no such file: {value}")
        options[option] = value
    return options


def _target(kwargs: Any) -> tuple[str, ...]:
    """Which server, database and user a connection's settings are for."""
    return tuple(str(kwargs.get(k) or "") for k in ("host", "port", "dbname", "user"))


def _apply_tls(datastore: PostgresDatastore) -> None:
    """Give the datastore's pool the TLS options `check_settings` read for its server."""
    pending = _pending_tls.get()
    kwargs = datastore.pool.kwargs
    if pending is None or not isinstance(kwargs, dict) or pending[0] != _target(kwargs):
        return
    _pending_tls.set(None)
    kwargs.update(pending[1])


def _check_recorders_pass_tls(env: Environment) -> None:
    """Refuse TLS settings that a recorder chosen by topic would silently leave out."""
    for name in ("APPLICATION_RECORDER_TOPIC", "PROCESS_RECORDER_TOPIC"):
        topic = env.get(name)
        if not topic:
            continue
        try:
            recorder = resolve_topic(topic)
        except TopicError:
            continue  # eventsourcing names it
        if not (isinstance(recorder, type) and issubclass(recorder, PostgresOneCallRecorder)):
            raise ConfigurationError(
                name,
                f"{topic} does not pass the POSTGRES_SSL* settings to its connections; "
                f"leave {name} unset, or give libpq's PGSSLMODE, PGSSLROOTCERT, ... instead",
            )


def check_settings(env: Environment) -> None:
    """Fail fast, naming the setting, where the pool would only time out.

    It also reads the TLS settings (`TLS_SETTINGS`), which eventsourcing does not, and
    hands them, in this thread's context, to the saga_es recorder the application builds
    next, so that every connection of its pool passes them.
    """
    for name in ("POSTGRES_DBNAME", "POSTGRES_HOST", "POSTGRES_USER"):
        if env.get(name) == "":
            raise ConfigurationError(name, "is set but empty")
        if env.get(name) is None:
            return  # eventsourcing names a missing setting itself
    port = env.get("POSTGRES_PORT") or "5432"
    if not (port.strip().isdecimal() and 1 <= int(port) <= 65535):  # libpq: "the host"
        raise ConfigurationError("POSTGRES_PORT", f"must be a number from 1 to 65535, got {port!r}")
    raw_timeout = env.get("POSTGRES_CONNECT_TIMEOUT") or ""
    if raw_timeout.strip().lstrip("-").isdecimal() and int(raw_timeout) <= 0:  # it would spin
        raise ConfigurationError(
            "POSTGRES_CONNECT_TIMEOUT", f"must be a positive number of seconds, got {raw_timeout!r}"
        )
    tls = tls_options(env)
    target: dict[str, Any] = {
        "host": env.get("POSTGRES_HOST"),
        "port": port,
        "dbname": env.get("POSTGRES_DBNAME"),
        "user": env.get("POSTGRES_USER"),
    }
    _pending_tls.set((_target(target), tls) if tls else None)
    if tls:
        _check_recorders_pass_tls(env)
    if env.get("POSTGRES_GET_PASSWORD_TOPIC"):
        return
    try:
        timeout = max(1, min(int(env.get("POSTGRES_CONNECT_TIMEOUT") or 5), 5))
    except ValueError:
        return
    password = env.get("POSTGRES_PASSWORD") or ""
    try:
        options: dict[str, Any] = {**target, **tls, "connect_timeout": timeout}
        psycopg.connect(**options, password=password).close()
    except psycopg.OperationalError as e:
        where = f"{env.get('POSTGRES_HOST')}:{port}"
        reason = " ".join(str(e).split()) or type(e).__name__
        message = f"cannot connect to PostgreSQL at {where}: {reason}"
        lowered = reason.lower()
        for words, setting in _TLS_FAILURES:
            if env.get(setting) and any(word in lowered for word in words):
                if password:
                    message = message.replace(password, "***")
                raise ConfigurationError(setting, message, unreachable=True) from None
        error = configuration_error(RuntimeError(message), env)
        error.unreachable = True  # the server may come up, the database be created
        raise error from None


class PostgresSagaProcessRecorder(
    PostgresTrackingRecorder, PostgresOneCallRecorder, ProcessRecorder
):
    """`PostgresOneCallRecorder` plus eventsourcing's tracking table: a `SagaProcess`'s recorder.

    A save without a tracking record is still one autocommit call. A save with one runs
    BEGIN; the tracking upsert; the insert function (table lock, NOTIFY, the events, the
    status rows); COMMIT, on the same connection: the events, their status rows and the
    tracking position commit together or not at all. The tracking row goes first, so a
    redelivered domain event fails fast, before the table lock.
    """

    def __init__(
        self,
        datastore: PostgresDatastore,
        *,
        events_table_name: str = "stored_events",
        tracking_table_name: str = "notification_tracking",
    ) -> None:
        super().__init__(
            datastore,
            tracking_table_name=tracking_table_name,
            events_table_name=events_table_name,
        )

    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        """Insert the events, and the tracking record if any, in one transaction."""
        tracking: Tracking | None = kwargs.get("tracking")
        ids: Sequence[int] | None
        if tracking is None:
            ids = super().insert_events(stored_events, **kwargs)
        else:
            statuses: Sequence[SagaStatus] = kwargs.get("saga_statuses") or ()
            ids = self._insert_tracked(stored_events, tracking, statuses)
        return ids

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def _insert_tracked(
        self,
        stored_events: Sequence[StoredEvent],
        tracking: Tracking,
        statuses: Sequence[SagaStatus],
    ) -> Sequence[int]:
        rows = [
            self.construct_pg_stored_event(s.originator_id, s.originator_version, s.topic, s.state)
            for s in stored_events
        ]
        if self.datastore.pool.max_size < 2:  # keeping the only connection would starve reads
            with self.datastore.get_connection() as conn:
                return self._tracked_transaction(conn, rows, tracking, statuses)
        with self._writer_lock:
            conn = self._writer or self._take_writer()
            try:
                return self._tracked_transaction(conn, rows, tracking, statuses)
            except psycopg.Error as e:
                if conn.broken or conn.closed:
                    self._give_back_writer()  # the retry takes a fresh one
                raise persistence_error(e) from e

    def _tracked_transaction(
        self,
        conn: Connection[DictRow],
        rows: list[PgStoredEvent],
        tracking: Tracking,
        statuses: Sequence[SagaStatus],
    ) -> list[int]:
        # The same insert function `insert_events` calls, inside this transaction.
        statement = self.insert_call_statement
        params: tuple[Any, ...] = (rows, self.lock_timeout)
        if statuses:  # states SQL cannot read: the application's rows, upserted by the call
            statement = self.insert_with_statuses_call_statement
            params = (rows, _status_rows(statuses), self.lock_timeout)
        with conn.transaction(), conn.cursor() as curs:
            self._insert_tracking(curs, tracking)
            if not rows:
                return []
            curs.execute(statement, params, prepare=True)
            return [row["notification_id"] for row in curs.fetchall()]
