"""A saga's history as a readable timeline: one row per event, with context changes.

Presentation only: it reads events and never touches a store, so the CLI, the
notebooks and tests all render the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from rich.table import Table
from rich.text import Text

from saga_es.aggregate import Saga
from saga_es.context import State, apply_diff
from saga_es.history import ABSENT


@dataclass(frozen=True)
class TimelineRow:
    """One event as a person reads it."""

    version: int
    timestamp: datetime
    elapsed_ms: float
    event: str
    step: str
    attempt: int | None
    status: str
    detail: str


def timeline(events: Sequence[Saga.Event]) -> list[TimelineRow]:
    """Rows for `events` (a whole stream, from `SagaStarted`), with before → after values."""
    rows: list[TimelineRow] = []
    state: State = {}
    start: datetime | None = None
    for event in events:
        data = vars(event)
        start = start or event.timestamp
        if isinstance(event, Saga.SagaStarted):
            state = dict(event.context)
            detail = ", ".join(f"{k}={_short(v)}" for k, v in state.items())
            if event.parent_saga_id is not None:  # a nested saga: the tree goes up from here
                parent = f"child of saga {event.parent_saga_id} ({event.parent_step!r})"
                detail = "; ".join(filter(None, [parent, detail]))
        elif "error_type" in data:
            detail = f"{data['error_type']}: {data['error_message']}{_policy(data)}"
        elif "changes" in data:
            detail = _changes(state, data["changes"], data["removed"])
            state = apply_diff(state, data["changes"], data["removed"])
            result = data.get("result")
            if isinstance(result, dict) and "saga_id" in result:  # a `Step.saga`'s child
                detail = "; ".join(filter(None, [f"child saga {result['saga_id']}", detail]))
        elif isinstance(event, Saga.SagaReverted):
            detail = f"reverted by its parent {event.parent_saga_id} ({event.parent_step!r})"
        elif isinstance(event, Saga.SagaResolved):
            detail = f"{event.action} by {event.by}: {event.reason}"
        elif isinstance(event, Saga.CancelRequested):
            detail = f"by {event.by}: {event.reason}"
        elif isinstance(event, Saga.SagaForked):
            carried = ", ".join(event.carried) or "nothing"
            detail = (
                f"from saga {event.source_saga_id} v{event.source_version} at "
                f"{event.from_step!r}; carried over: {carried}"
            )
        elif isinstance(event, Saga.SagaTimedOut):
            detail = f"deadline {event.deadline.isoformat()} passed"
        elif data.get("child_saga_id"):  # a `Step.saga` step starting (or retrying) its child
            detail = f"child saga {data['child_saga_id']}"
        elif data.get("fallback"):
            detail = "fallback"
        elif "took_effect" in data:
            detail = "took effect" if data["took_effect"] else "took no effect"
        else:
            detail = ""
        rows.append(
            TimelineRow(
                version=event.originator_version,
                timestamp=event.timestamp,
                elapsed_ms=(event.timestamp - start).total_seconds() * 1000,
                event=type(event).__name__,
                step=data.get("step", ""),
                attempt=data.get("attempt"),
                status=event.to_state,
                detail=detail,
            )
        )
    return rows


_STYLE = {
    "StepFailed": "bold red",
    "CompensationFailed": "bold red",
    "SagaStuck": "bold red",
    "SagaTimedOut": "bold red",
    "SagaResolved": "bold cyan",
    "CancelRequested": "bold magenta",
    "SagaCancelled": "bold magenta",
    "SagaForked": "bold cyan",
    "SagaReverted": "yellow",
    "CompensationStarted": "yellow",
    "CompensationRan": "yellow",
    "SagaCompensated": "bold yellow",
    "SagaCompleted": "bold green",
}


def render(saga: Saga, events: Sequence[Saga.Event]) -> Table:
    """A rich table of the saga's timeline, titled with what the saga is and how it ended."""
    key = f" key={saga.key}" if saga.key else ""
    table = Table(
        title=f"saga {saga.id} · {saga.name} v{saga.definition_version}{key} · {saga.status}",
        title_justify="left",
        expand=False,
    )
    for column, justify in (
        ("#", "right"),
        ("time", "left"),
        ("+ms", "right"),
        ("event", "left"),
        ("step", "left"),
        ("try", "right"),
        ("state", "left"),
        ("detail", "left"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in timeline(events):
        style = _STYLE.get(row.event, "")
        table.add_row(
            str(row.version),
            row.timestamp.strftime("%H:%M:%S.%f")[:-3],
            f"{row.elapsed_ms:.1f}",
            Text(row.event, style=style),
            row.step,
            "" if row.attempt is None else str(row.attempt),
            row.status,
            row.detail,
        )
    return table


def _changes(before: State, changes: dict[str, Any], removed: list[str]) -> str:
    parts = [f"{k}: {_short(before.get(k, ABSENT))} → {_short(v)}" for k, v in changes.items()]
    parts += [f"{k}: removed" for k in removed]
    return "; ".join(parts)


def _policy(data: dict[str, Any]) -> str:
    """What the failure led to: a retry after a wait, the breaker's state, a self-undo."""
    notes = []
    if data.get("will_retry"):
        delay = data.get("delay") or 0.0
        notes.append(f"retry in {delay:.3g}s" if delay else "retry")
    if data.get("breaker"):
        notes.append(f"breaker {data['breaker']}")
    if data.get("compensate"):
        notes.append("its own effect is undone")
    return f" ({'; '.join(notes)})" if notes else ""


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
