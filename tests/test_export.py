"""Export: the versioned JSON document and the self-contained HTML report, on every store."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from eventsourcing.persistence import StoredEvent

from saga_es import Parallel, Retry, Saga, SagaApplication, SagaDefinition, SagaNotFound, Step
from saga_es.export import SCHEMA, export_html, export_json, export_records, render_html

HANG = 10.0
"""Seconds a hanging parallel member would sleep; it is cancelled long before."""


class Declined(Exception):
    pass


class Shop:
    """Steps that record their work in the context, failing where told."""

    def __init__(self) -> None:
        self.fail: set[str] = set()
        self.fail_undo: set[str] = set()

    def do(self, step: str) -> Callable[[Any, str], Any]:
        def action(context: Any, key: str) -> Any:
            if step in self.fail:
                raise Declined(f"{step} declined")
            context[step] = "done"
            return f"{step}-ref"

        return action

    def undo(self, step: str) -> Callable[[Any, str], Any]:
        def compensation(context: Any, key: str) -> None:
            if step in self.fail_undo:
                raise Declined(f"cannot undo {step}")
            context[step] = "undone"

        return compensation

    def definition(self, steps: str = "abc", name: str = "trip", **policies: Any) -> SagaDefinition:
        return SagaDefinition(
            name,
            [Step(s, self.do(s), self.undo(s), **policies.get(s, {})) for s in steps],
        )


def attempts(document: dict[str, Any]) -> dict[str, list[tuple[int, str]]]:
    """Each step's (attempt, outcome) pairs."""
    return {
        s["step"]: [(a["attempt"], a["outcome"]) for a in s["attempts"]] for s in document["steps"]
    }


def compensations(document: dict[str, Any]) -> dict[str, list[tuple[int, str]]]:
    return {
        s["step"]: [(a["attempt"], a["outcome"]) for a in s["compensation"]]
        for s in document["steps"]
    }


def states(document: dict[str, Any]) -> dict[str, str]:
    return {s["step"]: s["state"] for s in document["steps"]}


def domain_events(app: SagaApplication, saga_id: UUID) -> list[Any]:
    """The saga's events, decoded straight from the store."""
    return [app.mapper.to_domain_event(s) for s in app.recorder.select_events(saga_id)]


def check_document(app: SagaApplication, document: dict[str, Any], saga_id: UUID) -> None:
    """What every export of a readable saga holds: the schema, the stream, plain JSON."""
    assert json.loads(json.dumps(document)) == document  # plain JSON: no default= needed
    assert document["schema"] == SCHEMA == "saga_es.export/1"
    assert set(document) == {"schema", "saga", "events", "unreadable", "steps", "diagram"}
    history = domain_events(app, saga_id)
    events = document["events"]
    assert [e["event"] for e in events] == [type(e).__name__ for e in history]
    assert [e["version"] for e in events] == list(range(1, len(history) + 1))
    assert [e["status"] for e in events] == [e.to_state for e in history]
    assert [e["timestamp"] for e in events] == [e.timestamp.isoformat() for e in history]
    positions = [e["position"] for e in events]
    assert all(isinstance(p, int) for p in positions)
    assert positions == sorted(positions)
    assert all(e["readable"] for e in events)
    assert document["unreadable"] == []
    saga = app.get(saga_id)
    assert document["saga"]["id"] == str(saga_id)
    assert document["saga"]["status"] == saga.status
    assert document["saga"]["version"] == saga.version == len(history)
    assert document["saga"]["steps"] == saga.steps
    assert [s["step"] for s in document["steps"]] == saga.steps
    assert document["saga"]["started_at"] == history[0].timestamp.isoformat()
    assert document["saga"]["updated_at"] == history[-1].timestamp.isoformat()
    for step in document["steps"]:
        for run in step["attempts"] + step["compensation"]:
            started, ended = run["started"], run["ended"]
            if started is not None and ended is not None:
                assert datetime.fromisoformat(started) <= datetime.fromisoformat(ended)


# -- JSON ------------------------------------------------------------------------------


def test_a_completed_saga_exports_its_events_steps_context_and_diagram(
    app: SagaApplication,
) -> None:
    saga = app.run(Shop().definition(), {"order": 7}, key="k-1")
    document = export_json(app, saga.id)
    check_document(app, document, saga.id)
    assert document["saga"] == {
        "id": str(saga.id),
        "name": "trip",
        "definition_version": 1,
        "key": "k-1",
        "status": "completed",
        "steps": ["a", "b", "c"],
        "version": 8,
        "started_at": document["saga"]["started_at"],
        "updated_at": document["saga"]["updated_at"],
        "context": {"order": 7, "a": "done", "b": "done", "c": "done"},
        "error": None,
    }
    assert attempts(document) == {
        "a": [(1, "completed")],
        "b": [(1, "completed")],
        "c": [(1, "completed")],
    }
    assert compensations(document) == {"a": [], "b": [], "c": []}
    assert states(document) == {"a": "completed", "b": "completed", "c": "completed"}
    first = document["steps"][0]["attempts"][0]
    assert (first["start_version"], first["end_version"], first["fallback"]) == (2, 3, False)
    assert first["error"] is None
    # The context diff of each event, from the initial context on.
    changes = {e["version"]: e["changes"] for e in document["events"] if e["changes"]}
    assert changes[1] == {"order": {"before": None, "after": 7, "added": True}}
    assert changes[3] == {"a": {"before": None, "after": "done", "added": True}}
    assert document["events"][2]["details"] == {"result": "a-ref"}
    assert document["diagram"] is not None
    assert document["diagram"].startswith("flowchart LR")


def test_a_saga_compensated_after_retries_lists_every_attempt(app: SagaApplication) -> None:
    shop = Shop()
    shop.fail = {"b"}
    definition = shop.definition(b={"retry": Retry(attempts=3, delay=0, jitter=0)})
    saga = app.run(definition, {})
    assert saga.status == "compensated"
    document = export_json(app, saga.id)
    check_document(app, document, saga.id)
    assert attempts(document) == {
        "a": [(1, "completed")],
        "b": [(1, "failed"), (2, "failed"), (3, "failed")],
        "c": [],
    }
    assert compensations(document) == {"a": [(1, "completed")], "b": [], "c": []}
    assert states(document) == {"a": "compensated", "b": "failed", "c": "unreached"}
    (b,) = [s for s in document["steps"] if s["step"] == "b"]
    assert {run["error"]["type"] for run in b["attempts"]} == {"Declined"}
    assert [
        e["details"].get("will_retry") for e in document["events"] if e["event"] == "StepFailed"
    ] == [
        True,
        True,
        False,
    ]
    assert document["saga"]["error"] == {"step": "b", "type": "Declined", "message": "b declined"}
    assert document["saga"]["context"] == {"a": "undone"}
    undo = [e for e in document["events"] if e["event"] == "CompensationRan"]
    assert undo[0]["changes"] == {"a": {"before": "done", "after": "undone"}}


def test_a_parallel_saga_exports_completed_failed_and_cancelled_members(
    app: SagaApplication,
) -> None:
    shop = Shop()
    b_done = asyncio.Event()

    async def b(context: Any, key: str) -> Any:
        await asyncio.sleep(0)
        context["b"] = "done"
        b_done.set()

    async def hanging(context: Any, key: str) -> Any:
        await asyncio.sleep(HANG)

    async def f(context: Any, key: str) -> Any:
        await b_done.wait()
        raise Declined("f declined")

    definition = SagaDefinition(
        "group",
        [
            Step("a", shop.do("a"), shop.undo("a")),
            Parallel(
                Step("b", b, shop.undo("b")),
                Step("x", hanging, shop.undo("x")),
                Step("f", f, shop.undo("f")),
            ),
            Step("z", shop.do("z")),
        ],
    )
    began = time.monotonic()
    saga = app.run(definition, {})
    assert time.monotonic() - began < HANG / 2
    assert saga.status == "compensated"
    document = export_json(app, saga.id)
    check_document(app, document, saga.id)
    assert attempts(document) == {
        "a": [(1, "completed")],
        "b": [(1, "completed")],
        "x": [(1, "cancelled")],
        "f": [(1, "failed")],
        "z": [],
    }
    assert compensations(document) == {
        "a": [(1, "completed")],
        "b": [(1, "completed")],
        "x": [(1, "completed")],
        "f": [],
        "z": [],
    }
    assert {s["step"]: s["group"] for s in document["steps"]} == {
        "a": None,
        "b": 0,
        "x": 0,
        "f": 0,
        "z": None,
    }
    assert states(document) == {
        "a": "compensated",
        "b": "compensated",
        "x": "failed",
        "f": "failed",
        "z": "unreached",
    }
    members = [s for s in document["steps"] if s["group"] == 0]
    starts = {datetime.fromisoformat(s["attempts"][0]["started"]) for s in members}
    ends = [datetime.fromisoformat(s["attempts"][0]["ended"]) for s in members]
    assert max(starts) <= min(ends)  # the members' bars overlap: they ran at once


def test_a_stuck_saga_exports_its_failed_compensations(app: SagaApplication) -> None:
    shop = Shop()
    shop.fail, shop.fail_undo = {"c"}, {"a"}
    definition = shop.definition(a={"compensation_retry": Retry(attempts=2, delay=0, jitter=0)})
    saga = app.run(definition, {})
    assert saga.status == "stuck"
    document = export_json(app, saga.id)
    check_document(app, document, saga.id)
    assert attempts(document) == {
        "a": [(1, "completed")],
        "b": [(1, "completed")],
        "c": [(1, "failed")],
    }
    assert compensations(document) == {
        "a": [(1, "failed"), (2, "failed")],
        "b": [(1, "completed")],
        "c": [],
    }
    assert states(document) == {"a": "stuck", "b": "compensated", "c": "failed"}
    (a,) = [s for s in document["steps"] if s["step"] == "a"]
    assert a["compensation"][-1]["error"] == {"type": "Declined", "message": "cannot undo a"}
    assert "fallback" not in a["compensation"][0]
    assert document["events"][-1]["event"] == "SagaStuck"
    assert document["saga"]["error"] == {
        "step": "a",
        "type": "Declined",
        "message": "cannot undo a",
    }


def test_cut_fallback_and_interrupted_attempts_have_their_own_outcome(
    app: SagaApplication,
) -> None:
    shop = Shop()

    async def slow(context: Any, key: str) -> Any:
        await asyncio.sleep(HANG)

    definition = SagaDefinition(
        "cut",
        [
            Step("a", shop.do("a"), shop.undo("a")),
            Step("ship", slow, timeout=0.05, recovery="fail", fallback=shop.do("courier")),
        ],
    )
    saga = app.run(definition, {})
    document = export_json(app, saga.id)
    check_document(app, document, saga.id)
    # A cut attempt's outcome is unknown, so no fallback runs: recovery="fail" fails it.
    assert attempts(document)["ship"] == [(1, "cut")]
    (ship,) = [s for s in document["steps"] if s["step"] == "ship"]
    assert ship["attempts"][0]["error"]["type"] == "StepTimeout"

    shop.fail = {"pay"}
    definition = SagaDefinition(
        "fallback", [Step("pay", shop.do("pay"), fallback=shop.do("voucher"))]
    )
    saga = app.run(definition, {})
    assert saga.status == "completed"
    document = export_json(app, saga.id)
    (pay,) = document["steps"]
    assert [(r["attempt"], r["outcome"], r["fallback"]) for r in pay["attempts"]] == [
        (1, "failed", False),
        (2, "completed", True),
    ]

    # A stream as recovery writes it: attempt 1 was re-run after a crash, attempt 2
    # reconciled as without effect, attempt 3 completed; b's outcome was unknown.
    forged = Saga.start(
        id=uuid4(),
        name="forged",
        definition_version=1,
        steps=["a", "b"],
        compensable=["a", "b"],
        key=None,
        context_type="builtins:dict",
        context={},
    )
    forged.start_step("a", 1)
    forged.start_step("a", 2)
    forged.reconcile_step("a", 2, took_effect=False)
    forged.start_step("a", 3)
    forged.complete_step("a", 3, changes={"a": 1}, removed=[])
    forged.start_step("b", 1)
    forged.fail_step(
        "b", 1, error_type="OutcomeUnknown", error_message="gone", will_retry=False, compensate=True
    )
    forged.start_compensation("b", 1)
    forged.start_compensation("b", 2)
    app.recorder.insert_events([app.mapper.to_stored_event(e) for e in forged.collect_events()])
    document = export_json(app, forged.id)
    check_document(app, document, forged.id)
    assert attempts(document) == {
        "a": [(1, "cut"), (2, "cut"), (3, "completed")],
        "b": [(1, "cut")],
    }
    assert compensations(document) == {"a": [], "b": [(1, "cut"), (2, "in-flight")]}
    assert states(document) == {"a": "completed", "b": "failed"}
    (b,) = [s for s in document["steps"] if s["step"] == "b"]
    assert b["compensation"][1]["ended"] is None
    assert b["compensation"][1]["end_version"] is None
    assert document["diagram"] is None  # "forged" is not a registered definition


def test_values_json_cannot_hold_are_written_as_strings(app: SagaApplication) -> None:
    when = datetime(2024, 5, 17, 9, 30, tzinfo=UTC)
    ref = uuid4()
    definition = SagaDefinition("values", [Step("a", Shop().do("a"))], deadline=3600)
    saga = app.run(definition, {"when": when, "amount": Decimal("9.99"), "ref": ref})
    document = export_json(app, saga.id)
    check_document(app, document, saga.id)
    assert document["saga"]["context"] == {
        "when": when.isoformat(),
        "amount": "9.99",
        "ref": str(ref),
        "a": "done",
    }
    deadline = document["events"][0]["details"]["deadline"]
    assert datetime.fromisoformat(deadline) > datetime.fromisoformat(
        document["events"][0]["timestamp"]
    )


def test_an_unknown_saga_is_not_found(app: SagaApplication) -> None:
    missing = uuid4()
    with pytest.raises(SagaNotFound, match=str(missing)):
        export_json(app, missing)
    with pytest.raises(SagaNotFound):
        export_html(app, str(missing))
    with pytest.raises(SagaNotFound):
        export_records(app, "not-a-uuid")


def test_ids_are_accepted_as_strings(app: SagaApplication) -> None:
    saga = app.run(Shop().definition("a"), {})
    assert export_json(app, str(saga.id)) == export_json(app, saga.id)


SAGA_FIELDS = (
    "id",
    "name",
    "definition_version",
    "key",
    "status",
    "steps",
    "version",
    "started_at",
    "updated_at",
    "context",
    "error",
)

UNREADABLE: dict[str, tuple[str, bytes | None]] = {
    # An event type from a newer saga_es: well-formed, but unknown here.
    "unknown-topic": ("saga_es:StepSkipped", None),
    # Unknown, and nothing like an event.
    "unknown-topic-garbage": ("saga_es:Teleported", b"{}"),
    # A known type whose bytes were damaged after they were written.
    "corrupt-state": (Saga.StepCompleted.TOPIC, b"\x00\x9c garbled"),
}


def append_unreadable(app: SagaApplication, saga_id: UUID, kind: str) -> int:
    """Append a stored event no reader can decode; its version."""
    version = app.get(saga_id).version + 1
    topic, state = UNREADABLE[kind]
    if state is None:
        event = Saga.StepStarted(  # type: ignore[call-arg]
            originator_id=saga_id,
            originator_version=version,
            timestamp=Saga.StepStarted.create_timestamp(),
            to_state="running",
            step="b",
            attempt=9,
        )
        state = app.mapper.to_stored_event(event).state
    app.recorder.insert_events([StoredEvent(saga_id, version, topic, state)])
    return version


@pytest.mark.parametrize("kind", UNREADABLE)
def test_an_unreadable_event_is_marked_and_the_rest_still_exports(
    app: SagaApplication, kind: str
) -> None:
    shop = Shop()
    shop.fail = {"b"}
    saga = app.run(shop.definition(), {"order": 1})
    readable = [type(e).__name__ for e in domain_events(app, saga.id)]
    version = append_unreadable(app, saga.id, kind)

    saga_state, history = export_records(app, saga.id)
    assert saga_state is None
    assert [r.readable for r in history] == [True] * len(readable) + [False]

    document = export_json(app, saga.id)
    assert json.loads(json.dumps(document)) == document
    assert document["schema"] == SCHEMA
    assert document["unreadable"] == [version]
    events = document["events"]
    assert [e["event"] for e in events[:-1]] == readable
    assert [e["version"] for e in events] == list(range(1, version + 1))
    bad = events[-1]
    assert bad["readable"] is False
    assert bad["event"] == UNREADABLE[kind][0]
    assert bad["timestamp"] is None
    assert bad["error"]["type"]
    assert bad["error"]["message"]
    assert isinstance(bad["position"], int)
    # The saga cannot be rebuilt without it: its id and what it was started as are known.
    assert document["saga"]["id"] == str(saga.id)
    assert set(document["saga"]) == set(SAGA_FIELDS)
    recorded = {"name", "definition_version", "key", "steps", "started_at"}
    unknown = {k: v for k, v in document["saga"].items() if k not in {"id", *recorded}}
    assert set(unknown.values()) == {None}
    assert {k: document["saga"][k] for k in recorded} == {
        "name": saga.name,
        "definition_version": saga.definition_version,
        "key": saga.key,
        "steps": saga.steps,
        "started_at": saga.created_on.isoformat(),
    }
    # The steps are still read from the readable events, in the recorded order.
    assert attempts(document) == {"a": [(1, "completed")], "b": [(1, "failed")], "c": []}
    assert compensations(document) == {"a": [(1, "completed")], "b": [], "c": []}
    # The diagram is drawn from the readable events too.
    assert document["diagram"] is not None

    page = export_html(app, saga.id)
    report = parse(page)
    (row,) = report.select("tr", cls="unreadable")
    assert row["data-version"] == str(version)
    assert row["data-readable"] == "false"
    assert report.text_of(row).count(bad["error"]["type"]) == 1
    assert report.select("p", cls="unreadable-warning")
    assert len(report.select("tr", cls="event")) == version


def test_an_unreadable_first_event_leaves_the_steps_in_the_order_they_appear(
    app: SagaApplication,
) -> None:
    forged = Saga.start(
        id=uuid4(),
        name="forged",
        definition_version=1,
        steps=["a", "b"],
        compensable=["a", "b"],
        key=None,
        context_type="builtins:dict",
        context={},
    )
    forged.start_step("a", 1)
    forged.complete_step("a", 1, changes={"a": 1}, removed=[])
    forged.start_step("b", 1)
    stored = [app.mapper.to_stored_event(e) for e in forged.collect_events()]
    stored[0] = StoredEvent(forged.id, 1, stored[0].topic, b"\x00 garbled")
    app.recorder.insert_events(stored)
    document = export_json(app, forged.id)
    assert document["unreadable"] == [1]
    assert attempts(document) == {"a": [(1, "completed")], "b": [(1, "in-flight")]}
    assert states(document) == {"a": "completed", "b": "running"}
    # The changes are counted from an unknown initial context.
    assert document["events"][2]["changes"] == {"a": {"before": None, "after": 1, "added": True}}
    assert document["diagram"] is None
    report = parse(render_html(document))
    assert report.text_of(report.by_id("saga-definition")) == "(unknown)"
    assert report.text_of(report.by_id("saga-status")) == "unreadable"
    assert bars(report) == [("a", "1", "completed"), ("b", "1", "in-flight")]
    assert [r["data-version"] for r in report.select("tr", cls="unreadable")] == ["1"]


# -- HTML ------------------------------------------------------------------------------


class Report(HTMLParser):
    """The elements of a page, with their attributes and the text inside each."""

    VOID = frozenset({"meta", "br", "img", "input", "link", "hr", "col", "source", "wbr"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[dict[str, Any]] = []
        self.open: list[dict[str, Any]] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element: dict[str, Any] = {"tag": tag, **{k: v or "" for k, v in attrs}, "_text": []}
        self.elements.append(element)
        if tag not in self.VOID:
            self.open.append(element)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append({"tag": tag, **{k: v or "" for k, v in attrs}, "_text": []})

    def handle_endtag(self, tag: str) -> None:
        if tag in self.VOID:
            return
        if not self.open or self.open[-1]["tag"] != tag:
            self.errors.append(f"</{tag}> closes {self.open[-1]['tag'] if self.open else None}")
            return
        self.open.pop()

    def handle_data(self, data: str) -> None:
        for element in self.open:
            element["_text"].append(data)

    def select(self, tag: str | None = None, cls: str | None = None, **attrs: str) -> list[Any]:
        found = []
        for element in self.elements:
            if tag is not None and element["tag"] != tag:
                continue
            if cls is not None and cls not in element.get("class", "").split():
                continue
            if all(element.get(k.replace("_", "-")) == v for k, v in attrs.items()):
                found.append(element)
        return found

    def by_id(self, ident: str) -> dict[str, Any]:
        (element,) = [e for e in self.elements if e.get("id") == ident]
        return element

    @staticmethod
    def text_of(element: dict[str, Any]) -> str:
        return "".join(element["_text"])


def parse(page: str) -> Report:
    report = Report()
    report.feed(page)
    report.close()
    assert report.errors == []
    assert report.open == []
    return report


def bars(report: Report, kind: str = "attempt") -> list[tuple[str, str, str]]:
    return [
        (b["data-step"], b["data-attempt"], b["data-outcome"])
        for b in report.select("g", cls="bar", data_kind=kind)
    ]


def check_self_contained(page: str) -> None:
    """Nothing is fetched: no external script, style, image, font or link."""
    report = parse(page)
    assert not report.select("link")
    assert not report.select("img")
    assert not report.select("iframe")
    for script in report.select("script"):
        assert "src" not in script
        assert script["type"] == "application/json"
    stripped = page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "http://" not in stripped
    assert "https://" not in stripped
    assert "url(#" in page  # local references only
    assert "@import" not in page


def test_the_html_report_holds_the_chart_path_diffs_and_events(app: SagaApplication) -> None:
    shop = Shop()
    shop.fail = {"b"}
    definition = shop.definition(b={"retry": Retry(attempts=2, delay=0, jitter=0)})
    saga = app.run(definition, {"order": "<script>alert(1)</script>"}, key="K&<1>")
    page = export_html(app, saga.id)
    assert page.startswith("<!DOCTYPE html>")
    check_self_contained(page)
    report = parse(page)

    assert report.text_of(report.by_id("saga-status")) == "compensated"
    assert report.text_of(report.by_id("saga-key")) == "K&<1>"
    assert report.text_of(report.by_id("saga-definition")) == "trip v1"
    assert str(saga.id) in report.text_of(report.select("h1")[0])

    assert bars(report) == [
        ("a", "1", "completed"),
        ("b", "1", "failed"),
        ("b", "2", "failed"),
    ]
    assert bars(report, "compensation") == [("a", "1", "completed")]
    widths = [
        float(rect["width"])
        for rect in report.select("rect")
        if "outcome-" in rect.get("class", "")
    ]
    assert len(widths) == 4
    assert min(widths) >= 4  # zero-length attempts still show
    tips = [report.text_of(t) for t in report.select("title")]
    assert any("b: attempt 2: failed" in tip and "Declined: b declined" in tip for tip in tips)
    rows = {r["data-step"]: r["data-state"] for r in report.select("g", cls="gantt-row")}
    assert rows == {"a": "compensated", "b": "failed", "c": "unreached"}

    path = {p["data-step"]: p["data-state"] for p in report.select("g", cls="path-step")}
    assert path == {"a": "compensated", "b": "failed", "c": "unreached"}
    (mermaid,) = report.select("pre", cls="mermaid-source")
    assert report.text_of(mermaid) == export_json(app, saga.id)["diagram"]

    diffs = [
        (d["data-version"], d["data-field"], report.text_of(d))
        for d in report.select("tr", cls="diff")
    ]
    assert [(v, f) for v, f, _ in diffs] == [("1", "order"), ("3", "a"), ("9", "a")]
    assert "absent" in diffs[1][2]
    assert '"done"' in diffs[1][2]
    assert '"done"→"undone"' in diffs[2][2].replace(" ", "")
    assert "<script>alert(1)</script>" not in page  # escaped, yet shown as it is
    assert '"<script>alert(1)</script>"' in diffs[0][2]

    events = report.select("tr", cls="event")
    assert [e["data-event"] for e in events] == [
        type(e).__name__ for e in domain_events(app, saga.id)
    ]
    assert not report.select("tr", cls="unreadable")
    assert not report.select("p", cls="unreadable-warning")
    embedded = json.loads(report.text_of(report.by_id("saga-export")))
    assert embedded == export_json(app, saga.id)


def test_the_html_report_of_a_parallel_and_a_stuck_saga(app: SagaApplication) -> None:
    shop = Shop()
    shop.fail, shop.fail_undo = {"d"}, {"a"}
    definition = SagaDefinition(
        "mixed",
        [
            Step("a", shop.do("a"), shop.undo("a")),
            Parallel(
                Step("b", shop.do("b"), shop.undo("b")), Step("c", shop.do("c"), shop.undo("c"))
            ),
            Step("d", shop.do("d"), shop.undo("d")),
        ],
    )
    saga = app.run(definition, {})
    assert saga.status == "stuck"
    report = parse(export_html(app, saga.id))
    assert sorted(bars(report)) == [
        ("a", "1", "completed"),
        ("b", "1", "completed"),
        ("c", "1", "completed"),
        ("d", "1", "failed"),
    ]
    assert bars(report, "compensation") == [
        ("a", "1", "failed"),
        ("b", "1", "completed"),
        ("c", "1", "completed"),
    ]
    path = {p["data-step"]: p["data-state"] for p in report.select("g", cls="path-step")}
    assert path == {"a": "stuck", "b": "compensated", "c": "compensated", "d": "failed"}
    groups = {r["data-step"]: r.get("data-group") for r in report.select("g", cls="gantt-row")}
    assert groups == {"a": None, "b": "0", "c": "0", "d": None}
    assert report.text_of(report.by_id("saga-status")) == "stuck"
    assert [m["data-event"] for m in report.select("g", cls="marker")] == ["SagaStuck"]


def test_the_report_does_without_a_definition_or_the_diagram_module(
    app: SagaApplication, monkeypatch: pytest.MonkeyPatch
) -> None:
    saga = app.run(Shop().definition(), {})
    app.definitions.clear()  # as an application that never registered it
    document = export_json(app, saga.id)
    assert document["diagram"] is None
    report = parse(render_html(document))
    assert not report.select("pre", cls="mermaid-source")
    assert len(report.select("g", cls="path-step")) == 3

    app.register(Shop().definition("xy"))  # the same name and version, other steps
    assert export_json(app, saga.id)["diagram"] is None

    app.register(Shop().definition())
    assert export_json(app, saga.id)["diagram"] is not None
    monkeypatch.setitem(sys.modules, "saga_es.diagram", None)  # as if it were not there
    assert export_json(app, saga.id)["diagram"] is None


def test_step_names_are_escaped_in_the_report(app: SagaApplication) -> None:
    shop = Shop()
    definition = SagaDefinition("odd <names>", [Step('x"><b>', shop.do("x"))])
    saga = app.run(definition, {})
    page = export_html(app, saga.id)
    report = parse(page)
    assert "<b>" not in page
    assert [b["data-step"] for b in report.select("g", cls="bar")] == ['x"><b>']
    assert report.text_of(report.by_id("saga-definition")) == "odd <names> v1"


# -- rendered by a browser -------------------------------------------------------------


def chromium() -> str:
    """Debian's chromium; `scripts/test` installs it, so its absence is a failure."""
    path = shutil.which("chromium")
    if path is None:
        pytest.fail(
            "chromium is not installed, so the HTML report cannot be rendered: run "
            "scripts/test (it installs it) or `apt-get install chromium`"
        )
    return path


def run_chromium(*args: str) -> subprocess.CompletedProcess[str]:
    command = [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)


@pytest.mark.parametrize("store", ["popo"])
def test_chromium_renders_the_report(app: SagaApplication, tmp_path: Path) -> None:
    shop = Shop()
    shop.fail = {"pay"}
    definition = SagaDefinition(
        "order",
        [
            Step("reserve", shop.do("reserve"), shop.undo("reserve")),
            Step(
                "pay",
                shop.do("pay"),
                retry=Retry(attempts=2, delay=0, jitter=0),
                fallback=shop.do("voucher"),
            ),
            Step("ship", shop.do("ship"), shop.undo("ship")),
        ],
    )
    saga = app.run(definition, {"order": 42})
    assert saga.status == "completed"
    page = tmp_path / "report.html"
    page.write_text(export_html(app, saga.id), encoding="utf-8")

    dumped = run_chromium("--dump-dom", page.as_uri()).stdout
    report = parse(dumped)
    assert bars(report) == [
        ("reserve", "1", "completed"),
        ("pay", "1", "failed"),
        ("pay", "2", "failed"),
        ("pay", "3", "completed"),
        ("ship", "1", "completed"),
    ]
    fallbacks = [b["data-attempt"] for b in report.select("g", cls="fallback")]
    assert fallbacks == ["3"]
    diffs = [(d["data-field"], d["data-step"]) for d in report.select("tr", cls="diff")]
    assert diffs == [("order", ""), ("reserve", "reserve"), ("voucher", "pay"), ("ship", "ship")]
    path = {p["data-step"]: p["data-state"] for p in report.select("g", cls="path-step")}
    assert path == {"reserve": "completed", "pay": "completed", "ship": "completed"}
    assert report.text_of(report.by_id("saga-status")) == "completed"

    screenshot = tmp_path / "report.png"
    run_chromium(
        "--hide-scrollbars", "--window-size=1280,1400", f"--screenshot={screenshot}", page.as_uri()
    )
    image = screenshot.read_bytes()
    assert image.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(image) > 20_000  # a blank page of that size is a few kilobytes
