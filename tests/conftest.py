"""Fixtures that run every behaviour on each store: POPO, an SQLite file, PostgreSQL.

- `app`: a `SagaApplication` on a fresh store, parametrised over `STORES`
  (test ids `[popo]`, `[sqlite]`, `[postgres]`). Override the `store` fixture
  with `@pytest.mark.parametrize("store", DURABLE_STORES)` where a test needs a
  store that a second application instance can read.
- `env`: the settings `app` was built with; `open_app(env)` opens another
  application on the same store (as a later process would), closed at teardown.
- `store_env(store, tmp_path)`: the settings of a fresh store (for PostgreSQL an
  empty database of its own, emptied again at teardown for a later test); the
  same arguments give the same store.
- `reader`: an application that reads `app`'s store independently of `app`
  (for POPO, whose store lives in one application's memory, `app` itself).

PostgreSQL is a throw-away server started once per session (`tests/pgserver.py`);
each test gets its own empty database. The settings always go through `env=`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pgserver import PgServer

from saga_es import SagaApplication

STORES = ("popo", "sqlite", "postgres")
DURABLE_STORES = ("sqlite", "postgres")

Env = dict[str, str]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """The session's PostgreSQL server: started here (or `SAGA_ES_TEST_POSTGRES`)."""
    server = PgServer.from_environment()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def store_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Env]]:
    """`store_env(store, path=tmp_path)`: settings of a fresh store, the same per arguments."""
    made: dict[tuple[str, str], Env] = {}
    databases: list[str] = []
    servers: list[PgServer] = []

    def make(store: str, path: Path | None = None) -> Env:
        folder = Path(path or tmp_path)
        key = (store, str(folder))
        if key not in made:
            if store == "popo":
                made[key] = {"PERSISTENCE_MODULE": "eventsourcing.popo"}
            elif store == "sqlite":
                made[key] = {
                    "PERSISTENCE_MODULE": "eventsourcing.sqlite",
                    "SQLITE_DBNAME": str(folder / "sagas.db"),
                }
            elif store == "postgres":
                server: PgServer = request.getfixturevalue("pg_server")
                servers[:] = [server]
                name = server.acquire_database()
                databases.append(name)
                made[key] = server.env(name)
            else:
                raise ValueError(f"unknown store {store!r}; expected one of {STORES}")
        return dict(made[key])

    yield make
    for name in databases:
        servers[0].release_database(name)


@pytest.fixture
def open_app(store_env: Callable[..., Env]) -> Iterator[Callable[[Env], SagaApplication]]:
    """`open_app(env)`: a new application on `env`'s store, closed at teardown.

    It depends on `store_env` so that applications close before their database is dropped.
    """
    apps: list[SagaApplication] = []

    def make(env: Env) -> SagaApplication:
        app = SagaApplication(env=env)
        apps.append(app)
        return app

    yield make
    for app in reversed(apps):
        app.close()


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest) -> str:
    """The store under test."""
    return str(request.param)


@pytest.fixture
def env(store: str, store_env: Callable[..., Env]) -> Env:
    """Settings of a fresh store of kind `store`."""
    return store_env(store)


@pytest.fixture
def app(env: Env, open_app: Callable[[Env], SagaApplication]) -> SagaApplication:
    """A `SagaApplication` on a fresh store."""
    return open_app(env)


@pytest.fixture
def reader(
    store: str, env: Env, app: SagaApplication, open_app: Callable[[Env], SagaApplication]
) -> SagaApplication:
    """Reads `app`'s store through another application where the store allows it."""
    if store == "popo":
        return app
    return open_app(env)


@pytest.fixture
def commits(app: SagaApplication) -> CommitSpy:
    """Counts `app`'s commits from now on."""
    return CommitSpy(app)


class CommitSpy:
    """Counts the transactions an application makes: each `insert_events` call is one.

    It wraps the application's recorder and calls through, so the store is real.
    """

    def __init__(self, app: SagaApplication) -> None:
        self.calls: list[list[str]] = []
        recorder: Any = app.recorder
        insert_events = recorder.insert_events

        def spy(stored_events: Any, **kwargs: Any) -> Any:
            result = insert_events(stored_events, **kwargs)
            self.calls.append([s.topic.split(":", 1)[1] for s in stored_events])
            return result

        recorder.insert_events = spy

    @property
    def count(self) -> int:
        """How many transactions were committed."""
        return len(self.calls)

    def reset(self) -> None:
        """Forget the calls so far."""
        self.calls.clear()
