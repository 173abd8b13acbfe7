"""`saga-es bench`: saga_es against floors measured in the same run, as ratios.

On a durable store a saga's speed is bounded by how fast the store commits, and
that differs between machines. So each figure is measured next to its floor, in
the same run:

- Sequential sagas, per store: N five-step sagas run one after another through
  `SagaApplication`, in interleaved rounds with the floor (floor, sagas, floor,
  sagas, ...): the same number of single-row INSERT+COMMIT transactions per saga
  written with the bare driver (sqlite3 in WAL with synchronous=FULL, psycopg).
  Medians of the rounds, and their ratio, say how much of the store's commit rate
  saga_es keeps; machine noise hits both alike. Commits per saga are counted at the
  recorder, not assumed. POPO has no floor: its target is absolute.
- Sagas in flight, per durable store: N sagas whose steps each await 5 ms of
  simulated I/O, run at once on one event loop (`asyncio.gather` of `arun`, so the
  group commit batches their boundaries), against the same sagas run one after
  another on the same store.
- Worker processes: N submitted sagas with the same I/O-bound steps, run by 1, 2,
  4 `saga-es worker` processes sharing one PostgreSQL; the figure is K workers
  against one.
- Memory: resident memory after many sagas in one process against what it was
  after the first 1,000, on SQLite (POPO keeps every event in memory by design).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import platform
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from eventsourcing.persistence import ApplicationRecorder, StoredEvent
from rich.console import Console
from rich.table import Table

from saga_es import recovery
from saga_es.aggregate import Saga
from saga_es.application import SagaApplication
from saga_es.definition import SagaDefinition, Step
from saga_es.machine import COMPLETED, STUCK, TERMINAL_STATES

if TYPE_CHECKING:
    import psycopg

STORES = ("popo", "sqlite", "postgres")
"""The stores measured by default, each with the recorder `SagaApplication` picks for it."""
STOCK_RECORDERS = {
    "popo": "eventsourcing.popo:POPOApplicationRecorder",
    "sqlite": "eventsourcing.sqlite:SQLiteApplicationRecorder",
    "postgres": "eventsourcing.postgres:PostgresApplicationRecorder",
}
CHOICES = (*STORES, "sqlite-stock", "postgres-stock")
"""`--stores` also takes `<store>-stock`: the same store through eventsourcing's own recorder."""
STEPS = 5
RATIO_TARGET = 0.8
"""Sagas/s over floor/s that SQLite and PostgreSQL must reach (issue 7)."""
POPO_TARGET = 3000.0
"""Sagas/s that POPO must stay well above: it has no commit to wait for."""
BENCH_APP_NAME = "SagaEsBench"
"""The bench's own application name, so its PostgreSQL tables never touch a user's."""
IO_SECONDS = 0.005
"""Simulated I/O per step of the in-flight and worker figures: each step awaits this long."""
CONCURRENT_TARGET = 5.0
"""Sagas in flight must run at least this many times the rate of the same sagas one by one."""
SEQUENTIAL_IO_SAGAS = 20
"""I/O-bound sagas run one after another per round: the floor of the in-flight figure."""
WORKERS_TARGET = 2.5
"""4 worker processes must run at least this many times the sagas per second of one."""
WORKER_SCHEMA = f"{BENCH_APP_NAME.lower()}_workers"
"""The PostgreSQL schema the worker figure runs in: `saga-es worker` runs a plain
`SagaApplication`, whose tables are named after it, so the bench gives it a schema of
its own (`POSTGRES_SCHEMA`) and drops it afterwards, never touching a user's tables."""
MEMORY_BASELINE = 1_000
"""Sagas completed before the memory figure's first reading."""
MEMORY_BATCH = 200
"""Sagas in flight at once while the memory figure runs (each batch is gathered)."""
MEMORY_LIMIT_MB = 100.0
"""Resident memory may grow at most this much from the first reading to the last."""


class BenchApplication(SagaApplication):
    """`SagaApplication` unchanged but for its name, which names its PostgreSQL tables."""

    name = BENCH_APP_NAME


@dataclass(frozen=True)
class PostgresSettings:
    """Where the PostgreSQL store and floor run."""

    dbname: str
    host: str
    port: int
    user: str
    password: str

    def env(self) -> dict[str, str]:
        """The `POSTGRES_*` settings `SagaApplication` reads."""
        return {
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": self.dbname,
            "POSTGRES_HOST": self.host,
            "POSTGRES_PORT": str(self.port),
            "POSTGRES_USER": self.user,
            "POSTGRES_PASSWORD": self.password,
        }

    def connect(self, **kwargs: Any) -> psycopg.Connection[tuple[Any, ...]]:
        """An autocommit psycopg connection (psycopg is imported only when it is used)."""
        import psycopg

        return psycopg.connect(
            dbname=self.dbname,
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            autocommit=True,
            **kwargs,
        )


@dataclass
class StoreResult:
    """One store's figures: medians over the rounds, and every round's value."""

    store: str
    recorder: str = ""
    sagas_per_s: float | None = None
    commits_per_saga: float | None = None
    floor_per_s: float | None = None
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    saga_rounds: list[float] = field(default_factory=list)
    floor_rounds: list[float] = field(default_factory=list)
    floor_transactions_per_round: int = 0
    bytes_per_event: float = 0.0
    store_ms_per_saga: float | None = None
    """Median, per saga, of the time spent inside the recorder's `insert_events` calls."""
    python_ms_per_saga: float | None = None
    """The rest of a saga's time (saga_es, eventsourcing and the mapper): where a gap lies."""
    floor_ms_per_saga: float | None = None
    store_rounds: list[float] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None


@dataclass
class RecoveryResult:
    """How fast one store rebuilds and resumes interrupted sagas."""

    store: str
    sagas: int
    events_replayed_per_s: float = 0.0
    """Events per second while rebuilding every interrupted saga from its stream."""
    recovered_per_s: float = 0.0
    """Sagas per second through `recover()`: find, rebuild, resume and finish each."""
    resumed: int = 0
    skipped: str | None = None


@dataclass
class ConcurrentResult:
    """Sagas with I/O-bound steps in flight together, against the same run one by one."""

    store: str
    sagas: int
    """Sagas in flight at once (one `asyncio.gather` of `arun`)."""
    sequential_sagas: int = 0
    """Sagas run one after another per round, for the floor."""
    io_ms_per_step: float = IO_SECONDS * 1000
    sagas_per_s: float | None = None
    commits_per_saga: float | None = None
    sequential_per_s: float | None = None
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    rounds: list[float] = field(default_factory=list)
    sequential_rounds: list[float] = field(default_factory=list)
    skipped: str | None = None


@dataclass
class WorkersResult:
    """Submitted sagas run by K `saga-es worker` processes on one PostgreSQL, per K."""

    store: str = "postgres"
    sagas: int = 0
    concurrency: int = 0
    """`--concurrency` of each worker process."""
    io_ms_per_step: float = IO_SECONDS * 1000
    workers: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    sagas_per_s: list[float] = field(default_factory=list)
    """Sagas per second with `workers[i]` processes."""
    ratio: float | None = None
    """The most workers' sagas per second over the fewest's."""
    target: str = ""
    met: bool | None = None
    skipped: str | None = None


@dataclass
class MemoryResult:
    """Resident memory of one process after many sagas, against after the first ones."""

    store: str = "sqlite"
    sagas: int = 0
    baseline_sagas: int = 0
    in_flight: int = MEMORY_BATCH
    rss_baseline_mb: float | None = None
    """VmRSS after `baseline_sagas` completed sagas."""
    rss_end_mb: float | None = None
    """VmRSS after `sagas` completed sagas."""
    growth_mb: float | None = None
    sagas_per_s: float | None = None
    target: str = ""
    met: bool | None = None
    skipped: str | None = None


@dataclass
class BenchResult:
    """Every figure of one bench run, as `--json` writes it."""

    sagas: int
    rounds: int
    steps: int
    python: str
    machine: str
    cpus: int
    stores: list[StoreResult]
    recovery: list[RecoveryResult] = field(default_factory=list)
    concurrent: list[ConcurrentResult] = field(default_factory=list)
    workers: WorkersResult | None = None
    memory: MemoryResult | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures."""
        return asdict(self)


# -- the saga under test ---------------------------------------------------------------


def _noop(context: Any, key: str) -> None:
    """A trivial action: the bench measures saga_es and the store, not user code."""


DEFINITION = SagaDefinition(
    "bench", [Step(f"step{i}", _noop, compensation=_noop) for i in range(1, STEPS + 1)]
)


async def _io(context: Any, key: str) -> None:
    """A step that waits on simulated I/O, as a call to another service would."""
    await asyncio.sleep(IO_SECONDS)


async def _anoop(context: Any, key: str) -> None:
    """An async step that does nothing: the memory figure measures saga_es alone."""


IO_SAGA = SagaDefinition("bench_io", [Step(f"step{i}", _io) for i in range(1, STEPS + 1)])
"""Five steps of 5 ms simulated I/O each; `saga-es worker --definitions saga_es.bench:IO_SAGA`
runs it in the worker figure's processes."""
ASYNC_SAGA = SagaDefinition("bench_async", [Step(f"step{i}", _anoop) for i in range(1, STEPS + 1)])


class _CommitCounter:
    """Counts the recorder's insert transactions (one per `insert_events` call that returns).

    It also sums the seconds spent inside those calls, which splits a saga's time
    between the store and the Python around it. While `sizing`, it also sums what the
    events weigh (for the floor's row size); the timed rounds only count and time, so
    the wrapper costs the sagas next to nothing.
    """

    def __init__(self, recorder: ApplicationRecorder) -> None:
        self.commits = 0
        self.seconds = 0.0
        self.sizing = True
        self.events = 0
        self.state_bytes = 0
        insert = recorder.insert_events
        clock = time.perf_counter

        def counted(stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
            started = clock()
            ids = insert(stored_events, **kwargs)
            self.seconds += clock() - started
            self.commits += 1
            if self.sizing:
                self.events += len(stored_events)
                self.state_bytes += sum(len(s.state) for s in stored_events)
            return ids

        setattr(recorder, "insert_events", counted)  # noqa: B010 (an instance attribute)


def _run_sagas(app: SagaApplication, n: int) -> float:
    """Seconds to run `n` sagas one after another; each must complete."""
    started = time.perf_counter()
    for i in range(n):
        _check_completed([app.run(DEFINITION, {"n": i})])
    return time.perf_counter() - started


async def _in_flight(
    app: SagaApplication, definition: SagaDefinition, n: int, first: int = 0
) -> float:
    """Seconds to run `n` sagas at once on the running event loop; each must complete."""
    started = time.perf_counter()
    sagas = await asyncio.gather(*(app.arun(definition, {"n": first + i}) for i in range(n)))
    seconds = time.perf_counter() - started
    _check_completed(sagas)
    return seconds


async def _one_by_one(app: SagaApplication, definition: SagaDefinition, n: int) -> float:
    """Seconds to run `n` sagas one after another on the running event loop."""
    started = time.perf_counter()
    for i in range(n):
        _check_completed([await app.arun(definition, {"n": i})])
    return time.perf_counter() - started


def _check_completed(sagas: Sequence[Saga]) -> None:
    for saga in sagas:
        if saga.status != COMPLETED:
            raise click.ClickException(f"bench saga {saga.id} ended {saga.status}, not completed")


# -- the floors: one single-row INSERT+COMMIT transaction at a time, bare driver --------


class _Floor:
    """Writes single-row transactions straight through the store's driver."""

    def transactions(self, count: int, payload: bytes) -> float:
        """Seconds to commit `count` single-row transactions."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the connection and drop what the floor created."""


class _SQLiteFloor(_Floor):
    """sqlite3 on its own file in WAL with synchronous=FULL: a durable commit per row."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute(
            "CREATE TABLE floor (originator_id TEXT, originator_version INTEGER, "
            "topic TEXT, state BLOB, PRIMARY KEY (originator_id, originator_version))"
        )

    def transactions(self, count: int, payload: bytes) -> float:
        """BEGIN, INSERT one row, COMMIT; `count` times."""
        execute = self.conn.execute
        started = time.perf_counter()
        for _ in range(count):
            execute("BEGIN")
            execute("INSERT INTO floor VALUES (?,?,?,?)", (uuid.uuid4().hex, 1, "t", payload))
            execute("COMMIT")
        return time.perf_counter() - started

    def close(self) -> None:
        """Close the file's connection (the temporary folder goes with the run)."""
        self.conn.close()


class _PostgresFloor(_Floor):
    """psycopg on one connection: INSERT a row into a table shaped like the events table."""

    TABLE = f"{BENCH_APP_NAME.lower()}_floor"

    def __init__(self, settings: PostgresSettings) -> None:
        self.conn = settings.connect()
        self.conn.execute(f"DROP TABLE IF EXISTS {self.TABLE}")
        self.conn.execute(
            f"CREATE TABLE {self.TABLE} (originator_id uuid NOT NULL, "
            "originator_version bigint NOT NULL, topic text, state bytea, "
            "notification_id bigserial, PRIMARY KEY (originator_id, originator_version))"
        )
        self.conn.execute(
            f"CREATE UNIQUE INDEX {self.TABLE}_notification_id_idx "
            f"ON {self.TABLE} (notification_id ASC)"
        )
        self.conn.autocommit = False

    def transactions(self, count: int, payload: bytes) -> float:
        """`execute(INSERT)` then `commit()`, as psycopg users write a transaction."""
        conn = self.conn
        statement = f"INSERT INTO {self.TABLE} VALUES (%s, %s, %s, %s)"
        started = time.perf_counter()
        for _ in range(count):
            conn.execute(statement, (uuid.uuid4(), 1, "t", payload), prepare=True)
            conn.commit()
        return time.perf_counter() - started

    def close(self) -> None:
        """Drop the floor's table and close the connection."""
        self.conn.autocommit = True
        self.conn.execute(f"DROP TABLE IF EXISTS {self.TABLE}")
        self.conn.close()


def _drop_bench_tables(settings: PostgresSettings) -> None:
    """Start and end with no bench tables, so every run writes into the same shape.

    Everything named after the bench application goes: its events, snapshots, status
    and floor tables, and saga_es's insert functions (which no table depends on).
    """
    prefix = BENCH_APP_NAME.lower().replace("_", "\\_") + "\\_%"
    with settings.connect() as conn:
        tables = conn.execute(
            "SELECT quote_ident(tablename) FROM pg_tables "
            "WHERE schemaname = current_schema() AND tablename LIKE %s",
            [prefix],
        ).fetchall()
        functions = conn.execute(
            "SELECT p.oid::regprocedure::text FROM pg_proc p "
            "JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = current_schema() AND p.proname LIKE %s",
            [prefix],
        ).fetchall()
        for (table,) in tables:
            conn.execute(f"DROP TABLE IF EXISTS {table} CASCADE")
        for (function,) in functions:
            conn.execute(f"DROP FUNCTION IF EXISTS {function} CASCADE")


# -- one store -------------------------------------------------------------------------


@contextmanager
def _store(
    store: str, workdir: Path, postgres: PostgresSettings | None, *, floor: bool = True
) -> Iterator[tuple[SagaApplication, _Floor | None, dict[str, Any]]]:
    """The store's application, its floor (None for POPO, or if not wanted) and settings."""
    kind, _, variant = store.partition("-")
    # Each store names its recorder: "" is saga_es's default, "-stock" eventsourcing's own.
    env: dict[str, str] = {"APPLICATION_RECORDER_TOPIC": STOCK_RECORDERS[kind] if variant else ""}
    settings: dict[str, Any] = {}
    the_floor: _Floor | None = None
    if kind == "popo":
        env["PERSISTENCE_MODULE"] = "eventsourcing.popo"
    elif kind == "sqlite":
        env["PERSISTENCE_MODULE"] = "eventsourcing.sqlite"
        env["SQLITE_DBNAME"] = str(workdir / "sagas.db")
        if floor:
            the_floor = _SQLiteFloor(workdir / "floor.db")
    else:
        assert postgres is not None
        _drop_bench_tables(postgres)
        env.update(postgres.env())
        if floor:
            the_floor = _PostgresFloor(postgres)
        settings = {"dbname": postgres.dbname, "host": postgres.host, "port": postgres.port}
    try:
        app = BenchApplication(env=env)
        try:
            if kind == "sqlite":
                settings = _sqlite_settings(workdir / "sagas.db")
            yield app, the_floor, settings
        finally:
            app.close()
    finally:
        if the_floor is not None:
            the_floor.close()
        if kind == "postgres" and postgres is not None:
            _drop_bench_tables(postgres)


def _sqlite_settings(path: Path) -> dict[str, Any]:
    """What durability the application's SQLite file actually runs with."""
    conn = sqlite3.connect(path)
    try:
        journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
        synchronous = conn.execute("PRAGMA synchronous").fetchone()[0]
    finally:
        conn.close()
    names = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
    return {"journal_mode": journal, "synchronous": names.get(synchronous, str(synchronous))}


def _bench_store(
    store: str,
    *,
    sagas: int,
    rounds: int,
    workdir: Path,
    postgres: PostgresSettings | None,
    progress: Callable[[str], None],
) -> StoreResult:
    result = StoreResult(store=store)
    with _store(store, workdir, postgres) as (app, floor, settings):
        result.settings = settings
        result.recorder = f"{type(app.recorder).__module__}.{type(app.recorder).__qualname__}"
        counter = _CommitCounter(app.recorder)
        warm_up = max(1, min(sagas, 20))
        _run_sagas(app, warm_up)  # opens pools, prepares statements, measures commits and sizes
        commits_per_saga = counter.commits / warm_up
        counter.sizing = False
        result.bytes_per_event = counter.state_bytes / max(counter.events, 1)
        payload = os.urandom(max(1, round(result.bytes_per_event)))
        if floor is not None:
            result.floor_transactions_per_round = round(commits_per_saga * sagas)
            floor.transactions(min(result.floor_transactions_per_round, 50), payload)
        counter.commits = 0
        for r in range(1, rounds + 1):
            if floor is not None:
                progress(f"{store}: round {r}/{rounds}: floor")
                seconds = floor.transactions(result.floor_transactions_per_round, payload)
                result.floor_rounds.append(sagas / seconds)
            progress(f"{store}: round {r}/{rounds}: sagas")
            counter.seconds = 0.0
            result.saga_rounds.append(sagas / _run_sagas(app, sagas))
            result.store_rounds.append(counter.seconds / sagas * 1000)
        result.commits_per_saga = counter.commits / (sagas * rounds)
    result.sagas_per_s = statistics.median(result.saga_rounds)
    result.store_ms_per_saga = statistics.median(result.store_rounds)
    result.python_ms_per_saga = 1000 / result.sagas_per_s - result.store_ms_per_saga
    if result.floor_rounds:
        result.floor_per_s = statistics.median(result.floor_rounds)
        result.floor_ms_per_saga = 1000 / result.floor_per_s
        result.ratio = result.sagas_per_s / result.floor_per_s
        result.target = f">= {RATIO_TARGET}x floor"
        result.met = result.ratio >= RATIO_TARGET
    else:
        result.target = f"> {POPO_TARGET:,.0f} sagas/s"
        result.met = result.sagas_per_s > POPO_TARGET
    return result


_NO_POSTGRES = (
    "no PostgreSQL configured: set POSTGRES_DBNAME, POSTGRES_HOST, "
    "POSTGRES_USER and POSTGRES_PASSWORD (or pass --postgres-*)"
)
INTERRUPTED_AT = 3
"""Recovery bench sagas stop with this step's action in flight (outcome unknown)."""


def _interrupted_sagas(n: int) -> Iterator[Saga]:
    """Sagas as a crash leaves them: steps before `INTERRUPTED_AT` done, that one in flight."""
    for i in range(n):
        saga = Saga.start(
            id=uuid.uuid4(),
            name=DEFINITION.name,
            definition_version=DEFINITION.version,
            steps=DEFINITION.step_names,
            compensable=DEFINITION.compensable,
            key=None,
            context_type="builtins:dict",
            context={"n": i},
        )
        for step in DEFINITION.step_names[: INTERRUPTED_AT - 1]:
            saga.start_step(step, 1)
            saga.complete_step(step, 1, changes={}, removed=[])
        saga.start_step(DEFINITION.step_names[INTERRUPTED_AT - 1], 1)
        yield saga


def _bench_recovery(
    store: str,
    n: int,
    workdir: Path,
    postgres: PostgresSettings | None,
    progress: Callable[[str], None],
) -> RecoveryResult:
    result = RecoveryResult(store=store, sagas=n)
    with _store(store, workdir, postgres) as (app, _, _):
        app.register(DEFINITION)
        app.default_step_timeout = 0.0
        progress(f"{store}: recovery: writing {n:,} interrupted sagas")
        batch: list[Saga] = []
        for saga in _interrupted_sagas(n):
            batch.append(saga)
            if len(batch) == 500:
                app.save(*batch)
                batch = []
        if batch:
            app.save(*batch)
        ids = [row.saga_id for row in recovery.in_flight(app)]
        progress(f"{store}: recovery: rebuilding {len(ids):,} sagas")
        started = time.perf_counter()
        events = sum(app.get(saga_id).version for saga_id in ids)
        result.events_replayed_per_s = events / (time.perf_counter() - started)
        progress(f"{store}: recovery: recovering {len(ids):,} sagas")
        started = time.perf_counter()
        report = app.recover()
        result.recovered_per_s = len(report.resumed) / (time.perf_counter() - started)
        result.resumed = len(report.resumed)
        if result.resumed != n or report.failed:
            raise click.ClickException(f"{store}: recovery resumed {result.resumed} of {n} sagas")
    return result


# -- sagas in flight, against the same sagas one by one ---------------------------------


def _bench_concurrent(
    store: str,
    *,
    sagas: int,
    rounds: int,
    workdir: Path,
    postgres: PostgresSettings | None,
    progress: Callable[[str], None],
) -> ConcurrentResult:
    """`sagas` I/O-bound sagas gathered on one loop, interleaved with the same one by one."""
    sequential = min(SEQUENTIAL_IO_SAGAS, sagas)
    result = ConcurrentResult(store=store, sagas=sagas, sequential_sagas=sequential)
    with _store(store, workdir, postgres, floor=False) as (app, _, _):
        counter = _CommitCounter(app.recorder)
        counter.sizing = False

        async def measure() -> int:
            await _in_flight(app, IO_SAGA, min(sagas, 20))  # warm up: pool, threads, statements
            commits = 0
            for r in range(1, rounds + 1):
                progress(f"{store}: in flight: round {r}/{rounds}: {sequential} one by one")
                seconds = await _one_by_one(app, IO_SAGA, sequential)
                result.sequential_rounds.append(sequential / seconds)
                progress(f"{store}: in flight: round {r}/{rounds}: {sagas} at once")
                counter.commits = 0
                result.rounds.append(sagas / await _in_flight(app, IO_SAGA, sagas))
                commits += counter.commits
            return commits

        commits = asyncio.run(measure())
    result.commits_per_saga = commits / (sagas * rounds)
    result.sagas_per_s = statistics.median(result.rounds)
    result.sequential_per_s = statistics.median(result.sequential_rounds)
    result.ratio = result.sagas_per_s / result.sequential_per_s
    result.target = f">= {CONCURRENT_TARGET:g}x one by one, < 1 commit/saga"
    result.met = result.ratio >= CONCURRENT_TARGET and result.commits_per_saga < 1
    return result


# -- worker processes on one PostgreSQL --------------------------------------------------


class _Worker:
    """One `saga-es worker` process; a thread drains its log and keeps the last lines."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str]) -> None:
        self.process = subprocess.Popen(
            list(argv),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.ready = threading.Event()
        """Set once the worker logs that it started (its store is open)."""
        self.unreachable = False
        self.tail: deque[str] = deque(maxlen=20)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.tail.append(line.rstrip())
            if "started:" in line:
                self.ready.set()
            elif "cannot reach the store" in line:
                self.unreachable = True  # it would retry for ever

    def failure(self, what: str) -> click.ClickException:
        """An error naming the worker, with the end of its log."""
        self._reader.join(timeout=1)
        log = "\n".join(self.tail)
        return click.ClickException(
            f"bench worker process {self.process.pid} {what}"
            + (f"; its log:\n{log}" if log else "")
        )

    def wait_ready(self, deadline: float) -> None:
        """Return once the worker has started; raise if it exits or takes past `deadline`."""
        while not self.ready.wait(0.05):
            if self.process.poll() is not None:
                raise self.failure(f"exited with status {self.process.returncode} before starting")
            if self.unreachable or time.monotonic() > deadline:
                raise self.failure("did not start")

    def stop(self) -> int:
        """SIGTERM (it finishes what it holds), then its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=5)
        return self.process.returncode


def _worker_settings(postgres: PostgresSettings) -> dict[str, str]:
    """The worker figure's store: the bench's own schema (saga_es's recorder by default)."""
    return {**postgres.env(), "POSTGRES_SCHEMA": WORKER_SCHEMA}


def _reset_worker_schema(postgres: PostgresSettings, *, create: bool) -> None:
    with postgres.connect() as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {WORKER_SCHEMA} CASCADE")
        if create:
            conn.execute(f"CREATE SCHEMA {WORKER_SCHEMA}")


def _run_workers(postgres: PostgresSettings, processes: int, sagas: int, concurrency: int) -> float:
    """Seconds for `processes` started workers to run `sagas` newly submitted sagas to their end.

    The workers start first and the clock with the first submission, so the figure is
    what the workers sustain, not how fast Python starts.
    """
    _reset_worker_schema(postgres, create=True)
    settings = _worker_settings(postgres)
    prefix = f"{SagaApplication.name.upper()}_"  # such settings would win over the bench's
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefix)}
    env.pop("APPLICATION_RECORDER_TOPIC", None)  # workers need saga_es's status projection
    package_root = str(Path(__file__).resolve().parent.parent)  # the saga_es under test
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env.update(settings)
    argv = [
        sys.executable,
        "-m",
        "saga_es",
        "worker",
        "--definitions",
        "saga_es.bench:IO_SAGA",
        "--concurrency",
        str(concurrency),
        "--poll",
        "0.05",
    ]
    app = SagaApplication(
        env={
            **settings,
            **{prefix + k: v for k, v in settings.items()},
            "APPLICATION_RECORDER_TOPIC": "",
        }
    )
    workers: list[_Worker] = []
    try:
        app.register(IO_SAGA)
        workers = [_Worker(argv, env) for _ in range(processes)]
        deadline = time.monotonic() + 120
        for worker in workers:
            worker.wait_ready(deadline)
        started = time.perf_counter()
        batch: list[Saga] = []
        for i in range(sagas):  # what `submit` records, written 500 to a transaction
            batch.append(app._start(IO_SAGA, {"n": i}, None, begin=False))
            if len(batch) == 500 or i == sagas - 1:
                app.save(*batch)
                batch = []
        deadline = time.monotonic() + max(600.0, sagas * 0.5)
        while True:
            counts = app.stats()
            ended = sum(n for (name, status), n in counts.items() if status in TERMINAL_STATES)
            if ended >= sagas:
                break
            if counts.get((IO_SAGA.name, STUCK)):
                raise click.ClickException("a worker bench saga got stuck")
            for worker in workers:
                if worker.process.poll() is not None:
                    code = worker.process.returncode
                    raise worker.failure(f"exited with status {code} with sagas left")
            if time.monotonic() > deadline:
                raise click.ClickException(f"workers: only {ended} of {sagas} sagas ended in time")
            time.sleep(0.025)  # often enough for the figure, rarely enough to cost little
        seconds = time.perf_counter() - started
    finally:
        codes = [worker.stop() for worker in workers]
        app.close()
    for worker, code in zip(workers, codes, strict=True):
        if code != 0:
            raise worker.failure(f"exited with status {code}")
    return seconds


def _bench_workers(
    postgres: PostgresSettings,
    counts: Sequence[int],
    *,
    sagas: int,
    concurrency: int,
    progress: Callable[[str], None],
) -> WorkersResult:
    """Sagas per second with each number of worker processes, on a fresh schema each."""
    result = WorkersResult(sagas=sagas, concurrency=concurrency, workers=list(counts))
    try:
        for processes in counts:
            progress(f"workers: {processes} process(es) running {sagas:,} sagas")
            seconds = _run_workers(postgres, processes, sagas, concurrency)
            result.seconds.append(seconds)
            result.sagas_per_s.append(sagas / seconds)
    finally:
        _reset_worker_schema(postgres, create=False)
    rate = dict(zip(counts, result.sagas_per_s, strict=True))
    if 1 in rate and 4 in rate:
        result.ratio = rate[4] / rate[1]
        result.target = f">= {WORKERS_TARGET:g}x (4 workers vs 1)"
        result.met = result.ratio >= WORKERS_TARGET
    elif len(rate) > 1:
        result.ratio = rate[max(rate)] / rate[min(rate)]
        result.target = f"{max(rate)} vs {min(rate)} workers (the target is for 4 vs 1)"
    return result


# -- memory ------------------------------------------------------------------------------


def _rss_mb() -> float | None:
    """Resident memory (VmRSS) of this process in MB, or None where /proc is missing."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _bench_memory(sagas: int, workdir: Path, progress: Callable[[str], None]) -> MemoryResult:
    """Resident memory after `sagas` sagas on SQLite, against after the first ones."""
    baseline = min(MEMORY_BASELINE, max(1, sagas // 10))
    result = MemoryResult(sagas=sagas, baseline_sagas=baseline)
    if _rss_mb() is None:
        result.skipped = "no /proc/self/status to read resident memory from"
        return result
    with _store("sqlite", workdir, None, floor=False) as (app, _, _):

        async def run_until(done: int, total: int) -> int:
            while done < total:
                size = min(MEMORY_BATCH, total - done)
                await _in_flight(app, ASYNC_SAGA, size, first=done)
                done += size
                if done % 10_000 < size:
                    progress(f"memory: {done:,} of {sagas:,} sagas")
            return done

        async def measure() -> None:
            done = await run_until(0, baseline)
            gc.collect()
            result.rss_baseline_mb = _rss_mb()
            started = time.perf_counter()
            await run_until(done, sagas)
            if sagas > baseline:
                result.sagas_per_s = (sagas - baseline) / (time.perf_counter() - started)
            gc.collect()
            result.rss_end_mb = _rss_mb()

        asyncio.run(measure())
    assert result.rss_baseline_mb is not None
    assert result.rss_end_mb is not None
    result.growth_mb = result.rss_end_mb - result.rss_baseline_mb
    result.target = f"<= {MEMORY_LIMIT_MB:g} MB growth"
    result.met = result.growth_mb <= MEMORY_LIMIT_MB
    return result


def run_bench(
    *,
    sagas: int = 300,
    rounds: int = 5,
    stores: Sequence[str] = STORES,
    postgres: PostgresSettings | None = None,
    recovery_sagas: int = 0,
    concurrent_sagas: int = 0,
    workers: Sequence[int] = (),
    worker_sagas: int = 1000,
    worker_concurrency: int = 4,
    memory_sagas: int = 0,
    progress: Callable[[str], None] = lambda _: None,
) -> BenchResult:
    """Measure each store in turn; PostgreSQL is skipped (and says so) without settings.

    Each figure beyond the sequential one runs only when asked for (a count above 0):
    `recovery_sagas` and `concurrent_sagas` on each durable store chosen; `workers`
    (process counts) on PostgreSQL if it is chosen; `memory_sagas` on SQLite if it is.
    """
    results: list[StoreResult] = []
    recoveries: list[RecoveryResult] = []
    concurrent: list[ConcurrentResult] = []
    workers_result: WorkersResult | None = None
    memory: MemoryResult | None = None
    with tempfile.TemporaryDirectory(prefix="saga-es-bench-") as tmp:
        for store in stores:
            if recovery_sagas and store in ("sqlite", "postgres"):
                workdir = Path(tmp) / f"{store}-recovery"
                workdir.mkdir()
                if store == "postgres" and postgres is None:
                    recoveries.append(RecoveryResult(store, recovery_sagas, skipped=_NO_POSTGRES))
                else:
                    recoveries.append(
                        _bench_recovery(store, recovery_sagas, workdir, postgres, progress)
                    )
            if store.startswith("postgres") and postgres is None:
                results.append(StoreResult(store=store, skipped=_NO_POSTGRES))
            else:
                workdir = Path(tmp) / store
                workdir.mkdir()
                results.append(
                    _bench_store(
                        store,
                        sagas=sagas,
                        rounds=rounds,
                        workdir=workdir,
                        postgres=postgres,
                        progress=progress,
                    )
                )
            if concurrent_sagas and store in ("sqlite", "postgres"):
                if store == "postgres" and postgres is None:
                    concurrent.append(
                        ConcurrentResult(store, concurrent_sagas, skipped=_NO_POSTGRES)
                    )
                    continue
                workdir = Path(tmp) / f"{store}-concurrent"
                workdir.mkdir()
                concurrent.append(
                    _bench_concurrent(
                        store,
                        sagas=concurrent_sagas,
                        rounds=rounds,
                        workdir=workdir,
                        postgres=postgres,
                        progress=progress,
                    )
                )
        if workers and any(store.startswith("postgres") for store in stores):
            if postgres is None:
                workers_result = WorkersResult(
                    sagas=worker_sagas, workers=list(workers), skipped=_NO_POSTGRES
                )
            else:
                workers_result = _bench_workers(
                    postgres,
                    workers,
                    sagas=worker_sagas,
                    concurrency=worker_concurrency,
                    progress=progress,
                )
        if memory_sagas and any(store.startswith("sqlite") for store in stores):
            workdir = Path(tmp) / "sqlite-memory"
            workdir.mkdir()
            memory = _bench_memory(memory_sagas, workdir, progress)
    return BenchResult(
        sagas=sagas,
        rounds=rounds,
        steps=STEPS,
        python=platform.python_version(),
        machine=platform.platform(),
        cpus=os.cpu_count() or 0,
        stores=results,
        recovery=recoveries,
        concurrent=concurrent,
        workers=workers_result,
        memory=memory,
    )


# -- output ----------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(result: BenchResult, console: Console) -> None:
    """The table of medians, one row per store."""
    table = Table(
        title=f"saga-es bench: {result.sagas} sequential {result.steps}-step sagas per round, "
        f"median of {result.rounds} interleaved rounds",
        title_justify="left",
    )
    for name in ("store", "sagas/s", "commits/saga", "floor sagas/s", "saga/floor", "target"):
        table.add_column(name, justify="left" if name in ("store", "target") else "right")
    for s in result.stores:
        if s.skipped:
            table.add_row(s.store, "skipped", "", "", "", "")
            continue
        verdict = "met" if s.met else "missed"
        table.add_row(
            s.store,
            _fmt(s.sagas_per_s, ",.0f"),
            _fmt(s.commits_per_saga, ".2f"),
            _fmt(s.floor_per_s, ",.0f"),
            "-" if s.ratio is None else f"{s.ratio:.2f}x",
            f"{s.target}: {verdict}",
        )
    console.print(table)
    for s in result.stores:
        if s.skipped:
            console.print(f"{s.store}: skipped: {s.skipped}", highlight=False)
        else:
            extra = ", ".join(f"{k}={v}" for k, v in s.settings.items())
            line = f"{s.store}: recorder {s.recorder}" + (f" ({extra})" if extra else "")
            console.print(line, highlight=False)
            console.print(f"  {_split(s)}", highlight=False)
    if result.recovery:
        recovery_table = Table(
            title=f"recovery: interrupted {result.steps}-step sagas (step {INTERRUPTED_AT} in "
            "flight) rebuilt from their streams and resumed to completion",
            title_justify="left",
        )
        for name in ("store", "sagas", "events replayed/s", "sagas recovered/s"):
            recovery_table.add_column(name, justify="left" if name == "store" else "right")
        for r in result.recovery:
            if r.skipped:
                recovery_table.add_row(r.store, f"{r.sagas:,}", "skipped", "")
            else:
                recovery_table.add_row(
                    r.store,
                    f"{r.sagas:,}",
                    f"{r.events_replayed_per_s:,.0f}",
                    f"{r.recovered_per_s:,.0f}",
                )
        console.print(recovery_table)
    console.print(
        "floor = the same number of single-row INSERT+COMMIT transactions per saga on the "
        "same store in the same run, bare driver (sqlite3 in WAL with synchronous=FULL; "
        "psycopg execute(INSERT) then commit())",
        highlight=False,
    )
    if result.concurrent:
        _render_concurrent(result.concurrent, console)
    if result.workers is not None:
        _render_workers(result.workers, console)
    if result.memory is not None:
        _render_memory(result.memory, console)


def _split(s: StoreResult) -> str:
    """Where a saga's time goes: in the store's insert calls, against the floor's commits."""
    if s.sagas_per_s is None or s.store_ms_per_saga is None or s.python_ms_per_saga is None:
        return ""
    commits = "-" if s.commits_per_saga is None else f"{s.commits_per_saga:.0f}"
    floor = (
        ""
        if s.floor_ms_per_saga is None
        else f" (the floor's {commits} commits: {s.floor_ms_per_saga:.2f} ms)"
    )
    return (
        f"{1000 / s.sagas_per_s:.2f} ms a saga: {s.store_ms_per_saga:.2f} ms inside "
        f"insert_events{floor}, {s.python_ms_per_saga:.2f} ms in the Python around it"
    )


def _verdict(met: bool | None) -> str:
    return "" if met is None else ": met" if met else ": missed"


def _render_concurrent(results: Sequence[ConcurrentResult], console: Console) -> None:
    first = results[0]
    table = Table(
        title=f"in flight: {first.sagas} sagas at once (gather of arun: group commit), "
        f"{first.io_ms_per_step:g} ms I/O per step, vs {first.sequential_sagas} one by one",
        title_justify="left",
    )
    names = ("store", "sagas/s", "commits/saga", "one-by-one sagas/s", "ratio", "target")
    for name in names:
        table.add_column(name, justify="left" if name in ("store", "target") else "right")
    for c in results:
        if c.skipped:
            table.add_row(c.store, "skipped", "", "", "", "")
            continue
        table.add_row(
            c.store,
            _fmt(c.sagas_per_s, ",.0f"),
            _fmt(c.commits_per_saga, ".2f"),
            _fmt(c.sequential_per_s, ",.1f"),
            "-" if c.ratio is None else f"{c.ratio:.1f}x",
            c.target + _verdict(c.met),
        )
    console.print(table)
    for c in results:
        if c.skipped:
            console.print(f"{c.store}: in flight: skipped: {c.skipped}", highlight=False)


def _render_workers(w: WorkersResult, console: Console) -> None:
    if w.skipped:
        console.print(f"workers: skipped: {w.skipped}", highlight=False)
        return
    console.print(
        f"workers: {w.sagas:,} submitted sagas, {w.io_ms_per_step:g} ms I/O per step, run by "
        f"`saga-es worker --concurrency {w.concurrency}` processes sharing one PostgreSQL "
        "(started before the sagas are submitted)",
        highlight=False,
    )
    table = Table()
    for name in ("processes", "seconds", "sagas/s", f"vs {w.workers[0]}"):
        table.add_column(name, justify="right")
    for processes, seconds, rate in zip(w.workers, w.seconds, w.sagas_per_s, strict=True):
        table.add_row(
            str(processes), f"{seconds:.2f}", f"{rate:,.0f}", f"{rate / w.sagas_per_s[0]:.2f}x"
        )
    console.print(table)
    if w.ratio is not None:
        line = f"workers: {w.ratio:.2f}x, target {w.target}{_verdict(w.met)}"
        console.print(line, highlight=False)


def _render_memory(m: MemoryResult, console: Console) -> None:
    if m.skipped:
        console.print(f"memory: skipped: {m.skipped}", highlight=False)
        return
    console.print(
        f"memory (SQLite, {m.in_flight} sagas in flight at a time, one process): resident "
        f"{_fmt(m.rss_baseline_mb, ',.1f')} MB after {m.baseline_sagas:,} sagas, "
        f"{_fmt(m.rss_end_mb, ',.1f')} MB after {m.sagas:,} ({_fmt(m.sagas_per_s, ',.0f')} "
        f"sagas/s): {_fmt(m.growth_mb, '+,.1f')} MB, target {m.target}{_verdict(m.met)}. "
        "POPO is not measured: it keeps every event in memory by design.",
        highlight=False,
    )


def plot(result: BenchResult, path: Path) -> None:
    """Draw the figures to an image (PNG by its suffix); needs matplotlib (`saga_es[plot]`)."""
    from matplotlib.figure import Figure  # only for --plot: an optional dependency

    panels: list[Callable[[Any], None]] = []
    stores = [s for s in result.stores if not s.skipped]
    concurrent = [c for c in result.concurrent if not c.skipped]
    workers = result.workers if result.workers and not result.workers.skipped else None
    memory = result.memory if result.memory and not result.memory.skipped else None

    def bars(ax: Any, labels: Sequence[str], series: Mapping[str, Sequence[float | None]]) -> None:
        width = 0.8 / len(series)
        for i, (name, values) in enumerate(series.items()):
            xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
            ax.bar(xs, [v or 0.0 for v in values], width, label=name)
        ax.set_xticks(range(len(labels)), labels)
        ax.legend(fontsize="small", loc="upper left")

    def notes(ax: Any, values: Sequence[float], texts: Sequence[str]) -> None:
        for x, (value, text) in enumerate(zip(values, texts, strict=True)):
            ax.annotate(text, (x, value), ha="center", va="bottom", fontsize="small")
        ax.set_ylim(0, max([*values, 1.0]) * 1.3)  # room for the notes and the legend

    def sequential(ax: Any) -> None:
        durable = [s for s in stores if s.floor_per_s is not None]
        bars(
            ax,
            [s.store for s in durable],
            {
                "saga_es": [s.sagas_per_s for s in durable],
                "floor": [s.floor_per_s for s in durable],
            },
        )
        tops = [max(s.sagas_per_s or 0.0, s.floor_per_s or 0.0) for s in durable]
        notes(ax, tops, [f"{s.ratio or 0:.2f}x" for s in durable])
        absolute = [
            f"{s.store}: {s.sagas_per_s or 0:,.0f} sagas/s" for s in stores if s.ratio is None
        ]
        if absolute:
            ax.set_xlabel("; ".join(absolute) + " (no floor)")
        ax.set_title(f"sequential {result.steps}-step sagas vs floor\n(target {RATIO_TARGET}x)")
        ax.set_ylabel("sagas/s")

    def in_flight(ax: Any) -> None:
        bars(
            ax,
            [c.store for c in concurrent],
            {
                "one by one": [c.sequential_per_s for c in concurrent],
                f"{concurrent[0].sagas} in flight": [c.sagas_per_s for c in concurrent],
            },
        )
        tops = [c.sagas_per_s or 0.0 for c in concurrent]
        texts = [
            f"{c.ratio or 0:.1f}x\n{c.commits_per_saga or 0:.2f} commits/saga" for c in concurrent
        ]
        notes(ax, tops, texts)
        ax.set_title(
            f"{concurrent[0].sagas} in flight, {concurrent[0].io_ms_per_step:g} ms I/O per step\n"
            f"(target {CONCURRENT_TARGET:g}x one by one)"
        )
        ax.set_ylabel("sagas/s")

    def processes(ax: Any) -> None:
        assert workers is not None
        labels = [str(k) for k in workers.workers]
        ax.bar(labels, workers.sagas_per_s)
        base = workers.sagas_per_s[0]
        notes(ax, workers.sagas_per_s, [f"{r / base:.2f}x" for r in workers.sagas_per_s])
        ax.set_title(f"worker processes, PostgreSQL\n(target 4 vs 1: {WORKERS_TARGET:g}x)")
        ax.set_xlabel("processes")
        ax.set_ylabel("sagas/s")

    def resident(ax: Any) -> None:
        assert memory is not None
        labels = [f"{memory.baseline_sagas:,}", f"{memory.sagas:,}"]
        values = [memory.rss_baseline_mb or 0.0, memory.rss_end_mb or 0.0]
        ax.bar(labels, values)
        limit = values[0] + MEMORY_LIMIT_MB
        notes(ax, values, ["", f"{memory.growth_mb or 0:+.1f} MB"])
        ax.axhline(limit, linestyle="--", color="grey", label="limit")
        ax.set_ylim(0, max(limit, *values) * 1.15)
        ax.set_title("resident memory, SQLite\n(after N sagas)")
        ax.set_xlabel("sagas")
        ax.set_ylabel("MB")
        ax.legend(fontsize="small")

    if any(s.floor_per_s is not None for s in stores):
        panels.append(sequential)
    if concurrent:
        panels.append(in_flight)
    if workers is not None and workers.sagas_per_s:
        panels.append(processes)
    if memory is not None:
        panels.append(resident)
    if not panels:
        raise click.ClickException("nothing to plot: every figure was skipped")
    figure = Figure(figsize=(4.5 * len(panels), 4.5), layout="constrained")
    for ax, draw in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        draw(ax)
    figure.suptitle(f"saga-es bench ({result.cpus} CPUs, Python {result.python})")
    figure.savefig(path)


def _check_matplotlib() -> None:
    """Fail before measuring anything when `--plot` cannot draw."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise click.ClickException(
            "--plot needs matplotlib: pip install 'saga_es[plot]' (or 'matplotlib>=3.8')"
        ) from None


def _parse_stores(value: str) -> list[str]:
    names = [v.strip().lower() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in CHOICES]
    if unknown or not names:
        raise click.BadParameter(
            f"unknown store(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(CHOICES)}"
        )
    return list(dict.fromkeys(names))


def _parse_workers(value: str) -> list[int]:
    try:
        counts = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        counts = [0]
    if any(c < 1 for c in counts):
        raise click.BadParameter(
            f"expected process counts >= 1 separated by commas, got {value!r}",
            param_hint="--workers",
        )
    return list(dict.fromkeys(counts))


@click.command()
@click.option(
    "--sagas",
    "-n",
    default=300,
    show_default=True,
    type=click.IntRange(min=1),
    help="Sagas per round and store.",
)
@click.option(
    "--rounds",
    "-r",
    default=5,
    show_default=True,
    type=click.IntRange(min=1),
    help="Interleaved floor/saga rounds; medians are reported.",
)
@click.option(
    "--stores",
    default=",".join(STORES),
    show_default=True,
    help="Comma-separated stores to measure; also sqlite-stock, postgres-stock.",
)
@click.option(
    "--recovery-sagas",
    default=10_000,
    show_default=True,
    type=click.IntRange(min=0),
    help="Interrupted sagas each durable store recovers (0: skip the recovery figure).",
)
@click.option(
    "--concurrent-sagas",
    default=200,
    show_default=True,
    type=click.IntRange(min=0),
    help="Sagas in flight at once, 5 ms of I/O per step, per durable store (0: skip).",
)
@click.option(
    "--workers",
    "workers",
    default="1,2,4",
    show_default=True,
    help="Worker process counts to run on PostgreSQL, comma-separated (empty: skip).",
)
@click.option(
    "--worker-sagas",
    default=1000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Sagas the worker processes run, for each process count.",
)
@click.option(
    "--worker-concurrency",
    default=4,
    show_default=True,
    type=click.IntRange(min=1),
    help="--concurrency of each worker process.",
)
@click.option(
    "--memory-sagas",
    default=100_000,
    show_default=True,
    type=click.IntRange(min=0),
    help="Sagas run on SQLite for the resident-memory figure (0: skip).",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write every figure to this JSON file.",
)
@click.option(
    "--query-sagas",
    type=click.IntRange(0),
    default=0,
    help="Also time a filtered list over this many stored SQLite sagas (0: skip).",
)
@click.option(
    "--profile",
    "profile_sagas",
    type=click.IntRange(0),
    default=0,
    help="Also profile this many POPO sagas: where a step's CPU time goes (0: skip).",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also draw the figures to this image (PNG); needs matplotlib.",
)
@click.option("--postgres-dbname", envvar="POSTGRES_DBNAME", help="[env: POSTGRES_DBNAME]")
@click.option("--postgres-host", envvar="POSTGRES_HOST", help="[env: POSTGRES_HOST]")
@click.option(
    "--postgres-port",
    envvar="POSTGRES_PORT",
    default=5432,
    type=int,
    show_default=True,
    help="[env: POSTGRES_PORT]",
)
@click.option("--postgres-user", envvar="POSTGRES_USER", help="[env: POSTGRES_USER]")
@click.option(
    "--postgres-password", envvar="POSTGRES_PASSWORD", default="", help="[env: POSTGRES_PASSWORD]"
)
def bench_command(
    sagas: int,
    rounds: int,
    stores: str,
    recovery_sagas: int,
    concurrent_sagas: int,
    workers: str,
    worker_sagas: int,
    worker_concurrency: int,
    memory_sagas: int,
    json_path: Path | None,
    query_sagas: int,
    profile_sagas: int,
    plot_path: Path | None,
    postgres_dbname: str | None,
    postgres_host: str | None,
    postgres_port: int,
    postgres_user: str | None,
    postgres_password: str,
) -> None:
    """Sagas per store against floors measured in the same run: sequential, in flight, workers."""
    chosen = _parse_stores(stores)
    process_counts = _parse_workers(workers)
    if plot_path is not None:
        _check_matplotlib()
    postgres = None
    if postgres_dbname and postgres_host and postgres_user:
        postgres = PostgresSettings(
            postgres_dbname, postgres_host, postgres_port, postgres_user, postgres_password
        )
        if any(name.startswith("postgres") for name in chosen):
            _check_postgres(postgres)
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)  # a file or a pipe: keep the table on one line a row
    err = Console(stderr=True)
    result = run_bench(
        sagas=sagas,
        rounds=rounds,
        stores=chosen,
        postgres=postgres,
        recovery_sagas=recovery_sagas,
        concurrent_sagas=concurrent_sagas,
        workers=process_counts,
        worker_sagas=worker_sagas,
        worker_concurrency=worker_concurrency,
        memory_sagas=memory_sagas,
        progress=lambda line: err.print(line, style="dim", highlight=False),
    )
    render(result, console)
    figures = result.to_dict()
    if query_sagas:
        figures["query"] = bench_query(query_sagas, lambda line: err.print(line, style="dim"))
        query = figures["query"]
        console.print(
            f"query: one page of {query['rows']} filtered rows from {query_sagas:,} stored sagas: "
            f"{query['saga_es_ms']:.2f} ms by app.sagas(...), {query['store_ms']:.2f} ms read "
            f"straight from the store's table: {query['ratio']:.2f}x"
        )
    if profile_sagas:
        shares = profile_hot_path(profile_sagas)
        render_profile(shares, profile_sagas, console)
        figures["profile"] = [{"part": p, "share": s, "us_per_step": u} for p, s, u in shares]
    if json_path is not None:
        json_path.write_text(json.dumps(figures, indent=2) + "\n")
        console.print(f"figures written to {json_path}")
    if plot_path is not None:
        plot(result, plot_path)
        console.print(f"figures drawn to {plot_path}")


def bench_query(sagas: int, progress: Callable[[str], None]) -> dict[str, Any]:
    """A filtered page of `app.sagas(...)` on `sagas` stored sagas, against raw SQL on its table.

    Every tenth saga is a refund; half of those have ended. The page asked for is the first
    100 refunds in flight, oldest first: what an operator asks for. The ratio is the store's
    time over saga_es's (1.0: saga_es adds nothing).
    """
    with tempfile.TemporaryDirectory() as folder:
        env = {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": f"{folder}/q.db"}
        app = BenchApplication(env=env)
        batch: list[tuple[Saga, Sequence[Saga.Event]]] = []
        for n in range(sagas):
            saga = Saga.start(
                id=uuid.uuid4(),
                name="refunds" if n % 10 == 0 else "orders",
                definition_version=1,
                steps=["a"],
                compensable=[],
                key=str(n),
                context_type="builtins:dict",
                context={},
            )
            if n % 20 == 0:
                saga.start_step("a", 1)
                saga.complete_step("a", 1, changes={}, removed=[])
                saga.complete()
            batch.append((saga, saga.collect_events()))  # type: ignore[arg-type]
            if len(batch) == 1000:
                app._write(batch)
                batch = []
                if (n + 1) % 20000 == 0:
                    progress(f"query: {n + 1:,} of {sagas:,} sagas stored")
        if batch:
            app._write(batch)
        table = app.recorder.status_table_name  # type: ignore[attr-defined]
        raw = sqlite3.connect(f"{folder}/q.db")
        statement = (
            f"SELECT * FROM {table} WHERE status IN ('pending', 'running', 'compensating') "
            "AND name = 'refunds' ORDER BY started_at, saga_id LIMIT 100"
        )

        def ours() -> int:
            return len(app.sagas(status=("pending", "running", "compensating"), name="refunds"))

        def store() -> int:
            return len(raw.execute(statement).fetchall())

        rows = ours()
        assert store() == rows
        timings = {}
        for label, query in (("saga_es_ms", ours), ("store_ms", store)):
            samples = []
            for _ in range(21):
                started = time.perf_counter()
                query()
                samples.append((time.perf_counter() - started) * 1000)
            timings[label] = statistics.median(samples)
        raw.close()
        app.close()
    return {
        "sagas": sagas,
        "rows": rows,
        **timings,
        "ratio": timings["store_ms"] / timings["saga_es_ms"],
    }


_PARTS = (
    ("state machine", ("saga_es/machine.py", "transitions/")),
    ("events: creation and apply", ("saga_es/aggregate.py", "eventsourcing/domain.py")),
    ("transcoding", ("json/", "eventsourcing/persistence.py", "saga_es/context.py:encode")),
    ("save: recorder and status row", ("saga_es/popo.py", "eventsourcing/popo.py", "status.py")),
    ("runner decisions", ("saga_es/runner.py",)),
    ("definition lookup", ("saga_es/definition.py",)),
    ("context copy and diff", ("saga_es/context.py",)),
    ("application", ("saga_es/application.py", "saga_es/commits.py")),
    ("uuid", ("uuid.py",)),
)


def profile_hot_path(sagas: int) -> list[tuple[str, float, float]]:
    """Where a POPO step's CPU time goes: (part, share of the time, µs per step), largest first.

    cProfile slows everything alike, so the shares hold; the µs are the shares of the
    unprofiled time per step measured just before.
    """
    import cProfile
    import pstats

    app = BenchApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    _run_sagas(app, max(10, sagas // 10))  # warm up
    started = time.perf_counter()
    _run_sagas(app, sagas)
    per_step = (time.perf_counter() - started) / (sagas * STEPS) * 1e6
    profiler = cProfile.Profile()
    profiler.enable()
    _run_sagas(app, sagas)
    profiler.disable()
    times: dict[str, float] = {}
    for (path, _, name), row in pstats.Stats(profiler).stats.items():  # type: ignore[attr-defined]
        where = f"{path}:{name}"  # a part is a file, or a function in one (`file.py:name`)
        part = next(
            (label for label, paths in _PARTS if any(p in where for p in paths)),
            "builtins and the rest" if path == "~" else "other Python",
        )
        times[part] = times.get(part, 0.0) + row[2]
    total = sum(times.values()) or 1.0
    shares = [(part, t / total, t / total * per_step) for part, t in times.items()]
    return sorted(shares, key=lambda share: -share[1])


def render_profile(shares: list[tuple[str, float, float]], sagas: int, console: Console) -> None:
    """The hot path's breakdown as a table."""
    table = Table(title=f"hot path: {sagas} sequential 5-step sagas on POPO, CPU per step")
    table.add_column("part")
    table.add_column("share", justify="right")
    table.add_column("µs per step", justify="right")
    for part, share, micros in shares:
        table.add_row(part, f"{share:.0%}", f"{micros:.1f}")
    console.print(table)


def _check_postgres(settings: PostgresSettings) -> None:
    """Fail in one line, before anything runs, when PostgreSQL is configured but unreachable."""
    import psycopg

    try:
        settings.connect(connect_timeout=10).close()
    except psycopg.Error as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise click.ClickException(
            f"PostgreSQL {settings.user}@{settings.host}:{settings.port}/{settings.dbname}: {first}"
        ) from None


def results_from_json(data: Mapping[str, Any]) -> BenchResult:
    """A `BenchResult` back from what `--json` wrote (for plots and docs)."""
    workers, memory = data.get("workers"), data.get("memory")
    return BenchResult(
        **{
            **data,
            "stores": [StoreResult(**s) for s in data["stores"]],
            "recovery": [RecoveryResult(**r) for r in data.get("recovery", [])],
            "concurrent": [ConcurrentResult(**c) for c in data.get("concurrent", [])],
            "workers": None if workers is None else WorkersResult(**workers),
            "memory": None if memory is None else MemoryResult(**memory),
        }
    )
