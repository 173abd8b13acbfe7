"""SagaApplication: running, streaming, reading back, idempotent starts, settings."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from eventsourcing.application import Application
from eventsourcing.persistence import StoredEvent
from pgserver import PgServer, free_port

from saga_es import (
    ConfigurationError,
    DefinitionError,
    ForkRefused,
    IllegalTransition,
    Saga,
    SagaApplication,
    SagaDefinition,
    SagaNotFound,
    SagaStarted,
    SagaStatus,
    SagaUpdate,
    Step,
    StepNotReached,
    VersionNotFound,
)
from saga_es.aggregate import replay

Env = dict[str, str]
DURABLE_STORES = ("sqlite", "postgres")


class Counter:
    """A definition whose actions count their calls; step "fail" raises."""

    def __init__(self, steps: tuple[str, ...] = ("reserve", "charge"), name: str = "order"):
        self.calls: list[str] = []
        self.definition = SagaDefinition(
            name, [Step(s, self._action(s), compensation=self._undo(s)) for s in steps]
        )

    def _action(self, step: str) -> Callable[[dict[str, Any], str], None]:
        def action(context: dict[str, Any], key: str) -> None:
            self.calls.append(step)
            context[step] = True
            if step == "fail":
                raise ValueError("declined")

        return action

    def _undo(self, step: str) -> Callable[[dict[str, Any], str], None]:
        def undo(context: dict[str, Any], key: str) -> None:
            self.calls.append(f"undo {step}")

        return undo


def collect(app: SagaApplication, definition: SagaDefinition, context: Any, **kw: Any) -> Any:
    async def main() -> list[SagaUpdate]:
        return [update async for update in app.stream(definition, context, **kw)]

    return asyncio.run(main())


# -- running ---------------------------------------------------------------------------


def test_run_returns_the_finished_saga_as_stored(app: SagaApplication) -> None:
    counter = Counter()
    saga = app.run(counter.definition, {"order": 7})
    assert isinstance(saga, Saga)
    assert saga.status == "completed"
    assert (saga.name, saga.definition_version, saga.steps) == ("order", 1, ["reserve", "charge"])
    assert saga.key is None
    stored = app.get(saga.id)
    assert stored.version == saga.version == len(app.saga_events(saga.id))
    assert stored.status == "completed"
    assert stored.context == {"order": 7, "reserve": True, "charge": True}


def test_arun_returns_the_finished_saga(app: SagaApplication) -> None:
    counter = Counter(("reserve", "fail"))
    saga = asyncio.run(app.arun(counter.definition, {}))
    assert saga.status == "compensated"
    assert counter.calls == ["reserve", "fail", "undo reserve"]
    assert app.get(saga.id).status == "compensated"


def test_run_needs_a_definition(app: SagaApplication) -> None:
    with pytest.raises(TypeError, match="SagaDefinition"):
        app.run("order", {})  # type: ignore[arg-type]


def test_the_definition_version_is_recorded(app: SagaApplication) -> None:
    definition = SagaDefinition("order", [Step("a", lambda c, k: None)], version=3)
    saga = app.run(definition, {})
    assert app.get(saga.id).definition_version == 3
    assert app.saga_events(saga.id)[0].definition_version == 3


def test_stream_yields_one_update_per_event_once_it_is_durable(
    app: SagaApplication, reader: SagaApplication
) -> None:
    counter = Counter(("reserve", "fail"))
    durable: list[int] = []

    async def main() -> list[SagaUpdate]:
        updates = []
        async for update in app.stream(counter.definition, {"n": 1}, key="s1"):
            # When an update arrives, its event can already be read from the store.
            durable.append(len(reader.saga_events(update.saga_id)) >= update.version)
            updates.append(update)
        return updates

    updates = asyncio.run(main())
    saga_id = SagaApplication.saga_id("order", "s1")
    history = app.saga_events(saga_id)
    assert all(durable)
    assert [u.version for u in updates] == list(range(1, len(history) + 1))
    assert [u.event for u in updates] == [type(e).__name__ for e in history]
    assert [u.status for u in updates] == [e.to_state for e in history]
    assert {u.saga_id for u in updates} == {saga_id}
    assert [u.step for u in updates][1:4] == ["reserve", "reserve", "fail"]
    failed = next(u for u in updates if u.event == "StepFailed")
    assert failed.error == {"type": "ValueError", "message": "declined"}
    completed = next(u for u in updates if u.event == "StepCompleted")
    assert completed.changes == {"reserve": True}
    assert completed.attempt == 1
    assert updates[-1].status == "compensated"


def test_updates_convert_to_json(app: SagaApplication) -> None:
    updates = collect(app, Counter().definition, {"n": 1})
    for update in updates:
        data = json.loads(update.to_json())
        assert data == update.to_dict()
        assert data["saga_id"] == str(update.saga_id)
        assert data["version"] == update.version
        assert data["event"] == update.event
        assert data["status"] == update.status
        assert data["timestamp"] == update.timestamp.isoformat()
        assert "\n" not in update.to_json()
    assert json.loads(updates[2].to_json())["changes"] == {"reserve": True}


def test_update_json_writes_what_json_cannot_hold_as_strings() -> None:
    from datetime import UTC, datetime

    update = SagaUpdate(
        saga_id=uuid4(),
        version=3,
        event="StepCompleted",
        status="running",
        timestamp=datetime(2024, 1, 1, tzinfo=UTC),
        changes={"id": UUID(int=1)},
    )
    assert update.to_dict()["changes"] == {"id": str(UUID(int=1))}


# -- reading back ----------------------------------------------------------------------


def test_get_at_each_version_is_the_saga_as_of_that_event(app: SagaApplication) -> None:
    saga = app.run(Counter(("reserve", "fail")).definition, {})
    history = app.saga_events(saga.id)
    for version, event in enumerate(history, start=1):
        past = app.get(saga.id, version=version)
        assert past.version == version
        assert past.status == event.to_state
    assert app.get(saga.id, version=None).version == len(history)
    assert app.get(str(saga.id)).version == len(history)
    assert app.get(saga.id, version=2).in_flight == {"reserve": 1}
    assert app.get(saga.id, version=3).completed == ["reserve"]


def test_get_projects_with_the_plain_replay_loop(
    app: SagaApplication, monkeypatch: pytest.MonkeyPatch
) -> None:
    # eventsourcing's default projector runs a runtime Protocol check per event.
    import saga_es.application

    saga = app.run(Counter().definition, {})
    projected: list[int] = []

    def counting(saga: Saga | None, events: Any) -> Saga | None:
        events = list(events)
        projected.append(len(events))
        return replay(saga, events)

    monkeypatch.setattr(saga_es.application, "replay", counting)
    assert app.get(saga.id).version == saga.version
    assert app.get(saga.id, version=3).version == 3
    assert projected == [saga.version, 3]


@pytest.mark.parametrize("version", [0, -1, 99])
def test_a_version_outside_the_stream_is_refused(app: SagaApplication, version: int) -> None:
    saga = app.run(Counter().definition, {})
    last = len(app.saga_events(saga.id))
    with pytest.raises(VersionNotFound) as caught:
        app.get(saga.id, version=version if version != 99 else last + 1)
    error = caught.value
    assert (error.saga_id, error.last) == (saga.id, last)
    assert isinstance(error, KeyError)
    assert f"1..{last}" in str(error)


@pytest.mark.parametrize("version", ["2", 1.5, 2.0])
def test_a_version_that_is_not_an_int_is_refused_naming_it(
    app: SagaApplication, version: Any
) -> None:
    saga = app.run(Counter().definition, {})
    with pytest.raises(TypeError, match=f"version must be an int >= 1 or None, got {version!r}"):
        app.get(saga.id, version=version)


def test_an_unknown_saga_is_not_found(app: SagaApplication) -> None:
    app.run(Counter().definition, {})
    unknown = uuid4()
    for read in (
        lambda: app.get(unknown),
        lambda: app.get(unknown, version=1),
        lambda: app.saga_events(unknown),
        lambda: app.get("not-a-uuid"),
        lambda: app.saga_events("not-a-uuid"),
    ):
        with pytest.raises(SagaNotFound):
            read()
    with pytest.raises(SagaNotFound) as caught:
        app.get(unknown)
    assert caught.value.saga_id == unknown
    assert str(unknown) in str(caught.value)


def test_history_is_every_event_in_order(app: SagaApplication) -> None:
    saga = app.run(Counter(("a", "b")).definition, {})
    history = app.saga_events(saga.id)
    assert [e.originator_version for e in history] == list(range(1, len(history) + 1))
    assert {e.originator_id for e in history} == {saga.id}
    assert [type(e).__name__ for e in history] == [
        "SagaStarted",
        "StepStarted",
        "StepCompleted",
        "StepStarted",
        "StepCompleted",
        "SagaCompleted",
    ]
    assert app.saga_events(str(saga.id)) == history


def test_sagas_lists_every_saga_in_the_order_started(app: SagaApplication) -> None:
    assert list(app.all_sagas()) == []
    definition = Counter(("a",)).definition
    ids = [app.run(definition, {"n": n}).id for n in range(105)]  # more than one page
    listed = list(app.all_sagas())
    assert [s.id for s in listed] == ids
    assert [s.context["n"] for s in listed] == list(range(105))
    assert {s.status for s in listed} == {"completed"}


def test_saga_events_are_in_the_notification_log(app: SagaApplication) -> None:
    assert isinstance(app, Application)
    saga = app.run(Counter(("a",)).definition, {})
    notifications = app.notification_log.select(start=1, limit=10)
    assert [n.originator_version for n in notifications] == [1, 2, 3, 4]
    assert {n.originator_id for n in notifications} == {saga.id}
    assert notifications[0].topic == "saga_es:SagaStarted"


# -- idempotent starts -----------------------------------------------------------------


def test_starting_twice_with_the_same_key_returns_the_first_saga(app: SagaApplication) -> None:
    counter = Counter()
    first = app.run(counter.definition, {"try": 1}, key="order-42")
    again = app.run(counter.definition, {"try": 2}, key="order-42")
    assert counter.calls == ["reserve", "charge"]
    assert again.id == first.id == SagaApplication.saga_id("order", "order-42")
    assert again.version == first.version
    assert again.context == {"try": 1, "reserve": True, "charge": True}
    assert again.key == "order-42"
    via_arun = asyncio.run(app.arun(counter.definition, {"try": 3}, key="order-42"))
    assert via_arun.id == first.id
    updates = collect(app, counter.definition, {"try": 4}, key="order-42")
    assert [u.version for u in updates] == list(range(1, first.version + 1))
    assert counter.calls == ["reserve", "charge"]
    other = app.run(counter.definition, {}, key="order-43")
    assert other.id != first.id
    assert counter.calls == ["reserve", "charge"] * 2
    assert len(list(app.all_sagas())) == 2


def test_a_key_is_scoped_to_the_definition_name(app: SagaApplication) -> None:
    one, two = Counter(name="order"), Counter(name="refund")
    assert app.run(one.definition, {}, key="k").id != app.run(two.definition, {}, key="k").id
    assert one.calls == two.calls == ["reserve", "charge"]


def test_a_compensated_saga_is_not_run_again_under_its_key(app: SagaApplication) -> None:
    counter = Counter(("reserve", "fail"))
    first = app.run(counter.definition, {}, key="k")
    again = app.run(counter.definition, {}, key="k")
    assert first.status == again.status == "compensated"
    assert counter.calls == ["reserve", "fail", "undo reserve"]


@pytest.mark.parametrize("store", DURABLE_STORES)
def test_the_same_key_in_a_second_application_on_the_store_runs_nothing(
    app: SagaApplication, env: Env, open_app: Callable[[Env], SagaApplication]
) -> None:
    counter = Counter()
    first = app.run(counter.definition, {}, key="order-42")
    later = open_app(env)
    again = later.run(counter.definition, {}, key="order-42")
    assert again.id == first.id
    assert again.status == "completed"
    assert counter.calls == ["reserve", "charge"]
    assert len(later.saga_events(first.id)) == len(app.saga_events(first.id))


@pytest.mark.parametrize("store", DURABLE_STORES)
def test_a_second_application_reads_what_the_first_wrote(
    app: SagaApplication, env: Env, open_app: Callable[[Env], SagaApplication]
) -> None:
    done = app.run(Counter().definition, {"who": "ada"})
    undone = app.run(Counter(("reserve", "fail")).definition, {"who": "blaise"})
    later = open_app(env)
    assert [s.id for s in later.all_sagas()] == [done.id, undone.id]
    for saga in (done, undone):
        stored = later.get(saga.id)
        assert stored.status == saga.status
        assert stored.version == saga.version
        assert stored.context == saga.context
        assert later.saga_events(saga.id) == app.saga_events(saga.id)
        assert later.get(saga.id, version=2).status == "running"


def test_the_default_application_stores_in_saga_es_db_in_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("PERSISTENCE_MODULE", "SQLITE_DBNAME", "SAGAAPPLICATION_SQLITE_DBNAME"):
        monkeypatch.delenv(name, raising=False)  # the defaults under test, not the shell's
    monkeypatch.chdir(tmp_path)
    counter = Counter()
    with SagaApplication() as app:
        saga = app.run(counter.definition, {})
    assert (tmp_path / "saga_es.db").is_file()
    with SagaApplication() as later:
        assert later.get(saga.id).status == "completed"


# -- settings --------------------------------------------------------------------------


def bad_postgres(pg_server: PgServer, **changes: str | None) -> Env:
    env = pg_server.env("postgres")
    env["POSTGRES_CONNECT_TIMEOUT"] = "2"
    for name, value in changes.items():
        if value is None:
            env.pop(name)
        else:
            env[name] = value
    return env


@pytest.mark.parametrize(
    ("changes", "setting"),
    [
        ({"POSTGRES_PORT": "<free>"}, "POSTGRES_PORT"),
        ({"POSTGRES_PORT": "abc"}, "POSTGRES_PORT"),
        ({"POSTGRES_PORT": "70000"}, "POSTGRES_PORT"),
        ({"POSTGRES_PASSWORD": "wrong-pass-5c1f"}, "POSTGRES_PASSWORD"),
        ({"POSTGRES_DBNAME": None}, "POSTGRES_DBNAME"),
        ({"POSTGRES_DBNAME": "no_such_database"}, "POSTGRES_DBNAME"),
        ({"POSTGRES_POOL_SIZE": "-1"}, "POSTGRES_POOL_SIZE"),
        ({"POSTGRES_MAX_OVERFLOW": "-5"}, "POSTGRES_MAX_OVERFLOW"),
        ({"POSTGRES_PRE_PING": "maybe"}, "POSTGRES_PRE_PING"),
        ({"POSTGRES_CONNECT_TIMEOUT": "-3"}, "POSTGRES_CONNECT_TIMEOUT"),
    ],
    ids=[
        "bad-port",
        "port-not-a-number",
        "port-out-of-range",
        "bad-password",
        "missing-dbname",
        "unknown-dbname",
        "negative-pool-size",
        "negative-max-overflow",
        "pre-ping-not-a-boolean",
        "negative-connect-timeout",
    ],
)
def test_wrong_postgres_settings_name_the_setting_and_hide_the_password(
    pg_server: PgServer, changes: dict[str, str | None], setting: str
) -> None:
    if changes.get("POSTGRES_PORT") == "<free>":
        changes = {"POSTGRES_PORT": str(free_port())}
    env = bad_postgres(pg_server, **changes)
    with pytest.raises(ConfigurationError) as caught:
        SagaApplication(env=env).close()
    error = caught.value
    assert error.setting == setting, str(error)
    assert str(error).startswith(f"{setting}: ")
    for secret in (pg_server.password, "wrong-pass-5c1f"):
        assert secret not in str(error)
        assert secret not in repr(error)


def test_an_unknown_persistence_module_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError) as caught:
        SagaApplication(env={"PERSISTENCE_MODULE": "no.such.module"})
    assert caught.value.setting == "PERSISTENCE_MODULE"


def test_an_unusable_sqlite_file_is_a_configuration_error(tmp_path: Path) -> None:
    env = {
        "PERSISTENCE_MODULE": "eventsourcing.sqlite",
        "SQLITE_DBNAME": str(tmp_path / "missing-folder" / "sagas.db"),
    }
    with pytest.raises(ConfigurationError) as caught:
        SagaApplication(env=env)
    assert caught.value.setting == "SQLITE_DBNAME"


# -- versioning: streams written by the first release read back in today's shape -----------

V2_FIELDS = {  # and the fields of later class versions: release 1 wrote none of them
    "saga_es:SagaStarted": (
        "parallel",
        "fallback_compensable",
        "deadline",
        "parent_saga_id",
        "parent_step",
        "children",
    ),
    "saga_es:StepStarted": ("fallback", "child_saga_id"),
    "saga_es:StepFailed": ("delay", "breaker"),
    "saga_es:CompensationFailed": ("delay",),
}


def _as_first_release(app: SagaApplication, stored: StoredEvent) -> StoredEvent:
    """The stored event as release 1 wrote it: no class_version, none of the later fields."""
    state = json.loads(stored.state)
    state.pop("class_version", None)
    for name in V2_FIELDS.get(stored.topic, ()):
        state.pop(name)
    return StoredEvent(
        originator_id=stored.originator_id,
        originator_version=stored.originator_version,
        topic=stored.topic,
        state=json.dumps(state).encode(),
    )


def test_events_in_the_first_releases_shape_are_upcast_and_resumed(
    app: SagaApplication, open_app: Callable[[Env], SagaApplication], env: Env
) -> None:
    ran: list[str] = []

    def step(name: str) -> Step:
        return Step(name, lambda context, key: ran.append(name), lambda context, key: None)

    definition = SagaDefinition("legacy", [step("a"), step("b"), step("c")])
    saga = Saga.start(
        id=uuid4(),
        name="legacy",
        definition_version=1,
        steps=["a", "b", "c"],
        compensable=["a", "b", "c"],
        key=None,
        context_type="builtins:dict",
        context={"order": 7},
    )
    saga.start_step("a", 1)
    saga.fail_step("a", 1, error_type="Timeout", error_message="slow", will_retry=True)
    saga.start_step("a", 2)
    saga.complete_step("a", 2, changes={"a": 1}, removed=[])
    saga.start_step("b", 1)  # the worker died here, under release 1
    old = [_as_first_release(app, app.mapper.to_stored_event(e)) for e in saga.collect_events()]
    assert all(b"class_version" not in s.state and b"fallback" not in s.state for s in old)
    rows = {"saga_statuses": [SagaStatus.of(saga)]} if app._keeps_statuses else {}
    app.recorder.insert_events(old, **rows)  # POPO takes its status rows from the writer

    read = app.get(saga.id)
    assert (read.status, read.in_flight) == ("running", {"b": 1})
    assert (read.groups, read.deadline, read.retrying) == ([], None, {})
    events = app.saga_events(saga.id)
    failed = events[2]
    assert isinstance(failed, Saga.StepFailed)
    assert (failed.delay, failed.breaker) == (0.0, None)
    assert [e.fallback for e in events if isinstance(e, Saga.StepStarted)] == [False] * 3
    assert [e.child_saga_id for e in events if isinstance(e, Saga.StepStarted)] == [None] * 3
    assert (read.parent_saga_id, read.children) == (None, {})
    assert [r.event for r in app.history(saga.id)][-1] == "StepStarted"

    worker = app if env["PERSISTENCE_MODULE"].endswith("popo") else open_app(env)
    worker.register(definition)
    worker.default_step_timeout = 0  # its worker is gone: take it over at once
    report = worker.recover()
    assert report.resumed == [saga.id], report
    assert ran == ["b", "c"]
    assert worker.get(saga.id).status == "completed"
    assert worker.verify() == []


def test_a_snapshot_in_the_first_releases_shape_is_upcast() -> None:
    saga = Saga.start(
        id=uuid4(),
        name="legacy",
        definition_version=1,
        steps=["a"],
        compensable=[],
        key=None,
        context_type="builtins:dict",
        context={},
    )
    snapshot = Saga.Snapshot.take(saga)
    state = dict(snapshot.state)
    assert state.pop("class_version") == 5
    for name in (
        "carried_keys",
        "groups",
        "fallback_compensable",
        "deadline",
        "on_fallback",
        "retrying",
        "parent_saga_id",
        "parent_step",
        "children",
    ):
        del state[name]
    old = Saga.Snapshot(
        originator_id=snapshot.originator_id,
        originator_version=snapshot.originator_version,
        timestamp=snapshot.timestamp,
        topic=snapshot.topic,
        state=state,
    )
    restored = old.mutate(None)
    assert (restored.groups, restored.on_fallback, restored.retrying) == ([], [], {})
    assert (restored.parent_saga_id, restored.parent_step, restored.children) == (None, None, {})
    assert restored.carried_keys == {}
    restored.start_step("a", 1)
    assert restored.in_flight == {"a": 1}


def test_a_fork_written_before_it_kept_its_keys_reads_with_the_sources_keys() -> None:
    """A `SagaForked` (v1) or a fork's snapshot (v4) without the keys: keyed in the source."""
    source = uuid4()
    saga = Saga.start(
        id=uuid4(),
        name="parcel",
        definition_version=1,
        steps=["pack", "label"],
        compensable=["pack"],
        key=None,
        context_type="builtins:dict",
        context={},
    )
    saga.fork(source_saga_id=str(source), source_version=3, from_step="label", carried=["pack"])
    forked = saga.pending_events[-1]
    state = {k: v for k, v in forked.__dict__.items() if k not in ("keys", "fallbacks")}
    Saga.SagaForked.upcast_v1_v2(state)
    assert state["keys"] == {"pack": f"{source}:pack"}
    assert state["fallbacks"] == []
    snapshot = dict(Saga.Snapshot.take(saga).state)
    del snapshot["carried_keys"]
    Saga.upcast_v4_v5(snapshot)
    assert snapshot["carried_keys"] == {"pack": f"{source}:pack"}
    assert saga.step_key("pack") == f"{source}:pack"
    assert saga.step_key("label") == f"{saga.id}:label"


def test_every_event_is_logged_with_its_saga_step_and_attempt(
    app: SagaApplication, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(context: Any, key: str) -> None:
        raise ValueError("declined")

    definition = SagaDefinition(
        "logged", [Step("reserve", lambda c, k: None, lambda c, k: None), Step("pay", refuse)]
    )
    with caplog.at_level(logging.DEBUG, logger="saga_es"):
        saga = app.run(definition, {"secret": "4111-1111"})
    records = [r for r in caplog.records if getattr(r, "saga_id", None) == str(saga.id)]
    assert [r.getMessage().split(": ", 1)[1] for r in records] == [
        "SagaStarted",
        "StepStarted reserve attempt 1",
        "StepCompleted reserve attempt 1",
        "StepStarted pay attempt 1",
        "StepFailed pay attempt 1 ValueError: declined",
        "CompensationStarted reserve attempt 1",
        "CompensationRan reserve attempt 1",
        "SagaCompensated",
    ]
    assert [(r.step, r.attempt) for r in records][4] == ("pay", 1)
    assert [r.levelname for r in records][4::3] == ["WARNING", "INFO"]
    assert all(r.saga_name == "logged" for r in records)
    assert not any("4111" in r.getMessage() for r in caplog.records), "contexts are not logged"


def test_stats_take_the_same_filters_as_sagas(app: SagaApplication) -> None:
    ok = SagaDefinition("ok", [Step("a", lambda c, k: None)])
    bad = SagaDefinition("bad", [Step("a", lambda c, k: (_ for _ in ()).throw(RuntimeError()))])
    app.run(ok, {}, key="k1")
    app.run(ok, {})
    app.run(bad, {})
    middle = app.sagas()[1].started_at
    assert app.stats() == {("ok", "completed"): 2, ("bad", "compensated"): 1}
    assert app.stats(status="compensated") == {("bad", "compensated"): 1}
    assert app.stats(name="ok", key="k1") == {("ok", "completed"): 1}
    assert app.stats(started_after=middle) == {("bad", "compensated"): 1}
    assert app.stats(started_before=middle) == {("ok", "completed"): 1}
    assert app.stats(name="none") == {}
    with pytest.raises(ValueError, match="unknown saga status 'lost'"):
        app.stats(status="lost")


def test_sagas_are_listed_from_the_projection_and_bad_queries_are_refused(
    app: SagaApplication,
) -> None:
    definition = SagaDefinition("listed", [Step("a", lambda c, k: None)])
    ids = [app.run(definition, {}, key=str(n)).id for n in range(5)]
    first = app.sagas(limit=2)
    assert [row.saga_id for row in first] == ids[:2]
    rest = app.sagas(after=str(first[-1].saga_id), limit=10)  # a cursor as typed on a CLI
    assert [row.saga_id for row in rest] == ids[2:]
    assert [row.saga_id for row in app.sagas(key="3")] == [ids[3]]
    assert app.sagas(status="completed", name="listed") == app.statuses(limit=100)
    with pytest.raises(ValueError, match="unknown saga status 'done'"):
        app.sagas(status=["completed", "done"])
    with pytest.raises(ValueError, match="after= must be a saga id"):
        app.sagas(after="page-2")
    with pytest.raises(ValueError, match="limit"):
        app.sagas(limit=0)
    assert app.sagas(after=ids[-1]) == []  # the last page: past the last saga, none
    stranger = uuid4()
    with pytest.raises(SagaNotFound, match=str(stranger)):  # not "no more sagas"
        app.sagas(after=stranger)


def test_a_query_with_a_filter_of_the_wrong_type_is_refused_the_same_on_every_store(
    app: SagaApplication,
) -> None:
    """`status=None` means no filter; a name, key or time of the wrong type names itself."""
    definition = SagaDefinition("typed", [Step("a", lambda c, k: None)])
    saga = app.run(definition, {}, key="7")
    assert [row.saga_id for row in app.sagas(status=None, name=None, key=None)] == [saga.id]
    assert app.stats(status=None) == {("typed", "completed"): 1}
    for bad, named in (
        ({"name": 5}, "name="),
        ({"key": 7}, "key="),
        ({"status": 3}, "status"),
        ({"status": [None]}, "status"),
        ({"started_after": "2020-01-01"}, "started_after="),
        ({"started_before": 0}, "started_before="),
    ):
        with pytest.raises(ValueError, match=named):
            app.sagas(**bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=named):
            app.stats(**bad)  # type: ignore[arg-type]
    # Bytes are a sequence of ints: they were read as the status 99 ("c").
    for odd in (b"completed", bytearray(b"completed")):
        with pytest.raises(ValueError, match=r"status= must be a saga status .* got .*completed"):
            app.sagas(status=odd)  # type: ignore[arg-type]


def test_sagas_take_none_for_any_status_and_refuse_a_time_that_is_not_one(
    app: SagaApplication,
) -> None:
    definition = SagaDefinition("listed", [Step("a", lambda c, k: None)])
    ids = [app.run(definition, {}, key=str(n)).id for n in range(2)]
    assert [row.saga_id for row in app.sagas(status=None)] == ids  # None: no filter, as name=
    assert app.stats(status=None) == {("listed", "completed"): 2}
    today = app.sagas()[0].started_at.date()
    # A date is its midnight, UTC, as `saga-es list --since DATE` reads it.
    assert [row.saga_id for row in app.sagas(started_after=today)] == ids
    assert app.sagas(started_before=today) == []
    for wrong in ("2020-01-01", 1700000000):
        with pytest.raises(ValueError, match=r"started_after= must be a datetime.*got"):
            app.sagas(started_after=wrong)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"started_before= must be a datetime.*got"):
            app.stats(started_before=wrong)  # type: ignore[arg-type]


# -- cancel --------------------------------------------------------------------------------


def _shop(log: list[str], gate: threading.Event | None = None) -> SagaDefinition:
    """reserve, pay (which waits at `gate`), ship: every call logged."""

    def do(name: str) -> Any:
        def action(context: Any, key: str) -> None:
            log.append(f"do {name}")
            if name == "pay" and gate is not None:
                gate.wait(10)
            context[name] = True

        return action

    def undo(name: str) -> Any:
        return lambda context, key: log.append(f"undo {name}")

    return SagaDefinition("shop", [Step(n, do(n), undo(n)) for n in ("reserve", "pay", "ship")])


def test_a_submitted_saga_is_cancelled_at_once_with_no_step_run(app: SagaApplication) -> None:
    log: list[str] = []
    saga_id = app.submit(_shop(log), {})
    saga = app.cancel(saga_id, by="ada", reason="customer asked")
    assert saga.status == "cancelled"
    assert [r.event for r in app.history(saga_id)] == [
        "SagaStarted",
        "CancelRequested",
        "SagaCancelled",
    ]
    assert app.history(saga_id)[1].details == {"by": "ada", "reason": "customer asked"}
    assert log == []
    assert app.sagas(status="cancelled")[0].saga_id == saga_id
    assert app.recover().found == 0
    assert app.verify() == []


def test_a_running_saga_stops_at_its_next_boundary_and_compensates(
    app: SagaApplication, reader: SagaApplication
) -> None:
    log: list[str] = []
    gate = threading.Event()
    definition = _shop(log, gate)
    reader.register(definition)
    result: dict[str, Saga] = {}
    worker = threading.Thread(target=lambda: result.update(saga=app.run(definition, {})))
    worker.start()
    while "do pay" not in log:
        time.sleep(0.005)
    (row,) = reader.sagas()
    requested = reader.cancel(row.saga_id, by="ada", reason="stop")  # another process
    assert (requested.status, requested.in_flight) == ("running", {"pay": 1})
    gate.set()
    worker.join()

    assert result["saga"].status == "cancelled"
    assert log == ["do reserve", "do pay", "undo pay", "undo reserve"]  # ship never ran
    assert [r.event for r in reader.history(row.saga_id)][4:] == [
        "CancelRequested",
        "StepCompleted",
        "CompensationStarted",
        "CompensationRan",
        "CompensationStarted",
        "CompensationRan",
        "SagaCancelled",
    ]
    assert reader.get(row.saga_id).status == "cancelled"
    assert reader.verify() == []


def test_a_cancelled_saga_whose_worker_died_is_finished_by_recovery(
    app: SagaApplication,
) -> None:
    class Died(BaseException):
        pass

    def dies(context: Any, key: str) -> None:
        raise Died

    undone: list[str] = []
    definition = SagaDefinition(
        "died",
        [Step("a", lambda c, k: None, lambda c, k: undone.append("a")), Step("b", dies)],
    )
    with pytest.raises(Died):
        app.run(definition, {}, key="k")
    saga_id = SagaApplication.saga_id("died", "k")
    assert app.cancel(saga_id, by="ops", reason="stop it").status == "running"
    app.default_step_timeout = 0
    assert app.recover().resumed == [saga_id]
    saga = app.get(saga_id)
    assert saga.status == "cancelled"
    assert undone == ["a"]
    assert [r.event for r in app.history(saga_id)][-5:] == [
        "CancelRequested",
        "StepFailed",  # b's outcome was lost with its worker, and nothing runs again
        "CompensationStarted",
        "CompensationRan",
        "SagaCancelled",
    ]
    assert app.verify() == []


@pytest.mark.parametrize("driver", ["run", "arun"])
def test_a_cancel_cuts_a_running_async_action_only_if_its_step_opts_in(
    app: SagaApplication, driver: str
) -> None:
    log: list[str] = []
    inside = threading.Event()

    async def slow(context: Any, key: str) -> None:
        log.append("do wait")
        inside.set()
        try:
            await asyncio.sleep(1.0)
        except asyncio.CancelledError:
            log.append("cut wait")
            raise
        context["waited"] = True

    def step(name: str) -> Step:
        return Step(
            name,
            lambda context, key: log.append(f"do {name}"),
            lambda context, key: log.append(f"undo {name}"),
        )

    def cancelled_after(cancellable: bool) -> tuple[str, float]:
        log.clear()
        inside.clear()
        name = f"slow-{cancellable}-{driver}"
        definition = SagaDefinition(
            name,
            [
                step("reserve"),
                Step("wait", slow, lambda c, k: log.append("undo wait"), cancellable=cancellable),
                step("ship"),
            ],
        )
        saga_id = app.saga_id(name, "k")
        runs: list[Saga] = []
        if driver == "run":
            worker = threading.Thread(target=lambda: runs.append(app.run(definition, {}, key="k")))
        else:
            worker = threading.Thread(
                target=lambda: runs.append(asyncio.run(app.arun(definition, {}, key="k")))
            )
        worker.start()
        assert inside.wait(5)
        asked = time.monotonic()
        assert app.cancel(saga_id, by="ada", reason="changed her mind").status == "running"
        worker.join(10)
        assert runs
        assert runs[0].status == "cancelled"
        events = [r.event for r in app.history(saga_id)]
        return events[events.index("CancelRequested") + 1], time.monotonic() - asked

    # Not opted in: the action runs to its end, its completion is recorded, then undone.
    after, waited = cancelled_after(False)
    assert after == "StepCompleted"
    assert waited >= 0.5
    assert log == ["do reserve", "do wait", "undo wait", "undo reserve"]
    # Opted in: the action is cancelled at once; its outcome unknown, it is undone too.
    after, waited = cancelled_after(True)
    assert after == "StepFailed"
    assert waited < 0.9
    assert log == ["do reserve", "do wait", "cut wait", "undo wait", "undo reserve"]
    assert app.verify() == []


def test_a_cancellable_step_needs_an_async_action() -> None:
    with pytest.raises(DefinitionError, match="cancellable=True needs an async action"):
        Step("wait", lambda context, key: None, cancellable=True)


def test_cancel_of_a_terminal_stuck_or_unknown_saga_is_refused_and_appends_nothing(
    app: SagaApplication,
) -> None:
    log: list[str] = []
    done = app.run(_shop(log), {})

    def broken(context: Any, key: str) -> None:
        raise RuntimeError("refund api down")

    stuck = app.run(
        SagaDefinition(
            "stuck",
            [Step("a", lambda c, k: None, broken), Step("b", broken)],
        ),
        {},
    )
    assert stuck.status == "stuck"
    for saga in (done, stuck):
        before = len(app.history(saga.id))
        with pytest.raises(IllegalTransition, match="cannot request_cancel"):
            app.cancel(saga.id, by="ada", reason="too late")
        assert len(app.history(saga.id)) == before
    with pytest.raises(SagaNotFound):
        app.cancel(uuid4(), by="ada", reason="x")
    with pytest.raises(ValueError, match="by="):
        app.cancel(done.id, by=" ", reason="x")


def test_a_cancel_whose_reason_no_store_could_keep_is_refused_and_appends_nothing(
    app: SagaApplication,
) -> None:
    saga_id = app.submit(_shop([]), {}, key="k")
    for by, reason, named in (("ada", "fraud\x00", "reason=.*NUL"), ("\udc80", "x", "by=")):
        with pytest.raises(ValueError, match=named):
            app.cancel(saga_id, by=by, reason=reason)
    assert [r.event for r in app.history(saga_id)] == ["SagaStarted"]


def test_a_cancel_racing_a_step_completion_leaves_one_legal_history(
    app: SagaApplication, reader: SagaApplication
) -> None:
    for attempt in range(5):
        log: list[str] = []
        definition = _shop(log)
        reader.register(definition)
        saga_id = app.submit(definition, {}, key=f"race-{attempt}")
        outcome: dict[str, Any] = {}

        def cancel(saga_id: UUID = saga_id, outcome: dict[str, Any] = outcome) -> None:
            try:
                outcome["cancel"] = reader.cancel(saga_id, by="ada", reason="race").status
            except IllegalTransition as e:
                outcome["cancel"] = e

        racer = threading.Thread(target=cancel)
        racer.start()
        app.work(until_idle=True)
        racer.join()
        final = app.get(saga_id)
        assert final.status in ("cancelled", "completed")
        if final.status == "completed":  # the saga ended first: the cancel was refused
            assert isinstance(outcome["cancel"], IllegalTransition)
        else:
            assert "do ship" not in log or "undo ship" in log
        assert app.verify() == []


# -- fork ------------------------------------------------------------------------------------


def _parcel(calls: list[str], label_works: bool, version: int = 1) -> SagaDefinition:
    def step(name: str) -> Step:
        def action(context: Any, key: str) -> None:
            calls.append(f"do {name}")
            if name == "label" and not label_works:
                raise RuntimeError("label printer bug")
            context[name] = len(calls)

        return Step(name, action, lambda context, key: calls.append(f"undo {name}"))

    return SagaDefinition("parcel", [step("pack"), step("weigh"), step("label")], version=version)


def test_a_fork_after_a_fix_completes_where_the_original_failed(
    app: SagaApplication, reader: SagaApplication
) -> None:
    calls: list[str] = []
    failed = app.run(_parcel(calls, label_works=False), {"parcel": 7})
    assert failed.status == "compensated"
    history = [r.event for r in app.history(failed.id)]
    calls.clear()

    forked = app.fork(failed.id, "label", _parcel(calls, label_works=True, version=2))
    assert forked.status == "completed"
    assert calls == ["do label"], "the carried-over steps did not run again"
    assert forked.context_state == {"parcel": 7, "pack": 1, "weigh": 2, "label": 1}
    assert forked.completed == ["pack", "weigh", "label"]
    assert forked.forked_from == {"saga_id": str(failed.id), "version": 5, "from_step": "label"}
    forked_history = reader.history(forked.id)
    assert [r.event for r in forked_history] == [
        "SagaStarted",
        "SagaForked",
        "StepStarted",
        "StepCompleted",
        "SagaCompleted",
    ]
    assert forked_history[1].details["carried"] == ["pack", "weigh"]
    assert [r.event for r in reader.history(failed.id)] == history, "the original is untouched"
    assert reader.verify() == []


def test_a_failing_fork_compensates_the_steps_it_carried_over(app: SagaApplication) -> None:
    calls: list[str] = []
    failed = app.run(_parcel(calls, label_works=False), {})
    calls.clear()
    again = app.fork(failed.id, "label")  # the same, still broken, definition
    assert again.status == "compensated"
    assert calls == ["do label", "undo weigh", "undo pack"]


def test_a_fork_compensates_a_carried_step_as_it_ran_in_the_source(
    app: SagaApplication, reader: SagaApplication
) -> None:
    """A carried step is undone with the key its action had, by the compensation of the
    action that took effect (its fallback's), and a carried nested step reverts its child.
    """
    calls: list[tuple[str, str]] = []

    def note(what: str) -> Any:
        return lambda context, key: calls.append((what, key))

    def down(context: Any, key: str) -> None:
        raise RuntimeError("card service down")

    def fails(context: Any, key: str) -> None:
        raise RuntimeError("courier bug")

    child = SagaDefinition("charge", [Step("debit", note("do debit"), note("undo debit"))])

    def order(ship: Any, version: int) -> SagaDefinition:
        return SagaDefinition(
            "order",
            [
                Step("reserve", note("do reserve"), note("undo reserve")),
                Step(
                    "pay",
                    down,
                    note("undo card"),
                    fallback=note("do voucher"),
                    fallback_compensation=note("undo voucher"),
                ),
                Step.saga("bill", child),
                Step("ship", ship, note("undo ship")),
            ],
            version=version,
        )

    source = app.run(order(note("do ship"), 1), {})
    assert source.status == "completed"
    ran_with = {what.split()[1]: key for what, key in calls}
    assert ran_with["voucher"] == source.step_key("pay")
    calls.clear()

    first = app.fork(source.id, "ship", order(fails, 2))
    second = app.fork(first.id, "ship", order(fails, 3))  # a fork of a fork: the same keys
    for fork in (first, second):
        assert fork.status == "compensated"
        for step in ("reserve", "pay", "bill"):
            assert fork.step_key(step) == source.step_key(step)
    assert calls[:3] == [
        ("undo debit", ran_with["debit"]),
        ("undo voucher", ran_with["voucher"]),
        ("undo reserve", ran_with["reserve"]),
    ]
    (billed,) = reader.sagas(name="charge")
    assert billed.status == "compensated", "the source's child saga was reverted"
    again = reader.get(second.id)
    assert again.step_key("pay") == source.step_key("pay")
    assert again.on_fallback == ["pay"]
    assert reader.verify() == []


def test_a_keyed_fork_runs_once(app: SagaApplication) -> None:
    calls: list[str] = []
    failed = app.run(_parcel(calls, label_works=False), {})
    fixed = _parcel(calls, label_works=True, version=2)
    first = app.fork(failed.id, "label", fixed, key="retry-1")
    calls.clear()
    assert app.fork(failed.id, "label", fixed, key="retry-1").id == first.id
    assert calls == []


def _incompressible(size: int) -> str:
    """Text PostgreSQL cannot shrink to fit an index entry (a repeated letter it would)."""
    return random.Random(size).randbytes(size).hex()[:size]


def test_a_key_too_long_for_postgresql_to_index_is_refused_alike_on_every_store(
    app: SagaApplication,
) -> None:
    # PostgreSQL indexes the status rows by key: a longer key was an OperationalError
    # there and stored elsewhere. It is refused on every store, before anything is stored.
    calls: list[str] = []
    definition = _parcel(calls, label_works=True)
    long_key = _incompressible(2001)  # PostgreSQL refused such keys past about 2,700 bytes
    with pytest.raises(ValueError, match=r"key '[0-9a-f]{20}.*cannot be stored: .*2001 bytes"):
        app.run(definition, {}, key=long_key)
    with pytest.raises(ValueError, match=r"key .* cannot be stored: .*bytes"):
        app.submit(definition, {}, key="é" * 1001)
    assert calls == []
    assert app.stats() == {}
    longest = _incompressible(2000)
    assert app.run(definition, {}, key=longest).status == "completed"
    failed = app.run(_parcel(calls, label_works=False), {})
    with pytest.raises(ValueError, match=r"key .* cannot be stored"):
        app.fork(failed.id, "label", _parcel(calls, label_works=True, version=2), key=long_key)
    assert [row.key for row in app.sagas(key=longest)] == [longest]
    assert sum(app.stats().values()) == 2


@pytest.mark.parametrize(("key", "reason"), [("a\x00b", "NUL"), ("\udc80", "surrogates")])
def test_a_fork_refuses_a_key_some_store_cannot_keep_alike_on_every_store(
    app: SagaApplication, key: str, reason: str
) -> None:
    failed = app.run(_parcel([], label_works=False), {})
    stored = app.stats()
    with pytest.raises(ValueError, match=f"key .* cannot be stored: .*{reason}"):
        app.fork(failed.id, "label", _parcel([], label_works=True, version=2), key=key)
    assert app.stats() == stored


def test_a_fork_key_is_stored_as_a_str_as_run_stores_it(app: SagaApplication) -> None:
    failed = app.run(_parcel([], label_works=False), {})
    fixed = _parcel([], label_works=True, version=2)
    forked = app.fork(failed.id, "label", fixed, key=7)  # type: ignore[arg-type]
    assert forked.key == "7"
    assert app.fork(failed.id, "label", fixed, key="7").id == forked.id
    assert [row.key for row in app.sagas(status="completed")] == ["7"]


def test_a_fork_that_cannot_be_carried_is_refused_and_stores_nothing(
    app: SagaApplication,
) -> None:
    calls: list[str] = []
    failed = app.run(_parcel(calls, label_works=False), {})
    stored = app.stats()
    with pytest.raises(ForkRefused) as missing:
        app.fork(
            failed.id,
            "label",
            SagaDefinition(
                "parcel", [Step("pack", lambda c, k: None), Step("label", lambda c, k: None)]
            ),
        )
    assert [(d.kind, d.step, d.blocking) for d in missing.value.divergences] == [
        ("removed", "weigh", True)
    ]
    with pytest.raises(StepNotReached):
        app.fork(failed.id, "ship")
    with pytest.raises(ValueError, match="named 'other'"):
        app.fork(failed.id, "label", SagaDefinition("other", [Step("label", lambda c, k: None)]))
    with pytest.raises(SagaNotFound):
        app.fork(uuid4(), "label")
    assert app.stats() == stored


# -- nested sagas ------------------------------------------------------------------------------


class _Died(BaseException):
    """A worker dying mid-call: the runner does not catch it."""


def _nested(log: list[str], *, ship_fails: bool = False, capture_dies: bool = False) -> Any:
    def step(name: str, fails: bool = False, dies: bool = False) -> Step:
        def action(context: Any, key: str) -> None:
            log.append(f"do {name}")
            if dies and log.count(f"do {name}") == 1:
                raise _Died
            if fails:
                raise RuntimeError(f"{name} failed")
            context[name] = True

        return Step(name, action, lambda context, key: log.append(f"undo {name}"))

    child = SagaDefinition("payment", [step("auth"), step("capture", dies=capture_dies)])
    parent = SagaDefinition(
        "order", [step("reserve"), Step.saga("pay", child), step("ship", fails=ship_fails)]
    )
    return parent, child


def test_a_nested_saga_completes_its_parents_step_and_is_linked_both_ways(
    app: SagaApplication,
) -> None:
    log: list[str] = []
    parent, _ = _nested(log)
    saga = app.run(parent, {"order": 1})
    assert saga.status == "completed"
    assert log == ["do reserve", "do auth", "do capture", "do ship"]
    child_id = UUID(saga.results["pay"]["saga_id"])
    assert child_id == SagaApplication.saga_id("payment", f"{saga.id}:pay")
    child_saga = app.get(child_id)
    assert (child_saga.status, child_saga.key) == ("completed", f"{saga.id}:pay")
    # The child starts from the parent's context at that step (`Step.saga(context=...)` to choose).
    assert child_saga.context_state == {"order": 1, "reserve": True, "auth": True, "capture": True}
    assert app.verify() == []


def test_a_nested_sagas_first_event_names_its_parent_and_step_and_timelines_show_the_tree(
    app: SagaApplication, reader: SagaApplication
) -> None:
    from saga_es.diagram import definition_diagram
    from saga_es.timeline import timeline

    log: list[str] = []
    parent, _ = _nested(log)
    saga = app.run(parent, {"order": 1})
    child_id = UUID(saga.results["pay"]["saga_id"])
    started = reader.saga_events(child_id)[0]
    assert isinstance(started, SagaStarted)
    assert (started.parent_saga_id, started.parent_step) == (str(saga.id), "pay")
    child = reader.get(child_id)
    assert (child.parent_saga_id, child.parent_step) == (str(saga.id), "pay")
    # A saga that is nobody's child names no parent.
    assert (saga.parent_saga_id, saga.parent_step) == (None, None)
    assert reader.saga_events(saga.id)[0].parent_saga_id is None
    # Linked both ways: the parent's start of that step names the child, written ahead of it.
    starts = [e for e in reader.saga_events(saga.id) if isinstance(e, Saga.StepStarted)]
    assert {e.step: e.child_saga_id for e in starts} == {
        "reserve": None,
        "pay": str(child_id),
        "ship": None,
    }
    pay = next(r for r in reader.history(saga.id) if r.event == "StepStarted" and r.step == "pay")
    assert pay.details["child_saga_id"] == str(child_id)
    # The history shows the link, and the timelines go down from the parent and up from the child.
    assert reader.history(child_id)[0].details["parent_saga_id"] == str(saga.id)
    down = [r.detail for r in timeline(reader.saga_events(saga.id)) if r.step == "pay"]
    assert any(f"child saga {child_id}" in detail for detail in down)
    up = timeline(reader.saga_events(child_id))[0].detail
    assert up.startswith(f"child of saga {saga.id} ('pay')")
    assert "saga payment v1: auth → capture" in definition_diagram(parent)


def test_compensating_a_nested_step_compensates_the_childs_steps_in_reverse(
    app: SagaApplication,
) -> None:
    log: list[str] = []
    parent, _ = _nested(log, ship_fails=True)
    saga = app.run(parent, {})
    assert saga.status == "compensated"
    assert log[-3:] == ["undo capture", "undo auth", "undo reserve"]
    child_id = UUID(saga.results["pay"]["saga_id"])
    assert app.get(child_id).status == "compensated"
    assert [r.event for r in app.history(child_id)][-6:] == [
        "SagaReverted",
        "CompensationStarted",
        "CompensationRan",
        "CompensationStarted",
        "CompensationRan",
        "SagaCompensated",
    ]
    assert app.verify() == []


def test_a_child_that_fails_fails_its_parents_step(app: SagaApplication) -> None:
    log: list[str] = []
    child = SagaDefinition(
        "refund",
        [
            Step("auth", lambda c, k: log.append("do auth"), lambda c, k: log.append("undo auth")),
            Step("capture", lambda c, k: (_ for _ in ()).throw(RuntimeError("declined"))),
        ],
    )
    parent = SagaDefinition(
        "order",
        [
            Step("reserve", lambda c, k: None, lambda c, k: log.append("undo reserve")),
            Step.saga("pay", child),
        ],
    )
    saga = app.run(parent, {})
    assert saga.status == "compensated"
    assert saga.error is not None
    assert saga.error["type"] == "ChildSagaFailed"
    assert log == ["do auth", "undo auth", "undo reserve"]  # the child undid itself


def test_recovery_brings_parent_and_child_to_consistent_ends_after_a_crash(
    app: SagaApplication,
) -> None:
    log: list[str] = []
    parent, _ = _nested(log, capture_dies=True)
    with pytest.raises(_Died):
        app.run(parent, {}, key="crash")
    parent_id = SagaApplication.saga_id("order", "crash")
    child_id = SagaApplication.saga_id("payment", f"{parent_id}:pay")
    assert (app.get(parent_id).status, app.get(child_id).status) == ("running", "running")
    app.default_step_timeout = 0
    app.recover()
    assert (app.get(parent_id).status, app.get(child_id).status) == ("completed", "completed")
    assert log.count("do auth") == 1, "the child was started once"
    assert log.count("do capture") == 2  # re-run once, with the same key
    assert app.verify() == []


def test_a_definition_that_contains_itself_is_refused() -> None:
    inner = SagaDefinition("loop", [Step("x", lambda c, k: None)])
    middle = SagaDefinition("middle", [Step.saga("again", inner)])
    with pytest.raises(DefinitionError, match="contains itself"):
        SagaDefinition("loop", [Step.saga("nested", middle)])
    with pytest.raises(DefinitionError, match="needs a SagaDefinition"):
        Step.saga("pay", "payment")  # type: ignore[arg-type]
