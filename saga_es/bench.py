"""`saga-es bench`: sequential sagas on each store, against that store's commit floor.

On a durable store a saga's speed is bounded by how fast the store commits, and
that differs between machines. So each store is measured twice in the same run,
in interleaved rounds (floor, sagas, floor, sagas, ...): N five-step sagas run
through `SagaApplication`, and the floor, the same number of single-row
INSERT+COMMIT transactions per saga written with the bare driver (sqlite3 in WAL
with synchronous=FULL, psycopg). Medians of the rounds, and their ratio, say how
much of the store's commit rate saga_es keeps; machine noise hits both alike.
Commits per saga are counted at the recorder, not assumed. POPO has no floor:
its target is absolute.
"""

from __future__ import annotations

import json
import os
import platform
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
from eventsourcing.persistence import ApplicationRecorder, StoredEvent
from rich.console import Console
from rich.table import Table

from saga_es import recovery
from saga_es.aggregate import Saga
from saga_es.application import SagaApplication
from saga_es.definition import SagaDefinition, Step
from saga_es.machine import COMPLETED

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
RATIO_TARGET = 0.6
"""Sagas/s over floor/s that SQLite and PostgreSQL must reach (issue 2; later issues: 0.8)."""
POPO_TARGET = 3000.0
"""Sagas/s that POPO must stay well above: it has no commit to wait for."""
BENCH_APP_NAME = "SagaEsBench"
"""The bench's own application name, so its PostgreSQL tables never touch a user's."""


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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures."""
        return asdict(self)


# -- the saga under test ---------------------------------------------------------------


def _noop(context: Any, key: str) -> None:
    """A trivial action: the bench measures saga_es and the store, not user code."""


DEFINITION = SagaDefinition(
    "bench", [Step(f"step{i}", _noop, compensation=_noop) for i in range(1, STEPS + 1)]
)


class _CommitCounter:
    """Counts the recorder's insert transactions (one per `insert_events` call that returns).

    While `sizing`, it also sums what the events weigh (for the floor's row size); the
    timed rounds only count, so the wrapper costs the sagas next to nothing.
    """

    def __init__(self, recorder: ApplicationRecorder) -> None:
        self.commits = 0
        self.sizing = True
        self.events = 0
        self.state_bytes = 0
        insert = recorder.insert_events

        def counted(stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
            ids = insert(stored_events, **kwargs)
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
        saga = app.run(DEFINITION, {"n": i})
        if saga.status != COMPLETED:
            raise click.ClickException(f"bench saga {saga.id} ended {saga.status}, not completed")
    return time.perf_counter() - started


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
        import psycopg  # only when PostgreSQL is benchmarked

        self.conn = psycopg.connect(
            dbname=settings.dbname,
            host=settings.host,
            port=settings.port,
            user=settings.user,
            password=settings.password,
            autocommit=True,
        )
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
    """Start and end with no bench tables, so every run writes into the same shape."""
    import psycopg

    prefix = BENCH_APP_NAME.lower()
    with psycopg.connect(
        dbname=settings.dbname,
        host=settings.host,
        port=settings.port,
        user=settings.user,
        password=settings.password,
        autocommit=True,
    ) as conn:
        for suffix in ("events", "snapshots", "tracking", "floor"):
            conn.execute(f"DROP TABLE IF EXISTS {prefix}_{suffix} CASCADE")


# -- one store -------------------------------------------------------------------------


@contextmanager
def _store(
    store: str, workdir: Path, postgres: PostgresSettings | None
) -> Iterator[tuple[SagaApplication, _Floor | None, dict[str, Any]]]:
    """The store's application, its floor (None for POPO) and what describes them."""
    kind, _, variant = store.partition("-")
    # Each store names its recorder: "" is saga_es's default, "-stock" eventsourcing's own.
    env: dict[str, str] = {"APPLICATION_RECORDER_TOPIC": STOCK_RECORDERS[kind] if variant else ""}
    settings: dict[str, Any] = {}
    floor: _Floor | None = None
    if kind == "popo":
        env["PERSISTENCE_MODULE"] = "eventsourcing.popo"
    elif kind == "sqlite":
        env["PERSISTENCE_MODULE"] = "eventsourcing.sqlite"
        env["SQLITE_DBNAME"] = str(workdir / "sagas.db")
        floor = _SQLiteFloor(workdir / "floor.db")
    else:
        assert postgres is not None
        _drop_bench_tables(postgres)
        env.update(postgres.env())
        floor = _PostgresFloor(postgres)
        settings = {"dbname": postgres.dbname, "host": postgres.host, "port": postgres.port}
    try:
        app = BenchApplication(env=env)
        try:
            if kind == "sqlite":
                settings = _sqlite_settings(workdir / "sagas.db")
            yield app, floor, settings
        finally:
            app.close()
    finally:
        if floor is not None:
            floor.close()
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
            result.saga_rounds.append(sagas / _run_sagas(app, sagas))
        result.commits_per_saga = counter.commits / (sagas * rounds)
    result.sagas_per_s = statistics.median(result.saga_rounds)
    if result.floor_rounds:
        result.floor_per_s = statistics.median(result.floor_rounds)
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


def run_bench(
    *,
    sagas: int = 300,
    rounds: int = 5,
    stores: Sequence[str] = STORES,
    postgres: PostgresSettings | None = None,
    recovery_sagas: int = 0,
    progress: Callable[[str], None] = lambda _: None,
) -> BenchResult:
    """Measure each store in turn; PostgreSQL is skipped (and says so) without settings.

    With `recovery_sagas`, each durable store also recovers that many interrupted sagas.
    """
    results: list[StoreResult] = []
    recoveries: list[RecoveryResult] = []
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
                continue
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
    return BenchResult(
        sagas=sagas,
        rounds=rounds,
        steps=STEPS,
        python=platform.python_version(),
        machine=platform.platform(),
        cpus=os.cpu_count() or 0,
        stores=results,
        recovery=recoveries,
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


def _parse_stores(value: str) -> list[str]:
    names = [v.strip().lower() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in CHOICES]
    if unknown or not names:
        raise click.BadParameter(
            f"unknown store(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(CHOICES)}"
        )
    return list(dict.fromkeys(names))


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
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write every figure to this JSON file.",
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
    json_path: Path | None,
    postgres_dbname: str | None,
    postgres_host: str | None,
    postgres_port: int,
    postgres_user: str | None,
    postgres_password: str,
) -> None:
    """Sequential 5-step sagas per store, against the store's commit floor in the same run."""
    chosen = _parse_stores(stores)
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
        progress=lambda line: err.print(line, style="dim", highlight=False),
    )
    render(result, console)
    if json_path is not None:
        json_path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        console.print(f"figures written to {json_path}")


def _check_postgres(settings: PostgresSettings) -> None:
    """Fail in one line, before anything runs, when PostgreSQL is configured but unreachable."""
    import psycopg

    try:
        psycopg.connect(
            dbname=settings.dbname,
            host=settings.host,
            port=settings.port,
            user=settings.user,
            password=settings.password,
            connect_timeout=10,
        ).close()
    except psycopg.Error as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise click.ClickException(
            f"PostgreSQL {settings.user}@{settings.host}:{settings.port}/{settings.dbname}: {first}"
        ) from None


def results_from_json(data: Mapping[str, Any]) -> BenchResult:
    """A `BenchResult` back from what `--json` wrote (for plots and docs)."""
    stores = [StoreResult(**s) for s in data["stores"]]
    recoveries = [RecoveryResult(**r) for r in data.get("recovery", [])]
    return BenchResult(**{**data, "stores": stores, "recovery": recoveries})
