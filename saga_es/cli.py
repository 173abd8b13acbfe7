"""The `saga-es` command: each subcommand is one user task over the public API.

Store settings come from the environment, as for any `eventsourcing`
application (`PERSISTENCE_MODULE`, `SQLITE_DBNAME`, `POSTGRES_*`); `--db PATH`
is a shortcut for an SQLite file. A `SagaError` prints one line and exits 1.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import click
from rich.console import Console
from rich.padding import Padding
from rich.progress import Progress
from rich.table import Table

from saga_es import recovery
from saga_es.aggregate import Saga
from saga_es.application import SagaApplication
from saga_es.bench import bench_command
from saga_es.definition import SagaDefinition
from saga_es.errors import (
    ConfigurationError,
    DefinitionNotFound,
    SagaError,
    SagaNotFound,
    UnreadableEvent,
)
from saga_es.machine import STATES
from saga_es.timeline import render

DEFAULT_DB = "saga_es.db"
_DEFINITIONS_HINT = "--definitions MODULE[:NAME] (or SAGA_ES_DEFINITIONS)"
log = logging.getLogger("saga_es")

_db_option = click.option(
    "--db",
    "db",
    metavar="PATH",
    default=None,
    help=f"SQLite file to use (default: settings from the environment, else ./{DEFAULT_DB}).",
)


@click.group()
@click.option(
    "--app",
    "app_spec",
    metavar="MODULE:CLASS",
    envvar="SAGA_ES_APP",
    default=None,
    help="Your SagaApplication subclass (or SagaProcess), to read its tables and transcodings.",
)
@click.pass_context
def cli(ctx: click.Context, app_spec: str | None) -> None:
    """Event-sourced sagas: run the demo, read sagas back, measure."""
    ctx.obj = _app_class(app_spec)


def _app_class(spec: str | None) -> type[SagaApplication]:
    """The application class named by MODULE:CLASS (default: `SagaApplication`)."""
    if spec is None:
        return SagaApplication
    module_name, _, name = spec.partition(":")
    try:
        found = getattr(_import(module_name, spec, "--app"), name or "")
    except AttributeError as e:
        raise click.BadParameter(f"{spec}: {e}", param_hint="--app") from None
    if not (isinstance(found, type) and issubclass(found, SagaApplication)):
        raise click.BadParameter(f"{spec} is not a SagaApplication subclass", param_hint="--app")
    return found


def _chosen_class() -> type[SagaApplication]:
    ctx = click.get_current_context(silent=True)
    found = ctx.find_object(type) if ctx is not None else None
    return (
        found if isinstance(found, type) and issubclass(found, SagaApplication) else SagaApplication
    )


@contextmanager
def _app(db: str | None) -> Iterator[SagaApplication]:
    """Open the store, turning any saga_es error into one line on stderr."""
    env = {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": db} if db else None
    try:
        with _chosen_class()(env=env) as app:
            yield app
    except DefinitionNotFound as e:  # its advice is for Python callers; say the option too
        click.echo(f"saga-es: {e}; on the command line: {_DEFINITIONS_HINT}", err=True)
        sys.exit(1)
    except SagaError as e:
        click.echo(f"saga-es: {e}", err=True)
        sys.exit(1)


@cli.command()
@_db_option
def demo(db: str | None) -> None:
    """Book two trips: one goes through, one is undone when the hotel is full."""
    from saga_es.demo import CUSTOMERS, TRIP

    console = _console()
    with _app(db) as app:
        for booking in CUSTOMERS:
            saga = app.run(TRIP, booking)
            console.print(render(saga, app.saga_events(saga.id)))
            outcome = (
                "every booking made"
                if saga.status == "completed"
                else "cancelled in reverse order: " + ", ".join(saga.context.cancelled)
            )
            console.print(f"  {booking.customer}: {saga.status} ({outcome})\n")
        console.print(f"Stored in {_where(app)}. Read them back with `saga-es list`.")


class _Moment(click.ParamType[datetime]):
    """A date or a date and time in ISO 8601: fractions of seconds, `Z` or an offset allowed.

    Without an offset it is UTC, as `SagaApplication.statuses` reads naive times, so the
    same text means the same instant on every machine.
    """

    name = "datetime"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            return datetime.fromisoformat(str(value).strip())
        except ValueError:
            self.fail(
                f"{value!r} is not a date or a date and time in ISO 8601 "
                "(e.g. 2025-06-01, 2025-06-01T12:30, 2025-06-01 12:30:05.25+02:00)",
                param,
                ctx,
            )


def _saga_id(ctx: click.Context, param: click.Parameter, value: str | None) -> UUID | None:
    """A saga id option, checked here so that a typo is a usage error, not a traceback."""
    if value is None:
        return None
    try:
        return UUID(value.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a saga id (a UUID)") from None


def _filters(command: Callable[..., None]) -> Callable[..., None]:
    """The filters `list` and `stats` share: `--status`, `--name`, `--key`, `--since`, `--until`."""
    for option in reversed(
        (
            click.option(
                "--status",
                "statuses",
                multiple=True,
                type=click.Choice(list(STATES[1:])),
                help="Only sagas in this state. Repeatable.",
            ),
            click.option("--name", default=None, help="Only sagas of this definition name."),
            click.option(
                "--key", default=None, help="Only the saga started under this business key."
            ),
            click.option(
                "--since",
                type=_Moment(),
                help="Only sagas started after this (ISO 8601; UTC without an offset).",
            ),
            click.option(
                "--until",
                type=_Moment(),
                help="Only sagas started before this (ISO 8601; UTC without an offset).",
            ),
        )
    ):
        command = option(command)
    return command


@cli.command("list")
@_db_option
@_filters
@click.option("--limit", type=click.IntRange(1), default=100, show_default=True)
@click.option(
    "--after", default=None, metavar="ID", callback=_saga_id, help="The page after this saga id."
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def list_(
    db: str | None,
    statuses: tuple[str, ...],
    name: str | None,
    key: str | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    after: UUID | None,
    as_json: bool,
) -> None:
    """List sagas, oldest first, from the status projection (no replay); filter and page."""
    with _app(db) as app:
        found = app.statuses(
            status=statuses,
            name=name,
            key=key,
            started_after=since,
            started_before=until,
            after=after,
            limit=limit,
        )
    rows = [
        {
            "id": str(row.saga_id),
            "name": row.name,
            "version": row.definition_version,
            "key": row.key,
            "status": row.status,
            "step": row.step,
            "events": row.version,
            "started": row.started_at.isoformat(timespec="seconds"),
            "updated": row.updated_at.isoformat(timespec="seconds"),
        }
        for row in found
    ]
    if as_json:  # one document, as `stats --json` and `show --json` print
        click.echo(json.dumps(rows))
        return
    if not rows:
        click.echo("0 saga(s)")
        return
    more = f"; next page: --after {rows[-1]['id']}" if len(rows) == limit else ""
    table = Table(title=f"{len(rows)} saga(s){more}", title_justify="left")
    for column in rows[0]:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(row[c]) if row[c] is not None else "" for c in row))
    _console().print(table)


@cli.command()
@_db_option
@_filters
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def stats(
    db: str | None,
    statuses: tuple[str, ...],
    name: str | None,
    key: str | None,
    since: datetime | None,
    until: datetime | None,
    as_json: bool,
) -> None:
    """Count sagas per definition and status, from the status projection."""
    with _app(db) as app:
        counts = app.stats(
            status=statuses, name=name, key=key, started_after=since, started_before=until
        )
    rows = [
        {"name": name_, "status": status, "count": count}
        for (name_, status), count in sorted(counts.items())
    ]
    if as_json:
        click.echo(json.dumps(rows))
        return
    table = Table(title=f"{sum(counts.values())} saga(s)", title_justify="left")
    for column in ("name", "status", "count"):
        table.add_column(column, justify="right" if column == "count" else "left")
    for row in rows:
        table.add_row(str(row["name"]), str(row["status"]), str(row["count"]))
    _console().print(table)


@cli.command()
@click.argument("saga_id")
@_db_option
@click.option("--at", "version", type=int, default=None, help="Show the saga as of event N.")
@click.option("--json", "as_json", is_flag=True, help="Print the history records as JSON.")
def show(saga_id: str, db: str | None, version: int | None, as_json: bool) -> None:
    """Show one saga's timeline, optionally as it was after event N.

    An event that cannot be read ends the timeline: what comes before it is shown, then
    the error names it (and the command fails), as a person debugging the saga needs.
    """
    with _app(db) as app:
        try:
            saga = app.get(saga_id, version=version)
        except UnreadableEvent as e:
            if as_json or e.version <= 1:
                raise
            _show_tree(app, _console(), app.get(saga_id, version=e.version - 1), depth=0)
            raise
        if as_json:
            history = app.history(saga.id, strict=version is None)[: saga.version]
            click.echo(json.dumps([r.to_dict() for r in history], indent=2, default=str))
            return
        console = _console()
        _show_tree(app, console, saga, depth=0)


def _show_tree(app: SagaApplication, console: Console, saga: Saga, depth: int) -> None:
    """The saga's timeline, then each child saga's (`Step.saga`) below it, indented: the tree."""
    # With --at, only the events up to N are read: one after it that cannot be decoded
    # (written by a later release, say) does not stop time travel to before it.
    try:
        events: list[Saga.Event] = list(app.events.get(saga.id, lte=saga.version))  # type: ignore[arg-type]
    except Exception as e:
        raise app.unreadable(saga.id, e) from e
    console.print(Padding(render(saga, events), (0, 0, 0, 4 * depth)))
    console.print(Padding(f"  context: {saga.context_state}", (0, 0, 0, 4 * depth)))
    for step, child in _children(app, events):
        link = f"  └─ step {step!r} ran child saga {child.id}:"
        console.print(Padding(link, (1, 0, 0, 4 * depth)))
        _show_tree(app, console, child, depth + 1)


def _children(app: SagaApplication, events: list[Saga.Event]) -> list[tuple[str, Saga]]:
    """The sagas the parent's steps started, as their `StepStarted` events name them."""
    started = {
        e.step: e.child_saga_id
        for e in events
        if isinstance(e, Saga.StepStarted) and e.child_saga_id is not None
    }
    found = []
    for step, child_id in started.items():
        with contextlib.suppress(SagaNotFound):  # the parent died before the child's first event
            found.append((step, app.get(child_id)))
    return found


def _non_empty(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not value.strip():
        raise click.BadParameter("must not be empty")
    return value


_definitions_option = click.option(
    "--definitions",
    "modules",
    multiple=True,
    metavar="MODULE[:NAME]",
    envvar="SAGA_ES_DEFINITIONS",
    help="Where the saga definitions live: every SagaDefinition in MODULE, or MODULE:NAME "
    "(a definition or a list of them). Repeatable.",
)


@cli.command()
@_db_option
@_definitions_option
def recover(db: str | None, modules: tuple[str, ...]) -> None:
    """Resume every interrupted saga: forward if running, backward if compensating."""
    definitions = [d for spec in modules for d in _load_definitions(spec)]
    with _app(db) as app, Progress(transient=True) as bar:
        app.register(*definitions)
        task = bar.add_task("recovering", total=None)
        report = app.recover(
            progress=lambda done, total: bar.update(task, completed=done, total=total)
        )
    console = _console()
    console.print(
        f"{report.found} saga(s) in flight: {len(report.resumed)} resumed, "
        f"{len(report.waiting)} left to their worker (within their step timeout), "
        f"{len(report.taken_over)} taken by another worker, {len(report.failed)} failed"
    )
    for saga_id, reason in report.failed.items():
        console.print(f"  [red]{saga_id}[/red]: {reason}", highlight=False)
    if report.failed and not definitions:
        console.print(f"  no definitions were given: {_DEFINITIONS_HINT}", highlight=False)
    if report.failed:
        sys.exit(1)


@cli.command()
@click.argument("saga_id")
@click.option("--from-step", "from_step", required=True, help="The step the new saga starts from.")
@_db_option
@_definitions_option
def fork(saga_id: str, from_step: str, db: str | None, modules: tuple[str, ...]) -> None:
    """Run a new saga continuing ID from a step, under the (fixed) definition given."""
    definitions = [d for spec in modules for d in _load_definitions(spec)]
    with _app(db) as app:
        app.register(*definitions)
        source = app.get(saga_id)
        named = [d for d in definitions if d.name == source.name]
        newest = max(named, key=lambda d: d.version) if named else None
        saga = app.fork(source.id, from_step, newest)
        events = app.saga_events(saga.id)
    console = _console()
    console.print(render(saga, events))
    forked = saga.forked_from or {}
    console.print(f"  forked from saga {source.id} as of version {forked.get('version')}")
    if saga.status != "completed":
        sys.exit(1)


@cli.command()
@click.argument("saga_id")
@click.option(
    "--by", required=True, callback=_non_empty, help="Who cancels it (recorded in the stream)."
)
@click.option(
    "--reason", required=True, callback=_non_empty, help="Why (recorded in the saga's stream)."
)
@_db_option
@_definitions_option
def cancel(saga_id: str, by: str, reason: str, db: str | None, modules: tuple[str, ...]) -> None:
    """Stop a saga: no further step starts, what completed is compensated, it ends cancelled."""
    definitions = [d for spec in modules for d in _load_definitions(spec)]
    with _app(db) as app:
        app.register(*definitions)
        saga = app.cancel(saga_id, by=by, reason=reason)
        events = app.saga_events(saga.id)
    console = _console()
    console.print(render(saga, events))
    if saga.status != "cancelled":
        console.print(
            f"  cancel requested: the worker running step {saga.step!r} stops at its next "
            "boundary, or recovery finishes it",
            highlight=False,
        )


@cli.command()
@click.argument("saga_id")
@click.option(
    "--action",
    type=click.Choice(["retry", "mark-compensated"]),
    required=True,
    help="retry: run the failed compensation again; mark-compensated: you undid it by hand.",
)
@click.option(
    "--by", required=True, callback=_non_empty, help="Who resolves it (recorded in the stream)."
)
@click.option(
    "--reason", required=True, callback=_non_empty, help="Why (recorded in the saga's stream)."
)
@_db_option
@_definitions_option
def resolve(
    saga_id: str, action: str, by: str, reason: str, db: str | None, modules: tuple[str, ...]
) -> None:
    """Finish a stuck saga by hand; who and why are recorded, then compensation goes on."""
    definitions = [d for spec in modules for d in _load_definitions(spec)]
    with _app(db) as app:
        app.register(*definitions)
        saga = app.resolve(saga_id, action, by=by, reason=reason)
        events = app.saga_events(saga.id)
    console = _console()
    console.print(render(saga, events))
    if saga.status != "compensated":
        sys.exit(1)


@cli.command()
@_db_option
def verify(db: str | None) -> None:
    """Replay every stored saga through the state machine; list what it would refuse."""
    with _app(db) as app:
        problems = app.verify()
        checked = sum(app.stats().values())
    for problem in problems:
        click.echo(str(problem))
    click.echo(f"{checked} saga(s) checked, {len(problems)} rejected")
    if problems:
        sys.exit(1)


@cli.command()
@click.argument("saga_id", required=False)
@click.option("--machine", is_flag=True, help="Draw the state machine every saga follows.")
@_db_option
@_definitions_option
def diagram(saga_id: str | None, machine: bool, db: str | None, modules: tuple[str, ...]) -> None:
    """Print Mermaid text: a saga's path, the definitions, or the state machine."""
    from saga_es.diagram import definition_diagram, machine_diagram, saga_path_diagram

    if machine:
        click.echo(machine_diagram())
        return
    definitions = [d for spec in modules for d in _load_definitions(spec)]
    if saga_id is None:
        if not definitions:
            raise click.UsageError("give a SAGA_ID, --definitions MODULE[:NAME], or --machine")
        click.echo("\n\n".join(definition_diagram(d) for d in definitions))
        return
    with _app(db) as app:
        app.register(*definitions)
        # Drawn from the history records, so an event that cannot be decoded is left out
        # (and named) instead of costing the whole drawing.
        records = app.history(saga_id, strict=False)
        started = next((r for r in records if r.readable and r.event == "SagaStarted"), None)
        if started is None:
            app.get(saga_id)  # raises, naming the event that cannot be read
            raise AssertionError("a saga with no readable SagaStarted was rebuilt")
        name, version = started.details["name"], started.details["definition_version"]
        drawing = saga_path_diagram(app.definition(name, version), records)
    click.echo(drawing)
    for record in records:
        if not record.readable:
            click.echo(
                f"saga-es: event {record.version} ({record.event}) cannot be read and is not drawn",
                err=True,
            )


@cli.command()
@click.argument("saga_id")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["json", "html"]),
    default=None,
    help="JSON (schema saga_es.export/1) or a self-contained HTML report "
    "[default: html for an -o FILE ending in .html, else json].",
)
@click.option("--html", "fmt", flag_value="html", help="Same as --format html.")
@click.option("--json", "fmt", flag_value="json", help="Same as --format json.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write to FILE, not stdout.")
@_db_option
@_definitions_option
def export(
    saga_id: str, fmt: str | None, output: str | None, db: str | None, modules: tuple[str, ...]
) -> None:
    """Export one saga's history: JSON, or an HTML report with its timeline and path."""
    from saga_es.export import export_html, export_json

    if fmt is None:
        fmt = (
            "html" if output is not None and output.lower().endswith((".html", ".htm")) else "json"
        )
    definitions = [d for spec in modules for d in _load_definitions(spec)]
    with _app(db) as app:
        app.register(*definitions)
        if fmt == "json":
            text = json.dumps(export_json(app, saga_id), indent=2)
        else:
            text = export_html(app, saga_id)
    if output is None:
        click.echo(text)
        return
    try:
        Path(output).write_text(text, encoding="utf-8")
    except OSError as e:  # no such folder, no permission, a full disk: the user's to mend
        click.echo(f"saga-es: cannot write {output}: {e.strerror or e}", err=True)
        sys.exit(1)
    click.echo(f"wrote {output}", err=True)


@cli.command()
@_db_option
@_definitions_option
@click.option(
    "--recent-hours",
    type=click.FloatRange(0),
    default=24.0,
    show_default=True,
    help="Also check sagas that ended this recently.",
)
def check(db: str | None, modules: tuple[str, ...], recent_hours: float) -> None:
    """Replay stored sagas against these definitions, to tell whether this code recovers them."""
    definitions = [d for spec in modules for d in _load_definitions(spec)]
    if not definitions:
        raise click.UsageError("give the new code's definitions with --definitions MODULE")
    newest: dict[str, SagaDefinition] = {}
    for definition in definitions:
        if definition.name not in newest or definition.version > newest[definition.name].version:
            newest[definition.name] = definition
    ok = True
    with _app(db) as app:
        app.register(*definitions)
        stored = {name for name, _ in app.stats()}
        if stored and not stored & set(newest):
            # Sagas are stored, but under other names: a typo or the wrong module, which a
            # deploy gate must not pass as "nothing to check".
            click.echo(
                f"saga-es: no stored saga was started from {', '.join(map(repr, newest))}; "
                f"stored names: {', '.join(map(repr, sorted(stored)))}",
                err=True,
            )
            sys.exit(1)
        for definition in newest.values():
            if definition.name not in stored:
                click.echo(f"check of {definition.name!r}: no stored saga of that name")
                continue
            report = app.check(definition, recent=timedelta(hours=recent_hours))
            click.echo(str(report))
            ok = ok and report.ok
    if not ok:
        sys.exit(1)


@cli.command()
@_db_option
@_definitions_option
@click.option(
    "--concurrency",
    type=click.IntRange(1),
    default=8,
    show_default=True,
    help="Sagas run at once by this worker.",
)
@click.option(
    "--poll",
    type=click.FloatRange(0.01),
    default=1.0,
    show_default=True,
    help="Seconds between looks for new work.",
)
@click.option("--until-idle", is_flag=True, help="Exit once a pass finds nothing to run.")
def worker(
    db: str | None, modules: tuple[str, ...], concurrency: int, poll: float, until_idle: bool
) -> None:
    """Run submitted and interrupted sagas until SIGTERM; many workers may share PostgreSQL."""
    logging.basicConfig(level=logging.INFO, format="saga-es worker %(process)d: %(message)s")
    definitions = [d for spec in modules for d in _load_definitions(spec)]
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    app = _connect(db, stop)
    if app is None:
        return
    with app:
        app.register(*definitions)
        log.info("started: %s, %d at a time", _where(app), concurrency)
        report = app.work(
            concurrency=concurrency, poll_interval=poll, stop=stop, until_idle=until_idle
        )
    log.info(
        "stopped: %d saga(s) run, %d taken by another worker, %d failed",
        len(report.resumed),
        len(report.taken_over),
        len(report.failed),
    )
    if report.failed:
        sys.exit(1)


def _connect(db: str | None, stop: threading.Event) -> SagaApplication | None:
    """The application, retrying with backoff while the store cannot be reached.

    A setting that no retry can mend (missing, malformed, an unknown module) is said
    in one line, and the worker exits 2, rather than waiting forever on a typo.
    """
    env = {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": db} if db else None
    delay = recovery.STORE_RETRY_FIRST
    while not stop.is_set():
        try:
            return _chosen_class()(env=env)
        except ConfigurationError as e:
            if not e.unreachable:
                log.error("cannot start: %s", e)
                sys.exit(2)
            following = recovery.store_unreachable(e, delay)
            stop.wait(delay)
            delay = following
    return None


def _load_definitions(spec: str) -> list[SagaDefinition]:
    """The definitions named by MODULE or MODULE:NAME."""
    module_name, _, attribute = spec.partition(":")
    module = _import(module_name, spec, "--definitions")
    try:
        found: Any = getattr(module, attribute) if attribute else vars(module).values()
    except AttributeError as e:
        raise click.BadParameter(f"{spec}: {e}", param_hint="--definitions") from None
    if isinstance(found, SagaDefinition):
        return [found]
    definitions = (
        [d for d in found if isinstance(d, SagaDefinition)]
        if isinstance(found, Iterable) and not isinstance(found, str | bytes)
        else []
    )
    if not definitions:
        raise click.BadParameter(f"{spec} holds no SagaDefinition", param_hint="--definitions")
    return definitions


def _import(module_name: str, spec: str, param_hint: str) -> Any:
    """The user's module; failing to import it is a usage error naming it, in one line.

    A typo, a syntax error or an exception its own code raised is the user's to mend,
    so it reads as such, not as a traceback through the CLI.
    """
    try:
        return importlib.import_module(module_name)
    except Exception as e:
        reason = f"{type(e).__name__}: {e}" if not isinstance(e, ImportError) else str(e)
        raise click.BadParameter(
            f"{spec}: cannot import {module_name!r}: {reason}", param_hint=param_hint
        ) from None


def _console() -> Console:
    """The terminal's width, or 120 columns when output goes to a file or a pipe."""
    console = Console()
    return console if console.is_terminal else Console(width=120)


def _where(app: SagaApplication) -> str:
    name = app.env.get("SQLITE_DBNAME")
    module = app.env.get("PERSISTENCE_MODULE", "")
    return f"SQLite file {name}" if "sqlite" in module and name else module


cli.add_command(bench_command, "bench")


def main() -> None:
    """Console-script entry point."""
    cli()
