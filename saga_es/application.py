"""`SagaApplication`: sagas over an `eventsourcing` event store (POPO, SQLite or PostgreSQL).

It is a plain `eventsourcing.application.Application`, configured by the same
settings (`PERSISTENCE_MODULE`, `SQLITE_DBNAME`, `POSTGRES_*`, ...), with SQLite
in `saga_es.db` as the default store. Running a saga starts it, hands it to the
runner and saves each boundary; reading one replays its stream.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import re
import sys
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from uuid import UUID, uuid4

from eventsourcing.application import AggregateNotFoundError, Application, ProcessingEvent
from eventsourcing.persistence import (
    ApplicationRecorder,
    EventStore,
    InfrastructureFactory,
    IntegrityError,
    JSONTranscoder,
    Recording,
    Transcoder,
)
from eventsourcing.popo import POPOFactory
from eventsourcing.utils import Environment, EnvType, TopicError, resolve_topic

from saga_es import compat, recovery, runner, tracing
from saga_es.aggregate import KEY_NAMESPACE, Saga, SagaStarted, StreamProblem, keyed_id, replay
from saga_es.clock import SYSTEM_CLOCK, Clock
from saga_es.commits import GroupCommit
from saga_es.compat import CheckReport
from saga_es.context import (
    LONGEST_KEY,
    SagaTranscoder,
    State,
    refused_text,
    shown_text,
    to_state,
    topic_of,
)
from saga_es.debug import RerunResult, rerun_step
from saga_es.definition import SagaDefinition
from saga_es.errors import (
    ChildSagaFailed,
    ConfigurationError,
    ContextError,
    DefinitionNotFound,
    IllegalTransition,
    SagaError,
    SagaNotFound,
    UnreadableEvent,
    VersionNotFound,
)
from saga_es.history import HistoryRecord, records
from saga_es.machine import CANCELLED, COMPENSATED, COMPLETED, NEW, STATES, STUCK
from saga_es.popo import POPOSagaRecorder
from saga_es.recovery import RecoveryReport
from saga_es.settings import (
    DEFAULT_STEP_TIMEOUT,
    SAGA_COMMIT_MAX_BATCH,
    SAGA_COMMIT_MAX_WAIT,
    SAGA_MAX_RESUMPTIONS,
    SAGA_STEP_TIMEOUT,
    Settings,
    commit_settings,
    configuration_error,
    step_timeout,
)
from saga_es.settings import max_resumptions as max_resumptions_setting
from saga_es.status import (
    IN_FLIGHT_STATES,
    SagaStatus,
    StatusQuery,
    StatusRecorder,
    saga_log_fields,
)

log = logging.getLogger("saga_es")
log.addHandler(logging.NullHandler())  # a library logs; the application decides where to

SAGA_LOG_FIELDS = ("saga_id", "saga_name", "step", "attempt")
"""The `extra` fields of every record on the `saga_es` logger (None where it is about none)."""


class SagaLogFields(logging.Filter):
    """Gives every record on the `saga_es` logger each of `SAGA_LOG_FIELDS`.

    A record about no saga, step or attempt (a worker starting, a redelivered domain
    event skipped) gets None, so a formatter or handler may name the fields on any record.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Fill in the fields the record lacks; never drop it."""
        fields = vars(record)
        for name in SAGA_LOG_FIELDS:
            fields.setdefault(name, None)
        return True


if not any(isinstance(f, SagaLogFields) for f in log.filters):  # once, even if reloaded
    log.addFilter(SagaLogFields())

_RECORDER_TOPIC = InfrastructureFactory.APPLICATION_RECORDER_TOPIC
_STORE_RECORDERS = (
    ("eventsourcing.sqlite", "SQLiteFactory", "saga_es.sqlite:SQLiteWriterRecorder"),
    ("eventsourcing.postgres", "PostgresFactory", "saga_es.postgres:PostgresOneCallRecorder"),
)
"""The recorder `SagaApplication` uses by default on each store's factory."""

SAGA_KEY_NAMESPACE = KEY_NAMESPACE
"""Saga ids derived from a business key are uuid5 in this namespace."""


@dataclass(frozen=True)
class SagaUpdate:
    """One recorded event of a running saga, as `stream()` yields it."""

    saga_id: UUID
    version: int
    event: str
    status: str
    timestamp: datetime
    step: str | None = None
    attempt: int | None = None
    error: dict[str, str] | None = None
    changes: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_event(cls, event: Saga.Event) -> SagaUpdate:
        """The update that reports `event`."""
        data = vars(event)
        error = None
        if "error_type" in data:
            error = {"type": data["error_type"], "message": data["error_message"]}
        return cls(
            saga_id=event.originator_id,
            version=event.originator_version,
            event=type(event).__name__,
            status=event.to_state,
            timestamp=event.timestamp,
            step=data.get("step"),
            attempt=data.get("attempt"),
            error=error,
            changes=dict(data.get("changes") or {}),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, for server-sent events or logs."""
        return json.loads(self.to_json())  # type: ignore[no-any-return]

    def to_json(self) -> str:
        """One line of JSON; values JSON cannot hold are written as strings."""
        return json.dumps(
            {
                "saga_id": str(self.saga_id),
                "version": self.version,
                "event": self.event,
                "status": self.status,
                "timestamp": self.timestamp.isoformat(),
                "step": self.step,
                "attempt": self.attempt,
                "error": self.error,
                "changes": self.changes,
            },
            default=str,
        )


class SagaApplication(Application[UUID]):
    """Runs sagas and reads them back, over any `eventsourcing` persistence module."""

    name = "SagaApplication"
    env = {  # noqa: RUF012 (eventsourcing reads it as a class attribute)
        "PERSISTENCE_MODULE": "eventsourcing.sqlite",
        "SQLITE_DBNAME": "saga_es.db",
    }

    snapshotting_intervals = {Saga: 100}  # noqa: RUF012 (eventsourcing's class attribute)
    snapshotting_projectors = {Saga: replay}  # noqa: RUF012

    SAGA_STEP_TIMEOUT = SAGA_STEP_TIMEOUT
    """Setting: seconds recovery leaves a step to its worker, unless the step sets `timeout`."""
    DEFAULT_STEP_TIMEOUT = DEFAULT_STEP_TIMEOUT
    SAGA_COMMIT_MAX_BATCH = SAGA_COMMIT_MAX_BATCH
    """Setting: most sagas' boundaries written by one group commit (default 100)."""
    SAGA_MAX_RESUMPTIONS = SAGA_MAX_RESUMPTIONS
    """Setting: times recovery re-runs a step whose outcome was lost (default 3)."""
    SAGA_COMMIT_MAX_WAIT = SAGA_COMMIT_MAX_WAIT
    """Setting: seconds a group commit waits for more boundaries (default 0: none)."""

    def __init__(
        self,
        env: EnvType | None = None,
        *,
        definitions: Iterable[SagaDefinition] = (),
        default_step_timeout: float | None = None,
        clock: Clock | None = None,
        max_resumptions: int | None = None,
    ) -> None:
        """Open the store; `clock` is where retry waits, breakers and deadlines read time.

        Tests pass a `saga_es.FakeClock`; step timeouts always run on real time.
        """
        settings = self.construct_env(self.name, env)
        try:
            if "postgres" in settings.get("PERSISTENCE_MODULE", ""):
                from saga_es.postgres import check_settings  # psycopg: only for PostgreSQL

                check_settings(settings)
            super().__init__(env)
        except ConfigurationError:
            raise
        except Exception as e:
            raise configuration_error(e, settings) from None
        self.default_step_timeout = step_timeout(default_step_timeout, settings)
        self.clock: Clock = clock or SYSTEM_CLOCK
        self.max_resumptions = max_resumptions_setting(max_resumptions, settings)
        """Times recovery re-runs a step whose outcome was lost, then the saga is stuck."""
        self.commit_max_batch, self.commit_max_wait = commit_settings(settings)
        self._group_commits: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, GroupCommit] = (
            weakref.WeakKeyDictionary()
        )
        self.definitions: dict[tuple[str, int], SagaDefinition] = {}
        self.register(*definitions)

    def construct_transcoder(self) -> Transcoder:
        """eventsourcing's, unless it is the plain `JSONTranscoder`: then a `SagaTranscoder`.

        So a transcoding registered for a `str` or `int` enum, or a tuple, is applied.
        `TRANSCODER_TOPIC` naming another transcoder is used as it is.
        """
        transcoder = self.factory.transcoder()
        if type(transcoder) is JSONTranscoder:
            transcoder = SagaTranscoder()
        if isinstance(transcoder, JSONTranscoder):
            self.register_transcodings(transcoder)
        return transcoder

    def construct_env(self, name: str, env: EnvType | None = None) -> Environment:
        """Eventsourcing's settings, in a dict whose repr hides passwords and keys."""
        settings = super().construct_env(name, env)
        return Settings(settings.name, settings)

    def register(self, *definitions: SagaDefinition) -> None:
        """Make definitions known by name and version, so recovery can resume their sagas.

        `run`, `arun` and `stream` register the definition they are given.
        """
        for definition in definitions:
            if not isinstance(definition, SagaDefinition):
                raise TypeError(f"expected a SagaDefinition, got {type(definition).__name__}")
            self.definitions[definition.name, definition.version] = definition

    def definition(self, name: str, version: int) -> SagaDefinition:
        """The registered definition `name` at `version`."""
        try:
            return self.definitions[name, version]
        except KeyError:
            raise DefinitionNotFound(name, version) from None

    def table_name(self, purpose: str) -> str:
        """`<name>_<purpose>`: how this application's tables are named on every durable store."""
        prefix = self.name.lower()
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", prefix):
            raise ConfigurationError(
                "name", f"{self.name!r} cannot prefix a table name (letters, digits and _ only)"
            )
        return f"{prefix}_{purpose}"

    def close(self) -> None:
        """Close the store; saga_es's PostgreSQL recorder first returns the connection it keeps."""
        close_recorder = getattr(getattr(self, "recorder", None), "close", None)
        if callable(close_recorder):
            close_recorder()
        super().close()

    def construct_snapshot_store(self) -> EventStore[UUID]:
        """Eventsourcing's snapshot store, in a table named after the application.

        On PostgreSQL it is created in turn: applications starting at once can collide.
        """
        sqlite = sys.modules.get("eventsourcing.sqlite")
        if sqlite is not None and isinstance(self.factory, sqlite.SQLiteFactory):
            snapshots = sqlite.SQLiteAggregateRecorder(
                self.factory.datastore, events_table_name=self.table_name("snapshots")
            )
            if self.factory.env_create_table():
                snapshots.create_table()
            sqlite_store: EventStore[UUID] = self.factory.event_store(
                mapper=self.mapper, recorder=snapshots
            )
            return sqlite_store
        postgres = sys.modules.get("eventsourcing.postgres")
        if postgres is None or not isinstance(self.factory, postgres.PostgresFactory):
            return super().construct_snapshot_store()
        from saga_es.postgres import PostgresSnapshotRecorder

        factory = self.factory
        recorder = PostgresSnapshotRecorder(
            datastore=factory.datastore,
            events_table_name=f"{factory.env.name.lower() or 'stored'}_snapshots",
        )
        if factory.env_create_table():
            recorder.create_table()
        store: EventStore[UUID] = factory.event_store(mapper=self.mapper, recorder=recorder)
        return store

    def construct_recorder(self) -> ApplicationRecorder:
        """The factory's recorder, subclassed by saga_es for each store.

        Each keeps the saga status projection in the same transaction as the events;
        `saga_es.sqlite` and `saga_es.postgres` say what else each changes (the tables and
        the notification log stay eventsourcing's). Setting `APPLICATION_RECORDER_TOPIC`
        chooses another recorder, such as eventsourcing's stock
        `eventsourcing.postgres:PostgresApplicationRecorder`.
        """
        if not self.env.get(_RECORDER_TOPIC):
            if isinstance(self.factory, POPOFactory):  # it does not read the setting
                return POPOSagaRecorder()
            sqlite = sys.modules.get("eventsourcing.sqlite")
            if sqlite is not None and isinstance(self.factory, sqlite.SQLiteFactory):
                from saga_es.sqlite import SQLiteWriterRecorder

                # Named after the application, as on PostgreSQL, so it can share a file
                # with the user's own applications (eventsourcing's are `stored_events`).
                recorder = SQLiteWriterRecorder(
                    self.factory.datastore, events_table_name=self.table_name("events")
                )
                if self.factory.env_create_table():
                    recorder.create_table()
                return recorder
            for module, factory, recorder_topic in _STORE_RECORDERS:
                loaded = sys.modules.get(module)  # a store's module is loaded if it is in use
                if loaded is not None and isinstance(self.factory, getattr(loaded, factory)):
                    self.env[_RECORDER_TOPIC] = recorder_topic
                    break
        return super().construct_recorder()

    # -- running -----------------------------------------------------------------------

    def run(self, definition: SagaDefinition, context: Any, *, key: str | None = None) -> Saga:
        """Run a saga to its end and return it; with a known `key`, return that saga."""
        return self._run_saga(definition, context, key)

    def _run_saga(
        self,
        definition: SagaDefinition,
        context: Any,
        key: str | None,
        parent: tuple[str, str] | None = None,
    ) -> Saga:
        """`run`; `parent` (saga id, step) is what a nested saga's `SagaStarted` names."""
        saga = self._start(definition, context, key, parent=parent)
        clock = self.clock
        if saga.pending_events:
            if not self._save_start(saga):
                return self.get(saga.id)
            try:
                with tracing.saga_span(saga, "run"):
                    saga = runner.run(
                        saga,
                        definition,
                        self._save,
                        self._check_encodable,
                        clock=clock,
                        reload=self.get,
                    )
            except IntegrityError:
                return self._taken_over(saga)
        return saga

    def submit(
        self, definition: SagaDefinition | str, context: Any, *, key: str | None = None
    ) -> UUID:
        """Record a pending saga and return its id at once; a worker runs it.

        `definition` is a definition or the name of a registered one (its latest
        version). With a known `key`, the saga already started under it is returned.
        Nothing is stored if the definition is unknown or the context cannot be.
        """
        if isinstance(definition, str):
            versions = [v for (name, v) in self.definitions if name == definition]
            if not versions:
                raise DefinitionNotFound(definition)
            definition = self.definitions[definition, max(versions)]
        saga = self._start(definition, context, key, begin=False)
        if saga.pending_events:
            self._save_start(saga)
        return saga.id

    def work(
        self,
        *,
        concurrency: int = 8,
        poll_interval: float = 1.0,
        stop: threading.Event | None = None,
        until_idle: bool = False,
    ) -> RecoveryReport:
        """Run submitted and interrupted sagas, `concurrency` at a time, until `stop` is set.

        Many workers, in many processes, may share one PostgreSQL: each lists the sagas
        in flight from the status projection, and a saga's version check lets exactly
        one of them append its next start. `stop` lets the sagas in hand finish;
        `until_idle` returns once a pass over the store finds nothing to run.
        """
        return asyncio.run(
            self.awork(
                concurrency=concurrency,
                poll_interval=poll_interval,
                stop=stop,
                until_idle=until_idle,
            )
        )

    async def awork(
        self,
        *,
        concurrency: int = 8,
        poll_interval: float = 1.0,
        stop: threading.Event | None = None,
        until_idle: bool = False,
    ) -> RecoveryReport:
        """`work` on the running event loop."""
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be an int >= 1, got {concurrency!r}")
        if (
            isinstance(poll_interval, bool)
            or not isinstance(poll_interval, int | float)
            or not 0 < poll_interval < math.inf  # 0, below or NaN: a busy loop on the store
        ):
            raise ValueError(f"poll_interval must be seconds > 0, got {poll_interval!r}")
        if stop is not None and not isinstance(stop, threading.Event):
            raise TypeError(f"stop must be a threading.Event, got {stop!r}")
        return await recovery.work(
            self,
            concurrency=concurrency,
            poll_interval=poll_interval,
            stop=stop or threading.Event(),
            until_idle=until_idle,
        )

    # -- nested sagas (see `Step.saga`) ------------------------------------------------------

    def _run_child(self, definition: SagaDefinition, context: Any, key: str) -> dict[str, str]:
        """Start a parent step's child (once: it is keyed by the step) and drive it to its end."""
        parent_id, step = key.split(":", 1)  # the parent step's key: `<parent id>:<step>`
        child = self._run_saga(definition, context, key, parent=(parent_id, step))
        if child.status in IN_FLIGHT_STATES:  # started before, then left by a dead worker
            child = self._finish(child.id, definition)
        if child.status != COMPLETED:
            raise ChildSagaFailed(child.id, child.status, child.error)
        return {"saga_id": str(child.id), "status": child.status}

    def _revert_child(self, definition: SagaDefinition, key: str) -> None:
        """Compensate the child a parent step started: its completed steps, in reverse."""
        try:
            child = self.get(self.saga_id(definition.name, key))
        except SagaNotFound:
            return  # never started: nothing to undo
        if child.status in IN_FLIGHT_STATES:
            child = self._finish(child.id, definition)
        if child.status == COMPLETED:
            parent_id, step = key.split(":", 1)
            child.revert(parent_saga_id=parent_id, parent_step=step)
            runner.resume(child, definition)
            self._save(child)
            check, clock, reload = self._check_encodable, self.clock, self.get
            child = runner.run(child, definition, self._save, check, clock=clock, reload=reload)
        if child.status not in (COMPENSATED, CANCELLED):
            raise ChildSagaFailed(child.id, child.status, child.error)

    def _finish(self, saga_id: UUID, definition: SagaDefinition) -> Saga:
        """Resume a saga in flight now, whatever its step's timeout (its driver is here)."""
        return self._resume(recovery.rebuild(self, saga_id), definition)

    def _resume(self, saga: Saga, definition: SagaDefinition) -> Saga:
        """Drive a pending or interrupted saga to its end, from where its stream stops.

        Its first append is the fencing point: a worker that took the saga meanwhile
        makes it fail with `IntegrityError`, and this driver stops there.
        """
        first = runner.resume(saga, definition, self.max_resumptions)
        self._save(saga)
        check, clock, reload = self._check_encodable, self.clock, self.get
        return runner.run(saga, definition, self._save, check, first, clock, reload)

    def _taken_over(self, saga: Saga) -> Saga:
        """Another writer appended first: keep its history, stop, and say who it was."""
        stored = self.get(saga.id)
        if stored.cancel_requested is not None and saga.cancel_requested is None:
            # With nothing in flight (a retry's wait, say) the cancel drives the saga itself.
            log.info(
                "saga %s was cancelled by %s at version %s; the cancel goes on with it and "
                "this runner stopped",
                saga.id,
                stored.cancel_requested.get("by"),
                stored.version,
                extra=saga_log_fields(saga),
            )
            return stored
        log.warning(
            "saga %s was taken over by another worker at version %s; this worker stopped "
            "and its late events were rejected",
            saga.id,
            saga.version,
            extra=saga_log_fields(saga),
        )
        return stored

    async def arun(
        self, definition: SagaDefinition, context: Any, *, key: str | None = None
    ) -> Saga:
        """`run`, awaiting async steps and running sync ones in threads."""
        started = await asyncio.to_thread(self._start, definition, context, key)
        result = started
        async for _, stored in self._drive(started, definition):
            result = stored
        return result

    async def stream(
        self, definition: SagaDefinition, context: Any, *, key: str | None = None
    ) -> AsyncIterator[SagaUpdate]:
        """Run a saga, yielding an update for each event once it is durable.

        With a known `key`, the first saga's history is yielded and nothing runs.
        """
        saga = await asyncio.to_thread(self._start, definition, context, key)
        async for events, _ in self._drive(saga, definition):
            for event in events:
                yield SagaUpdate.from_event(event)

    async def _drive(
        self, saga: Saga, definition: SagaDefinition
    ) -> AsyncIterator[tuple[Sequence[Saga.Event], Saga]]:
        """Each commit's events, with the saga as stored (the last one is the result)."""
        if not saga.pending_events:  # started before, under the same key
            yield await asyncio.to_thread(self.saga_events, saga.id), saga
            return
        events: Sequence[Saga.Event] = list(saga.pending_events)  # type: ignore[arg-type]
        if not await self._asave_start(saga):  # started meanwhile elsewhere
            stored = await asyncio.to_thread(self.get, saga.id)
            yield await asyncio.to_thread(self.saga_events, saga.id), stored
            return
        yield events, saga
        try:
            check, clock = self._check_encodable, self.clock
            reload = self.get
            with tracing.saga_span(saga, "arun"):
                async for events in runner.arun(
                    saga, definition, self._asave, check, clock=clock, reload=reload
                ):
                    if events and events[-1].originator_version != saga.version:
                        saga = await asyncio.to_thread(self.get, saga.id)  # a cancel was obeyed
                    yield events, saga
        except IntegrityError:
            yield [], await asyncio.to_thread(self._taken_over, saga)

    def _start(
        self,
        definition: SagaDefinition,
        context: Any,
        key: str | None,
        *,
        begin: bool = True,
        parent: tuple[str, str] | None = None,
    ) -> Saga:
        """A new saga with its first step written ahead, or the one already under `key`."""
        self.register(definition)
        try:
            context_type = topic_of(context)
            state = to_state(context)
        except ContextError:
            raise
        except TypeError as e:
            raise ContextError("(context)", context, str(e)) from None
        self._check_context(context_type, state)
        if key is not None:
            _check_key(key)
            saga_id = self.saga_id(definition.name, key)
            try:
                return self.get(saga_id)
            except SagaNotFound:
                pass
        else:
            saga_id = uuid4()
        saga = Saga.start(
            id=saga_id,
            name=definition.name,
            definition_version=definition.version,
            steps=definition.step_names,
            compensable=definition.compensable,
            key=None if key is None else str(key),
            context_type=context_type,
            context=state,
            parallel=[list(group) for group in definition.groups],
            fallback_compensable=definition.fallback_compensable,
            deadline=None
            if definition.deadline is None
            else self.clock.now() + timedelta(seconds=definition.deadline),
            parent_saga_id=None if parent is None else parent[0],
            parent_step=None if parent is None else parent[1],
            children=definition.children,
        )
        if begin:
            runner.begin(saga)
        return saga

    def _save_start(self, saga: Saga) -> bool:
        """Save a new saga; False if another process started it under the same key first."""
        try:
            self._save(saga)
        except IntegrityError:
            if saga.key is None:
                raise
            return False
        return True

    def _record(self, processing_event: ProcessingEvent[UUID]) -> list[Recording[UUID]]:
        """Record events with the status rows of their sagas, in one transaction."""
        if self._keeps_statuses:
            statuses = [
                SagaStatus.of(aggregate)
                for aggregate in processing_event.aggregates.values()
                if isinstance(aggregate, Saga)
            ]
            if statuses:
                processing_event.saved_kwargs["saga_statuses"] = statuses
        return super()._record(processing_event)

    @functools.cached_property
    def _lean_saves(self) -> bool:
        """No subclass hook or cache needs the `Recording`s a full save builds."""
        cls = type(self)
        return (
            cls._notify is Application._notify
            and cls.notify is Application.notify
            and cls._record is SagaApplication._record
            and not self.repository.cache
        )

    def _snapshot_due(self, events: Sequence[Saga.Event]) -> bool:
        interval = self.snapshotting_intervals.get(Saga)
        return bool(self.snapshots and interval) and any(
            [e.originator_version % interval == 0 for e in events]  # type: ignore[operator]
        )

    @functools.cached_property
    def _keeps_statuses(self) -> bool:
        """Whether the recorder wants status rows from us (not derived in the database).

        A database derives them from each event's JSON state: when the mapper ciphers or
        compresses the states, it cannot, so saga_es's recorders are told to take ours.
        """
        recorder = self.recorder
        opaque = self.mapper.cipher is not None or self.mapper.compressor is not None
        if opaque and isinstance(recorder, StatusRecorder):
            recorder.wants_status_rows = True
        return bool(getattr(recorder, "wants_status_rows", False))

    def _save(self, saga: Saga) -> Sequence[Saga.Event]:
        """`save(saga)` as one transaction; with nothing pending, no transaction at all."""
        events: list[Saga.Event] = saga.collect_events()  # type: ignore[assignment]
        if events:
            self._write([(saga, events)])
        return events

    def _write(self, batch: Sequence[tuple[Saga, Sequence[Saga.Event]]]) -> None:
        """Write several sagas' collected events in one transaction.

        It does what `Application.save` does, minus that method's two runtime Protocol
        checks (~30 µs a call on Python 3.11, half of a POPO saga's time). While nothing
        listens to saves (the `notify` hooks, an aggregate cache) and no snapshot is due,
        it hands the stored events straight to the recorder.
        """
        snapshot_due = self._snapshot_due
        if self._lean_saves and not any([snapshot_due(events) for _, events in batch]):
            to_stored_event = self.mapper.to_stored_event
            stored = [to_stored_event(e) for _, events in batch for e in events]
            if self._keeps_statuses:
                statuses = [SagaStatus.of(saga) for saga, _ in batch]
                self.recorder.insert_events(stored, saga_statuses=statuses)
            else:
                self.recorder.insert_events(stored)
        else:
            self._save_fully(batch)
        _log_events(batch)

    def _save_fully(self, batch: Sequence[tuple[Saga, Sequence[Saga.Event]]]) -> None:
        """`Application.save`'s own path: hooks, cache and snapshots see every save."""
        processing_event: ProcessingEvent[UUID] = ProcessingEvent()  # not [UUID](): ~0.4 µs
        for saga, events in batch:
            processing_event.events.extend(events)
            processing_event.aggregates[saga.id] = saga
        recordings = self._record(processing_event)
        self._take_snapshots(processing_event)
        self._notify(recordings)
        self.notify(processing_event.events)  # deprecated in eventsourcing, still called

    def _group_commit(self) -> GroupCommit:
        """The running event loop's commit queue (each loop has its own)."""
        loop = asyncio.get_running_loop()
        queue = self._group_commits.get(loop)
        if queue is None:
            queue = GroupCommit(
                self._write, max_batch=self.commit_max_batch, max_wait=self.commit_max_wait
            )
            self._group_commits[loop] = queue
        return queue

    async def _asave(self, saga: Saga) -> Sequence[Saga.Event]:
        return await self._group_commit().save(saga)

    async def _asave_start(self, saga: Saga) -> bool:
        """`_save_start` through the group commit."""
        try:
            await self._asave(saga)
        except IntegrityError:
            if saga.key is None:
                raise
            return False
        return True

    def _check_context(self, context_type: str, state: State) -> None:
        try:
            resolve_topic(context_type)
        except TopicError as e:
            raise ContextError("(context)", state, f"its type cannot be found again: {e}") from None
        self._check_encodable(state, None)

    def _check_encodable(self, state: State, result: Any) -> None:
        """Raise `ContextError`, naming the field, for what some store could not keep.

        Beyond what the transcoder refuses: NaN and infinities (not JSON: SQLite and
        PostgreSQL refuse them) and NUL characters (PostgreSQL cannot store them), so a
        saga is refused alike on every store, before anything is stored.
        """
        transcoder = self.mapper.transcoder
        if isinstance(transcoder, JSONTranscoder) and _plain_json(state) and _plain_json(result):
            return  # JSON takes these as they are: no need to encode them twice
        fields = [*state.items(), ("(result)", result)]
        try:
            _encode(transcoder, state)
            _encode(transcoder, result)
        except (TypeError, ValueError):
            for name, value in fields:
                _check_value(transcoder, name, value)
            for name in state:  # the values encode alone: a field's name is what JSON refuses
                _check_value(transcoder, str(name), {name: None}, "its name cannot be a JSON key")
            raise

    @staticmethod
    def saga_id(name: str, key: str) -> UUID:
        """The id of the saga of definition `name` started under business `key`."""
        return keyed_id(name, key)

    # -- reading -----------------------------------------------------------------------

    def get(self, saga_id: UUID | str, version: int | None = None) -> Saga:
        """The saga as it is now, or as it was right after event number `version`."""
        saga_id = _as_uuid(saga_id)
        if version is not None and not isinstance(version, int):  # "2" would fail deep inside
            raise TypeError(f"version must be an int >= 1 or None, got {version!r}")
        if version is not None and (isinstance(version, bool) or version < 1):
            raise VersionNotFound(saga_id, version, self._last_version(saga_id))
        try:
            saga: Saga = self.repository.get(saga_id, version=version, projector_func=replay)
        except AggregateNotFoundError:
            raise SagaNotFound(saga_id) from None
        except SagaError:
            raise
        except Exception as e:
            raise self.unreadable(saga_id, e) from e
        if version is not None and saga.version < version:
            raise VersionNotFound(saga_id, version, saga.version)
        return saga

    def saga_events(self, saga_id: UUID | str) -> list[Saga.Event]:
        """Every domain event of the saga, in order (`history` is the audit view of them)."""
        saga_id = _as_uuid(saga_id)
        try:
            events: list[Saga.Event] = list(self.events.get(saga_id))  # type: ignore[arg-type]
        except Exception as e:
            raise self.unreadable(saga_id, e) from e
        if not events:
            raise SagaNotFound(saga_id)
        return events

    def history(self, saga_id: UUID | str, *, strict: bool = True) -> list[HistoryRecord]:
        """The saga's history as an auditor reads it: one typed record per event.

        Each record has its position, version, time, event, step, attempt, state after,
        error, and each context change as before → after. With `strict=False` an event
        that cannot be decoded is a record marked `readable=False` and the rest still
        reads; by default it raises `UnreadableEvent`.
        """
        saga_id = _as_uuid(saga_id)
        stored = self.recorder.select_events(saga_id)
        if not stored:
            raise SagaNotFound(saga_id)
        select_positions = getattr(self.recorder, "select_positions", None)
        positions = select_positions(saga_id) if select_positions is not None else None
        rows = records(stored, self.mapper.to_domain_event, positions)
        if strict:
            for row in rows:
                if not row.readable:
                    assert row.error is not None
                    reason = self._cipher_hint(f"{row.error.type}: {row.error.message}")
                    raise UnreadableEvent(saga_id, row.version, row.event, reason)
        return rows

    # -- recovery and audit (see saga_es.recovery) --------------------------------------

    def recover(
        self,
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> RecoveryReport:
        """Resume every saga in flight whose worker is gone.

        Forward if running, backward if compensating; a saga whose current step is
        within its timeout is left to its worker, and one that cannot be resumed is
        reported, not fatal. `progress(done, total)` is called after each saga.
        """
        return recovery.recover(self, progress=progress)

    def resolve(self, saga_id: UUID | str, action: str = "retry", *, by: str, reason: str) -> Saga:
        """Finish a stuck saga by hand, recording who did it and why.

        `action="retry"` runs the failed compensation again; `"mark-compensated"` records
        that `by` undid that step by hand. Either way compensation then goes on, so the
        saga ends `compensated` (or `stuck` again, if another compensation fails).
        """
        for label, value in (("by", by), ("reason", reason)):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"resolve needs {label}= (a non-empty string), got {value!r}")
            _check_text(f"resolve {label}=", value)
        saga = self.get(saga_id)
        if saga.status != STUCK:  # said first: its definition need not be registered to know
            raise IllegalTransition(
                saga.id, saga.status, "resolve_saga", "only a stuck saga can be resolved"
            )
        definition = self.definition(saga.name, saga.definition_version)
        with tracing.saga_span(saga, "resolve"):
            return self._resolve(saga, definition, action, by=by, reason=reason)

    def _resolve(
        self, saga: Saga, definition: SagaDefinition, action: str, *, by: str, reason: str
    ) -> Saga:
        runner.resolve(saga, action, by=by, reason=reason)
        try:
            self._save(saga)
            saga = runner.run(
                saga,
                definition,
                self._save,
                self._check_encodable,
                clock=self.clock,
                reload=self.get,
            )
        except IntegrityError:
            return self._taken_over(saga)
        return saga

    def rerun_step(
        self,
        saga_id: UUID | str,
        step: str,
        version: int | None = None,
        *,
        compensation: bool = False,
    ) -> RerunResult:
        """Call one step's action (or compensation) with its recorded context; append nothing.

        The context is the one the step's latest attempt started with, or the saga's as of
        `version`. The result says what the call returned or raised and what it changed.
        """
        return rerun_step(self, saga_id, step, version, compensation=compensation)

    def check(
        self,
        definition: SagaDefinition,
        *,
        recent: timedelta | None = timedelta(days=1),
        limit: int | None = None,
    ) -> CheckReport:
        """Replay the sagas in flight (and those ended within `recent`) against `definition`.

        The report says, per saga, where the stored stream and the definition diverge (a
        step renamed, removed or reordered, a version mismatch, a compensation gone) and
        whether that would stop this code recovering it: run it before a deploy.
        """
        return compat.check(self, definition, recent=recent, limit=limit)

    def fork(
        self,
        saga_id: UUID | str,
        from_step: str,
        definition: SagaDefinition | None = None,
        *,
        key: str | None = None,
    ) -> Saga:
        """Run a new saga that continues `saga_id` from `from_step`, under `definition`.

        The new saga starts from the context recorded right before `from_step` first
        started; the steps before it are carried over (`SagaForked`), not run again, and
        it runs from `from_step` on (by default under the original's definition; after a
        fix, under the fixed one). The original's stream is never changed. A definition
        that lacks a carried-over step is refused with the divergences (`ForkRefused`).
        A `key` is checked and stored as `run` does its own, so it reads alike on every store.
        """
        if key is not None:
            _check_key(key)
            key = str(key)
        source = self.get(saga_id)
        if definition is None:
            definition = self.definition(source.name, source.definition_version)
        return compat.fork(self, source, from_step, definition, key)

    def _run_fork(
        self,
        definition: SagaDefinition,
        before: Saga,
        from_step: str,
        carried: list[str],
        key: str | None,
    ) -> Saga:
        """Start the fork (`SagaStarted`, `SagaForked`, the first start: one commit), run it."""
        self.register(definition)
        saga_id = uuid4() if key is None else self.saga_id(definition.name, key)
        saga = Saga.start(
            id=saga_id,
            name=definition.name,
            definition_version=definition.version,
            steps=definition.step_names,
            compensable=definition.compensable,
            key=key,
            context_type=before.context_type,
            context=dict(before.context_state),
            parallel=[list(group) for group in definition.groups],
            fallback_compensable=definition.fallback_compensable,
            children=definition.children,
        )
        saga.fork(
            source_saga_id=str(before.id),
            source_version=before.version,
            from_step=from_step,
            carried=carried,
            keys={step: before.step_key(step) for step in carried},
            fallbacks=[step for step in carried if step in before.on_fallback],
        )
        runner.begin(saga)
        if not self._save_start(saga):
            return self.get(saga_id)  # forked before under the same key
        try:
            check, reload = self._check_encodable, self.get
            with tracing.saga_span(saga, "fork"):
                saga = runner.run(
                    saga, definition, self._save, check, clock=self.clock, reload=reload
                )
        except IntegrityError:
            return self._taken_over(saga)
        return saga

    def cancel(self, saga_id: UUID | str, *, by: str, reason: str) -> Saga:
        """Ask a saga to stop; who and why are recorded (`CancelRequested`).

        No further step starts: what completed is compensated in reverse order and the
        saga ends `cancelled` (a pending saga at once, with no step run). A worker
        running one of its steps meets the request at its next append and obeys; with
        nothing in flight, this call drives the compensation itself (when it knows the
        definition; else recovery will). A terminal or stuck saga cannot be cancelled.
        """
        for label, value in (("by", by), ("reason", reason)):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"cancel needs {label}= (a non-empty string), got {value!r}")
            _check_text(f"cancel {label}=", value)
        for _ in range(5):  # a worker may append between our read and our append
            saga = self.get(saga_id)
            drive = runner.cancel(saga, by=by, reason=reason)
            try:
                self._save(saga)
            except IntegrityError:
                continue
            key = (saga.name, saga.definition_version)
            if drive and key in self.definitions:
                definition, check = self.definitions[key], self._check_encodable
                try:
                    with tracing.saga_span(saga, "cancel"):
                        saga = runner.run(saga, definition, self._save, check, clock=self.clock)
                except IntegrityError:
                    return self._taken_over(saga)
            return saga
        raise IntegrityError(f"saga {saga_id}: kept losing the race to append its cancel")

    def verify(self) -> list[StreamProblem]:
        """Replay every stored stream through the state machine; what it would refuse."""
        return recovery.verify(self)

    def sagas(
        self,
        *,
        status: str | Sequence[str] | None = (),
        name: str | None = None,
        key: str | None = None,
        started_after: datetime | date | None = None,
        started_before: datetime | date | None = None,
        after: UUID | str | None = None,
        limit: int = 100,
    ) -> list[SagaStatus]:
        """The sagas matching every filter, oldest first, one page of status rows.

        Answered from the status projection, never by replaying streams; page on with
        `after=` the last row's `saga_id`. An unknown status or a malformed cursor is a
        `ValueError` naming it; a cursor naming no stored saga is `SagaNotFound` (an empty
        page would read as "no more sagas").
        """
        if after is not None and not isinstance(after, UUID):
            try:
                after = UUID(str(after))
            except ValueError:
                raise ValueError(f"after= must be a saga id (a UUID), got {after!r}") from None
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be an int >= 1, got {limit!r}")
        query = _status_query(status, name, key, started_after, started_before, after, limit)
        rows = self._status_recorder.select_statuses(query)
        if not rows and after is not None and not self.recorder.select_events(after, limit=1):
            raise SagaNotFound(after)
        return rows

    statuses = sagas
    """`sagas` under the name of the projection it reads."""

    def stats(
        self,
        *,
        status: str | Sequence[str] | None = (),
        name: str | None = None,
        key: str | None = None,
        started_after: datetime | date | None = None,
        started_before: datetime | date | None = None,
    ) -> dict[tuple[str, str], int]:
        """How many sagas there are per (definition name, status), from the projection.

        The filters are `sagas`'s: with any, the matching rows are counted page by page.
        """
        query = _status_query(status, name, key, started_after, started_before)
        if query == StatusQuery():
            return self._status_recorder.count_statuses()
        counts: dict[tuple[str, str], int] = {}
        query = replace(query, limit=1000)
        while True:  # the checked query, a page at a time
            page = self._status_recorder.select_statuses(query)
            for row in page:
                counts[row.name, row.status] = counts.get((row.name, row.status), 0) + 1
            if len(page) < query.limit:
                return counts
            query = replace(query, after=page[-1].saga_id)

    def rebuild_status(self) -> int:
        """Recompute the status row of every readable saga from its events; how many.

        A saga whose stream cannot be read keeps the row it has (see `verify`).
        """
        recorder = self._status_recorder
        count = 0
        for saga_id in self.stream_ids():
            try:
                saga = self.get(saga_id)
            except SagaError as e:
                log.error(
                    "status of saga %s not rebuilt: %s", saga_id, e, extra={"saga_id": str(saga_id)}
                )
                continue
            recorder.write_statuses([SagaStatus.of(saga)])
            count += 1
        return count

    @property
    def _status_recorder(self) -> StatusRecorder:
        if not isinstance(self.recorder, StatusRecorder):
            raise ConfigurationError(
                _RECORDER_TOPIC,
                f"{type(self.recorder).__name__} keeps no saga status projection; "
                "use saga_es's recorder (leave the setting unset)",
            )
        self._keeps_statuses  # noqa: B018 (tells the recorder, before any row is written)
        return self.recorder

    def all_sagas(self) -> Iterator[Saga]:
        """Every saga in the store, rebuilt, in the order they were started (reads every stream)."""
        start: int | None = None
        while True:
            page = self.recorder.select_notifications(
                start, limit=100, topics=[SagaStarted.TOPIC], inclusive_of_start=False
            )
            for notification in page:
                yield self.get(notification.originator_id)
            if len(page) < 100:
                return
            start = page[-1].id

    def unreadable(self, saga_id: UUID, error: Exception) -> Exception:
        """The `UnreadableEvent` naming the stored event that failed to decode, else `error`."""
        for record in self.recorder.select_events(saga_id):
            try:
                self.mapper.to_domain_event(record)
            except Exception as e:
                reason = self._cipher_hint(f"{type(e).__name__}: {e}")
                return UnreadableEvent(saga_id, record.originator_version, record.topic, reason)
        return error

    def _cipher_hint(self, reason: str) -> str:
        """`reason`, naming the settings when a state could not be deciphered or decoded."""
        if "deserialise state" not in reason:
            return reason
        if self.mapper.cipher is not None and "cipher" in reason.lower():
            return f"{reason} (was it written with another CIPHER_KEY?)"
        binary = "codec can't decode" in reason or "Expecting value" in reason
        if self.mapper.cipher is None and self.mapper.compressor is None and binary:
            return f"{reason} (was it written with CIPHER_KEY or COMPRESSOR_TOPIC set?)"
        if self.mapper.compressor is None and binary:  # deciphered, but still compressed
            return f"{reason} (was it written with COMPRESSOR_TOPIC set?)"
        return reason

    def stream_ids(self) -> Iterator[UUID]:
        """The id of every saga stream in the store, in the order each first appears.

        Read from the notification log, so it finds streams written by any writer
        (with or without a status row); it reads every event once.
        """
        seen: set[UUID] = set()
        start: int | None = None
        while True:
            page = self.recorder.select_notifications(start, limit=1000, inclusive_of_start=False)
            for notification in page:
                saga_id = notification.originator_id
                if notification.topic.startswith("saga_es:") and saga_id not in seen:
                    seen.add(saga_id)  # type: ignore[arg-type]
                    yield saga_id  # type: ignore[misc]
            if len(page) < 1000:
                return
            start = page[-1].id

    def _last_version(self, saga_id: UUID) -> int:
        """The version of the saga's latest stored event, read without decoding it.

        So a stream that cannot be decoded (another `CIPHER_KEY`) still has a version, and
        a worker's look before rebuilding leaves the error to the rebuild, which reports it.
        """
        last = self.recorder.select_events(saga_id, desc=True, limit=1)
        if not last:
            raise SagaNotFound(saga_id)
        return last[0].originator_version


_LEVELS = {
    "SagaCompleted": logging.INFO,
    "SagaCompensated": logging.INFO,
    "SagaResolved": logging.INFO,
    "SagaCancelled": logging.INFO,
    "CancelRequested": logging.INFO,
    "StepFailed": logging.WARNING,
    "CompensationFailed": logging.WARNING,
    "SagaStuck": logging.ERROR,
    "SagaTimedOut": logging.WARNING,
}


def _log_events(batch: Sequence[tuple[Saga, Sequence[Saga.Event]]]) -> None:
    """One log record per durable event, with the saga id, step and attempt as fields.

    A saga's end is INFO, a failure WARNING, a stuck saga ERROR, every other event DEBUG.
    """
    debug = log.isEnabledFor(logging.DEBUG)  # once per batch: most events are DEBUG
    for saga, events in batch:
        for event in events:
            name = type(event).__name__
            level = _LEVELS.get(name, logging.DEBUG)
            if (level == logging.DEBUG and not debug) or not log.isEnabledFor(level):
                continue
            data = vars(event)
            step, attempt = data.get("step"), data.get("attempt")
            error = (
                f" {data['error_type']}: {data['error_message']}" if "error_type" in data else ""
            )
            where = (
                f" {step}" + (f" attempt {attempt}" if attempt is not None else "") if step else ""
            )
            log.log(
                level,
                "saga %s %s v%s: %s%s%s",
                saga.name,
                saga.id,
                event.originator_version,
                name,
                where,
                error,
                extra={
                    "saga_id": str(saga.id),
                    "saga_name": saga.name,
                    "step": step,
                    "attempt": attempt,
                },
            )


def _status_query(
    status: str | Sequence[str] | None,
    name: str | None,
    key: str | None,
    started_after: datetime | date | None,
    started_before: datetime | date | None,
    after: UUID | None = None,
    limit: int = 100,
) -> StatusQuery:
    """The filters of `sagas` and `stats`, checked here so every store refuses them alike.

    A filter of the wrong type would otherwise match nothing on one store and fail in the
    driver on another. `None` means no filter, for `status` too.
    """
    if status is None:
        statuses: tuple[str, ...] = ()
    elif isinstance(status, str):
        statuses = (status,)
    elif isinstance(status, bytes | bytearray):  # iterable, but of ints: name it as it was given
        raise ValueError(f"status= must be a saga status or a list of them, got {status!r}")
    else:
        try:
            statuses = tuple(status)
        except TypeError:
            raise ValueError(
                f"status= must be a saga status or a list of them, got {status!r}"
            ) from None
    unknown = [s for s in statuses if not isinstance(s, str) or s not in STATES or s == NEW]
    if unknown:
        raise ValueError(
            f"unknown saga status {unknown[0]!r}; expected one of {', '.join(STATES[1:])}"
        )
    for label, value in (("name", name), ("key", key)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{label}= must be a str or None, got {value!r}")
    return StatusQuery(
        statuses=statuses,
        name=name,
        key=key,
        started_after=_moment("started_after", started_after),
        started_before=_moment("started_before", started_before),
        after=after,
        limit=limit,
    )


def _moment(name: str, value: datetime | date | None) -> datetime | None:
    """A time filter as a datetime: a date is its midnight UTC, as `saga-es list` reads one."""
    if value is None or isinstance(value, datetime):
        return value
    if isinstance(value, date):
        return datetime.combine(value, time(), UTC)
    raise ValueError(f"{name}= must be a datetime (or a date) or None, got {value!r}")


def _as_uuid(saga_id: UUID | str) -> UUID:
    """Accept ids as typed on a command line, too."""
    if isinstance(saga_id, UUID):
        return saga_id
    try:
        return UUID(str(saga_id))
    except ValueError:
        raise SagaNotFound(saga_id) from None  # type: ignore[arg-type]


_JSON_SCALARS = frozenset({int, bool, type(None)})
"""Scalars every store takes as they are; a str or float only passes `_plain_scalar`."""


def _plain_scalar(value: Any) -> bool:
    kind = type(value)
    if kind in _JSON_SCALARS:
        return True
    if kind is str:  # a non-ASCII one may hold a lone surrogate: let the encoder judge it
        return value.isascii() and "\x00" not in value
    return kind is float and value - value == 0  # not NaN nor Infinity


def _plain_json(value: Any) -> bool:
    """True for a scalar, or a flat dict (str keys) or list of scalars: always encodable."""
    kind = type(value)
    if kind is dict:
        for k, v in value.items():  # a loop, not all(...): this runs at every boundary
            if type(k) is not str or not k.isascii() or "\x00" in k:
                return False
            if type(v) not in _JSON_SCALARS and not _plain_scalar(v):
                return False
        return True
    if kind is list:
        return all(_plain_scalar(v) for v in value)
    return _plain_scalar(value)


_NUL = re.compile(rb"(?:^|[^\\])(?:\\\\)*\\u0000")
"""A NUL character as JSON writes it (not an escaped backslash followed by `u0000`)."""


def _encode(transcoder: Transcoder, value: Any) -> None:
    """Encode `value` as it would be stored; `ValueError` for what a store would refuse.

    PostgreSQL cannot hold a NUL character in JSON text: it is refused on every store,
    so a saga can be moved from one to another.
    """
    encoded = transcoder.encode(value)
    if isinstance(transcoder, JSONTranscoder) and _NUL.search(encoded):
        raise ValueError("it holds the character NUL (\\x00), which PostgreSQL cannot store")


def _check_text(label: str, text: str, longest: int | None = None) -> None:
    """Refuse, on every store, a recorded text that some store could not keep (or index)."""
    reason = refused_text(text, longest)
    if reason is not None:
        raise ValueError(f"{label} {shown_text(text)} cannot be stored: {reason}")


def _check_key(key: Any) -> None:
    """A business key is indexed by the status rows: `_check_text` with its bound."""
    _check_text("key", str(key), LONGEST_KEY)


def _check_value(transcoder: Transcoder, name: str, value: Any, why: str = "") -> None:
    try:
        _encode(transcoder, value)
    except (TypeError, ValueError) as e:
        reason = str(e).split(". Please")[0]
        raise ContextError(name, value, f"{why} ({reason})" if why else reason) from None
