from pathlib import Path
from uuid import uuid4

from saga_es import Saga, SagaApplication


def _saga(steps: int) -> Saga:
    saga = Saga.start(
        id=uuid4(),
        name="s",
        definition_version=1,
        steps=[f"s{i}" for i in range(steps)],
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
