"""The `saga-es` command: each subcommand is one user task over the public API.

Store settings come from the environment, as for any `eventsourcing`
application (`PERSISTENCE_MODULE`, `SQLITE_DBNAME`, `POSTGRES_*`); `--db PATH`
is a shortcut for an SQLite file. A `SagaError` prints one line and exits 1.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from saga_es.application import SagaApplication
from saga_es.errors import SagaError
from saga_es.timeline import render, timeline

DEFAULT_DB = "saga_es.db"

_db_option = click.option(
    "--db",
    "db",
    metavar="PATH",
    default=None,
    help=f"SQLite file to use (default: settings from the environment, else ./{DEFAULT_DB}).",
)


@click.group()
def cli() -> None:
    """Event-sourced sagas: run the demo, read sagas back, measure."""


@contextmanager
def _app(db: str | None) -> Iterator[SagaApplication]:
    """Open the store, turning any saga_es error into one line on stderr."""
    env = {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": db} if db else None
    try:
        with SagaApplication(env=env) as app:
            yield app
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
            console.print(render(saga, app.history(saga.id)))
            outcome = (
                "every booking made"
                if saga.status == "completed"
                else "cancelled in reverse order: " + ", ".join(saga.context.cancelled)
            )
            console.print(f"  {booking.customer}: {saga.status} ({outcome})\n")
        console.print(f"Stored in {_where(app)}. Read them back with `saga-es list`.")


@cli.command("list")
@_db_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of a table.")
def list_(db: str | None, as_json: bool) -> None:
    """List the stored sagas, oldest first."""
    with _app(db) as app:
        rows = [
            {
                "id": str(saga.id),
                "name": saga.name,
                "version": saga.definition_version,
                "key": saga.key,
                "status": saga.status,
                "steps": f"{len(saga.completed)}/{len(saga.steps)}",
                "started": saga.created_on.isoformat(timespec="seconds"),
            }
            for saga in app.sagas()
        ]
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    table = Table(title=f"{len(rows)} saga(s)", title_justify="left")
    for column in ("id", "name", "version", "key", "status", "steps", "started"):
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(row[c]) if row[c] is not None else "" for c in row))
    _console().print(table)


@cli.command()
@click.argument("saga_id")
@_db_option
@click.option("--at", "version", type=int, default=None, help="Show the saga as of event N.")
@click.option("--json", "as_json", is_flag=True, help="Print the timeline as JSON.")
def show(saga_id: str, db: str | None, version: int | None, as_json: bool) -> None:
    """Show one saga's timeline, optionally as it was after event N."""
    with _app(db) as app:
        saga = app.get(saga_id, version=version)
        events = app.history(saga.id)[: saga.version]
    if as_json:
        click.echo(json.dumps([_row_json(r) for r in timeline(events)], indent=2, default=str))
        return
    console = _console()
    console.print(render(saga, events))
    console.print(f"  context: {saga.context_state}")


def _console() -> Console:
    """The terminal's width, or 120 columns when output goes to a file or a pipe."""
    console = Console()
    return console if console.is_terminal else Console(width=120)


def _row_json(row: Any) -> dict[str, Any]:
    return {k: getattr(row, k) for k in row.__dataclass_fields__}


def _where(app: SagaApplication) -> str:
    name = app.env.get("SQLITE_DBNAME")
    module = app.env.get("PERSISTENCE_MODULE", "")
    return f"SQLite file {name}" if "sqlite" in module and name else module


def main() -> None:
    """Console-script entry point."""
    cli()
