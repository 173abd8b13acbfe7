"""Submitted sagas and workers: `submit`, `work`, and `saga-es worker` processes over one store.

Worker processes are real `python -m saga_es worker` subprocesses sharing one PostgreSQL
(or one SQLite file). Every action appends its idempotency key to a side-effect log, so
the tests can say which step ran how many times, in which process.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import STORES, Env

from saga_es import ContextError, DefinitionNotFound, SagaApplication

SAGAS = """
import asyncio
import logging
import os
from pathlib import Path

from saga_es import SagaDefinition, Step

LOG = Path(os.environ["SIDE_EFFECTS"])
PAUSE = float(os.environ.get("STEP_PAUSE", "0.005"))


def effect(what):
    async def step(context, key):
        with LOG.open("a") as log:
            log.write(f"{os.getpid()} {what} {key}\\n")
        await asyncio.sleep(PAUSE)

    return step


ORDER = SagaDefinition(
    "order", [Step(name, effect("do"), effect("undo")) for name in ("reserve", "pay", "ship")]
)


async def hang(context, key):
    await effect("do")(context, key)
    await asyncio.sleep(60)


SLOW = SagaDefinition(
    "slow",
    [
        Step("reserve", effect("do"), effect("undo")),
        Step("wait", hang, effect("undo"), cancellable=True),
        Step("ship", effect("do")),
    ],
)
"""


@pytest.fixture
def sagas_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The definitions module the workers import, and its side-effect log."""
    (tmp_path / "worker_sagas.py").write_text(SAGAS)
    monkeypatch.setenv("SIDE_EFFECTS", str(tmp_path / "effects.log"))
    monkeypatch.syspath_prepend(str(tmp_path))
    import worker_sagas  # type: ignore[import-not-found]

    yield worker_sagas
    sys.modules.pop("worker_sagas", None)


def effects(module: Any) -> list[tuple[int, str, str]]:
    """(pid, "do" | "undo", key) for every call, in the order they happened."""
    if not module.LOG.exists():
        return []
    rows = [line.split() for line in module.LOG.read_text().splitlines()]
    return [(int(pid), what, key) for pid, what, key in rows]


def start_worker(env: Env, module: Any, *args: str, pause: float = 0.005) -> subprocess.Popen[str]:
    folder = str(Path(module.__file__).parent)
    return subprocess.Popen(
        [sys.executable, "-m", "saga_es", "worker", "--definitions", "worker_sagas", *args],
        env={
            **os.environ,
            **env,
            "PYTHONPATH": os.pathsep.join([folder, *sys.path]),
            "SIDE_EFFECTS": str(module.LOG),
            "STEP_PAUSE": str(pause),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def stop(worker: subprocess.Popen[str]) -> str:
    """SIGTERM, then its whole output; it must exit cleanly."""
    worker.send_signal(signal.SIGTERM)
    output, _ = worker.communicate(timeout=60)
    assert worker.returncode == 0, output
    return output


@pytest.fixture
def store() -> str:
    """Worker processes need a store they can share: PostgreSQL unless a test says otherwise."""
    return "postgres"


# -- submit --------------------------------------------------------------------------------


@pytest.mark.parametrize("store", STORES)
def test_submit_records_a_pending_saga_and_returns_at_once(
    app: SagaApplication, sagas_module: Any
) -> None:
    saga_id = app.submit(sagas_module.ORDER, {"id": 1})
    saga = app.get(saga_id)
    assert (saga.status, saga.version, saga.in_flight) == ("pending", 1, {})
    assert [r.event for r in app.history(saga_id)] == ["SagaStarted"]
    assert effects(sagas_module) == []
    assert app.submit(sagas_module.ORDER, {"id": 2}, key="k") == app.submit(
        "order", {"id": 3}, key="k"
    )  # by name too; one saga per key


@pytest.mark.parametrize("store", STORES)
def test_submit_refuses_an_unknown_definition_or_context_and_stores_nothing(
    app: SagaApplication, sagas_module: Any
) -> None:
    with pytest.raises(DefinitionNotFound, match="'nowhere'"):
        app.submit("nowhere", {})
    with pytest.raises(ContextError, match="'when'"):
        app.submit(sagas_module.ORDER, {"when": threading.Lock()})
    assert app.stats() == {}


UNSTORABLE = {
    "nan": ({"price": float("nan")}, "'price'", "not JSON compliant"),
    "infinity": ({"price": {"max": [float("-inf")]}}, "'price'", "not JSON compliant"),
    "nul": ({"note": "a\x00b"}, "'note'", "character NUL"),
    "nul in a name": ({"no\x00te": 1}, "'no\\x00te'", "character NUL"),
    "surrogate": ({"note": "\ud800"}, "'note'", "surrogates not allowed"),
    "tuple as a name": ({(1, 2): "a"}, "'(1, 2)'", "cannot be a JSON key"),
}


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("case", list(UNSTORABLE))
def test_submit_refuses_a_context_some_store_cannot_keep_alike_on_every_store(
    app: SagaApplication, sagas_module: Any, case: str
) -> None:
    """JSON's NaN, PostgreSQL's NUL: one store's refusal is every store's `ContextError`."""
    context, field_name, reason = UNSTORABLE[case]
    with pytest.raises(ContextError, match=reason) as raised:
        app.submit(sagas_module.ORDER, context)
    assert raised.value.field == field_name.strip("'").encode().decode("unicode_escape")
    assert field_name in str(raised.value)
    assert app.stats() == {}


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize(("key", "reason"), [("a\x00b", "NUL"), ("\udc80", "surrogates")])
def test_submit_refuses_a_key_some_store_cannot_keep_alike_on_every_store(
    app: SagaApplication, sagas_module: Any, key: str, reason: str
) -> None:
    with pytest.raises(ValueError, match=f"key .* cannot be stored: .*{reason}"):
        app.submit(sagas_module.ORDER, {"id": 1}, key=key)
    assert app.stats() == {}


@pytest.mark.parametrize("store", STORES)
def test_work_runs_submitted_sagas_concurrently_until_idle(
    app: SagaApplication, sagas_module: Any
) -> None:
    ids = [app.submit(sagas_module.ORDER, {"n": n}) for n in range(30)]
    report = app.work(concurrency=10, until_idle=True)
    assert sorted(report.resumed) == sorted(ids)
    assert app.stats() == {("order", "completed"): 30}
    calls = Counter(key for _, what, key in effects(sagas_module) if what == "do")
    assert set(calls.values()) == {1}
    assert len(calls) == 90
    assert app.verify() == []
    with pytest.raises(ValueError, match="concurrency"):
        app.work(concurrency=0)


@pytest.mark.parametrize("poll", [0, -1, float("nan"), float("inf"), "1", None, True])
def test_work_refuses_a_poll_interval_that_would_spin_or_never_look(
    app: SagaApplication, sagas_module: Any, poll: Any
) -> None:
    """A poll of 0, below 0 or NaN would list the store in a busy loop; refused at once."""
    saga_id = app.submit(sagas_module.ORDER, {"id": 1})
    with pytest.raises(ValueError, match=f"poll_interval must be .*, got {poll!r}"):
        app.work(poll_interval=poll, stop=threading.Event())
    assert app.get(saga_id).status == "pending"


def test_work_refuses_a_stop_that_is_not_an_event(app: SagaApplication) -> None:
    with pytest.raises(TypeError, match=r"stop must be a threading\.Event, got 'soon'"):
        app.work(stop="soon", until_idle=True)  # type: ignore[arg-type]


# -- worker processes ----------------------------------------------------------------------


@pytest.mark.parametrize("store", ["postgres", "sqlite"])
def test_worker_processes_share_the_sagas_and_run_each_step_once(
    store: str, env: Env, app: SagaApplication, sagas_module: Any
) -> None:
    ids = [app.submit(sagas_module.ORDER, {"n": n}) for n in range(120)]
    workers = [
        start_worker(env, sagas_module, "--concurrency", "10", "--poll", "0.1") for _ in range(3)
    ]
    try:
        wait_until(lambda: app.stats() == {("order", "completed"): 120})
    finally:
        outputs = [stop(worker) for worker in workers]

    calls = effects(sagas_module)
    done = Counter(key for _, what, key in calls if what == "do")
    assert len(done) == 360
    assert set(done.values()) == {1}, "a step ran twice"
    assert not [c for c in calls if c[1] == "undo"]
    by_worker = Counter(pid for pid, _, _ in calls)
    assert set(by_worker) <= {w.pid for w in workers}
    assert len(by_worker) >= 2, "the work was shared"
    assert all("stopped:" in output for output in outputs)
    assert sum(int(o.split("stopped: ")[1].split()[0]) for o in outputs) == len(ids)
    assert app.verify() == []


def test_a_stopped_worker_finishes_the_sagas_it_holds_and_takes_no_more(
    env: Env, app: SagaApplication, sagas_module: Any
) -> None:
    ids = [app.submit(sagas_module.ORDER, {"n": n}) for n in range(20)]
    worker = start_worker(env, sagas_module, "--concurrency", "4", "--poll", "0.1", pause=0.2)
    wait_until(lambda: len(effects(sagas_module)) >= 4)  # it holds four sagas now
    output = stop(worker)

    rows = {saga_id: app.get(saga_id).status for saga_id in ids}
    held = [saga_id for saga_id, status in rows.items() if status != "pending"]
    assert 4 <= len(held) < len(ids)
    assert {rows[saga_id] for saga_id in held} == {"completed"}, "it finished what it held"
    assert f"stopped: {len(held)} saga(s) run" in output
    assert app.verify() == []


def test_a_worker_that_cannot_reach_its_store_retries_with_backoff(
    env: Env, sagas_module: Any
) -> None:
    unreachable = {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_HOST": "127.0.0.1",
        "POSTGRES_PORT": "9",
        "POSTGRES_USER": "nobody",
        "POSTGRES_PASSWORD": "x",
        "POSTGRES_DBNAME": "nothing",
        "POSTGRES_CONNECT_TIMEOUT": "1",
    }
    worker = start_worker(unreachable, sagas_module)
    time.sleep(2.5)
    output = stop(worker)
    attempts = [line for line in output.splitlines() if "cannot reach the store" in line]
    assert len(attempts) >= 2, output
    assert "retrying in 0.5s" in attempts[0]
    assert "retrying in 1.0s" in attempts[1]
    assert all(line.count("\n") == 0 for line in attempts)


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"PERSISTENCE_MODULE": "eventsourcing.nowhere"}, "PERSISTENCE_MODULE"),
        ({"POSTGRES_DBNAME": ""}, "POSTGRES_DBNAME"),
        ({"SAGA_COMMIT_MAX_WAIT": "soon"}, "SAGA_COMMIT_MAX_WAIT"),
        ({"POSTGRES_CONNECT_TIMEOUT": "0"}, "POSTGRES_CONNECT_TIMEOUT"),
    ],
)
def test_a_worker_with_a_setting_no_retry_can_mend_says_so_once_and_exits(
    env: Env, sagas_module: Any, settings: Env, named: str
) -> None:
    """Only an unreachable store is waited for; a typo is not 'cannot reach the store'."""
    worker = start_worker({**env, **settings}, sagas_module)
    output, _ = worker.communicate(timeout=30)
    assert worker.returncode == 2, output
    assert "cannot reach the store" not in output
    [line] = output.splitlines()
    assert f"cannot start: {named}: " in line


@pytest.mark.parametrize("store", ["postgres", "sqlite"])
def test_a_cancel_from_another_process_is_obeyed_by_the_worker_holding_the_saga(
    store: str, env: Env, app: SagaApplication, sagas_module: Any
) -> None:
    saga_id = app.submit(sagas_module.ORDER, {"n": 1})
    worker = start_worker(env, sagas_module, "--poll", "0.05", pause=0.3)
    try:
        wait_until(lambda: len(effects(sagas_module)) >= 1)  # the worker is inside "reserve"
        requested = app.cancel(saga_id, by="ada", reason="changed her mind")
        assert requested.status == "running"  # the worker holds the step: it will obey
        wait_until(lambda: app.get(saga_id).status == "cancelled")
    finally:
        stop(worker)
    calls = [(what, key.split(":")[1]) for _, what, key in effects(sagas_module)]
    assert calls == [("do", "reserve"), ("undo", "reserve")], "pay and ship never ran"
    assert {pid for pid, _, _ in effects(sagas_module)} == {worker.pid}
    events = [r.event for r in app.history(saga_id)]
    assert events[events.index("CancelRequested") :] == [
        "CancelRequested",
        "StepCompleted",
        "CompensationStarted",
        "CompensationRan",
        "SagaCancelled",
    ]
    assert app.verify() == []


@pytest.mark.parametrize("store", ["postgres", "sqlite"])
def test_a_cancel_from_another_process_cuts_a_cancellable_async_action_in_the_worker(
    store: str, env: Env, app: SagaApplication, sagas_module: Any
) -> None:
    saga_id = app.submit(sagas_module.SLOW, {"n": 1})
    worker = start_worker(env, sagas_module, "--poll", "0.05")
    try:
        wait_until(lambda: len(effects(sagas_module)) >= 2)  # inside "wait", for 60 s
        asked = time.monotonic()
        assert app.cancel(saga_id, by="ada", reason="too slow").status == "running"
        wait_until(lambda: app.get(saga_id).status == "cancelled", timeout=20)
        assert time.monotonic() - asked < 20, "the action was cut, not waited for"
    finally:
        stop(worker)
    calls = [(what, key.split(":")[1]) for _, what, key in effects(sagas_module)]
    # The cut attempt may have taken effect: it is undone too; ship never ran.
    assert calls == [("do", "reserve"), ("do", "wait"), ("undo", "wait"), ("undo", "reserve")]
    history = app.history(saga_id)
    events = [r.event for r in history]
    assert events[events.index("CancelRequested") :] == [
        "CancelRequested",
        "StepFailed",
        "CompensationStarted",
        "CompensationRan",
        "CompensationStarted",
        "CompensationRan",
        "SagaCancelled",
    ]
    failed = next(r for r in history if r.event == "StepFailed")
    assert failed.error is not None
    assert failed.error.type == "StepCancelled"
    assert app.verify() == []


def _instant(context: dict[str, Any], key: str) -> None:
    context["done"] = True


def _allow_connections(admin: Any, dbname: str, allow: bool) -> None:
    """Let the test database take connections, or refuse them and cut those it has."""
    from psycopg import sql

    admin.execute(
        sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
            sql.Identifier(dbname), sql.SQL("true" if allow else "false")
        )
    )
    if not allow:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", [dbname]
        )


@contextmanager
def _warnings() -> Iterator[list[str]]:
    """The messages of the WARNING (and worse) records on `saga_es` while inside."""
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Keep(level=logging.WARNING)
    logging.getLogger("saga_es").addHandler(handler)
    try:
        yield records
    finally:
        logging.getLogger("saga_es").removeHandler(handler)


def test_a_worker_rides_out_its_database_refusing_connections_mid_run(
    store_env: Callable[..., Env], open_app: Callable[[Env], SagaApplication], request: Any
) -> None:
    from saga_es import SagaDefinition, Step

    env = store_env("postgres")
    server = request.getfixturevalue("pg_server")
    dbname = env["POSTGRES_DBNAME"]
    definition = SagaDefinition("instant", [Step("only", _instant)])
    app = open_app({**env, "POSTGRES_CONNECT_TIMEOUT": "2"})
    app.register(definition)
    with server.connect() as admin, _warnings() as records:
        _allow_connections(admin, dbname, False)
        stop = threading.Event()
        worker = threading.Thread(target=lambda: app.work(poll_interval=0.05, stop=stop))
        try:
            worker.start()
            wait_until(lambda: sum("cannot reach the store" in m for m in records) >= 2, 30)
            assert worker.is_alive()  # it waits and looks again; it does not give up
            _allow_connections(admin, dbname, True)
            saga_id = app.submit(definition, {})
            wait_until(lambda: app.get(saga_id).status == "completed", 30)
        finally:
            _allow_connections(admin, dbname, True)
            stop.set()
            worker.join(30)
    waits = [m for m in records if "cannot reach the store" in m]
    assert "retrying in 0.5s" in waits[0]
    assert "retrying in 1.0s" in waits[1]  # backing off


def test_a_saga_whose_store_goes_away_mid_run_is_left_in_flight_not_failed(
    store_env: Callable[..., Env], open_app: Callable[[Env], SagaApplication], request: Any
) -> None:
    """A save refused by an outage is no fault of the saga: a later pass finishes it."""
    from saga_es import SagaDefinition, Step

    env = store_env("postgres")
    server = request.getfixturevalue("pg_server")
    dbname = env["POSTGRES_DBNAME"]
    cuts: list[str] = []
    with server.connect() as admin, _warnings() as records:

        def cut_the_store(context: dict[str, Any], key: str) -> None:
            if not cuts:  # the first attempt only: the store goes away under it
                cuts.append(key)
                _allow_connections(admin, dbname, False)

        definition = SagaDefinition("cut", [Step("only", cut_the_store, timeout=0.5)])
        app = open_app({**env, "POSTGRES_CONNECT_TIMEOUT": "2"})
        app.register(definition)
        saga_id = app.submit(definition, {})
        stop = threading.Event()
        reports: list[Any] = []
        worker = threading.Thread(
            target=lambda: reports.append(app.work(poll_interval=0.05, stop=stop))
        )
        try:
            worker.start()
            wait_until(lambda: any("went away mid-run" in m for m in records), 30)
            _allow_connections(admin, dbname, True)
            wait_until(lambda: app.get(saga_id).status == "completed", 30)
        finally:
            _allow_connections(admin, dbname, True)
            stop.set()
            worker.join(30)
    (report,) = reports
    assert report.failed == {}
    assert saga_id in report.resumed
    assert len(cuts) == 1
    assert app.verify() == []


@pytest.mark.parametrize("store", ["postgres", "sqlite"])
def test_a_cancel_racing_a_worker_process_step_by_step_has_one_winner_and_a_legal_history(
    store: str, env: Env, app: SagaApplication, sagas_module: Any
) -> None:
    from saga_es import IllegalTransition

    worker = start_worker(env, sagas_module, "--poll", "0.02", pause=0.1)
    outcomes: list[str] = []
    try:
        # Each round's cancel comes later after its saga's first step began: the first ones
        # while it runs (~0.3 s a saga), the last ones well after it ended.
        for round_, delay in enumerate((0, 0.03, 0.06, 0.1, 0.15, 0.2, 1.0, 1.5)):
            saga_id = app.submit(sagas_module.ORDER, {"n": round_})
            key = f"{saga_id}:reserve"
            wait_until(lambda key=key: any(k == key for _, _, k in effects(sagas_module)))
            time.sleep(delay)
            try:
                app.cancel(saga_id, by="ada", reason=f"round {round_}")
                won = "cancel"
            except IllegalTransition:
                won = "saga"  # it ended first: the cancel was refused, nothing appended
            wait_until(
                lambda saga_id=saga_id: app.get(saga_id).status in ("cancelled", "completed")
            )
            final = app.get(saga_id)
            assert final.status == ("cancelled" if won == "cancel" else "completed")
            events = [r.event for r in app.history(saga_id)]
            assert events.count("CancelRequested") == (1 if won == "cancel" else 0)
            mine = [
                (what, k.split(":")[1])
                for _, what, k in effects(sagas_module)
                if k.startswith(f"{saga_id}:")
            ]
            did = [step for what, step in mine if what == "do"]
            if won == "cancel":  # whatever ran is undone, in reverse order
                assert [step for what, step in mine if what == "undo"] == did[::-1]
                assert [what for what, _ in mine] == ["do"] * len(did) + ["undo"] * len(did)
            else:
                assert mine == [("do", "reserve"), ("do", "pay"), ("do", "ship")]
            outcomes.append(won)
    finally:
        stop(worker)
    assert app.verify() == []
    assert set(outcomes) == {"cancel", "saga"}  # early rounds land in time, late ones do not
