"""Mermaid drawings of a definition, of the state machine, and of the path one saga took.

Drawn from the objects themselves (the definition, `MACHINE`, the saga's events), never
by hand, so a drawing cannot drift from what runs. Output is plain text and
deterministic: the same input always gives the same bytes, so drawings can be diffed,
committed and tested.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from transitions import Machine

from saga_es.aggregate import Saga
from saga_es.definition import RETRY, Retry, SagaDefinition, Step
from saga_es.errors import DefinitionError
from saga_es.history import HistoryRecord
from saga_es.machine import MACHINE, TERMINAL_STATES

START = "start"
END = "done"
"""Node ids of the saga's start and end (`end` itself is a Mermaid keyword)."""

CLASS_DEFS: Mapping[str, str] = {
    "completed": "fill:#d4edda,stroke:#2e7d32,color:#1b5e20",
    "failed": "fill:#f8d7da,stroke:#c62828,color:#b71c1c",
    "fallback": "fill:#e3f2fd,stroke:#1565c0,color:#0d47a1",
    "compensated": "fill:#fff3cd,stroke:#ff8f00,color:#7a4f01",
    "stuck": "fill:#f8d7da,stroke:#b71c1c,stroke-width:4px,color:#b71c1c,font-weight:bold",
    "running": "fill:#e1f5fe,stroke:#0277bd,color:#01579b",
    "unreached": "fill:#f5f5f5,stroke:#9e9e9e,stroke-dasharray:5 5,color:#9e9e9e",
}
"""The classes a path drawing gives its nodes, by what happened to them."""

FORWARD_LINK = "stroke:#2e7d32,stroke-width:3px"
UNDO_LINK = "stroke:#ff8f00,stroke-width:3px"

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_DEFAULT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")
_TIMES = "\N{MULTIPLICATION SIGN}"


# -- labels -----------------------------------------------------------------------------


def escape(text: str) -> str:
    """Text safe inside a quoted Mermaid label: quotes, tags and entities are encoded.

    Mermaid decodes `#name;` and `#number;` itself, so `#` goes first.
    """
    text = text.replace("#", "#35;")
    for char, code in (('"', "#quot;"), ("<", "#lt;"), (">", "#gt;"), ("`", "#96;")):
        text = text.replace(char, code)
    return " ".join(text.split())  # a newline would end the statement


def _callable_name(fn: Callable[..., Any]) -> str:
    """A readable, stable name: addresses in a repr would change on every run."""
    if isinstance(fn, functools.partial):
        return _callable_name(fn.func)
    name = getattr(fn, "__name__", None)
    if isinstance(name, str):
        return name
    text = repr(fn)
    if _DEFAULT_REPR.fullmatch(text):  # a callable object without a repr of its own
        return type(fn).__name__
    return _ADDRESS.sub("", text)


def _seconds(value: float) -> str:
    return f"{value:g}s"


def _retry(retry: Retry) -> list[str]:
    return [f"retry {_TIMES}{retry.attempts}"] if retry.attempts > 1 else []


def _label(*lines: str) -> str:
    """A quoted label; the first line is the name, the others are notes."""
    return '"' + "<br/>".join(escape(line) for line in lines if line) + '"'


def _step_notes(step: Step) -> str:
    notes = _retry(step.retries)
    if step.timeout is not None:
        notes.append(f"timeout {_seconds(step.timeout)}")
    if step.breaker is not None:
        notes.append(f"breaker {step.breaker.name}")
    if step.recovery != RETRY:
        notes.append(f"recovery {step.recovery}")
    return " · ".join(notes)


def _child_notes(step: Step) -> list[str]:
    """A nested step's child saga and its steps, deeper children in brackets: the tree."""
    return [f"saga {child.name} v{child.version}: {_tree(child)}" for child in step.children]


def _tree(definition: SagaDefinition) -> str:
    names = []
    for step in definition.steps:
        inner = "; ".join(_child_notes(step))
        names.append(f"{step.name} [{inner}]" if inner else step.name)
    return " → ".join(names)


def _undo_notes(step: Step) -> str:
    notes = _retry(step.compensation_retries)
    if step.compensation_recovery != RETRY:
        notes.append(f"recovery {step.compensation_recovery}")
    if step.compensate_on_failure:
        notes.append("also on failure")
    return " · ".join(notes)


def _fallback_edge(step: Step) -> str:
    errors = step.fallback_on
    assert isinstance(errors, tuple)  # normalised by Step
    if errors == (Exception,):
        return "fallback"
    return "fallback on " + ", ".join(error.__name__ for error in errors)


# -- the definition ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Edge:
    """One link, in drawing order: `linkStyle` addresses links by that order."""

    source: str
    target: str
    label: str = ""
    dashed: bool = False
    kind: str = "flow"  # "flow", "undo", "fallback", "fallback_undo"

    def __str__(self) -> str:
        if self.dashed:
            if self.label:
                return f"    {self.source} -. {_label(self.label)} .-> {self.target}"
            return f"    {self.source} -.-> {self.target}"
        if self.label:
            return f"    {self.source} -- {_label(self.label)} --> {self.target}"
        return f"    {self.source} --> {self.target}"


def _node_id(index: int) -> str:
    return f"s{index}"


def _fallback_id(index: int) -> str:
    return f"s{index}f"


def _undo_id(index: int) -> str:
    return f"s{index}u"


def _fallback_undo_id(index: int) -> str:
    return f"s{index}fu"


def _items(definition: SagaDefinition) -> Iterator[tuple[tuple[int, ...], bool]]:
    """The definition's items in order: their steps' indexes, and whether they are a group.

    `SagaDefinition` keeps its steps flattened; a group's members are consecutive there.
    """
    group_of = {name: group for group in definition.groups for name in group}
    index = 0
    while index < len(definition.steps):
        group = group_of.get(definition.steps[index].name)
        size = 1 if group is None else len(group)
        yield tuple(range(index, index + size)), group is not None
        index += size


@dataclass
class _Drawing:
    """A flowchart being built: node lines per step, edges, then the styling."""

    definition: SagaDefinition
    step_notes: dict[int, list[str]] = field(default_factory=dict)
    undo_notes: dict[str, list[str]] = field(default_factory=dict)
    end_label: str = "end"

    def nodes(self, index: int, indent: str) -> list[str]:
        step = self.definition.steps[index]
        notes = self.step_notes.get(index, [])
        label = _label(step.name, _step_notes(step), *_child_notes(step), *notes)
        lines = [f"{indent}{_node_id(index)}[{label}]"]
        if step.compensation is not None:
            undo = _undo_id(index)
            name = f"undo: {_callable_name(step.compensation)}"
            extra = self.undo_notes.get(undo, [])
            lines.append(f"{indent}{undo}({_label(name, _undo_notes(step), *extra)})")
        if step.fallback is not None:
            name = f"fallback: {_callable_name(step.fallback)}"
            lines.append(f"{indent}{_fallback_id(index)}[[{_label(name)}]]")
            if step.fallback_compensation is not None:
                undo = _fallback_undo_id(index)
                name = f"undo: {_callable_name(step.fallback_compensation)}"
                extra = self.undo_notes.get(undo, [])
                lines.append(f"{indent}{undo}({_label(name, _undo_notes(step), *extra)})")
        return lines

    def edges(self) -> list[_Edge]:
        edges: list[_Edge] = []
        previous = [START]
        for item, _ in _items(self.definition):
            targets = [_node_id(i) for i in item]
            edges.extend(_Edge(source, target) for source in previous for target in targets)
            previous = targets
        edges.extend(_Edge(source, END) for source in previous)
        for index, step in enumerate(self.definition.steps):
            if step.compensation is not None:
                edges.append(_Edge(_node_id(index), _undo_id(index), "undo", True, "undo"))
            if step.fallback is not None:
                fallback = _fallback_id(index)
                edges.append(
                    _Edge(_node_id(index), fallback, _fallback_edge(step), True, "fallback")
                )
                if step.fallback_compensation is not None:
                    undo = _fallback_undo_id(index)
                    edges.append(_Edge(fallback, undo, "undo", True, "fallback_undo"))
        return edges

    def lines(self) -> list[str]:
        definition = self.definition
        start = ["start", f"{definition.name} v{definition.version}"]
        if definition.deadline is not None:
            start.append(f"deadline {_seconds(definition.deadline)}")
        lines = ["flowchart LR", f"    {START}([{_label(*start)}])"]
        groups = 0
        for item, grouped in _items(definition):
            if not grouped:
                lines.extend(self.nodes(item[0], "    "))
                continue
            lines.append(f"    subgraph g{groups} [{_label('parallel')}]")
            groups += 1
            for index in item:
                lines.extend(self.nodes(index, "        "))
            lines.append("    end")
        lines.append(f"    {END}([{_label(self.end_label)}])")
        lines.extend(str(edge) for edge in self.edges())
        return lines


def definition_diagram(definition: SagaDefinition) -> str:
    """A Mermaid `flowchart LR` of `definition`: what a saga of it may do.

    Steps run left to right from `start` to `done`; a `Parallel` group is a subgraph its
    members fan out into and join from. Each compensation (`undo: ...`) and fallback
    (`fallback: ...`, with its own compensation) hangs off its step on a dashed link.
    Node ids are `s0`, `s1`, ... by step index (`s1u` its compensation, `s1f` its
    fallback, `s1fu` the fallback's compensation, `g0`... the groups); labels carry the
    real names and each policy in short (`timeout 5s · breaker cards`, retries too).
    """
    return "\n".join(_Drawing(definition).lines())


# -- the state machine ------------------------------------------------------------------


def machine_transitions(machine: Machine = MACHINE) -> list[tuple[str, str, str]]:
    """Every (source, dest, trigger) of `machine`, each once, grouped by source state.

    Sources follow the machine's state order, then declaration order, so the drawing
    reads from the initial state on. A transition without a dest is internal: it stays
    in its source state.
    """
    seen: dict[tuple[str, str, str], None] = {}
    for trigger, event in machine.events.items():
        for source, transitions in event.transitions.items():
            for transition in transitions:
                seen[(source, transition.dest or source, trigger)] = None
    order = {state: number for number, state in enumerate(machine.states)}
    return sorted(seen, key=lambda edge: order.get(edge[0], len(order)))


def machine_diagram(machine: Machine = MACHINE) -> str:
    """A Mermaid `stateDiagram-v2` of `machine`, read from the machine itself.

    One line per transition, `source --> dest : trigger`; the initial state comes from
    `[*]`, and the terminal states go to `[*]` (for saga_es's machine, `TERMINAL_STATES`:
    `completed` stays terminal although a nested saga's parent may revert it; for another
    machine, every state with no way out).
    """
    transitions = machine_transitions(machine)
    leave = {source for source, dest, _ in transitions if dest != source}
    ends = [
        s
        for s in machine.states
        if (s in TERMINAL_STATES if machine is MACHINE else s not in leave)
    ]
    lines = ["stateDiagram-v2", "    direction LR", f"    [*] --> {machine.initial}"]
    lines.extend(f"    {source} --> {dest} : {trigger}" for source, dest, trigger in transitions)
    lines.extend(f"    {state} --> [*]" for state in ends)
    return "\n".join(lines)


# -- the path one saga took -------------------------------------------------------------


@dataclass
class _StepTrace:
    """What the events say happened to one step."""

    attempts: int = 0
    action: str | None = None  # None, "running", "retrying", "completed", "failed"
    on_fallback: bool = False
    primary_error: str | None = None  # the last error of the primary action
    error: str | None = None  # the last error of whatever ran last
    undo: str | None = None  # None, "running", "done", "failed"
    undo_error: str | None = None
    undo_by_hand: bool = False
    child: str | None = None  # the id of the saga a `Step.saga` step ran


@dataclass
class _Trace:
    """What the events say happened to the saga."""

    steps: dict[str, _StepTrace] = field(default_factory=dict)
    status: str | None = None
    started: bool = False
    recorded_steps: list[str] | None = None
    recorded_name: str | None = None
    recorded_version: int | None = None
    timed_out: bool = False

    def step(self, name: str | None) -> _StepTrace:
        return self.steps.setdefault(name or "", _StepTrace())


def _facts(events: Iterable[Saga.Event | HistoryRecord]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each event as (class name, fields), whether a domain event or a history record."""
    for event in events:
        if isinstance(event, HistoryRecord):
            if not event.readable:
                continue
            fields = dict(event.details)
            fields.update(step=event.step, attempt=event.attempt, to_state=event.status)
            if event.error is not None:
                fields["error_type"] = event.error.type
            yield event.event, fields
        else:
            yield type(event).__name__, dict(vars(event))


def _trace(events: Iterable[Saga.Event | HistoryRecord]) -> _Trace:
    trace = _Trace()
    for name, fields in _facts(events):
        trace.status = fields.get("to_state") or trace.status
        step = trace.step(fields.get("step"))
        attempt = fields.get("attempt")
        if name == "SagaStarted":
            trace.started = True
            trace.recorded_steps = list(fields.get("steps") or [])
            trace.recorded_name = fields.get("name")
            trace.recorded_version = fields.get("definition_version")
        elif name == "StepStarted":
            step.action = "running"
            step.attempts = max(step.attempts, attempt or 0)
            step.on_fallback = bool(fields.get("fallback"))
        elif name == "StepCompleted":
            step.action = "completed"
            result = fields.get("result")
            if isinstance(result, dict) and "saga_id" in result:
                step.child = str(result["saga_id"])
        elif name == "StepFailed":
            step.action = "retrying" if fields.get("will_retry") else "failed"
            step.error = fields.get("error_type")
            if not step.on_fallback:
                step.primary_error = step.error
        elif name == "CompensationStarted":
            step.undo = "running"
        elif name == "CompensationRan":
            step.undo = "done"
        elif name == "CompensationFailed":
            step.undo_error = fields.get("error_type")
            step.undo = "running" if fields.get("will_retry") else "failed"
        elif name == "SagaStuck":
            step.undo = "failed"
            step.undo_error = fields.get("error_type") or step.undo_error
        elif name == "SagaResolved" and fields.get("action") == "mark-compensated":
            step.undo = "done"
            step.undo_by_hand = True
        elif name == "SagaTimedOut":
            trace.timed_out = True
    return trace


def _outcome(state: _StepTrace) -> str:
    """The class of the node whose callable did the step's work."""
    if state.undo == "failed":
        return "stuck"
    if state.action == "failed":
        return "failed"
    if state.undo == "done":
        return "compensated"
    if state.action == "completed":
        return "completed"
    return "running"


def _undo_class(state: _StepTrace) -> str:
    return {"done": "compensated", "failed": "stuck", "running": "running"}.get(
        state.undo or "", "unreached"
    )


def _attempts(count: int) -> str:
    return f"{count} attempt{'s' if count != 1 else ''}"


def _primary_note(state: _StepTrace, css: str) -> str:
    if css == "unreached":
        return "not reached"
    if css == "fallback":
        return f"fallback used after {state.primary_error}" if state.primary_error else ""
    if css == "failed":
        return f"failed: {state.error}, {_attempts(state.attempts)}"
    if css == "stuck":
        return "stuck: compensation failed"
    if css == "running":
        return f"in flight, attempt {state.attempts}"
    done = "compensated" if css == "compensated" else "completed"
    return done if state.attempts <= 1 else f"{done}, {_attempts(state.attempts)}"


def saga_path_diagram(
    definition: SagaDefinition, events: Iterable[Saga.Event | HistoryRecord]
) -> str:
    """`definition_diagram`, coloured by the path one saga took, so a failure reads at a glance.

    `events` is the saga's stream in order: its domain events or its `HistoryRecord`s.
    Nodes get a class: `completed` (green), `failed` (red, with the error type and the
    number of attempts), `fallback` (blue: the step's fallback did its work),
    `compensated` (amber), `stuck` (red, bold: a compensation failed), `running` (still in
    flight) or `unreached` (grey, dashed). The links the saga followed are drawn thick.
    A `DefinitionError` says the events were recorded by a saga of another name, or for
    other steps than `definition`'s.
    """
    if isinstance(events, Saga):  # a saga does not keep its stream: the app reads it
        raise TypeError(
            f"saga_path_diagram takes the saga's events (app.saga_events({str(events.id)!r})) "
            "or its history records (app.history(...)), not the Saga"
        )
    trace = _trace(events)
    names = [step.name for step in definition.steps]
    if trace.recorded_name is not None and trace.recorded_name != definition.name:
        raise DefinitionError(
            f"the events are of a saga of {trace.recorded_name!r} "
            f"v{trace.recorded_version}, not of {definition.name!r}: draw it with its own "
            "definition"
        )
    if trace.recorded_steps is not None and trace.recorded_steps != names:
        raise DefinitionError(
            f"saga {definition.name!r} v{definition.version} has steps {names}, "
            f"but the events were recorded for {trace.recorded_steps}"
        )
    drawing = _Drawing(definition)
    classes: dict[str, str] = {START: "completed" if trace.started else "unreached"}
    for index, step in enumerate(definition.steps):
        state = trace.steps.get(step.name, _StepTrace())
        step_classes, notes = _step_classes(index, step, state)
        classes.update(step_classes)
        drawing.step_notes[index] = [_primary_note(state, step_classes[_node_id(index)])]
        if state.child is not None:  # a nested saga: the tree goes on in the child's drawing
            drawing.step_notes[index].append(f"child saga {state.child}")
        drawing.undo_notes.update(notes)
    ends = {"completed": "completed", "compensated": "compensated", "stuck": "stuck"}
    classes[END] = ends.get(trace.status or "", "unreached")
    drawing.end_label = trace.status if trace.status in ends else "end"
    if trace.timed_out:
        drawing.end_label += " (deadline passed)"

    lines = drawing.lines()
    lines.extend(f"    classDef {name} {style}" for name, style in CLASS_DEFS.items())
    by_class: dict[str, list[str]] = {}
    for node, css in classes.items():
        by_class.setdefault(css, []).append(node)
    lines.extend(f"    class {','.join(nodes)} {css}" for css, nodes in by_class.items())
    forward: list[int] = []
    backward: list[int] = []
    for number, edge in enumerate(drawing.edges()):
        if _followed(edge, classes, trace.status):
            (backward if edge.kind in ("undo", "fallback_undo") else forward).append(number)
    for numbers, style in ((forward, FORWARD_LINK), (backward, UNDO_LINK)):
        if numbers:
            lines.append(f"    linkStyle {','.join(map(str, numbers))} {style}")
    return "\n".join(lines)


def _step_classes(
    index: int, step: Step, state: _StepTrace
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """The classes of a step's nodes, and notes for the compensation that ran."""
    worker = "unreached" if state.action is None else _outcome(state)
    primary = worker
    if state.on_fallback and worker not in ("stuck", "failed"):
        primary = "fallback"  # a failure matters more than how it came about
    classes = {_node_id(index): primary}
    undo = _fallback_undo_id(index) if state.on_fallback else _undo_id(index)
    if step.compensation is not None:
        classes[_undo_id(index)] = "unreached"
    if step.fallback is not None:
        classes[_fallback_id(index)] = worker if state.on_fallback else "unreached"
        if step.fallback_compensation is not None:
            classes[_fallback_undo_id(index)] = "unreached"
    notes: dict[str, list[str]] = {}
    if undo in classes:
        classes[undo] = _undo_class(state)
        if state.undo == "failed" and state.undo_error:
            notes[undo] = [f"stuck: {state.undo_error}"]
        elif state.undo_by_hand:
            notes[undo] = ["undone by hand"]
    return classes, notes


def _followed(edge: _Edge, classes: Mapping[str, str], status: str | None) -> bool:
    """Whether the saga went along `edge`: a flow link once its source is through."""
    if classes[edge.target] == "unreached" or classes[edge.source] == "unreached":
        return False
    if edge.target == END:
        return status == "completed"
    if edge.kind == "flow":
        return classes[edge.source] not in ("running", "failed")
    return True
