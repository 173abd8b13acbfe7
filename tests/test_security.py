"""Security: histories ciphered (AES-GCM) and compressed at rest, TLS, secrets kept out of sight.

- With `CIPHER_TOPIC`/`CIPHER_KEY` (and `COMPRESSOR_TOPIC`), no context value nor step name
  is in the stored state of any event (read straight from the tables), and yet the status
  projection, `stats()`, recovery and `history()` work: the recorders take the status rows
  from the application, since SQL cannot read the states any more.
- Another application with the key reads the sagas back; with another key, reading one is
  an `UnreadableEvent` naming the saga and version; a missing key is a `ConfigurationError`
  naming `CIPHER_KEY`.
- `POSTGRES_SSL*` settings reach every connection; a wrong password never shows in an
  error, a log record or the command line's output.
"""

from __future__ import annotations

import base64
import gc
import importlib.util
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import traceback
import zlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest
from conftest import DURABLE_STORES, STORES, Env
from eventsourcing.cryptography import AESCipher
from eventsourcing.persistence import IntegrityError
from pgserver import PgServer

from saga_es import Saga, SagaApplication, SagaDefinition, Step
from saga_es.errors import ConfigurationError, UnreadableEvent
from saga_es.status import IN_FLIGHT_STATES

ROOT = Path(__file__).resolve().parent.parent
KEY = AESCipher.create_key(num_bytes=32)
OTHER_KEY = AESCipher.create_key(num_bytes=32)
CIPHERED = {
    "CIPHER_TOPIC": "eventsourcing.cryptography:AESCipher",
    "CIPHER_KEY": KEY,
    "COMPRESSOR_TOPIC": "eventsourcing.compressor:ZlibCompressor",
}
COMPRESSED = {"COMPRESSOR_TOPIC": "eventsourcing.compressor:ZlibCompressor"}
PASSWORD = "Sup3r-Secret-pw-9431"  # what a wrong password looks like in any output

ADA, GRACE, ALAN = "Ada-Lovelace-4111", "Grace-Hopper-5500", "Alan-Turing-3300"
CARD = "4111-Babbage-0042"
STEPS = ("reserve-Analytical-Engine", "charge-Difference-Card", "ship-Jacquard-Loom")
SECRETS = (ADA, GRACE, ALAN, CARD, "Analytical-Engine", "Difference-Card", "Jacquard-Loom")
DYING: set[str] = set()  # customers whose worker dies in the shipping step (once)


class WorkerDied(BaseException):
    """Stands in for the process dying mid-call; the runner does not catch it."""


def reserve(order: dict[str, Any], key: str) -> None:
    order["reservation"] = f"R-{order['customer']}"


def release(order: dict[str, Any], key: str) -> None:
    order["reservation"] = None


def charge(order: dict[str, Any], key: str) -> None:
    if order["card"] == "declined":
        raise RuntimeError(f"card of {order['customer']} declined")
    order["charged"] = order["card"]


def refund(order: dict[str, Any], key: str) -> None:
    order["charged"] = None


def ship(order: dict[str, Any], key: str) -> None:
    if order["customer"] in DYING:
        DYING.discard(order["customer"])
        raise WorkerDied(order["customer"])
    order["shipped"] = True


ORDER = SagaDefinition(
    "order",
    [
        Step(STEPS[0], reserve, release),
        Step(STEPS[1], charge, refund),
        Step(STEPS[2], ship),
    ],
)


def run_three(app: SagaApplication) -> tuple[UUID, UUID, UUID]:
    """A completed saga, a compensated one and one whose worker died: their ids."""
    done = app.run(ORDER, {"customer": ADA, "card": CARD})
    assert done.status == "completed"
    undone = app.run(ORDER, {"customer": GRACE, "card": "declined"})
    assert undone.status == "compensated"
    DYING.add(ALAN)
    with pytest.raises(WorkerDied):
        app.run(ORDER, {"customer": ALAN, "card": CARD}, key=ALAN)
    return done.id, undone.id, app.saga_id(ORDER.name, ALAN)


def stored_states(store: str, env: Env, app: SagaApplication) -> list[bytes]:
    """Every stored state (events and snapshots), read from the tables, not through saga_es."""
    recorders: list[Any] = [app.recorder]
    if app.snapshots is not None:
        recorders.append(app.snapshots.recorder)
    if store == "popo":  # the recorders' own lists
        return [stored.state for r in recorders for stored in r._stored_events]
    tables = [r.events_table_name for r in recorders]
    states: list[bytes] = []
    if store == "sqlite":
        with sqlite3.connect(env["SQLITE_DBNAME"]) as db:
            for table in tables:
                states += [bytes(r[0]) for r in db.execute(f"SELECT state FROM {table}")]
        return states
    with _connect(env) as conn:
        for table in tables:
            rows = conn.execute(f"SELECT state FROM {table}").fetchall()
            states += [bytes(r[0]) for r in rows]
    return states


def _connect(env: Env, **options: Any) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(
        dbname=env["POSTGRES_DBNAME"],
        host=env["POSTGRES_HOST"],
        port=env["POSTGRES_PORT"],
        user=env["POSTGRES_USER"],
        password=env["POSTGRES_PASSWORD"],
        **options,
    )


def plaintext_in(states: list[bytes]) -> list[str]:
    """The secrets (context values, step names) found in any state."""
    return [s for s in SECRETS if any(s.encode() in state for state in states)]


# -- ciphered and compressed at rest -----------------------------------------------------------


@pytest.mark.parametrize("store", STORES)
def test_no_context_value_nor_step_name_is_stored_in_the_clear(
    store: str, store_env: Callable[..., Env], open_app: Callable[[Env], SagaApplication]
) -> None:
    env = {**store_env(store), **CIPHERED}
    app = open_app(env)
    run_three(app)
    states = stored_states(store, env, app)
    assert len(states) >= 20
    assert plaintext_in(states) == []
    assert not any(state.startswith(b'{"') for state in states)


@pytest.mark.parametrize("store", STORES)
def test_the_check_finds_plaintext_on_a_store_without_a_cipher(
    store: str, store_env: Callable[..., Env], open_app: Callable[[Env], SagaApplication]
) -> None:
    env = store_env(store)
    app = open_app(env)
    run_three(app)
    assert plaintext_in(stored_states(store, env, app)) == list(SECRETS)


@pytest.mark.parametrize("store", STORES)
def test_the_projection_stats_recovery_and_history_work_on_a_ciphered_store(
    store: str, store_env: Callable[..., Env], open_app: Callable[[Env], SagaApplication]
) -> None:
    app = open_app({**store_env(store), **CIPHERED, "SAGA_STEP_TIMEOUT": "0"})
    done, undone, died = run_three(app)
    assert app.recorder.wants_status_rows  # type: ignore[attr-defined]

    rows = {row.saga_id: row for row in app.statuses()}
    assert {k: (r.status, r.step, r.version) for k, r in rows.items()} == {
        done: ("completed", STEPS[2], app.get(done).version),
        undone: ("compensated", STEPS[0], app.get(undone).version),
        died: ("running", STEPS[2], app.get(died).version),
    }
    assert rows[died].key == ALAN
    assert [r.saga_id for r in app.statuses(status=IN_FLIGHT_STATES)] == [died]
    assert [r.saga_id for r in app.statuses(status="running")] == [died]
    assert app.stats() == {
        ("order", "completed"): 1,
        ("order", "compensated"): 1,
        ("order", "running"): 1,
    }

    report = app.recover()
    assert report.resumed == [died], report
    assert app.get(died).status == "completed"
    assert app.get(died).context["shipped"] is True
    assert app.statuses(status=IN_FLIGHT_STATES) == []
    assert app.stats() == {("order", "completed"): 2, ("order", "compensated"): 1}
    assert app.rebuild_status() == 3
    assert app.stats() == {("order", "completed"): 2, ("order", "compensated"): 1}

    history = app.history(undone)
    assert [r.event for r in history][-1] == "SagaCompensated"
    assert all(r.readable for r in history)
    assert history[0].position is not None
    assert app.get(done).context["charged"] == CARD


@pytest.mark.parametrize("store", DURABLE_STORES)
def test_another_application_with_the_key_reads_the_sagas_back(
    store: str, store_env: Callable[..., Env], open_app: Callable[[Env], SagaApplication]
) -> None:
    env = {**store_env(store), **CIPHERED}
    writer = open_app(env)
    done, undone, died = run_three(writer)
    reader = open_app(dict(env))
    for saga_id in (done, undone, died):
        assert reader.get(saga_id).context == writer.get(saga_id).context
        assert reader.history(saga_id) == writer.history(saga_id)
    assert reader.statuses() == writer.statuses()
    assert reader.get(done).context["customer"] == ADA


@pytest.mark.parametrize("store", STORES)
def test_compression_alone_works_and_hides_the_plain_json(
    store: str, store_env: Callable[..., Env], open_app: Callable[[Env], SagaApplication]
) -> None:
    env = {**store_env(store), **COMPRESSED, "SAGA_STEP_TIMEOUT": "0"}
    app = open_app(env)
    done, _, died = run_three(app)
    states = stored_states(store, env, app)
    assert plaintext_in(states) == []  # zlib, not a cipher: anyone can decompress it
    assert all(zlib.decompress(state).startswith(b"{") for state in states)
    assert [r.saga_id for r in app.statuses(status=IN_FLIGHT_STATES)] == [died]
    assert app.recover().resumed == [died]
    assert app.stats() == {("order", "completed"): 2, ("order", "compensated"): 1}
    assert app.get(done).context["charged"] == CARD


@pytest.mark.parametrize("store", DURABLE_STORES)
def test_snapshots_are_ciphered_too(store: str, store_env: Callable[..., Env]) -> None:
    class Snapshotting(SagaApplication):
        snapshotting_intervals = {Saga: 2}  # noqa: RUF012

    env = {**store_env(store), **CIPHERED}
    with Snapshotting(env=env) as app:
        saga = app.run(ORDER, {"customer": ADA, "card": CARD})
        assert app.snapshots is not None
        snapshots = list(app.snapshots.get(saga.id))
        assert snapshots
        assert plaintext_in(stored_states(store, env, app)) == []
        assert app.statuses()[0].status == "completed"


def test_a_ciphertext_that_happens_to_start_like_json_is_stored(
    store_env: Callable[..., Env],
    open_app: Callable[[Env], SagaApplication],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A state starts with its random nonce: one in 256 starts with '{'. The database must
    # not take it for JSON (SQLite's triggers would fail on it, and the save with them).
    monkeypatch.setattr(AESCipher, "random_bytes", staticmethod(lambda n: b"{" + os.urandom(n - 1)))
    for store in DURABLE_STORES:
        env = {**store_env(store), **CIPHERED, "SAGA_STEP_TIMEOUT": "0"}
        app = open_app(env)
        _, _, died = run_three(app)
        assert all(state.startswith(b"{") for state in stored_states(store, env, app))
        assert [r.saga_id for r in app.statuses(status=IN_FLIGHT_STATES)] == [died]
        assert app.recover().resumed == [died]
        assert app.stats() == {("order", "completed"): 2, ("order", "compensated"): 1}


@pytest.mark.parametrize("store", DURABLE_STORES)
def test_the_status_rows_commit_with_the_events_or_not_at_all(
    store: str, store_env: Callable[..., Env], open_app: Callable[[Env], SagaApplication]
) -> None:
    app = open_app({**store_env(store), **CIPHERED})
    saga = app.run(ORDER, {"customer": ADA, "card": CARD})
    (row,) = app.statuses()
    first = app.events.mapper.to_stored_event(app.saga_events(saga.id)[0])
    stale = replace(row, status="running", version=99)
    with pytest.raises(IntegrityError):  # version 1 is taken: nothing of this save is kept
        app.recorder.insert_events([first], saga_statuses=[stale])
    assert app.statuses() == [row]
    many = [replace(first, originator_version=v) for v in range(100, 700)]  # > one statement
    with pytest.raises(IntegrityError):
        app.recorder.insert_events([*many, first], saga_statuses=[stale])
    assert app.statuses() == [row]
    assert app.get(saga.id).version == row.version


# -- a wrong or missing key ----------------------------------------------------------------------


@pytest.mark.parametrize("store", DURABLE_STORES)
def test_reading_with_another_key_is_an_unreadable_event_naming_saga_and_version(
    store: str, store_env: Callable[..., Env], open_app: Callable[[Env], SagaApplication]
) -> None:
    env = {**store_env(store), **CIPHERED}
    saga_id = open_app(env).run(ORDER, {"customer": ADA, "card": CARD}).id
    other = open_app({**env, "CIPHER_KEY": OTHER_KEY})
    for read in (other.get, other.history, other.saga_events):
        with pytest.raises(UnreadableEvent) as raised:
            read(saga_id)
        assert (raised.value.saga_id, raised.value.version) == (saga_id, 1)
        assert str(saga_id) in str(raised.value)
        assert "version 1" in str(raised.value)
        assert "cipher" in str(raised.value).lower()
        assert KEY not in str(raised.value)
        assert OTHER_KEY not in str(raised.value)
    assert not any(r.readable for r in other.history(saga_id, strict=False))
    # The status projection is not ciphered: it still lists the saga.
    assert [r.saga_id for r in other.statuses()] == [saga_id]


@pytest.mark.parametrize("store", ["sqlite"])
def test_reading_with_another_key_names_the_setting(
    store: str, store_env: Callable[..., Env], open_app: Callable[[Env], SagaApplication]
) -> None:
    env = {**store_env(store), **CIPHERED}
    saga_id = open_app(env).run(ORDER, {"customer": ADA, "card": CARD}).id
    other = open_app({**env, "CIPHER_KEY": OTHER_KEY})
    with pytest.raises(UnreadableEvent, match="CIPHER_KEY"):
        other.get(saga_id)
    (problem,) = other.verify()
    assert (problem.saga_id, problem.version) == (saga_id, 1)
    assert "another CIPHER_KEY" in problem.reason


@pytest.mark.parametrize("store", DURABLE_STORES)
def test_exporting_with_another_key_names_the_setting_instead_of_a_document_of_nulls(
    store: str, store_env: Callable[..., Env], open_app: Callable[[Env], SagaApplication]
) -> None:
    from saga_es.export import export_html, export_json

    env = {**store_env(store), **CIPHERED}
    saga_id = open_app(env).run(ORDER, {"customer": ADA, "card": CARD}).id
    other = open_app({**env, "CIPHER_KEY": OTHER_KEY})
    for export in (export_json, export_html):
        with pytest.raises(UnreadableEvent, match="CIPHER_KEY") as raised:
            export(other, saga_id)
        assert (raised.value.saga_id, raised.value.version) == (saga_id, 1)
    done = subprocess.run(
        [sys.executable, "-m", "saga_es", "export", str(saga_id)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **env, "CIPHER_KEY": OTHER_KEY},
    )
    assert done.returncode == 1
    assert done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"saga-es: saga {saga_id} version 1 ")
    assert "CIPHER_KEY" in line
    assert KEY not in line
    assert OTHER_KEY not in line


@pytest.mark.parametrize("store", ["sqlite"])
def test_reading_a_compressed_store_without_its_compressor_names_the_setting(
    store: str, store_env: Callable[..., Env], open_app: Callable[[Env], SagaApplication]
) -> None:
    env = {**store_env(store), **CIPHERED}
    saga_id = open_app(env).run(ORDER, {"customer": ADA, "card": CARD}).id
    without = {k: v for k, v in env.items() if k != "COMPRESSOR_TOPIC"}
    with pytest.raises(UnreadableEvent, match="written with COMPRESSOR_TOPIC set"):
        open_app(without).get(saga_id)


@pytest.mark.parametrize("store", DURABLE_STORES)
def test_a_worker_with_another_key_reports_the_submitted_saga_naming_the_setting(
    store: str,
    store_env: Callable[..., Env],
    open_app: Callable[[Env], SagaApplication],
    caplog: pytest.LogCaptureFixture,
) -> None:
    env = {**store_env(store), **CIPHERED}
    saga_id = open_app(env).submit(ORDER, {"customer": ADA, "card": CARD})
    worker = open_app({**env, "CIPHER_KEY": OTHER_KEY})
    worker.register(ORDER)
    with caplog.at_level(logging.ERROR, logger="saga_es"):
        report = worker.work(until_idle=True)
    assert list(report.failed) == [saga_id]  # reported, not silently passed over
    assert "CIPHER_KEY" in report.failed[saga_id]
    assert [r.saga_id for r in caplog.records] == [str(saga_id)]
    assert "CIPHER_KEY" in caplog.records[0].getMessage()
    assert [r.status for r in worker.statuses()] == ["pending"]  # nothing written


@pytest.mark.parametrize("store", STORES)
def test_a_cipher_without_a_key_is_a_configuration_error_naming_cipher_key(
    store: str, store_env: Callable[..., Env]
) -> None:
    env = {**store_env(store), "CIPHER_TOPIC": CIPHERED["CIPHER_TOPIC"]}
    with pytest.raises(ConfigurationError) as raised:
        SagaApplication(env=env).close()
    assert raised.value.setting == "CIPHER_KEY"


@pytest.mark.parametrize(
    "key",
    [
        base64.b64encode(b"12345").decode(),  # 5 bytes: AES takes 16, 24 or 32
        "not a base64 key!",
        AESCipher.create_key(32)[:-3],
    ],
    ids=["wrong-length", "not-base64", "cut-short"],
)
def test_a_malformed_key_is_a_configuration_error_naming_cipher_key(
    key: str, store_env: Callable[..., Env]
) -> None:
    env = {**store_env("sqlite"), "CIPHER_TOPIC": CIPHERED["CIPHER_TOPIC"], "CIPHER_KEY": key}
    with pytest.raises(ConfigurationError) as raised:
        SagaApplication(env=env).close()
    assert key not in str(raised.value)
    assert raised.value.setting == "CIPHER_KEY"


def test_a_key_without_a_topic_uses_eventsourcing_default_cipher(
    store_env: Callable[..., Env],
) -> None:
    env = {**store_env("sqlite"), "CIPHER_KEY": KEY}
    if importlib.util.find_spec("Crypto") is not None:  # pycryptodome is installed
        SagaApplication(env=env).close()
        return
    with pytest.raises(ConfigurationError) as raised:
        SagaApplication(env=env)
    assert raised.value.setting == "CIPHER_TOPIC"


# -- PostgreSQL: TLS settings, and passwords kept out of sight -------------------------------------


@pytest.fixture
def pg_env(store_env: Callable[..., Env]) -> Env:
    return store_env("postgres")


def wrong_password() -> str:
    """For `POSTGRES_GET_PASSWORD_TOPIC`: the pool asks for it on each connection."""
    return PASSWORD


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])  # nothing listens once it is closed


def _shown(error: BaseException) -> str:
    """Everything a user could see of an error: message, repr, traceback."""
    return "\n".join([str(error), repr(error), *traceback.format_exception(error)])


@pytest.mark.parametrize(
    ("settings", "setting"),
    [
        ({"POSTGRES_PASSWORD": PASSWORD}, "POSTGRES_PASSWORD"),
        ({"POSTGRES_PASSWORD": PASSWORD, "POSTGRES_PORT": "closed"}, "POSTGRES_PORT"),
        ({"POSTGRES_PASSWORD": PASSWORD, "POSTGRES_HOST": "no-such-host.invalid"}, "POSTGRES_HOST"),
    ],
    ids=["wrong-password", "nothing-listening", "unknown-host"],
)
def test_a_failed_connection_names_the_setting_never_the_password(
    pg_env: Env, settings: Env, setting: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    env = {**pg_env, **settings, "POSTGRES_CONNECT_TIMEOUT": "2"}
    if env["POSTGRES_PORT"] == "closed":
        env["POSTGRES_PORT"] = _closed_port()
    with pytest.raises(ConfigurationError) as raised:
        SagaApplication(env=env)
    assert raised.value.setting == setting
    assert PASSWORD not in _shown(raised.value)
    assert PASSWORD not in caplog.text
    assert not any(PASSWORD in str(r.args) for r in caplog.records)


def test_a_schema_that_does_not_exist_names_postgres_schema(pg_env: Env) -> None:
    with pytest.raises(ConfigurationError, match="does not exist") as raised:
        SagaApplication(env={**pg_env, "POSTGRES_SCHEMA": "no_such_schema"})
    assert raised.value.setting == "POSTGRES_SCHEMA"  # not POSTGRES_HOST: the server answered


def test_a_password_the_pool_fetches_never_shows_either(
    pg_env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    # With POSTGRES_GET_PASSWORD_TOPIC, the pool itself meets the wrong password.
    caplog.set_level(logging.DEBUG)
    env = {
        **pg_env,
        "POSTGRES_GET_PASSWORD_TOPIC": f"{__name__}:wrong_password",
        "POSTGRES_CONNECT_TIMEOUT": "1",
    }
    env.pop("POSTGRES_PASSWORD")
    with pytest.raises(ConfigurationError) as raised:
        SagaApplication(env=env)
    shown = _shown(raised.value)
    del raised
    gc.collect()  # the half-built application's pool closes
    assert PASSWORD not in shown
    assert PASSWORD not in caplog.text


def test_the_command_line_never_prints_the_password(pg_env: Env) -> None:
    settings = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "SQLITE_"))}
    settings.pop("PERSISTENCE_MODULE", None)
    result = subprocess.run(
        [sys.executable, "-m", "saga_es", "list"],
        env={**settings, **pg_env, "POSTGRES_PASSWORD": PASSWORD},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 1
    assert "POSTGRES_PASSWORD" in result.stderr
    assert PASSWORD not in result.stdout + result.stderr


def test_the_settings_repr_hides_the_secrets(pg_env: Env) -> None:
    with SagaApplication(env={**pg_env, **CIPHERED}) as app:
        shown = f"{app.env!r} {app.env!s}"
    assert pg_env["POSTGRES_PASSWORD"] not in shown
    assert KEY not in shown


def test_tls_settings_reach_every_connection(pg_env: Env, pg_server: PgServer) -> None:
    settings = {"POSTGRES_SSLMODE": "allow"}  # libpq's default is prefer
    with SagaApplication(env={**pg_env, **settings}) as app:
        app.run(ORDER, {"customer": ADA, "card": CARD})
        datastore = app.recorder.datastore  # type: ignore[attr-defined]
        with datastore.get_connection() as conn:
            assert conn.info.get_parameters()["sslmode"] == "allow"
        assert app.recorder._writer.info.get_parameters()["sslmode"] == "allow"  # type: ignore[attr-defined]


def test_tls_required_of_a_server_without_it_names_the_setting(pg_env: Env) -> None:
    with _connect(pg_env) as conn:
        ssl = conn.execute("SHOW ssl").fetchone()
    env = {**pg_env, "POSTGRES_SSLMODE": "require"}
    if ssl == ("on",):  # a server of one's own (SAGA_ES_TEST_POSTGRES) may offer TLS
        with SagaApplication(env=env) as app:
            app.run(ORDER, {"customer": ADA, "card": CARD})
            with app.recorder.datastore.get_connection() as c:  # type: ignore[attr-defined]
                row = c.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                assert row.fetchone() == {"ssl": True}
        return
    with pytest.raises(ConfigurationError) as raised:
        SagaApplication(env=env)
    assert raised.value.setting == "POSTGRES_SSLMODE"
    assert "SSL" in str(raised.value)
    assert pg_env["POSTGRES_PASSWORD"] not in _shown(raised.value)


@pytest.mark.parametrize(
    ("settings", "setting"),
    [
        ({"POSTGRES_SSLMODE": "yes"}, "POSTGRES_SSLMODE"),
        (
            {"POSTGRES_SSLMODE": "verify-full", "POSTGRES_SSLROOTCERT": "/no/ca.pem"},
            "POSTGRES_SSLROOTCERT",
        ),
        ({"POSTGRES_SSLCERT": "/no/client.crt"}, "POSTGRES_SSLCERT"),
        ({"POSTGRES_SSLKEY": "/no/client.key"}, "POSTGRES_SSLKEY"),
    ],
    ids=["unknown-mode", "no-root-certificate", "no-client-certificate", "no-client-key"],
)
def test_a_malformed_tls_setting_is_named(pg_env: Env, settings: Env, setting: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        SagaApplication(env={**pg_env, **settings})
    assert raised.value.setting == setting


def test_tls_settings_with_a_recorder_that_would_drop_them_are_refused(pg_env: Env) -> None:
    env = {
        **pg_env,
        "POSTGRES_SSLMODE": "prefer",
        "APPLICATION_RECORDER_TOPIC": "eventsourcing.postgres:PostgresApplicationRecorder",
    }
    with pytest.raises(ConfigurationError) as raised:
        SagaApplication(env=env)
    assert raised.value.setting == "APPLICATION_RECORDER_TOPIC"
    assert "PGSSLMODE" in str(raised.value)
    ours = {
        **env,
        "POSTGRES_SSLMODE": "allow",  # not libpq's default, so the connection reports it
        "APPLICATION_RECORDER_TOPIC": "saga_es.postgres:PostgresOneCallRecorder",
    }
    with SagaApplication(env=ours) as app:
        datastore = app.recorder.datastore  # type: ignore[attr-defined]
        with datastore.get_connection() as conn:
            assert conn.info.get_parameters()["sslmode"] == "allow"
