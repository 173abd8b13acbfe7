"""Export one saga: a versioned JSON document, and a self-contained HTML report of it.

An export is what an auditor or a support engineer takes away from the store. It
reads the stored events one at a time, so an event that cannot be decoded (an
unknown type, a corrupt record) is marked as unreadable and everything else still
exports. The HTML report is drawn in Python from the JSON document alone, with no
script and nothing fetched from the network, so it opens anywhere, offline, later.

Schema `saga_es.export/1`
-------------------------

The document is one JSON object. Timestamps are ISO 8601 strings with their UTC
offset. Stored values JSON cannot hold are written as strings: dates and times in
ISO 8601, UUIDs in their usual form, anything else as `str(value)`. Keys may be
added under the same schema id; a key is never removed or retyped without a new one.

- `schema` (string): `"saga_es.export/1"`.
- `saga` (object): the saga as rebuilt from its events. When an event cannot be
  read the saga cannot be rebuilt: `status`, `version`, `updated_at`, `context` and
  `error` are `null`, and `name`, `definition_version`, `key`, `steps` and
  `started_at` are what its `SagaStarted` recorded (`null` too if that one cannot be
  read).
    - `id` (string): the saga's UUID.
    - `name` (string): its definition's name.
    - `definition_version` (integer): its definition's version.
    - `key` (string or null): the business key it was started under.
    - `status` (string): `pending`, `running`, `compensating`, `completed`,
      `compensated` or `stuck`.
    - `steps` (array of strings): the definition's step names, in order.
    - `version` (integer): how many events the saga has.
    - `started_at`, `updated_at` (string): the times of its first and last event.
    - `context` (object): the context's fields as they are now.
    - `error` (object or null): the last error recorded, `{step, type, message}`
      (`step` is `""` for a passed deadline).
- `events` (array of objects): every stored event, in the saga's stream order.
    - `position` (integer or null): its place in the application's notification log.
    - `version` (integer): its place in the saga's stream, from 1.
    - `timestamp` (string or null): when it was recorded; `null` when unreadable.
    - `event` (string): the event's type (`StepFailed`, ...); the stored topic when
      unreadable.
    - `step` (string or null), `attempt` (integer or null): the step and attempt
      the event is about.
    - `status` (string or null): the saga's status right after the event.
    - `error` (object or null): `{type, message}`: the error the event records or,
      when unreadable, why it cannot be read.
    - `changes` (object): for each context field the event set or removed,
      `{before, after}`; `added: true` when the field did not exist before (`before`
      is `null`), `removed: true` when the event removed it (`after` is `null`).
      `SagaStarted` adds the initial context.
    - `details` (object): the event's other fields, e.g. `will_retry`, `delay`,
      `breaker`, `compensate` (`StepFailed`), `fallback` (`StepStarted`), `result`
      (`StepCompleted`), `took_effect` (`...Reconciled`), `action`, `by`, `reason`
      (`SagaResolved`), `deadline`; for `SagaStarted` the definition as recorded:
      `name`, `definition_version`, `steps`, `compensable`, `parallel`,
      `fallback_compensable`, `key`, `context_type`, `deadline`.
    - `readable` (boolean): `false` when the stored event cannot be decoded.
- `unreadable` (array of integers): the versions of the events that cannot be read.
- `steps` (array of objects): what happened to each step, in definition order (then
  any step only the events name), read from the readable events.
    - `step` (string): the step's name.
    - `group` (integer or null): the index of its `Parallel` group, if in one.
    - `state` (string): where the step stands: `completed`, `failed`, `compensated`,
      `stuck` (its compensation failed; a person must resolve it), `running` (its
      action or compensation is in flight or waiting to retry) or `unreached`.
    - `attempts` (array of objects): each attempt of its action, in order:
        - `attempt` (integer): the attempt's number, from 1.
        - `fallback` (boolean): the step's fallback ran instead of its action.
        - `started`, `ended` (string or null): the times of the event that started it
          and of the one that ended it; `ended` is `null` while in flight, `started`
          when its start cannot be read.
        - `start_version`, `end_version` (integer or null): those events' versions.
        - `outcome` (string): `completed`; `failed` (it raised); `cut` (its outcome was
          unknown: cut by its timeout or the saga's deadline, or interrupted by a crash
          and then failed, run again or reconciled as without effect); `cancelled` (a
          parallel sibling's failure cut it off); `in-flight` (nothing recorded yet).
        - `error` (object or null): `{type, message}` of the error that ended it.
    - `compensation` (array of objects): each attempt of its compensation, with the
      same keys but `fallback`; `outcome` is `completed`, `failed`, `cut` or
      `in-flight`.
- `diagram` (string or null): a Mermaid flowchart of the path the saga took
  (`saga_es.diagram.saga_path_diagram`); `null` when the saga's definition is not
  registered with the application, or does not match the recorded steps.
"""

from __future__ import annotations

import html
import importlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time
from typing import TYPE_CHECKING, Any
from uuid import UUID

from saga_es.aggregate import Saga
from saga_es.errors import DefinitionError, DefinitionNotFound, SagaNotFound, UnreadableEvent
from saga_es.history import EventError, HistoryRecord

if TYPE_CHECKING:
    from saga_es.application import SagaApplication

log = logging.getLogger("saga_es")

SCHEMA = "saga_es.export/1"
"""The id of the JSON document's schema (see the module's documentation)."""

COMPLETED = "completed"
FAILED = "failed"
CUT = "cut"
CANCELLED = "cancelled"
IN_FLIGHT = "in-flight"
OUTCOMES = (COMPLETED, FAILED, CUT, CANCELLED, IN_FLIGHT)
"""What an attempt (or a compensation attempt) came to."""

STEP_STATES = ("completed", "failed", "compensated", "stuck", "running", "unreached")
"""Where a step stands, as the export's `steps[].state` says."""

_CUT_ERRORS = frozenset({"StepTimeout", "OutcomeUnknown"})
"""Errors recorded for an attempt whose outcome nobody knows."""


# -- reading ---------------------------------------------------------------------------


def export_records(
    app: SagaApplication, saga_id: UUID | str
) -> tuple[Saga | None, list[HistoryRecord]]:
    """The saga (None if an event cannot be read) and one record per stored event.

    Events are decoded one by one so that an unreadable one becomes a record marked
    `readable=False` instead of hiding the rest. When no event can be read (another
    `CIPHER_KEY`, say) there is no rest to export: the error names the first event and
    the setting, as `get` and `history` do, instead of a document of nulls.
    """
    uuid = _as_uuid(saga_id)
    history = app.history(uuid, strict=False)
    if history and not any(record.readable for record in history):
        app.history(uuid)  # raises UnreadableEvent, naming the event and the setting
    saga: Saga | None = None
    if all(record.readable for record in history):
        try:
            saga = app.get(uuid)
        except UnreadableEvent:  # e.g. a snapshot that no longer decodes
            saga = None
    return saga, history


def _as_uuid(saga_id: UUID | str) -> UUID:
    """Ids come from command lines too: a malformed one names no saga."""
    if isinstance(saga_id, UUID):
        return saga_id
    try:
        return UUID(str(saga_id))
    except ValueError:
        raise SagaNotFound(saga_id) from None  # type: ignore[arg-type]


# -- the JSON document -----------------------------------------------------------------


def export_json(app: SagaApplication, saga_id: UUID | str) -> dict[str, Any]:
    """The saga as a `saga_es.export/1` document; `json.dumps` takes it as it is."""
    uuid = _as_uuid(saga_id)
    saga, history = export_records(app, uuid)
    started = _started(history)
    steps = _step_summaries(history, started, saga)
    document = {
        "schema": SCHEMA,
        "saga": _saga_fields(uuid, saga, started),
        "events": [record.to_dict() for record in history],
        "unreadable": [record.version for record in history if not record.readable],
        "steps": steps,
        "diagram": _diagram(app, uuid, saga, started, history),
    }
    plain: dict[str, Any] = _jsonable(document)
    return plain


def _saga_fields(saga_id: UUID, saga: Saga | None, started: HistoryRecord | None) -> dict[str, Any]:
    """The rebuilt saga's fields; without it, what its readable `SagaStarted` recorded."""
    fields: dict[str, Any] = {
        "id": str(saga_id),
        "name": None,
        "definition_version": None,
        "key": None,
        "status": None,
        "steps": None,
        "version": None,
        "started_at": None,
        "updated_at": None,
        "context": None,
        "error": None,
    }
    if saga is not None:
        fields.update(
            name=saga.name,
            definition_version=saga.definition_version,
            key=saga.key,
            status=saga.status,
            steps=list(saga.steps),
            version=saga.version,
            started_at=saga.created_on,
            updated_at=saga.modified_on,
            context=dict(saga.context_state),
            error=saga.error,
        )
    elif started is not None:  # what the saga was started as still reads
        recorded = started.details
        fields.update(
            name=recorded.get("name"),
            definition_version=recorded.get("definition_version"),
            key=recorded.get("key"),
            steps=list(recorded.get("steps") or []),
            started_at=started.timestamp,
        )
    return fields


def _started(history: Iterable[HistoryRecord]) -> HistoryRecord | None:
    """The readable `SagaStarted`: the definition as recorded, even if the saga cannot be."""
    for record in history:
        if record.readable and record.event == "SagaStarted":
            return record
    return None


def _diagram(
    app: SagaApplication,
    saga_id: UUID,
    saga: Saga | None,
    started: HistoryRecord | None,
    history: list[HistoryRecord],
) -> str | None:
    """The Mermaid path, when the definition is at hand; an export never fails for it."""
    try:
        module = importlib.import_module("saga_es.diagram")
    except ImportError:
        return None
    draw: Callable[..., str] | None = getattr(module, "saga_path_diagram", None)
    if draw is None:
        return None
    recorded: Mapping[str, Any] = started.details if started is not None else {}
    name = saga.name if saga is not None else recorded.get("name")
    version = saga.definition_version if saga is not None else recorded.get("definition_version")
    if not isinstance(name, str) or not isinstance(version, int):
        return None
    try:
        definition = app.definition(name, version)
    except DefinitionNotFound:
        return None
    try:
        return draw(definition, history)
    except DefinitionError:  # registered under that name and version, with other steps
        return None
    except Exception:  # a drawing must not cost the user the export
        log.warning(
            "no path diagram for saga %s", saga_id, exc_info=True, extra={"saga_id": str(saga_id)}
        )
        return None


def _jsonable(value: Any) -> Any:
    """`value` with only JSON types, so any JSON writer takes the document as it is."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, set | frozenset):
        return sorted((_jsonable(v) for v in value), key=repr)
    return str(value)


# -- per-step summary ------------------------------------------------------------------


@dataclass
class _Run:
    """One attempt of a step's action or compensation, from its start to what ended it."""

    attempt: int
    started: datetime | None
    start_version: int | None
    fallback: bool = False
    ended: datetime | None = None
    end_version: int | None = None
    outcome: str = IN_FLIGHT
    error: EventError | None = None

    def end(self, record: HistoryRecord, outcome: str, error: EventError | None = None) -> None:
        self.ended, self.end_version = record.timestamp, record.version
        self.outcome, self.error = outcome, error

    def to_dict(self, *, action: bool) -> dict[str, Any]:
        fields: dict[str, Any] = {"attempt": self.attempt}
        if action:
            fields["fallback"] = self.fallback
        fields.update(
            started=self.started,
            ended=self.ended,
            start_version=self.start_version,
            end_version=self.end_version,
            outcome=self.outcome,
            error=None if self.error is None else vars(self.error).copy(),
        )
        return fields


@dataclass
class _StepTrack:
    """A step's attempts and compensations, and where its action and undo stand."""

    group: int | None = None
    attempts: list[_Run] = field(default_factory=list)
    compensation: list[_Run] = field(default_factory=list)
    action: str | None = None  # "running", "retrying", "completed", "failed"
    undo: str | None = None  # "running", "done", "failed"

    @property
    def state(self) -> str:
        """The step's `STEP_STATES` entry: a failure outranks how it was cleaned up."""
        if self.undo == "failed":
            return "stuck"
        if self.action == "failed":
            return "failed"
        if self.undo == "done":
            return "compensated"
        if self.action == "completed" and self.undo is None:
            return "completed"
        if self.action is None and self.undo is None:
            return "unreached"
        return "running"


def _start(runs: list[_Run], record: HistoryRecord, fallback: bool = False) -> None:
    """A new attempt; one still open was interrupted and re-run by recovery: it was cut."""
    for run in runs:
        if run.outcome == IN_FLIGHT:
            run.end(record, CUT)
    runs.append(_Run(record.attempt or 0, record.timestamp, record.version, fallback))


def _open(runs: list[_Run], record: HistoryRecord) -> _Run:
    """The run `record` ends: its attempt's open run, or one whose start cannot be read."""
    for run in reversed(runs):
        if run.attempt == record.attempt and run.outcome == IN_FLIGHT:
            return run
    run = _Run(record.attempt or 0, None, None)
    runs.append(run)
    return run


def _step_summaries(
    history: list[HistoryRecord], started: HistoryRecord | None, saga: Saga | None
) -> list[dict[str, Any]]:
    tracks: dict[str, _StepTrack] = {}
    if started is not None:
        names = list(started.details.get("steps") or [])
        groups = list(started.details.get("parallel") or [])
    elif saga is not None:
        names, groups = list(saga.steps), list(saga.groups)
    else:
        names, groups = [], []
    group_of = {name: number for number, group in enumerate(groups) for name in group}
    for name in names:
        tracks[name] = _StepTrack(group_of.get(name))
    for record in history:
        if not record.readable or record.step is None:
            continue
        track = tracks.setdefault(record.step, _StepTrack(group_of.get(record.step)))
        _follow(track, record)
    return [
        {
            "step": name,
            "group": track.group,
            "state": track.state,
            "attempts": [run.to_dict(action=True) for run in track.attempts],
            "compensation": [run.to_dict(action=False) for run in track.compensation],
        }
        for name, track in tracks.items()
    ]


def _follow(track: _StepTrack, record: HistoryRecord) -> None:
    """Move the step's attempts and state on by one event."""
    event, details = record.event, record.details
    if event == "StepStarted":
        _start(track.attempts, record, bool(details.get("fallback")))
        track.action = "running"
    elif event == "StepCompleted":
        _open(track.attempts, record).end(record, COMPLETED)
        track.action = "completed"
    elif event == "StepFailed":
        kind = record.error.type if record.error else ""
        outcome = CUT if kind in _CUT_ERRORS else CANCELLED if kind == "StepCancelled" else FAILED
        _open(track.attempts, record).end(record, outcome, record.error)
        track.action = "retrying" if details.get("will_retry") else "failed"
    elif event == "StepReconciled" and not details.get("took_effect"):
        _open(track.attempts, record).end(record, CUT)
    elif event == "CompensationStarted":
        _start(track.compensation, record)
        track.undo = "running"
    elif event == "CompensationRan":
        _open(track.compensation, record).end(record, COMPLETED)
        track.undo = "done"
    elif event == "CompensationFailed":
        kind = record.error.type if record.error else ""
        outcome = CUT if kind in _CUT_ERRORS else FAILED
        _open(track.compensation, record).end(record, outcome, record.error)
        track.undo = "running" if details.get("will_retry") else "failed"
    elif event == "CompensationReconciled" and not details.get("took_effect"):
        _open(track.compensation, record).end(record, CUT)
    elif event == "SagaStuck":
        track.undo = "failed"
    elif event == "SagaResolved" and details.get("action") == "mark-compensated":
        track.undo = "done"


# -- the HTML report -------------------------------------------------------------------


def export_html(app: SagaApplication, saga_id: UUID | str) -> str:
    """The saga as one self-contained HTML page (see `render_html`)."""
    return render_html(export_json(app, saga_id))


def render_html(document: Mapping[str, Any]) -> str:
    """An HTML report of an export document: no script, no network, no file beside it.

    It holds a header, a Gantt chart of every attempt and compensation (inline SVG),
    the path through the steps (inline SVG, plus the Mermaid source when there is
    one), the context changes per event, every event, and the document itself (in a
    `<script type="application/json" id="saga-export">` block, for tools).
    """
    saga = document["saga"]
    events: list[dict[str, Any]] = list(document["events"])
    steps: list[dict[str, Any]] = list(document["steps"])
    started = next((e for e in events if e["readable"] and e["event"] == "SagaStarted"), None)
    recorded = started["details"] if started else {}
    name = saga["name"] or recorded.get("name")
    version = saga["definition_version"] or recorded.get("definition_version")
    definition = "(unknown)" if name is None else f"{name} v{version}"
    key = saga["key"] if saga["name"] is not None else recorded.get("key")
    status = saga["status"] or "unreadable"
    title = f"saga {saga['id']} · {definition}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f'<meta name="generator" content="saga_es export ({_e(document["schema"])})">',
        f"<title>{_e(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        '<header id="saga-header">',
        f"<h1>Saga <code>{_e(saga['id'])}</code></h1>",
        '<dl class="facts">',
        _fact("definition", definition, "definition"),
        _fact("key", "—" if key is None else str(key), "key"),
        _fact("status", status, "status", f"status status-{status}"),
        _fact("events", str(len(events)), "event-count"),
        _fact("started", str(saga["started_at"] or _first_time(events) or "—"), "started"),
        _fact("updated", str(saga["updated_at"] or _last_time(events) or "—"), "updated"),
        "</dl>",
    ]
    if saga["error"]:
        error = saga["error"]
        where = f" in step {error['step']}" if error.get("step") else ""
        parts.append(
            f'<p class="saga-error">Last error{_e(where)}: '
            f"<strong>{_e(error['type'])}</strong>: {_e(error['message'])}</p>"
        )
    if document["unreadable"]:
        versions = ", ".join(str(v) for v in document["unreadable"])
        parts.append(
            f'<p class="warning unreadable-warning">{len(document["unreadable"])} stored '
            f"event(s) cannot be read (version {_e(versions)}); the saga's state cannot be "
            "rebuilt, and this report shows every other event.</p>"
        )
    parts.append("</header>")
    parts += [
        '<section id="timeline">',
        "<h2>Timeline</h2>",
        _gantt(steps, events),
        _LEGEND,
        "</section>",
        '<section id="path">',
        "<h2>Path</h2>",
        _path_svg(steps),
    ]
    if document["diagram"]:
        parts += [
            "<details open><summary>Mermaid source</summary>",
            f'<pre class="mermaid-source">{_e(document["diagram"])}</pre>',
            "</details>",
        ]
    else:
        parts.append(
            '<p class="note">No Mermaid drawing: the saga\'s definition was not registered '
            "with the application that exported it.</p>"
        )
    parts += [
        "</section>",
        '<section id="context">',
        "<h2>Context changes</h2>",
        _diff_table(events),
        "<h3>Context now</h3>",
        _context_table(saga["context"]),
        "</section>",
        '<section id="event-list">',
        "<h2>Events</h2>",
        _event_table(events),
        "</section>",
        '<script type="application/json" id="saga-export">',
        _script_json(document),
        "</script>",
        "</body>",
        "</html>",
    ]
    return "\n".join(parts) + "\n"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fact(label: str, value: str, ident: str, css: str = "") -> str:
    cls = f' class="{_e(css)}"' if css else ""
    return f'<div><dt>{_e(label)}</dt><dd id="saga-{ident}"{cls}>{_e(value)}</dd></div>'


def _first_time(events: list[dict[str, Any]]) -> str | None:
    return next((e["timestamp"] for e in events if e["timestamp"]), None)


def _last_time(events: list[dict[str, Any]]) -> str | None:
    return next((e["timestamp"] for e in reversed(events) if e["timestamp"]), None)


def _script_json(document: Mapping[str, Any]) -> str:
    """The document, made safe inside `<script>`: no `<`, `>` or `&` can end the block."""
    text = json.dumps(document, default=str, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _value(value: Any) -> str:
    return json.dumps(value, default=str, ensure_ascii=False)


def _time(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.3g} ms"
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.3g} min"
    return f"{seconds / 3600:.3g} h"


# -- the Gantt chart -------------------------------------------------------------------

_OUTCOME_FILL = {
    COMPLETED: "#2e7d32",
    FAILED: "#c62828",
    CUT: "#ef6c00",
    CANCELLED: "#f59e0b",
    IN_FLIGHT: "#1565c0",
}
_COMPENSATION_FILL = "#ffb300"
_COMPENSATION_STROKE = {
    COMPLETED: "#7a4f01",
    FAILED: "#c62828",
    CUT: "#ef6c00",
    CANCELLED: "#ef6c00",
    IN_FLIGHT: "#1565c0",
}
_LABEL_WIDTH = 170
_CHART_WIDTH = 860
_ROW_HEIGHT = 44
_AXIS_HEIGHT = 30
_MIN_BAR = 4.0
_SAGA_MARKERS = ("SagaTimedOut", "SagaStuck", "SagaResolved", "SagaCompleted", "SagaCompensated")

_LEGEND = (
    '<ul class="legend">'
    + "".join(
        f'<li><span class="swatch" style="background:{fill}"></span>{_e(outcome)}</li>'
        for outcome, fill in _OUTCOME_FILL.items()
    )
    + '<li><span class="swatch fallback-swatch"></span>fallback</li>'
    + f'<li><span class="swatch" style="background:{_COMPENSATION_FILL}"></span>'
    + "compensation</li></ul>"
)


def _gantt(steps: list[dict[str, Any]], events: list[dict[str, Any]]) -> str:
    """One row per step: its attempts above, its compensations (amber) below, to scale."""
    times = [t for e in events if (t := _time(e["timestamp"])) is not None]
    width = _LABEL_WIDTH + _CHART_WIDTH + 20
    height = _AXIS_HEIGHT + _ROW_HEIGHT * max(len(steps), 1) + 10
    out = [
        f'<svg id="gantt" class="gantt" xmlns="http://www.w3.org/2000/svg" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        'aria-label="attempts and compensations of each step over time">',
        "<defs>",
        '<pattern id="fallback-stripes" patternUnits="userSpaceOnUse" width="6" height="6" '
        'patternTransform="rotate(45)"><rect width="3" height="6" fill="#ffffff" '
        'fill-opacity="0.6"/></pattern>',
        "</defs>",
    ]
    if not times:
        out.append('<text x="10" y="20">no readable event to place in time</text></svg>')
        return "\n".join(out)
    t0, t1 = min(times), max(times)
    span = max((t1 - t0).total_seconds(), 1e-6)

    def x(moment: datetime) -> float:
        return _LABEL_WIDTH + (moment - t0).total_seconds() / span * _CHART_WIDTH

    bottom = height - 10
    for tick in range(5):
        tx = _LABEL_WIDTH + _CHART_WIDTH * tick / 4
        anchor = "end" if tick == 4 else "middle"
        out.append(
            f'<line class="tick" x1="{tx:.1f}" y1="{_AXIS_HEIGHT - 6}" x2="{tx:.1f}" '
            f'y2="{bottom}" stroke="#ddd"/>'
            f'<text class="tick-label" x="{tx:.1f}" y="{_AXIS_HEIGHT - 10}" '
            f'text-anchor="{anchor}" font-size="11" fill="#555">'
            f"+{_e(_duration(span * tick / 4))}</text>"
        )
    for row, step in enumerate(steps):
        top = _AXIS_HEIGHT + row * _ROW_HEIGHT
        name = step["step"]
        shade = "#f7f7f7" if row % 2 else "#ffffff"
        group = "" if step["group"] is None else f' data-group="{step["group"]}"'
        label = name if step["group"] is None else f"∥ {name}"
        out.append(
            f'<g class="gantt-row" data-step="{_e(name)}" data-state="{_e(step["state"])}"'
            f"{group}>"
            f'<rect x="0" y="{top}" width="{width}" height="{_ROW_HEIGHT}" fill="{shade}"/>'
            f'<text class="step-label" x="8" y="{top + _ROW_HEIGHT / 2 + 4}" font-size="13" '
            f'fill="#222">{_e(label)}</text>'
        )
        for run in step["attempts"]:
            out.append(_bar(name, run, "attempt", top + 5, 18, x, t1))
        for run in step["compensation"]:
            out.append(_bar(name, run, "compensation", top + 26, 13, x, t1))
        out.append("</g>")
    for event in events:
        moment = _time(event["timestamp"])
        if event["event"] in _SAGA_MARKERS and moment is not None:
            mx = x(moment)
            out.append(
                f'<g class="marker" data-event="{_e(event["event"])}" '
                f'data-version="{event["version"]}"><title>{_e(event["event"])} '
                f"(#{event['version']}, {_e(event['timestamp'])})</title>"
                f'<line x1="{mx:.1f}" y1="{_AXIS_HEIGHT - 4}" x2="{mx:.1f}" y2="{bottom}" '
                'stroke="#555" stroke-dasharray="3 3"/></g>'
            )
    out.append("</svg>")
    return "\n".join(out)


def _bar(
    step: str,
    run: dict[str, Any],
    kind: str,
    top: float,
    height: float,
    x: Callable[[datetime], float],
    last: datetime,
) -> str:
    """One attempt as a bar from its start to its outcome; a zero-length one still shows."""
    start, end = _time(run["started"]), _time(run["ended"])
    begin = start or end or last
    finish = end or last  # in flight: up to the last event
    left = x(begin)
    bar_width = max(x(finish) - left, _MIN_BAR)
    outcome = run["outcome"]
    fallback = bool(run.get("fallback"))
    if kind == "attempt":
        fill, stroke = _OUTCOME_FILL.get(outcome, "#777"), "none"
    else:
        fill, stroke = _COMPENSATION_FILL, _COMPENSATION_STROKE.get(outcome, "#777")
    dash = ' stroke-dasharray="3 2"' if outcome in (CUT, CANCELLED, IN_FLIGHT) else ""
    if kind == "attempt" and outcome in (CUT, CANCELLED):
        stroke = "#7c2d12"
    what = "compensation" if kind == "compensation" else "fallback" if fallback else "attempt"
    lasted = f", {_duration((finish - begin).total_seconds())}" if start else ""
    tip = f"{step}: {what} {run['attempt']}: {outcome}{lasted}"
    if run["error"]:
        tip += f" — {run['error']['type']}: {run['error']['message']}"
    css = "bar compensation" if kind == "compensation" else "bar"
    if fallback:
        css += " fallback"
    parts = [
        f'<g class="{css}" data-step="{_e(step)}" data-kind="{kind}" '
        f'data-attempt="{run["attempt"]}" data-outcome="{_e(outcome)}" '
        f'data-fallback="{str(fallback).lower()}">',
        f"<title>{_e(tip)}</title>",
        f'<rect class="outcome-{_e(outcome)}" x="{left:.1f}" y="{top:.1f}" '
        f'width="{bar_width:.1f}" height="{height}" rx="2" fill="{fill}" stroke="{stroke}"'
        f"{dash}/>",
    ]
    if fallback:
        parts.append(
            f'<rect class="stripes" x="{left:.1f}" y="{top:.1f}" width="{bar_width:.1f}" '
            f'height="{height}" fill="url(#fallback-stripes)"/>'
        )
    if bar_width >= 16:
        parts.append(
            f'<text x="{left + 3:.1f}" y="{top + height - 4:.1f}" font-size="10" '
            f'fill="#fff">{run["attempt"]}</text>'
        )
    parts.append("</g>")
    return "".join(parts)


# -- the path --------------------------------------------------------------------------

_STATE_STYLE = {
    "completed": ("#d4edda", "#2e7d32", ""),
    "failed": ("#f8d7da", "#c62828", ""),
    "compensated": ("#fff3cd", "#ff8f00", ""),
    "stuck": ("#f8d7da", "#b71c1c", ' stroke-width="4"'),
    "running": ("#e1f5fe", "#0277bd", ""),
    "unreached": ("#f5f5f5", "#9e9e9e", ' stroke-dasharray="5 5"'),
}
_BOX_W, _BOX_H, _GAP_X, _GAP_Y = 150, 46, 46, 14


def _stages(steps: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Steps in definition order, a parallel group's members sharing one column."""
    stages: list[list[dict[str, Any]]] = []
    placed: dict[int, list[dict[str, Any]]] = {}
    for step in steps:
        group = step["group"]
        if group is None:
            stages.append([step])
        elif group in placed:
            placed[group].append(step)
        else:
            placed[group] = [step]
            stages.append(placed[group])
    return stages


def _path_svg(steps: list[dict[str, Any]]) -> str:
    """The steps left to right, each box coloured by where the step stands."""
    stages = _stages(steps)
    rows = max((len(stage) for stage in stages), default=1)
    width = 20 + len(stages) * (_BOX_W + _GAP_X)
    height = 20 + rows * (_BOX_H + _GAP_Y)
    out = [
        f'<svg id="path-diagram" class="path" xmlns="http://www.w3.org/2000/svg" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        'aria-label="the path the saga took through its steps">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#666"/></marker>'
        "</defs>",
    ]
    centres: list[list[tuple[float, float]]] = []
    for column, stage in enumerate(stages):
        column_left = 10.0 + column * (_BOX_W + _GAP_X)
        offset = (rows - len(stage)) * (_BOX_H + _GAP_Y) / 2
        centres.append(
            [
                (column_left, 10 + offset + row * (_BOX_H + _GAP_Y) + _BOX_H / 2)
                for row in range(len(stage))
            ]
        )
    for column in range(1, len(stages)):
        for sx, sy in centres[column - 1]:
            for tx, ty in centres[column]:
                out.append(
                    f'<line class="path-link" x1="{sx + _BOX_W:.1f}" y1="{sy:.1f}" '
                    f'x2="{tx - 2:.1f}" y2="{ty:.1f}" stroke="#666" marker-end="url(#arrow)"/>'
                )
    for stage, places in zip(stages, centres, strict=True):
        for step, (left, middle) in zip(stage, places, strict=True):
            state = step["state"]
            fill, stroke, extra = _STATE_STYLE.get(state, ("#fff", "#333", ""))
            fallback = any(run["fallback"] for run in step["attempts"])
            note = state + (" (fallback)" if fallback and state != "unreached" else "")
            tries = len(step["attempts"])
            tip = f"{step['step']}: {note}; {tries} attempt(s), "
            tip += f"{len(step['compensation'])} compensation attempt(s)"
            top = middle - _BOX_H / 2
            out.append(
                f'<g class="path-step" data-step="{_e(step["step"])}" data-state="{_e(state)}">'
                f"<title>{_e(tip)}</title>"
                f'<rect x="{left:.1f}" y="{top:.1f}" width="{_BOX_W}" height="{_BOX_H}" rx="8" '
                f'fill="{fill}" stroke="{stroke}"{extra}/>'
                f'<text x="{left + _BOX_W / 2:.1f}" y="{top + 19:.1f}" text-anchor="middle" '
                f'font-size="13" font-weight="bold" fill="#222">{_e(_clip(step["step"]))}</text>'
                f'<text x="{left + _BOX_W / 2:.1f}" y="{top + 36:.1f}" text-anchor="middle" '
                f'font-size="11" fill="{stroke}">{_e(note)}</text></g>'
            )
    out.append("</svg>")
    return "\n".join(out)


def _clip(text: str, limit: int = 20) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- the tables ------------------------------------------------------------------------


def _diff_table(events: list[dict[str, Any]]) -> str:
    rows = []
    for event in events:
        for name, change in event["changes"].items():
            kind = "added" if change.get("added") else "removed" if change.get("removed") else ""
            kind = kind or "changed"
            before = (
                '<span class="absent">absent</span>'
                if change.get("added")
                else f"<code>{_e(_value(change['before']))}</code>"
            )
            after = (
                '<span class="removed">removed</span>'
                if change.get("removed")
                else f"<code>{_e(_value(change['after']))}</code>"
            )
            rows.append(
                f'<tr class="diff diff-{kind}" data-version="{event["version"]}" '
                f'data-step="{_e(event["step"] or "")}" data-field="{_e(name)}">'
                f"<td>{event['version']}</td><td>{_e(event['event'])}</td>"
                f"<td>{_e(event['step'] or '')}</td><td>{_e(_blank(event['attempt']))}</td>"
                f'<td class="field">{_e(name)}</td>'
                f'<td class="before">{before}</td><td class="arrow">→</td>'
                f'<td class="after">{after}</td></tr>'
            )
    if not rows:
        return '<p class="note">No event changed the context.</p>'
    return (
        '<table id="context-diffs"><thead><tr><th>#</th><th>event</th><th>step</th>'
        "<th>try</th><th>field</th><th>before</th><th></th><th>after</th></tr></thead>"
        "<tbody>" + "\n".join(rows) + "</tbody></table>"
    )


def _context_table(context: Mapping[str, Any] | None) -> str:
    if context is None:
        return '<p class="note">Unknown: the saga cannot be rebuilt.</p>'
    if not context:
        return '<p class="note">Empty.</p>'
    rows = "".join(
        f'<tr data-field="{_e(name)}"><td class="field">{_e(name)}</td>'
        f"<td><code>{_e(_value(value))}</code></td></tr>"
        for name, value in context.items()
    )
    return f'<table id="context-now"><tbody>{rows}</tbody></table>'


def _blank(value: Any) -> str:
    return "" if value is None else str(value)


def _event_table(events: list[dict[str, Any]]) -> str:
    first = next((t for e in events if (t := _time(e["timestamp"])) is not None), None)
    rows = []
    for event in events:
        moment = _time(event["timestamp"])
        clock = moment.strftime("%H:%M:%S.%f")[:-3] if moment else ""
        elapsed = f"{(moment - first).total_seconds() * 1000:.1f}" if moment and first else ""
        readable = event["readable"]
        error = event["error"]
        if not readable:
            problem = f"cannot be read: {error['type']}: {error['message']}" if error else ""
            note = f'<span class="unreadable-error">⚠ {_e(problem)}</span>'
        elif error:
            note = f'<span class="error">{_e(error["type"])}: {_e(error["message"])}</span>'
        else:
            note = ""
        details = {k: v for k, v in event["details"].items() if v not in (None, False, [], {})}
        if event["event"] == "SagaStarted":
            details = {k: details[k] for k in ("steps", "parallel", "deadline") if k in details}
        shown = ", ".join(f"{k}={_value(v)}" for k, v in details.items())
        css = "event" if readable else "event unreadable"
        position = _blank(event["position"])
        rows.append(
            f'<tr class="{css}" id="event-{event["version"]}" data-version="{event["version"]}" '
            f'data-event="{_e(event["event"])}" data-readable="{str(readable).lower()}">'
            f"<td>{event['version']}</td><td>{_e(position)}</td>"
            f'<td title="{_e(event["timestamp"] or "")}">{_e(clock)}</td>'
            f'<td class="num">{_e(elapsed)}</td><td class="event-type">{_e(event["event"])}</td>'
            f"<td>{_e(event['step'] or '')}</td><td>{_e(_blank(event['attempt']))}</td>"
            f"<td>{_e(event['status'] or '')}</td><td>{note}</td>"
            f'<td class="details">{_e(shown)}</td></tr>'
        )
    return (
        '<table id="events"><thead><tr><th>#</th><th>position</th><th>time (UTC)</th>'
        "<th>+ms</th><th>event</th><th>step</th><th>try</th><th>status</th><th>error</th>"
        "<th>details</th></tr></thead><tbody>" + "\n".join(rows) + "</tbody></table>"
    )


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5rem;
  color: #222; background: #fff; }
h1 { font-size: 1.4rem; margin: 0 0 .5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
code, pre { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; }
.facts { display: flex; flex-wrap: wrap; gap: .4rem 2rem; margin: 0; }
.facts dt { font-size: .75rem; color: #666; text-transform: uppercase; }
.facts dd { margin: 0; font-weight: 600; }
.status-completed { color: #2e7d32; } .status-compensated { color: #b26a00; }
.status-stuck, .status-unreadable { color: #b71c1c; }
.status-running, .status-pending, .status-compensating { color: #0277bd; }
.saga-error { color: #b71c1c; }
.warning { background: #fde2e2; border: 1px solid #c62828; padding: .5rem .75rem; }
.note { color: #666; font-style: italic; }
svg { max-width: 100%; height: auto; display: block; }
.legend { list-style: none; padding: 0; display: flex; gap: 1rem; font-size: .85rem; }
.swatch { display: inline-block; width: 14px; height: 10px; margin-right: .3rem; }
.fallback-swatch { background: repeating-linear-gradient(45deg, #2e7d32 0 3px, #a5d6a7 3px 6px); }
table { border-collapse: collapse; margin: .5rem 0; font-size: .85rem; }
th, td { border: 1px solid #ddd; padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; } td.arrow { color: #888; }
td.details { color: #555; max-width: 28rem; word-break: break-word; }
td code { white-space: pre-wrap; word-break: break-word; }
tr.unreadable { background: #fde2e2; }
.unreadable-error, .error { color: #b71c1c; }
.absent, .removed { color: #888; font-style: italic; }
pre.mermaid-source { background: #f6f8fa; padding: .75rem; overflow-x: auto; font-size: .8rem; }
"""
