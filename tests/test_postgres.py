"""saga_es's PostgreSQL recorder: one call per save, still eventsourcing's gapless log.

Each test gets its own empty database on the session's PostgreSQL (`store_env`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest
from eventsourcing.cryptography import AESCipher
from eventsourcing.persistence import IntegrityError, Notification, PersistenceError, StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresFactory
from eventsourcing.utils import Environment
from test_status import reads_as_its_events as _reads_as_its_events
from test_status import started as _started

from saga_es import Saga, SagaApplication, SagaDefinition, Step
from saga_es.postgres import STOCK_RECORDER_TOPIC, PostgresOneCallRecorder

Env = dict[str, str]


def _noop(context: Any, key: str) -> None:
    pass


FIVE_STEPS = SagaDefinition("five", [Step(f"s{i}", _noop) for i in range(1, 6)])
EVENTS_PER_SAGA = 12  # SagaStarted + 5 x (StepStarted, StepCompleted) + SagaCompleted


@pytest.fixture
def pg_env(store_env: Callable[..., Env]) -> Env:
    return store_env("postgres")


@pytest.fixture
def pg_app(pg_env: Env, open_app: Callable[[Env], SagaApplication]) -> SagaApplication:
    return open_app(pg_env)


def _connect(env: Env, *, autocommit: bool = False) -> psycopg.Connection[tuple[Any, ...]]:
    """A plain connection to the test's database, past the application."""
    return psycopg.connect(
        host=env["POSTGRES_HOST"],
        port=env["POSTGRES_PORT"],
        user=env["POSTGRES_USER"],
        password=env["POSTGRES_PASSWORD"],
        dbname=env["POSTGRES_DBNAME"],
        autocommit=autocommit,
    )


def _stored(originator_id: UUID, version: int) -> StoredEvent:
    return StoredEvent(originator_id, version, "tests:Event", b'{"n":%d}' % version)


def _all_notifications(app: SagaApplication) -> list[Notification]:
    found: list[Notification] = []
    while True:
        start = found[-1].id if found else None
        page = app.recorder.select_notifications(start, limit=500, inclusive_of_start=False)
        found.extend(page)
        if len(page) < 500:
            return found


def test_postgres_uses_the_one_call_recorder_by_default(pg_app: SagaApplication) -> None:
    assert type(pg_app.recorder) is PostgresOneCallRecorder


def test_the_stock_recorder_is_one_setting_away(
    pg_env: Env, open_app: Callable[[Env], SagaApplication]
) -> None:
    app = open_app({**pg_env, "APPLICATION_RECORDER_TOPIC": STOCK_RECORDER_TOPIC})
    assert type(app.recorder) is PostgresApplicationRecorder
    saga = app.run(FIVE_STEPS, {"n": 1})
    assert saga.status == "completed"


def test_a_save_returns_its_notification_ids_in_order(pg_app: SagaApplication) -> None:
    recorder = pg_app.recorder
    a, b = uuid4(), uuid4()
    assert recorder.insert_events([_stored(a, 1), _stored(a, 2)]) == [1, 2]
    assert recorder.insert_events([_stored(b, 1)]) == [3]
    assert recorder.insert_events([]) is None
    assert recorder.max_notification_id() == 3


def test_a_version_conflict_raises_integrity_error_and_writes_nothing(
    pg_app: SagaApplication,
) -> None:
    recorder = pg_app.recorder
    a, b = uuid4(), uuid4()
    recorder.insert_events([_stored(a, 1), _stored(a, 2)])
    with pytest.raises(IntegrityError):
        # b's event conflicts with nothing, a's second one does: neither is written.
        recorder.insert_events([_stored(b, 1), _stored(a, 2)])
    assert recorder.select_events(b) == []
    assert [e.originator_version for e in recorder.select_events(a)] == [1, 2]
    assert recorder.max_notification_id() == 2


def test_a_stale_writer_of_one_saga_is_refused_whole(pg_app: SagaApplication) -> None:
    """A copy of the saga as it was (time travel) appends; its save is refused, whole."""
    saga = pg_app.run(FIVE_STEPS, {"n": 1})
    stale = pg_app.get(saga.id, version=2)  # SagaStarted, StepStarted(s1): s1 in flight
    stale.complete_step("s1", 1, changes={"late": True}, removed=[])
    stale.start_step("s2", 1)
    with pytest.raises(IntegrityError):
        pg_app.save(stale)
    assert len(pg_app.saga_events(saga.id)) == EVENTS_PER_SAGA
    assert "late" not in pg_app.get(saga.id).context_state
    assert pg_app.recorder.max_notification_id() == EVENTS_PER_SAGA


def test_notification_log_reads_through_eventsourcing(pg_app: SagaApplication) -> None:
    saga = pg_app.run(FIVE_STEPS, {"n": 1})
    section = pg_app.notification_log.select(start=1, limit=10)
    assert [n.id for n in section] == list(range(1, 11))
    assert {n.originator_id for n in section} == {saga.id}
    assert section[0].topic == "saga_es:SagaStarted"
    assert pg_app.recorder.max_notification_id() == EVENTS_PER_SAGA


def test_concurrent_saves_leave_a_gapless_log_that_a_follower_never_skips(
    pg_env: Env, open_app: Callable[[Env], SagaApplication]
) -> None:
    """Two writer threads (each its own application and pool) and a follower reading by id."""
    sagas_per_writer = 25
    writers = [open_app(pg_env), open_app(pg_env)]
    follower = open_app(pg_env)
    errors: list[BaseException] = []
    done = threading.Event()
    seen: list[int] = []

    def write(app: SagaApplication) -> None:
        try:
            for i in range(sagas_per_writer):
                app.run(FIVE_STEPS, {"n": i})
        except BaseException as e:  # reported below
            errors.append(e)

    def follow() -> None:
        try:
            while True:
                finished = done.is_set()  # read before selecting, so nothing is missed
                last = seen[-1] if seen else None
                page = follower.recorder.select_notifications(
                    last, limit=100, inclusive_of_start=False
                )
                seen.extend(n.id for n in page)
                if finished and not page:
                    return
                if not page:
                    time.sleep(0.001)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=write, args=(app,)) for app in writers]
    reader = threading.Thread(target=follow)
    reader.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    done.set()
    reader.join(timeout=120)
    assert not errors, errors

    notifications = _all_notifications(follower)
    ids = [n.id for n in notifications]
    total = 2 * sagas_per_writer * EVENTS_PER_SAGA
    assert ids == list(range(1, total + 1))  # gapless, in order
    assert seen == ids  # the follower, reading by id as they committed, skipped none

    by_saga: dict[UUID, list[Notification]] = {}
    for n in notifications:
        by_saga.setdefault(n.originator_id, []).append(n)
    assert len(by_saga) == 2 * sagas_per_writer
    for events in by_saga.values():
        assert [n.originator_version for n in events] == list(range(1, EVENTS_PER_SAGA + 1))
        # each save wrote two events, on adjacent ids
        for first, second in zip(events[::2], events[1::2], strict=True):
            assert second.id == first.id + 1


def test_subscribers_are_notified(pg_app: SagaApplication) -> None:
    """The function still NOTIFYs, so eventsourcing's LISTEN-based subscription wakes up."""
    received: list[Notification] = []
    with pg_app.recorder.subscribe(gt=None) as subscription:

        def consume() -> None:
            for notification in subscription:
                received.append(notification)
                if len(received) == EVENTS_PER_SAGA:
                    return

        consumer = threading.Thread(target=consume)
        consumer.start()
        time.sleep(0.3)  # let the LISTEN start before the save
        pg_app.run(FIVE_STEPS, {"n": 1})
        consumer.join(timeout=10)
        alive = consumer.is_alive()
        subscription.stop()
        consumer.join(timeout=10)
    assert not alive, "no notification arrived"
    assert [n.id for n in received] == list(range(1, EVENTS_PER_SAGA + 1))


def test_recorders_starting_together_create_the_schema_once(pg_env: Env) -> None:
    """Creators take turns (an advisory lock), so "tuple concurrently updated" cannot happen."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)
    factories = [PostgresFactory(Environment("SagaApplication", pg_env)) for _ in range(4)]

    def start(factory: PostgresFactory) -> None:
        try:
            recorder = PostgresOneCallRecorder(
                factory.datastore, events_table_name="sagaapplication_events"
            )
            barrier.wait()
            recorder.create_table()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=start, args=(f,)) for f in factories]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for factory in factories:
        factory.close()
    assert not errors, errors


def _other_backends(env: Env) -> int:
    with _connect(env, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
        assert row is not None
        return int(row[0])


def _terminate_other_backends(env: Env) -> None:
    with _connect(env, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )


def test_a_lost_connection_is_replaced(pg_env: Env, pg_app: SagaApplication) -> None:
    pg_app.run(FIVE_STEPS, {"n": 1})
    _terminate_other_backends(pg_env)  # the kept writer connection dies with the others
    saga = pg_app.run(FIVE_STEPS, {"n": 2})
    assert saga.status == "completed"
    assert pg_app.recorder.max_notification_id() == 2 * EVENTS_PER_SAGA


def test_a_pool_of_one_connection_still_reads_and_writes(
    pg_env: Env, open_app: Callable[[Env], SagaApplication]
) -> None:
    app = open_app({**pg_env, "POSTGRES_POOL_SIZE": "1", "POSTGRES_MAX_OVERFLOW": "0"})
    saga = app.run(FIVE_STEPS, {"n": 1})
    assert app.get(saga.id).status == "completed"
    assert len(app.saga_events(saga.id)) == EVENTS_PER_SAGA


def test_closing_the_application_gives_every_connection_back(pg_env: Env) -> None:
    app = SagaApplication(env=pg_env)
    app.run(FIVE_STEPS, {"n": 1})
    assert _other_backends(pg_env) > 0
    app.close()
    deadline = time.monotonic() + 5
    while _other_backends(pg_env) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _other_backends(pg_env) == 0


# -- the status rows: written when a status changes, read live in between ----------------------


def _stored_row(env: Env, saga_id: UUID) -> tuple[Any, ...]:
    """The saga's row as the table holds it (status, step, version, live)."""
    with _connect(env) as conn:
        row = conn.execute(
            "SELECT status, step, version, live FROM sagaapplication_events_status "
            "WHERE saga_id = %s",
            [saga_id],
        ).fetchone()
    assert row is not None
    return tuple(row)


def test_a_boundary_that_changes_no_status_leaves_the_stored_row(
    pg_env: Env, pg_app: SagaApplication
) -> None:
    saga = _started()
    saga.start_step("a", 1)
    pg_app.save(saga)
    assert _reads_as_its_events(pg_app, saga.id).step == "a"
    assert _stored_row(pg_env, saga.id) == ("running", "a", 2, True)

    saga.complete_step("a", 1, changes={"x": 1}, removed=[])
    saga.start_step("b", 1)
    pg_app.save(saga)
    row = _reads_as_its_events(pg_app, saga.id)
    assert (row.status, row.step, row.version) == ("running", "b", 4)
    # Nothing a filter reads changed, so the table row was left as it was.
    assert _stored_row(pg_env, saga.id) == ("running", "a", 2, True)

    saga.complete_step("b", 1, changes={}, removed=[])
    saga.start_step("c", 1)
    saga.complete_step("c", 1, changes={}, removed=[])
    saga.complete()
    pg_app.save(saga)
    row = _reads_as_its_events(pg_app, saga.id)
    assert (row.status, row.step, row.version) == ("completed", "c", 8)
    assert _stored_row(pg_env, saga.id) == ("completed", "c", 8, False)


def test_a_pending_sagas_row_is_kept_exact_so_listing_submitted_sagas_reads_the_table(
    pg_env: Env, pg_app: SagaApplication
) -> None:
    saga = _started()
    pg_app.save(saga)
    assert _stored_row(pg_env, saga.id) == ("pending", None, 1, False)
    saga.request_cancel(by="ops", reason="not wanted")  # steady, but the saga is pending
    pg_app.save(saga)
    assert _stored_row(pg_env, saga.id) == ("pending", None, 2, False)
    assert _reads_as_its_events(pg_app, saga.id).version == 2
    other = _started(key="other")
    other.start_step("a", 1)
    pg_app.save(other)
    assert _stored_row(pg_env, other.id) == ("running", "a", 2, True)


def test_rows_written_by_a_rebuild_or_an_earlier_release_read_right(
    pg_env: Env, pg_app: SagaApplication, open_app: Callable[[Env], SagaApplication]
) -> None:
    saga = _started()
    saga.start_step("a", 1)
    pg_app.save(saga)
    saga.complete_step("a", 1, changes={}, removed=[])
    saga.start_step("b", 1)
    pg_app.save(saga)
    before = pg_app.sagas()
    assert pg_app.rebuild_status() == 1
    assert pg_app.sagas() == before
    assert _stored_row(pg_env, saga.id) == ("running", "b", 4, True)
    saga.complete_step("b", 1, changes={}, removed=[])
    saga.start_step("c", 1)
    pg_app.save(saga)
    _reads_as_its_events(pg_app, saga.id)

    # The table as the previous release left it: no `live` column, every row exact.
    with _connect(pg_env, autocommit=True) as conn:
        conn.execute("ALTER TABLE sagaapplication_events_status DROP COLUMN live CASCADE")
        conn.execute(
            "UPDATE sagaapplication_events_status SET step = 'c', version = 6, updated_at = %s",
            [pg_app.get(saga.id).modified_on],
        )
    pg_app.close()
    upgraded = open_app(pg_env)
    _reads_as_its_events(upgraded, saga.id)
    saga = upgraded.get(saga.id)
    saga.complete_step("c", 1, changes={}, removed=[])
    upgraded.save(saga)
    assert _reads_as_its_events(upgraded, saga.id).version == 7
    saga.complete()
    upgraded.save(saga)
    assert _reads_as_its_events(upgraded, saga.id).status == "completed"


def test_ciphered_sagas_in_flight_read_the_rows_the_application_writes(
    pg_env: Env, open_app: Callable[[Env], SagaApplication]
) -> None:
    app = open_app(
        {
            **pg_env,
            "CIPHER_TOPIC": "eventsourcing.cryptography:AESCipher",
            "CIPHER_KEY": AESCipher.create_key(16),
        }
    )
    saga = _started()
    saga.start_step("a", 1)
    app.save(saga)
    saga.complete_step("a", 1, changes={"card": "4111"}, removed=[])
    saga.start_step("b", 1)
    app.save(saga)
    row = _reads_as_its_events(app, saga.id)
    assert (row.step, row.version) == ("b", 4)
    assert _stored_row(pg_env, saga.id) == ("running", "b", 4, False)


def test_a_save_with_a_malformed_json_state_writes_nothing(pg_app: SagaApplication) -> None:
    saga = _started()
    saga.start_step("a", 1)
    pg_app.save(saga)
    bad = StoredEvent(saga.id, 3, Saga.StepCompleted.TOPIC, b"{not json")
    good = StoredEvent(
        saga.id, 4, Saga.StepStarted.TOPIC, pg_app.recorder.select_events(saga.id)[-1].state
    )
    with pytest.raises(PersistenceError, match="json"):
        pg_app.recorder.insert_events([bad, good])
    assert len(pg_app.saga_events(saga.id)) == 2
    _reads_as_its_events(pg_app, saga.id)
