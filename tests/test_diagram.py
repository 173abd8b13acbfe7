"""The drawings say what the code does: the machine's transitions, the definition's steps,
and the path a real saga took (sagas here are run, not made up).

Mermaid itself (mermaid-cli, on node) is not available to the test suite, so the output is
checked for structure instead: every edge joins declared nodes, subgraphs are closed,
labels are quoted and hold no bare quote, and classes name declared nodes and classes.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import pytest

from saga_es import (
    TERMINAL_STATES,
    CircuitBreaker,
    DefinitionError,
    Parallel,
    Retry,
    Saga,
    SagaApplication,
    SagaDefinition,
    Step,
)
from saga_es.diagram import (
    CLASS_DEFS,
    definition_diagram,
    escape,
    machine_diagram,
    machine_transitions,
    saga_path_diagram,
)
from saga_es.history import HistoryRecord, records
from saga_es.machine import MACHINE, TRANSITIONS

# -- a small Mermaid flowchart reader ---------------------------------------------------------

LABEL = r'"(?:[^"\n])*"'
NODE = re.compile(
    r"^(?P<id>\w+)(?P<open>\(\[|\[\[|\[|\()(?P<label>" + LABEL + r")(?P<close>\]\)|\]\]|\]|\))$"
)
EDGE = re.compile(
    r"^(?P<source>\w+) (?:-->|-\.->|-\. (?P<dashed>"
    + LABEL
    + r") \.->|-- (?P<solid>"
    + LABEL
    + r") -->) (?P<target>\w+)$"
)
SUBGRAPH = re.compile(r"^subgraph (?P<id>\w+) \[(?P<label>" + LABEL + r")\]$")
CLASS_DEF = re.compile(r"^classDef (?P<name>\w+) (?P<style>[\w#:.,\- ]+)$")
CLASS = re.compile(r"^class (?P<ids>\w+(?:,\w+)*) (?P<name>\w+)$")
LINK_STYLE = re.compile(r"^linkStyle (?P<numbers>\d+(?:,\d+)*) (?P<style>[\w#:.,\- ]+)$")
SHAPES = {"([": "])", "[[": "]]", "[": "]", "(": ")"}
RESERVED = {"end", "graph", "subgraph", "class", "classDef", "style", "linkStyle", "flowchart"}


class Flowchart:
    """What a flowchart declares; the reader fails on any line it does not understand."""

    def __init__(self, text: str) -> None:
        lines = text.split("\n")
        assert lines[0] == "flowchart LR"
        self.labels: dict[str, str] = {}
        self.parent: dict[str, str | None] = {}
        self.edges: list[tuple[str, str, str | None, bool]] = []
        self.subgraphs: dict[str, str] = {}
        self.class_defs: dict[str, str] = {}
        self.classes: dict[str, str] = {}
        self.link_styles: dict[int, str] = {}
        open_subgraphs: list[str] = []
        for line in lines[1:]:
            assert line == line.rstrip(), f"trailing whitespace: {line!r}"
            assert line.strip(), "an empty line"
            body = line.strip()
            if m := NODE.match(body):
                assert SHAPES[m["open"]] == m["close"], line
                assert m["id"] not in self.labels, f"declared twice: {line}"
                assert m["id"] not in RESERVED
                self.labels[m["id"]] = unquote(m["label"])
                self.parent[m["id"]] = open_subgraphs[-1] if open_subgraphs else None
            elif m := EDGE.match(body):
                label = m["dashed"] or m["solid"]
                dashed = "-." in body
                self.edges.append(
                    (m["source"], m["target"], unquote(label) if label else None, dashed)
                )
            elif m := SUBGRAPH.match(body):
                assert not open_subgraphs, "subgraphs are not nested"
                open_subgraphs.append(m["id"])
                self.subgraphs[m["id"]] = unquote(m["label"])
            elif body == "end":
                assert open_subgraphs, "`end` without a subgraph"
                open_subgraphs.pop()
            elif m := CLASS_DEF.match(body):
                self.class_defs[m["name"]] = m["style"]
            elif m := CLASS.match(body):
                for node in m["ids"].split(","):
                    assert node not in self.classes, f"{node} classed twice"
                    self.classes[node] = m["name"]
            elif m := LINK_STYLE.match(body):
                for number in m["numbers"].split(","):
                    self.link_styles[int(number)] = m["style"]
            else:
                pytest.fail(f"not a line this module writes: {line!r}")
        assert not open_subgraphs, "a subgraph is not closed"
        for source, target, _, _ in self.edges:
            assert source in self.labels, f"edge from undeclared {source}"
            assert target in self.labels, f"edge to undeclared {target}"
        for node, name in self.classes.items():
            assert node in self.labels, f"class on undeclared {node}"
            assert name in self.class_defs, f"undefined class {name}"
        assert all(0 <= n < len(self.edges) for n in self.link_styles)

    def node(self, name: str) -> str:
        """The id of the node whose label's first line is `name`."""
        (found,) = [n for n, label in self.labels.items() if label.split("<br/>")[0] == name]
        return found

    def step(self, name: str) -> str:
        found = self.node(name)
        assert re.fullmatch(r"s\d+", found)
        return found

    def linked(self, source: str, label: str | None = None) -> list[str]:
        return [t for s, t, lab, _ in self.edges if s == source and (label is None or lab == label)]

    def notes(self, node: str) -> list[str]:
        return self.labels[node].split("<br/>")[1:]

    def followed(self) -> set[tuple[str, str]]:
        return {(s, t) for n, (s, t, _, _) in enumerate(self.edges) if n in self.link_styles}


def unquote(label: str) -> str:
    inner = label[1:-1]
    assert '"' not in inner, label
    assert "\n" not in inner, label
    return inner


RETRY_2 = "retry \N{MULTIPLICATION SIGN}2"
RETRY_3 = "retry \N{MULTIPLICATION SIGN}3"

# -- definitions and sagas ------------------------------------------------------------------


class Declined(Exception):
    pass


def reserve(context: Any, key: str) -> None:
    pass


def release(context: Any, key: str) -> None:
    pass


def charge(context: Any, key: str) -> None:
    pass


def refund(context: Any, key: str) -> None:
    pass


def declined(context: Any, key: str) -> None:
    raise Declined("card declined")


def cannot_undo(context: Any, key: str) -> None:
    raise ConnectionError("bank unreachable")


class Ship:
    def __call__(self, context: Any, key: str) -> None:
        pass


def booking(*, pay: Any = charge, unreserve: Any = release, ship: Any = None) -> SagaDefinition:
    return SagaDefinition(
        "booking",
        [
            Step("reserve", reserve, unreserve),
            Step("pay", pay, refund, retry=Retry(attempts=3, delay=0.0)),
            Step("ship", ship or Ship()),
        ],
    )


@pytest.fixture
def app() -> Iterator[SagaApplication]:
    application = SagaApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    yield application
    application.close()


def run(app: SagaApplication, definition: SagaDefinition) -> tuple[Saga, list[Saga.Event]]:
    saga = app.run(definition, {})
    return saga, list(app.events.get(saga.id))  # type: ignore[arg-type]


def path(definition: SagaDefinition, events: Any) -> Flowchart:
    return Flowchart(saga_path_diagram(definition, events))


def classes(chart: Flowchart, *names: str) -> list[str]:
    return [chart.classes[chart.node(name)] for name in names]


# -- the machine ----------------------------------------------------------------------------

STATE_EDGE = re.compile(r"^    (\w+) --> (\w+) : (\w+)$")


def test_machine_diagram_draws_exactly_the_declared_transitions() -> None:
    declared = set()
    for t in TRANSITIONS:
        sources = t["source"] if isinstance(t["source"], list) else [t["source"]]
        declared |= {(s, t["dest"] or s, t["trigger"]) for s in sources}
    text = machine_diagram()
    lines = text.split("\n")
    assert lines[:3] == ["stateDiagram-v2", "    direction LR", f"    [*] --> {MACHINE.initial}"]
    drawn = [m.groups() for line in lines if (m := STATE_EDGE.match(line))]
    assert len(drawn) == len(set(drawn)), "each transition once"
    assert set(drawn) == declared
    assert set(machine_transitions()) == declared
    ends = {line.split()[0] for line in lines if line.endswith("--> [*]")}
    assert ends == set(TERMINAL_STATES)
    assert len(lines) == 3 + len(drawn) + len(ends), "no other line"


def test_machine_diagram_reads_any_machine_and_draws_internal_transitions() -> None:
    from transitions import Machine

    machine = Machine(
        model=None,
        states=["a", "b"],
        transitions=[
            {"trigger": "go", "source": "a", "dest": "b"},
            {"trigger": "poke", "source": "a", "dest": None},  # internal: stays in a
        ],
        initial="a",
        auto_transitions=False,
    )
    assert machine_diagram(machine).split("\n") == [
        "stateDiagram-v2",
        "    direction LR",
        "    [*] --> a",
        "    a --> b : go",
        "    a --> a : poke",
        "    b --> [*]",
    ]


# -- the definition -------------------------------------------------------------------------


def test_definition_diagram_draws_each_step_in_order_with_its_compensation() -> None:
    chart = Flowchart(definition_diagram(booking()))
    reserve_, pay, ship = (chart.step(n) for n in ("reserve", "pay", "ship"))
    flow = [(s, t) for s, t, _, dashed in chart.edges if not dashed]
    assert flow == [("start", reserve_), (reserve_, pay), (pay, ship), (ship, "done")]
    assert chart.labels[chart.linked(reserve_, "undo")[0]] == "undo: release"
    assert chart.labels[chart.linked(pay, "undo")[0]] == "undo: refund"
    assert chart.linked(ship) == ["done"], "no compensation, no undo node"
    assert all(dashed for _, _, label, dashed in chart.edges if label == "undo")
    assert chart.notes(pay) == [RETRY_3]
    assert chart.notes(chart.node("start")) == ["booking v1"]
    assert not chart.classes, "a definition alone is not coloured"


def test_definition_diagram_draws_a_parallel_group_as_a_subgraph_that_fans_out_and_joins() -> None:
    definition = SagaDefinition(
        "trip",
        [
            Step("flight", reserve, release),
            Parallel(Step("hotel", reserve, release), Step("car", reserve)),
            Parallel(Step("tickets", reserve), Step("insurance", reserve)),
            Step("notify", reserve),
        ],
    )
    chart = Flowchart(definition_diagram(definition))
    flight, hotel, car, tickets, insurance, notify = (
        chart.step(n) for n in ("flight", "hotel", "car", "tickets", "insurance", "notify")
    )
    assert len(chart.subgraphs) == 2
    assert chart.parent[hotel] == chart.parent[car] == "g0"
    assert chart.parent[chart.linked(hotel, "undo")[0]] == "g0"
    assert chart.parent[tickets] == chart.parent[insurance] == "g1"
    assert chart.parent[flight] is chart.parent[notify] is None
    flow = {(s, t) for s, t, _, dashed in chart.edges if not dashed}
    assert {(flight, hotel), (flight, car)} <= flow  # fan out
    assert {(m, n) for m in (hotel, car) for n in (tickets, insurance)} <= flow  # join, fan out
    assert {(tickets, notify), (insurance, notify)} <= flow  # join
    assert (flight, notify) not in flow


def test_definition_diagram_draws_fallbacks_and_policies() -> None:
    definition = SagaDefinition(
        "payment",
        [
            Step(
                "card",
                charge,
                refund,
                timeout=5,
                breaker=CircuitBreaker("cards"),
                fallback=functools.partial(charge),
                fallback_compensation=lambda context, key: None,
                fallback_on=(Declined, TimeoutError),
                compensation_retry=2,
            ),
            Step("invoice", reserve, fallback=Ship(), timeout=0.5, recovery="fail"),
        ],
        deadline=60,
    )
    chart = Flowchart(definition_diagram(definition))
    card, invoice = chart.step("card"), chart.step("invoice")
    assert chart.notes(card) == ["timeout 5s · breaker cards"]
    assert chart.notes(invoice) == ["timeout 0.5s · recovery fail"]
    assert chart.notes(chart.node("start")) == ["payment v1", "deadline 60s"]
    (fallback,) = chart.linked(card, "fallback on Declined, TimeoutError")
    assert chart.labels[fallback] == "fallback: charge"  # a partial is named by its function
    (undo,) = chart.linked(fallback, "undo")
    assert chart.labels[undo] == f"undo: #lt;lambda#gt;<br/>{RETRY_2}"
    assert chart.notes(chart.linked(card, "undo")[0]) == [RETRY_2]
    (other,) = chart.linked(invoice, "fallback")
    assert chart.labels[other] == "fallback: Ship"  # a callable object: its class


def test_labels_are_escaped_so_that_any_step_name_is_safe() -> None:
    name = 'say "hi" <b>#1</b>\nnow'
    chart = Flowchart(definition_diagram(SagaDefinition("odd", [Step(name, reserve)])))
    label = chart.labels["s0"]
    assert label == "say #quot;hi#quot; #lt;b#gt;#35;1#lt;/b#gt; now"
    assert escape("a#quot;") == "a#35;quot;", "a # is encoded before the codes that use it"


def test_drawings_are_deterministic() -> None:
    assert definition_diagram(booking()) == definition_diagram(booking())
    assert machine_diagram() == machine_diagram()


# -- the path one saga took -----------------------------------------------------------------


def test_a_completed_saga_is_green_along_the_whole_path(app: SagaApplication) -> None:
    definition = booking()
    saga, events = run(app, definition)
    assert saga.status == "completed"
    chart = path(definition, events)
    assert classes(chart, "start", "reserve", "pay", "ship", "completed") == ["completed"] * 5
    assert classes(chart, "undo: release", "undo: refund") == ["unreached"] * 2
    assert chart.notes(chart.step("pay")) == [RETRY_3, "completed"]
    flow = {(s, t) for s, t, _, dashed in chart.edges if not dashed}
    assert chart.followed() == flow
    assert set(chart.class_defs) == set(CLASS_DEFS)


def test_a_compensated_saga_shows_the_failure_in_red_and_the_undone_steps_in_amber(
    app: SagaApplication,
) -> None:
    definition = SagaDefinition(
        "booking",
        [
            Step("reserve", reserve, release),
            Step("hold", reserve),
            Step("pay", declined, refund, retry=Retry(attempts=3, delay=0.0)),
            Step("ship", Ship()),
        ],
    )
    saga, events = run(app, definition)
    assert saga.status == "compensated"
    chart = path(definition, events)
    assert classes(chart, "reserve", "undo: release", "hold", "pay", "ship", "compensated") == [
        "compensated",
        "compensated",
        "completed",  # nothing to undo
        "failed",
        "unreached",
        "compensated",
    ]
    assert chart.notes(chart.step("pay"))[-1] == "failed: Declined, 3 attempts"
    assert chart.notes(chart.step("ship")) == ["not reached"]
    assert chart.classes[chart.node("undo: refund")] == "unreached"
    reserve_, hold, pay = (chart.step(n) for n in ("reserve", "hold", "pay"))
    followed = chart.followed()
    assert {("start", reserve_), (reserve_, hold), (hold, pay)} <= followed
    assert (reserve_, chart.node("undo: release")) in followed
    assert not {edge for edge in followed if pay == edge[0] or edge[1] == "done"}


def test_history_records_draw_the_same_path_as_events(app: SagaApplication) -> None:
    definition = booking(pay=declined)
    saga, events = run(app, definition)
    history: list[HistoryRecord] = records(
        app.recorder.select_events(saga.id), app.mapper.to_domain_event
    )
    assert saga_path_diagram(definition, history) == saga_path_diagram(definition, events)


def test_a_parallel_saga_colours_each_member(app: SagaApplication) -> None:
    definition = SagaDefinition(
        "trip",
        [
            Step("flight", reserve, release),
            Parallel(Step("hotel", reserve, release), Step("car", declined, release)),
            Step("notify", reserve),
        ],
    )
    saga, events = run(app, definition)
    assert saga.status == "compensated"
    chart = path(definition, events)
    assert classes(chart, "flight", "hotel", "car", "notify") == [
        "compensated",
        "compensated",
        "failed",
        "unreached",
    ]
    hotel, car = chart.step("hotel"), chart.step("car")
    assert chart.parent[hotel] == chart.parent[car] == "g0"
    assert chart.notes(car) == ["failed: Declined, 1 attempt"]
    flight = chart.step("flight")
    assert {(flight, hotel), (flight, car)} <= chart.followed()
    assert (hotel, chart.step("notify")) not in chart.followed(), "the join was not passed"

    completed = SagaDefinition(
        "trip",
        [Parallel(Step("hotel", reserve, release), Step("car", reserve)), Step("notify", reserve)],
    )
    _, events = run(app, completed)
    chart = path(completed, events)
    notify = chart.step("notify")
    assert classes(chart, "hotel", "car", "notify") == ["completed"] * 3
    assert {(chart.step("hotel"), notify), (chart.step("car"), notify)} <= chart.followed()


def test_a_stuck_saga_is_red_and_bold_where_its_compensation_failed(
    app: SagaApplication,
) -> None:
    definition = booking(pay=declined, unreserve=cannot_undo)
    saga, events = run(app, definition)
    assert saga.status == "stuck"
    chart = path(definition, events)
    undo = chart.node("undo: cannot_undo")
    assert classes(chart, "reserve", "pay", "stuck") == ["stuck", "failed", "stuck"]
    assert chart.classes[undo] == "stuck"
    assert chart.notes(undo) == ["stuck: ConnectionError"]
    assert "font-weight:bold" in chart.class_defs["stuck"]

    app.resolve(saga.id, "mark-compensated", by="ops", reason="released by hand")
    events = list(app.events.get(saga.id))  # type: ignore[arg-type]
    chart = path(definition, events)
    assert classes(chart, "reserve", "undo: cannot_undo", "compensated") == ["compensated"] * 3
    assert chart.notes(chart.node("undo: cannot_undo")) == ["undone by hand"]


def test_a_fallback_that_did_the_work_is_shown_beside_its_step(app: SagaApplication) -> None:
    definition = SagaDefinition(
        "payment",
        [
            Step("card", declined, refund, fallback=charge, fallback_compensation=release),
            Step("ship", declined),
        ],
    )
    saga, events = run(app, definition)
    assert saga.status == "compensated"
    chart = path(definition, events)
    card = chart.step("card")
    assert chart.classes[card] == "fallback"
    assert chart.notes(card) == ["fallback used after Declined"]
    (fallback,) = chart.linked(card, "fallback")
    (undo,) = chart.linked(fallback, "undo")
    assert chart.classes[fallback] == chart.classes[undo] == "compensated"
    assert chart.classes[chart.node("undo: refund")] == "unreached", "the fallback's undo ran"
    assert {(card, fallback), (fallback, undo)} <= chart.followed()


def test_a_saga_past_its_deadline_says_so() -> None:
    # Driven through the aggregate's own commands: when the runner turns a passed deadline
    # into `SagaTimedOut` is the runner's business, not the drawing's.
    definition = SagaDefinition(
        "quick", [Step("flight", reserve, release), Step("hotel", reserve)], deadline=60
    )
    saga = Saga.start(
        id=uuid4(),
        name=definition.name,
        definition_version=definition.version,
        steps=definition.step_names,
        compensable=definition.compensable,
        key=None,
        context_type="builtins:dict",
        context={},
        deadline=datetime(2030, 1, 1, tzinfo=UTC),
    )
    saga.start_step("flight", 1)
    saga.complete_step("flight", 1, changes={}, removed=[])
    saga.time_out()
    saga.start_compensation("flight", 1)
    saga.complete_compensation("flight", 1, changes={}, removed=[])
    saga.compensate()
    chart = path(definition, saga.collect_events())
    assert chart.labels["done"] == "compensated (deadline passed)"
    assert classes(chart, "flight", "hotel") == ["compensated", "unreached"]


def test_a_saga_still_running_shows_the_step_in_flight(app: SagaApplication) -> None:
    definition = booking()
    _, events = run(app, definition)
    partial = events[:4]  # SagaStarted, reserve started and completed, pay started
    assert type(partial[-1]).__name__ == "StepStarted"
    chart = path(definition, partial)
    assert classes(chart, "reserve", "pay", "ship", "end") == [
        "completed",
        "running",
        "unreached",
        "unreached",
    ]
    assert chart.notes(chart.step("pay"))[-1] == "in flight, attempt 1"


def test_events_of_another_definition_are_refused(app: SagaApplication) -> None:
    _, events = run(app, booking())
    other = SagaDefinition("booking", [Step("reserve", reserve), Step("pay", charge)])
    with pytest.raises(DefinitionError, match="recorded for"):
        saga_path_diagram(other, events)


def test_a_saga_given_instead_of_its_events_says_where_they_are(app: SagaApplication) -> None:
    saga, _ = run(app, booking())
    with pytest.raises(TypeError, match=r"app.saga_events\('" + str(saga.id)):
        saga_path_diagram(booking(), saga)  # type: ignore[arg-type]


def test_a_definition_of_another_name_is_refused_naming_both(app: SagaApplication) -> None:
    saga, events = run(app, booking())
    same_steps = SagaDefinition(
        "shipping", [Step("reserve", reserve), Step("pay", charge), Step("ship", Ship())]
    )
    for given in (events, app.history(saga.id)):
        with pytest.raises(DefinitionError) as caught:
            saga_path_diagram(same_steps, given)
        message = str(caught.value)
        assert "of a saga of 'booking' v1, not of 'shipping'" in message


def test_a_nested_step_names_its_child_saga_in_the_path() -> None:
    from saga_es import SagaApplication, SagaDefinition, Step
    from saga_es.diagram import saga_path_diagram

    app = SagaApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    payment = SagaDefinition("payment", [Step("authorise", lambda c, k: None)])
    order = SagaDefinition("order", [Step.saga("pay", payment)])
    saga = app.run(order, {})
    drawing = saga_path_diagram(order, app.saga_events(saga.id))
    assert f"child saga {saga.results['pay']['saga_id']}" in drawing
