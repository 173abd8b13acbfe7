"""Sagas started by domain events: `SagaProcess`, an eventsourcing process application.

A `SagaProcess` follows your own eventsourcing applications in a `System`. Its `starts`
map domain event types to the saga each one starts and how to build that saga's context
from the event. For each domain event the policy records a *pending* saga (its
`SagaStarted`), and eventsourcing saves it with the tracking record of that event in one
transaction, the status row included: a domain event delivered twice starts one saga.
No step runs inside the policy: once that transaction has committed, the process runs the
sagas it started to their end, in the runner's thread. With `run_sagas = False` (or the
`RUN_SAGAS=no` setting) it only records them, and `work()` (here, or in worker processes
over the same store) runs them.

A `SagaProcess` is a `SagaApplication` too (`submit`, `work`, `sagas`, `history`, ...).
Its tables are named after it on every durable store, `<name>_events`,
`<name>_tracking` and `<name>_snapshots` (eventsourcing's own naming on PostgreSQL), so it
shares an SQLite file or a PostgreSQL database with the applications it follows.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, cast
from uuid import UUID, uuid5

from eventsourcing.application import ProcessingEvent
from eventsourcing.domain import Aggregate, DomainEventProtocol, event
from eventsourcing.persistence import (
    EventStore,
    InfrastructureFactory,
    IntegrityError,
    PersistenceError,
    ProcessRecorder,
    Recording,
    Tracking,
)
from eventsourcing.popo import POPOFactory
from eventsourcing.sqlite import SQLiteAggregateRecorder, SQLiteFactory
from eventsourcing.system import ProcessApplication
from eventsourcing.utils import EnvType, get_topic, strtobool

from saga_es import tracing
from saga_es.aggregate import Saga
from saga_es.application import SAGA_KEY_NAMESPACE, SagaApplication, _log_events
from saga_es.context import storable_text
from saga_es.definition import SagaDefinition
from saga_es.errors import ConfigurationError, ContextError, SagaError
from saga_es.popo import POPOSagaProcessRecorder
from saga_es.status import saga_log_fields

log = logging.getLogger("saga_es")

_PROCESS_RECORDER_TOPIC = InfrastructureFactory.PROCESS_RECORDER_TOPIC
RUN_SAGAS = "RUN_SAGAS"
"""The setting that overrides `SagaProcess.run_sagas` (yes or no)."""
_TABLE_PREFIX = re.compile(r"[a-z_][a-z0-9_]*")


@dataclass(frozen=True)
class StartSaga:
    """What a domain event starts: a saga of `definition`, its context built from the event.

    `context(event)` returns the saga's context (a dict, a dataclass or a pydantic model).
    `key(event)` returns its business key; by default the event's own identity,
    `"<originator id>:<originator version>"`, so that each domain event starts one saga.
    """

    definition: SagaDefinition
    context: Callable[[Any], Any]
    key: Callable[[Any], str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.definition, SagaDefinition):
            raise TypeError(f"expected a SagaDefinition, got {type(self.definition).__name__}")
        if not callable(self.context):
            raise TypeError(f"context must be a function of the event, got {self.context!r}")
        if self.key is not None and not callable(self.key):
            raise TypeError(f"key must be a function of the event, got {self.key!r}")


class StartFailure(Aggregate):
    """A domain event for which no saga was started: building its context (or key) failed.

    It is recorded with the tracking record of that event, in the same transaction, so
    the event is not processed again; `SagaProcess.start_failures()` lists them.
    """

    class Recorded(Aggregate.Created):
        """The only event of a `StartFailure`."""

        definition: str
        definition_version: int
        leader: str
        position: int
        event_topic: str
        event_id: str
        event_version: int
        error_type: str
        error_message: str

    @event(Recorded)
    def __init__(
        self,
        *,
        definition: str,
        definition_version: int,
        leader: str,
        position: int,
        event_topic: str,
        event_id: str,
        event_version: int,
        error_type: str,
        error_message: str,
    ) -> None:
        self.definition = definition
        """Name of the saga definition that was not started."""
        self.definition_version = definition_version
        self.leader = leader
        """The application whose notification log holds the domain event."""
        self.position = position
        """The domain event's notification id in that log."""
        self.event_topic = event_topic
        self.event_id = event_id
        """The domain event's originator id."""
        self.event_version = event_version
        self.error_type = error_type
        self.error_message = error_message

    @staticmethod
    def create_id(definition: str, event_id: str, event_version: int) -> UUID:
        """One failure per saga definition and domain event."""
        return uuid5(
            SAGA_KEY_NAMESPACE, f"start-failure\x00{definition}\x00{event_id}:{event_version}"
        )


Starts = Mapping[type[Any], StartSaga | Sequence[StartSaga]]


class SagaProcess(SagaApplication, ProcessApplication[UUID]):
    """An eventsourcing process application whose policy starts sagas from domain events.

    Subclass it and map domain event types to `StartSaga`s in `starts`::

        class PaymentSagas(SagaProcess):
            starts = {Order.Placed: StartSaga(payment, context=lambda e: {"amount": e.amount})}

    An event whose type (or a base class of it) is not mapped is ignored. A context or key
    that cannot be built is logged and recorded as a `StartFailure`: no saga is started.
    """

    starts: ClassVar[Starts] = {}
    """Domain event type → the `StartSaga` (or several) it triggers."""

    run_sagas: ClassVar[bool] = True
    """Run the sagas a domain event started once they are committed, in the runner's thread.

    `False` (or the setting `RUN_SAGAS=no`) leaves them pending for `work()`, so that worker
    processes run them and the runner's thread only records. An empty setting is unset.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _starts(cls.starts)  # a mistake in the mapping fails at import, not at the first event

    def __init__(self, env: EnvType | None = None, **options: Any) -> None:
        """Open the store as `SagaApplication` does (same options) and register the definitions."""
        super().__init__(env, **options)
        self._starts = _starts(self.starts)
        if not isinstance(self.run_sagas, bool):
            raise TypeError(f"run_sagas must be True or False, got {self.run_sagas!r}")
        raw = self.env.get(RUN_SAGAS)
        try:
            self._runs_sagas = self.run_sagas if raw in (None, "") else bool(strtobool(raw))
        except ValueError:
            raise ConfigurationError(RUN_SAGAS, f"expected yes or no, got {raw!r}") from None
        self._started = threading.local()  # the sagas this thread's processing recorded
        self.register(*(start.definition for group in self._starts.values() for start in group))

    # -- the policy ------------------------------------------------------------------------

    def policy(
        self,
        domain_event: DomainEventProtocol[Any],
        processing_event: ProcessingEvent[UUID],
    ) -> None:
        """Collect a pending saga for each `StartSaga` mapped to the event's type.

        Nothing runs here: the sagas are saved with the tracking record, and run after
        that commit (by `process_event`, or by `work()`). A saga already started under
        the same key is not started again; a context or key that cannot be built is
        recorded as a `StartFailure`.
        """
        for start in self._starts_for(type(domain_event)):
            built = False
            try:
                context = start.context(domain_event)
                key = default_key(domain_event) if start.key is None else start.key(domain_event)
                built = True
                saga = self._start(start.definition, context, key, begin=False)
            except Exception as e:
                if not _bad_input(e, from_builder=not built):
                    raise  # the store failed: the event stays unprocessed, to be retried
                failure = self._failure(start, domain_event, processing_event.tracking, e)
                if failure.id not in processing_event.aggregates:  # one per definition and event
                    processing_event.collect_events(failure)
                else:  # saved twice, it would break the event's transaction (and the runner)
                    log.debug(
                        "no %s saga started for this event either: %s: %s",
                        failure.definition,
                        failure.error_type,
                        failure.error_message,
                        extra={"saga_name": failure.definition},
                    )
                continue
            if saga.pending_events and saga.id not in processing_event.aggregates:
                processing_event.collect_events(saga)
            else:  # stored before, or collected by an earlier start of this event: the same saga
                log.debug(
                    "saga %s %s was started before under key %r: not started again",
                    saga.name,
                    saga.id,
                    saga.key,
                    extra={"saga_id": str(saga.id), "saga_name": saga.name},
                )

    def process_event(self, domain_event: DomainEventProtocol[UUID], tracking: Tracking) -> None:
        """Process a domain event once: one whose position is already tracked is skipped.

        If the save fails on a saga started meanwhile elsewhere under the same key, the
        event is processed once more, and then finds that saga instead of starting one.
        """
        for attempt in (1, 2):
            self._started.sagas = []
            try:
                super().process_event(domain_event, tracking)
            except IntegrityError:
                name, position = tracking.application_name, tracking.notification_id
                if self.recorder.has_tracking_id(name, position):
                    log.info("%s #%s was processed before: skipped", name, position)
                    return
                if attempt == 2:
                    raise
            else:
                started, self._started.sagas = self._started.sagas, []
                for saga in started:
                    self._run_started(saga)
                return

    def _run_started(self, saga: Saga) -> None:
        """Run a saga just committed by the policy to its end, as a worker would.

        The domain event is processed already: a saga that cannot go on here (its store
        failed, say) is logged and left in flight for `work()` or `recover()`, and the
        runner goes on with the next event.
        """
        try:
            definition = self.definition(saga.name, saga.definition_version)
            with tracing.saga_span(saga, "run"):
                self._resume(saga, definition)
        except IntegrityError:
            log.warning(
                "saga %s was taken by a worker first: left to it",
                saga.id,
                extra=saga_log_fields(saga),
            )
        except Exception:
            log.exception(
                "saga %s stopped before its end; work() or recover() resumes it",
                saga.id,
                extra=saga_log_fields(saga),
            )

    def _record(self, processing_event: ProcessingEvent[UUID]) -> list[Recording[UUID]]:
        """Save, then log each saga started and each `StartFailure` saved.

        Once durable, as every saga event is logged: a redelivery that is refused logs nothing.
        """
        recordings = super()._record(processing_event)
        if processing_event.tracking is not None:  # a domain event's; `work()` logs its own
            if self._runs_sagas:
                self._started.sagas = [
                    saga for saga in processing_event.aggregates.values() if isinstance(saga, Saga)
                ]
            events = cast(list[Saga.Event], processing_event.events)
            _log_events(
                [
                    (saga, [e for e in events if e.originator_id == saga.id])
                    for saga in processing_event.aggregates.values()
                    if isinstance(saga, Saga)
                ]
            )
        for recorded in processing_event.events:
            if isinstance(recorded, StartFailure.Recorded):
                log.error(
                    "no %s saga started for %s %s v%s (%s #%s): %s: %s",
                    recorded.definition,
                    recorded.event_topic.partition(":")[2],
                    recorded.event_id,
                    recorded.event_version,
                    recorded.leader,
                    recorded.position,
                    recorded.error_type,
                    recorded.error_message,
                    extra={"saga_name": recorded.definition},
                )
        return recordings

    def _starts_for(self, event_type: type[Any]) -> tuple[StartSaga, ...]:
        for cls in event_type.__mro__:
            found = self._starts.get(cls)
            if found is not None:
                return found
        return ()

    def _failure(
        self,
        start: StartSaga,
        domain_event: DomainEventProtocol[Any],
        tracking: Tracking | None,
        error: Exception,
    ) -> StartFailure:
        leader, position = ("", 0)
        if tracking is not None:
            leader, position = tracking.application_name, tracking.notification_id
        return StartFailure(
            definition=start.definition.name,
            definition_version=start.definition.version,
            leader=leader,
            position=position,
            event_topic=get_topic(type(domain_event)),
            event_id=str(domain_event.originator_id),
            event_version=domain_event.originator_version,
            error_type=type(error).__name__,
            error_message=storable_text(str(error)),
        )

    def start_failures(self) -> list[StartFailure]:
        """Every recorded `StartFailure`, in the order they were recorded."""
        topic = get_topic(StartFailure.Recorded)
        failures: list[StartFailure] = []
        start: int | None = None
        while True:
            page = self.recorder.select_notifications(
                start, limit=100, topics=[topic], inclusive_of_start=False
            )
            for notification in page:
                failure_id = cast(UUID, notification.originator_id)
                failures.append(cast(StartFailure, self.repository.get(failure_id)))
            if len(page) < 100:
                return failures
            start = page[-1].id

    # -- the store -------------------------------------------------------------------------

    def construct_recorder(self) -> ProcessRecorder:
        """A process recorder that keeps the saga status projection and the tracking position.

        The events, their status rows and the tracking record commit in one transaction.
        Setting `PROCESS_RECORDER_TOPIC` chooses eventsourcing's recorder instead (which
        keeps no status projection: `sagas()` and `work()` need it).
        """
        factory = self.factory
        if self.env.get(_PROCESS_RECORDER_TOPIC):
            return factory.process_recorder()
        if isinstance(factory, POPOFactory):
            return POPOSagaProcessRecorder()
        recorder: ProcessRecorder
        if isinstance(factory, SQLiteFactory):
            from saga_es.sqlite import SQLiteSagaProcessRecorder

            recorder = SQLiteSagaProcessRecorder(
                factory.datastore,
                events_table_name=self.table_name("events"),
                tracking_table_name=self.table_name("tracking"),
            )
        else:
            postgres = sys.modules.get("eventsourcing.postgres")  # loaded if it is in use
            if postgres is None or not isinstance(factory, postgres.PostgresFactory):
                return factory.process_recorder()
            from saga_es.postgres import PostgresSagaProcessRecorder

            recorder = PostgresSagaProcessRecorder(
                factory.datastore,
                events_table_name=self.table_name("events"),
                tracking_table_name=self.table_name("tracking"),
            )
        if factory.env_create_table():
            recorder.create_table()
        return recorder

    def construct_snapshot_store(self) -> EventStore[UUID]:
        """On SQLite too, the snapshots go to a table named after the application."""
        factory = self.factory
        if not isinstance(factory, SQLiteFactory):
            return super().construct_snapshot_store()
        recorder = SQLiteAggregateRecorder(
            factory.datastore, events_table_name=self.table_name("snapshots")
        )
        if factory.env_create_table():
            recorder.create_table()
        store: EventStore[UUID] = factory.event_store(mapper=self.mapper, recorder=recorder)
        return store

    def table_name(self, purpose: str) -> str:
        """`<name>_<purpose>`, as eventsourcing names an application's tables on PostgreSQL."""
        prefix = self.name.lower()
        if not _TABLE_PREFIX.fullmatch(prefix):
            raise ConfigurationError(
                "name", f"{self.name!r} cannot prefix a table name (letters, digits and _ only)"
            )
        return f"{prefix}_{purpose}"


def default_key(domain_event: DomainEventProtocol[Any]) -> str:
    """The business key of the saga a domain event starts: the event's own identity."""
    return f"{domain_event.originator_id}:{domain_event.originator_version}"


def _bad_input(error: Exception, *, from_builder: bool) -> bool:
    """Whether `error` came from the event's data (a StartFailure), not from the store.

    Anything the user's context or key function raises is bad input (a `SagaNotFound`
    from a look-up too: it would fail again on every delivery), but for eventsourcing's
    `PersistenceError`, and so is a context that cannot be stored (`ContextError`); the
    store's own errors (`PersistenceError`, or a stored saga that cannot be read) are not.
    """
    if isinstance(error, ContextError):
        return True
    if isinstance(error, PersistenceError):
        return False
    return from_builder or not isinstance(error, SagaError)


def _starts(starts: Starts) -> dict[type[Any], tuple[StartSaga, ...]]:
    if not isinstance(starts, Mapping):
        raise TypeError(f"starts must map domain event types to StartSaga, got {starts!r}")
    checked: dict[type[Any], tuple[StartSaga, ...]] = {}
    for event_type, value in starts.items():
        if not isinstance(event_type, type):
            raise TypeError(f"starts: {event_type!r} is not a domain event class")
        if isinstance(value, StartSaga):
            group: tuple[Any, ...] = (value,)
        else:
            group = tuple(value) if isinstance(value, list | tuple) else ()
        if not group or not all(isinstance(start, StartSaga) for start in group):
            raise TypeError(
                f"starts[{event_type.__qualname__}] must be a StartSaga or a list of them, "
                f"got {value!r}"
            )
        checked[event_type] = group
    return checked
