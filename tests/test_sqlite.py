import sqlite3
from pathlib import Path
from uuid import uuid4

import pytest

from saga_es import Saga, SagaApplication
from saga_es.status import IN_FLIGHT_STATES, SagaStatus


def _saga(steps: int) -> Saga:
    """A saga whose first `steps` steps (of at least one) completed."""
    saga = Saga.start(
        id=uuid4(),
        name="s",
        definition_version=1,
        steps=[f"s{i}" for i in range(max(steps, 1))],
        compensable=[],
        key=None,
        context_type="builtins:dict",
        context={},
    )
    for i in range(steps):
        saga.start_step(f"s{i}", 1)
        saga.complete_step(f"s{i}", 1, changes={"i": i}, removed=[])
    return saga


def test_a_save_returns_the_notification_ids_its_events_were_stored_under(
    tmp_path: Path,
) -> None:
    # The writer computes the ids from the statement's last rowid while triggers write
    # rows of their own (the status projection): they must be the stored ones.
    env = {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(tmp_path / "n.db")}
    with SagaApplication(env=env) as app:
        recordings = [r for saga in (_saga(1), _saga(3), _saga(2)) for r in app.save(saga)]
        stored = app.recorder.select_notifications(start=1, limit=100)
        assert [r.notification.id for r in recordings] == [n.id for n in stored]
        assert [
            (r.domain_event.originator_id, r.domain_event.originator_version) for r in recordings
        ] == [(n.originator_id, n.originator_version) for n in stored]
        assert [n.id for n in stored] == list(range(1, len(stored) + 1))


def test_a_live_view_from_an_earlier_release_is_replaced_when_the_application_starts(
    tmp_path: Path,
) -> None:
    env = {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(tmp_path / "v.db")}
    saga = _saga(0)
    saga.start_step("s0", 1)
    saga.request_cancel(by="ops", reason="not wanted")  # names no step: 's0' is still running
    with SagaApplication(env=env) as app:
        app.save(saga)
        view = f"{app.recorder.status_table_name}_live"  # type: ignore[attr-defined]
        conn = sqlite3.connect(tmp_path / "v.db", isolation_level=None)
        (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = ?", [view]).fetchone()
        earlier = sql.replace("ELSE js END AS step", "ELSE json_extract(j, '$.step') END AS step")
        assert earlier != sql
        conn.execute(f"DROP VIEW {view}")
        conn.execute(earlier)  # as the previous release created it
        conn.close()
        assert [row.step for row in app.sagas()] == [None]  # what that view read
    with SagaApplication(env=env) as app:
        assert [row.step for row in app.sagas()] == ["s0"]
        assert app.sagas() == [SagaStatus.of(app.get(saga.id))]

    def schema_version() -> int:
        with sqlite3.connect(tmp_path / "v.db") as conn:
            return int(conn.execute("PRAGMA schema_version").fetchone()[0])

    before = schema_version()
    with SagaApplication(env=env):
        assert schema_version() == before  # the current view is left as it is


def test_the_triggers_of_an_earlier_release_are_dropped_and_the_rows_still_kept(
    tmp_path: Path,
) -> None:
    env = {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(tmp_path / "t.db")}
    with SagaApplication(env=env) as app:
        table, status = app.recorder.events_table_name, app.recorder.status_table_name  # type: ignore[attr-defined]
    with sqlite3.connect(tmp_path / "t.db") as conn:  # as an earlier release left them
        for name in ("from_start", "ends", "resumes"):
            conn.execute(
                f"CREATE TRIGGER {status}_{name} AFTER INSERT ON {table} BEGIN SELECT 1; END"
            )
    with SagaApplication(env=env) as app:
        with sqlite3.connect(tmp_path / "t.db") as conn:
            assert (
                conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall()
                == []
            )
        ended, running = _saga(2), _saga(1)
        ended.complete()
        app.save(ended, running)
        assert sorted(app.sagas(), key=lambda row: row.saga_id) == sorted(
            [SagaStatus.of(app.get(ended.id)), SagaStatus.of(app.get(running.id))],
            key=lambda row: row.saga_id,
        )
        assert [row.saga_id for row in app.sagas(status=IN_FLIGHT_STATES)] == [running.id]


def test_a_save_after_close_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    """A saga still running in a thread when its application closes stops at its next save.

    The writer's connection is not opened again behind the closed pool (it would never be
    closed, and the file would go on changing after `close()`).
    """
    from eventsourcing.persistence import ConnectionPoolClosedError

    from saga_es import SagaDefinition, Step

    env = {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(tmp_path / "s.db")}
    app = SagaApplication(env=env)
    definition = SagaDefinition("late", [Step("a", lambda c, k: app.close())])
    with pytest.raises(ConnectionPoolClosedError, match="closed"):
        app.run(definition, {}, key="k")
    assert app.recorder._writer is None  # type: ignore[attr-defined]
    reader = SagaApplication(env=env)
    try:
        events = reader.saga_events(SagaApplication.saga_id("late", "k"))
        assert [type(e).__name__ for e in events] == ["SagaStarted", "StepStarted"]
        assert reader.verify() == []
    finally:
        reader.close()
