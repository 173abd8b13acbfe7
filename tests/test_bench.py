"""`saga-es bench`, run in-process with tiny numbers: the shape of its figures, not their values.

Also: the speed paths the bench motivated keep behaviour (the machine's fast check
agrees with transitions' own trigger; the SQLite writer recorder is the default).
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any
from uuid import uuid4

import psycopg
import pytest
from click.testing import CliRunner
from eventsourcing.persistence import IntegrityError, StoredEvent
from eventsourcing.sqlite import SQLiteApplicationRecorder
from transitions import MachineError

from saga_es import IllegalTransition, Saga, SagaApplication, SagaDefinition, Step, machine
from saga_es.bench import WORKER_SCHEMA, bench_command, plot, results_from_json
from saga_es.cli import cli
from saga_es.sqlite import STOCK_RECORDER_TOPIC, SQLiteWriterRecorder

Env = dict[str, str]
NO_POSTGRES = {k: None for k in ("POSTGRES_DBNAME", "POSTGRES_HOST", "POSTGRES_USER")}


# Every figure beyond the sequential one is off unless a test turns it on (the last wins).
ONLY_SEQUENTIAL = [
    "--recovery-sagas",
    "0",
    "--concurrent-sagas",
    "0",
    "--workers",
    "",
    "--memory-sagas",
    "0",
]
PNG = b"\x89PNG\r\n\x1a\n"


def _bench(args: list[str], env: dict[str, str | None] | None = None) -> Any:
    return CliRunner().invoke(
        bench_command, [*ONLY_SEQUENTIAL, *args], env=env or NO_POSTGRES, catch_exceptions=False
    )


def _postgres_options(env: Env) -> list[str]:
    return [
        "--postgres-dbname",
        env["POSTGRES_DBNAME"],
        "--postgres-host",
        env["POSTGRES_HOST"],
        "--postgres-port",
        env["POSTGRES_PORT"],
        "--postgres-user",
        env["POSTGRES_USER"],
        "--postgres-password",
        env["POSTGRES_PASSWORD"],
    ]


def _by_store(path: Path) -> dict[str, dict[str, Any]]:
    data = json.loads(path.read_text())
    assert data["sagas"] == 3
    assert data["rounds"] == 2
    assert data["steps"] == 5
    return {s["store"]: s for s in data["stores"]}


def _assert_durable(figures: dict[str, Any]) -> None:
    assert figures["skipped"] is None
    assert figures["commits_per_saga"] == 6  # k + 1 for k = 5, counted at the recorder
    assert len(figures["saga_rounds"]) == len(figures["floor_rounds"]) == 2
    assert figures["floor_per_s"] > 0
    assert figures["floor_transactions_per_round"] == 6 * 3
    assert figures["ratio"] == pytest.approx(figures["sagas_per_s"] / figures["floor_per_s"])
    assert isinstance(figures["met"], bool)
    assert figures["floor_ms_per_saga"] == pytest.approx(1000 / figures["floor_per_s"])
    _assert_split(figures)


def _assert_split(figures: dict[str, Any]) -> None:
    """A saga's time splits into the store's insert calls and the Python around them."""
    assert len(figures["store_rounds"]) == len(figures["saga_rounds"])
    assert 0 < figures["store_ms_per_saga"] < 1000 / figures["sagas_per_s"]
    assert figures["store_ms_per_saga"] + figures["python_ms_per_saga"] == pytest.approx(
        1000 / figures["sagas_per_s"]
    )


def test_bench_on_popo_and_sqlite_writes_the_figures(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = _bench(
        ["--sagas", "3", "--rounds", "2", "--stores", "popo,sqlite", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    stores = _by_store(out)
    assert list(stores) == ["popo", "sqlite"]

    popo = stores["popo"]
    assert popo["commits_per_saga"] == 6
    assert popo["floor_per_s"] is None  # the POPO target is absolute
    assert popo["ratio"] is None
    assert popo["sagas_per_s"] > 0
    assert len(popo["saga_rounds"]) == 2
    _assert_split(popo)

    sqlite = stores["sqlite"]
    _assert_durable(sqlite)
    assert sqlite["recorder"] == "saga_es.sqlite.SQLiteWriterRecorder"
    assert sqlite["settings"] == {"journal_mode": "wal", "synchronous": "FULL"}

    for name in ("popo", "sqlite", "saga/floor", "commits/saga", "inside insert_events"):
        assert name in result.output


def test_bench_says_postgres_is_skipped_when_not_configured(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = _bench(["-n", "3", "-r", "2", "--stores", "popo,postgres", "--json", str(out)])
    assert result.exit_code == 0, result.output
    stores = _by_store(out)
    assert stores["postgres"]["skipped"].startswith("no PostgreSQL configured")
    assert stores["postgres"]["sagas_per_s"] is None
    assert stores["popo"]["skipped"] is None
    assert "postgres: skipped: no PostgreSQL configured" in " ".join(result.output.split())


def test_bench_on_postgres(tmp_path: Path, store_env: Callable[..., Env]) -> None:
    env = store_env("postgres")
    out = tmp_path / "bench.json"
    both = "postgres,postgres-stock"
    result = _bench(
        ["-n", "3", "-r", "2", "--stores", both, "--json", str(out), *_postgres_options(env)]
    )
    assert result.exit_code == 0, result.output
    stores = _by_store(out)
    _assert_durable(stores["postgres"])
    _assert_durable(stores["postgres-stock"])
    assert stores["postgres"]["recorder"] == "saga_es.postgres.PostgresOneCallRecorder"
    assert stores["postgres-stock"]["recorder"] == (
        "eventsourcing.postgres.PostgresApplicationRecorder"
    )


def _assert_in_flight(figures: dict[str, Any], store: str) -> None:
    assert figures["store"] == store
    assert figures["skipped"] is None
    assert figures["sagas"] == 20
    assert figures["sequential_sagas"] == 20
    assert figures["io_ms_per_step"] == 5
    assert len(figures["rounds"]) == len(figures["sequential_rounds"]) == 1
    assert figures["ratio"] == pytest.approx(figures["sagas_per_s"] / figures["sequential_per_s"])
    assert 0 < figures["commits_per_saga"] < 1  # the group commit, counted at the recorder
    assert figures["target"].startswith(">= 5x one by one")
    assert isinstance(figures["met"], bool)


def test_bench_in_flight_memory_and_plot_on_sqlite(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    result = _bench(
        [
            *("-n", "2", "-r", "1", "--stores", "sqlite", "--recovery-sagas", "30"),
            *("--concurrent-sagas", "20", "--memory-sagas", "400", "--workers", "1,2"),
            *("--json", str(out), "--plot", str(png)),
        ]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [r["resumed"] for r in data["recovery"]] == [30]
    [in_flight] = data["concurrent"]
    _assert_in_flight(in_flight, "sqlite")
    assert data["workers"] is None  # PostgreSQL only, and it was not chosen

    memory = data["memory"]
    assert (memory["store"], memory["sagas"], memory["baseline_sagas"]) == ("sqlite", 400, 40)
    assert memory["rss_baseline_mb"] > 0
    assert memory["rss_end_mb"] > 0
    assert memory["growth_mb"] == pytest.approx(memory["rss_end_mb"] - memory["rss_baseline_mb"])
    assert memory["sagas_per_s"] > 0
    assert memory["met"] is (memory["growth_mb"] <= 100)

    output = " ".join(result.output.split())
    for text in ("in flight: 20 sagas at once", "commits/saga", "memory (SQLite", "by design"):
        assert text in output
    assert png.read_bytes().startswith(PNG)
    again = results_from_json(data)  # what --json wrote reads back whole, and plots again
    assert again.to_dict() == data
    plot(again, tmp_path / "again.png")
    assert (tmp_path / "again.png").read_bytes().startswith(PNG)


def test_bench_workers_and_in_flight_on_postgres(
    tmp_path: Path, store_env: Callable[..., Env]
) -> None:
    env = store_env("postgres")
    out = tmp_path / "bench.json"
    result = _bench(
        [
            *("-n", "2", "-r", "1", "--stores", "postgres", "--concurrent-sagas", "20"),
            *("--workers", "1,2", "--worker-sagas", "20", "--worker-concurrency", "2"),
            *("--json", str(out), *_postgres_options(env)),
        ]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    [in_flight] = data["concurrent"]
    _assert_in_flight(in_flight, "postgres")
    workers = data["workers"]
    assert workers["skipped"] is None
    assert (workers["sagas"], workers["concurrency"], workers["workers"]) == (20, 2, [1, 2])
    assert len(workers["seconds"]) == len(workers["sagas_per_s"]) == 2
    assert workers["sagas_per_s"] == pytest.approx([20 / s for s in workers["seconds"]])
    rates = workers["sagas_per_s"]
    assert workers["ratio"] == pytest.approx(rates[1] / rates[0])
    assert "4 vs 1" in workers["target"]
    assert workers["met"] is None  # the target is for 4 workers against 1
    assert data["memory"] is None  # SQLite only
    assert "workers: 20 submitted sagas" in " ".join(result.output.split())
    with psycopg.connect(
        dbname=env["POSTGRES_DBNAME"],
        host=env["POSTGRES_HOST"],
        port=env["POSTGRES_PORT"],
        user=env["POSTGRES_USER"],
        password=env["POSTGRES_PASSWORD"],
    ) as conn:  # the bench leaves nothing behind: no schema, no table
        schemas = conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname = %s", [WORKER_SCHEMA]
        )
        assert schemas.fetchall() == []
        tables = conn.execute("SELECT tablename FROM pg_tables WHERE tablename LIKE 'sagaesbench%'")
        assert tables.fetchall() == []
        functions = conn.execute("SELECT proname FROM pg_proc WHERE proname LIKE 'sagaesbench%'")
        assert functions.fetchall() == []


def test_bench_says_which_figures_postgres_would_give_when_not_configured(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["-n", "1", "-r", "1", "--stores", "postgres", "--concurrent-sagas", "5"]
    result = _bench([*args, "--workers", "1,4", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["concurrent"][0]["skipped"].startswith("no PostgreSQL configured")
    assert data["workers"]["skipped"].startswith("no PostgreSQL configured")
    assert "workers: skipped" in result.output


def test_bench_plot_needs_matplotlib_and_says_so_before_measuring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    result = _bench(["--stores", "popo", "--plot", str(tmp_path / "b.png")])
    assert result.exit_code == 1
    assert result.output.strip() == (
        "Error: --plot needs matplotlib: pip install 'saga_es[plot]' (or 'matplotlib>=3.8')"
    )
    assert not (tmp_path / "b.png").exists()


@pytest.mark.parametrize("value", ["0", "two", "1,-4"])
def test_bench_refuses_bad_worker_counts(value: str) -> None:
    result = _bench(["--stores", "popo", "--workers", value])
    assert result.exit_code == 2
    assert "process counts >= 1" in result.output


def test_bench_fails_in_one_line_when_postgres_is_unreachable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])  # nothing listens there once closed
    options = ["--postgres-dbname", "x", "--postgres-host", "127.0.0.1", "--postgres-port", port]
    result = _bench(
        ["-n", "1", "-r", "1", "--stores", "postgres", *options, "--postgres-user", "u"]
    )
    assert result.exit_code == 1
    assert result.output.startswith("Error: PostgreSQL u@127.0.0.1:")
    assert len(result.output.strip().splitlines()) == 1


def test_bench_refuses_an_unknown_store() -> None:
    result = _bench(["--stores", "popo,mongo"])
    assert result.exit_code == 2
    assert "unknown store(s) mongo" in result.output


def test_bench_is_a_subcommand_of_saga_es() -> None:
    result = CliRunner().invoke(cli, ["bench", "--help"])
    assert result.exit_code == 0
    assert "--sagas" in result.output


# -- the speed paths keep behaviour ------------------------------------------------------


class Boom(Exception):
    pass


def _ok(context: Any, key: str) -> None:
    pass


def _fail(context: Any, key: str) -> None:
    raise Boom("no")


STORIES = [
    SagaDefinition("all-ok", [Step("a", _ok, compensation=_ok), Step("b", _ok)]),
    SagaDefinition("b-fails", [Step("a", _ok, compensation=_ok), Step("b", _fail)]),
    SagaDefinition(
        "undo-fails", [Step("a", _ok, compensation=_fail), Step("b", _ok), Step("c", _fail)]
    ),
]


def _sagas_in_every_state() -> list[Saga]:
    """Every version of sagas that complete, compensate and get stuck (time travel)."""
    sagas: list[Saga] = []
    with SagaApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"}) as app:
        for definition in STORIES:
            saga = app.run(definition, {"n": 1})
            sagas += [app.get(saga.id, version=v) for v in range(1, saga.version + 1)]
    return sagas


def _payloads(saga: Saga) -> list[dict[str, Any]]:
    """Right and wrong steps and attempts, with every flag a guard may read."""
    payloads: list[dict[str, Any]] = [{}, {"step": "a"}]
    for step in [*saga.steps, "zz"]:
        for attempt in (1, 2):
            for flag in (True, False):
                payloads.append(
                    {
                        "step": step,
                        "attempt": attempt,
                        "will_retry": flag,
                        "compensate": flag,
                        "took_effect": flag,
                    }
                )
    return payloads


def _outcome(run: Callable[[], str]) -> tuple[str, str]:
    try:
        return ("ok", run())
    except IllegalTransition as e:
        return ("refused", e.reason)
    except Exception as e:  # a guard given too little data raises alike on both paths
        return ("raised", type(e).__name__)


def _by_trigger(saga: Saga, trigger: str, data: dict[str, Any]) -> str:
    """What `check` decided before its fast path: ask transitions' own trigger."""
    event = machine.MACHINE.events[trigger]
    probe = machine._Probe(saga)
    try:
        ok = event.trigger(probe, **data)
    except MachineError:
        raise IllegalTransition(saga.id, saga.status, trigger) from None
    if not ok:
        raise IllegalTransition(saga.id, saga.status, trigger, probe.reason)
    return str(probe.state)


def test_the_fast_check_agrees_with_the_machines_own_trigger() -> None:
    assert machine._PLAIN, "the machine gained callbacks: check() now takes the slow path"
    compared, accepted, statuses = 0, 0, set()
    for saga in _sagas_in_every_state():
        statuses.add(saga.status)
        for trigger in machine.TRIGGERS:
            for data in _payloads(saga):
                fast = _outcome(partial(machine.check, saga, trigger, data))
                slow = _outcome(partial(_by_trigger, saga, trigger, data))
                assert fast == slow, (saga.status, trigger, data)
                compared += 1
                accepted += fast[0] == "ok"
    assert statuses >= {"pending", "running", "completed", "compensating", "compensated"}
    assert compared > 1000
    assert accepted > 20


def test_sqlite_uses_the_writer_recorder_unless_told_otherwise(tmp_path: Path) -> None:
    env = {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(tmp_path / "a.db")}
    with SagaApplication(env=env) as app:
        assert type(app.recorder) is SQLiteWriterRecorder
    with SagaApplication(env={**env, "APPLICATION_RECORDER_TOPIC": STOCK_RECORDER_TOPIC}) as app:
        assert type(app.recorder) is SQLiteApplicationRecorder


def test_sqlite_writer_recorder_conflict_writes_nothing_and_ids_stay_in_order(
    tmp_path: Path,
) -> None:
    env = {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(tmp_path / "a.db")}
    with SagaApplication(env=env) as app:
        recorder = app.recorder
        a, b = uuid4(), uuid4()

        def stored(originator: Any, version: int) -> StoredEvent:
            return StoredEvent(originator, version, "tests:E", b"{}")

        assert recorder.insert_events([stored(a, 1), stored(a, 2)]) == [1, 2]
        with pytest.raises(IntegrityError):
            recorder.insert_events([stored(b, 1), stored(a, 2)])
        assert recorder.select_events(b) == []
        assert recorder.insert_events([stored(b, 1)]) == [3]
        assert [n.id for n in recorder.select_notifications(1, limit=10)] == [1, 2, 3]


def test_the_hot_path_profile_splits_a_step_into_its_parts(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    args = ["--stores", "popo", "-n", "20", "-r", "1", "--recovery-sagas", "0"]
    args += ["--concurrent-sagas", "0", "--workers", "", "--memory-sagas", "0"]
    result = _bench([*args, "--profile", "100", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "hot path" in result.output
    parts = {row["part"]: row for row in json.loads(out.read_text())["profile"]}
    assert {"state machine", "events: creation and apply", "transcoding"} <= set(parts)
    assert abs(sum(row["share"] for row in parts.values()) - 1.0) < 1e-6
    assert all(row["us_per_step"] > 0 for row in parts.values())


def test_the_query_figure_compares_a_filtered_page_with_the_raw_table(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    args = ["--stores", "popo", "-n", "20", "-r", "1", "--recovery-sagas", "0"]
    args += ["--concurrent-sagas", "0", "--workers", "", "--memory-sagas", "0"]
    result = _bench([*args, "--query-sagas", "2000", "--json", str(out)])
    assert result.exit_code == 0, result.output
    query = json.loads(out.read_text())["query"]
    assert (query["sagas"], query["rows"]) == (2000, 100)  # 200 refunds, 100 of them in flight
    assert query["ratio"] == pytest.approx(query["store_ms"] / query["saga_es_ms"])
    assert "straight from the store's table" in " ".join(result.output.split())
