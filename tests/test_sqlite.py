import sqlite3
from pathlib import Path
from uuid import uuid4

from saga_es import Saga, SagaApplication
from saga_es.status import SagaStatus


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
