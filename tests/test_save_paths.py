"""Saves skip eventsourcing's hooks only while nothing listens to them."""

import sqlite3
from pathlib import Path
from typing import Any

import psycopg

from saga_es import SagaApplication, SagaDefinition, Step
from saga_es.errors import persistence_error


def _ok(context: dict[str, Any], key: str) -> None:
    context[key.rsplit(":", 1)[1]] = True


DEFINITION = SagaDefinition("paths", [Step("a", _ok), Step("b", _ok)])


class Listening(SagaApplication):
    name = "SagaApplication"

    def __init__(self, **kwargs: Any) -> None:
        self.heard: list[str] = []
        super().__init__(**kwargs)

    def notify(self, new_events: list[Any]) -> None:
        self.heard += [type(e).__name__ for e in new_events]


def test_an_overridden_notify_hears_every_saga_event(tmp_path: Path) -> None:
    app = Listening(
        env={"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(tmp_path / "l.db")}
    )
    saga = app.run(DEFINITION, {})
    assert app.heard == [type(e).__name__ for e in app.saga_events(saga.id)]
    assert saga.status == "completed"


def test_an_aggregate_cache_stays_current(tmp_path: Path) -> None:
    env = {
        "PERSISTENCE_MODULE": "eventsourcing.sqlite",
        "SQLITE_DBNAME": str(tmp_path / "c.db"),
        "AGGREGATE_CACHE_MAXSIZE": "10",
    }
    with SagaApplication(env=env) as app:
        saga = app.run(DEFINITION, {})
        assert app.get(saga.id).status == "completed"
        assert app.get(saga.id).version == saga.version == 6
        assert app.get(saga.id).context == {"a": True, "b": True}


def test_driver_errors_become_eventsourcing_errors_by_their_pep_249_class() -> None:
    from eventsourcing.persistence import IntegrityError, OperationalError, PersistenceError

    assert type(persistence_error(sqlite3.IntegrityError("dup"))) is IntegrityError
    assert type(persistence_error(psycopg.errors.UniqueViolation("dup"))) is IntegrityError
    assert type(persistence_error(psycopg.OperationalError("down"))) is OperationalError
    assert type(persistence_error(ValueError("other"))) is PersistenceError
    assert str(persistence_error(sqlite3.IntegrityError("dup"))) == "dup"
