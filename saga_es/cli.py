"""The `saga-es` command: thin wrappers over the public API."""

from __future__ import annotations

import click


@click.group()
def cli() -> None:
    """Event-sourced sagas: run the demo, read sagas back, measure."""


def main() -> None:
    """Console-script entry point."""
    cli()
