"""Recovery: every interrupted saga is brought to an end, by one worker, from its stream.

A dying worker is simulated by `WorkerDied`, a `BaseException` raised inside an action or a
compensation: the runner catches only `Exception`, so the call's start stays recorded without
an outcome, exactly as after a crash. Every behaviour runs on POPO, SQLite and PostgreSQL
through the `app` fixture, which here lets recovery take over at once (`SAGA_STEP_TIMEOUT=0`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from conftest import DURABLE_STORES, CommitSpy, Env
from eventsourcing.persistence import StoredEvent

from saga_es import (
    ConfigurationError,
    DefinitionError,
    FakeClock,
    Parallel,
    Retry,
    Saga,
    SagaApplication,
    SagaDefinition,
    SagaError,
    Step,
    recovery,
)
from saga_es.aggregate import StreamProblem
from saga_es.errors import DefinitionNotFound
from saga_es.recovery import RecoveryReport
from saga_es.status import SagaStatus

Moves = list[tuple[Any, ...]]


class WorkerDied(BaseException):
    """Stands in for the process dying mid-call; the runner does not catch it."""


class NoRooms(Exception):
    """An action's ordinary failure."""


class Shop:
    """Callables that log every call as (what, step, key) and die or fail where told.

    `what` is "do" (action), "undo" (compensation), "check" (reconcile) or "check-undo"
    (reconcile of a compensation). Each entry of `die` kills the worker once.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []
        self.die: set[tuple[str, str]] = set()
        self.fail: set[str] = set()
        self.answers: dict[tuple[str, str], bool | Exception] = {}

    def _enter(self, what: str, step: str, key: str) -> None:
        self.calls.append((what, step, key))
        if (what, step) in self.die:
            self.die.discard((what, step))
            raise WorkerDied(f"{what} {step}")

    def action(self, step: str) -> Callable[[Any, str], Any]:
        def action(context: Any, key: str) -> Any:
            self._enter("do", step, key)
            context[step] = "done"
            if step in self.fail:
                raise NoRooms(f"{step}: no rooms left")
            return f"{step}-ref"

        return action

    def compensation(self, step: str) -> Callable[[Any, str], Any]:
        def compensation(context: Any, key: str) -> None:
            self._enter("undo", step, key)
            context[step] = "undone"

        return compensation

    def reconcile(self, step: str, what: str = "check") -> Callable[[Any, str], Any]:
        """A reconcile that notes what it looked at in the context, then answers."""

        def reconcile(context: Any, key: str) -> bool:
            self._enter(what, step, key)
            context[f"{step}-{what}"] = "looked"
            answer = self.answers[what, step]
            if isinstance(answer, Exception):
                raise answer
            return answer

        return reconcile

    def definition(
        self, name: str = "trip", steps: str = "abc", version: int = 1, **policies: Any
    ) -> SagaDefinition:
        """Steps named by the letters of `steps`, each compensable; `policies[step]` are kwargs."""
        return SagaDefinition(
            name,
            [Step(s, self.action(s), self.compensation(s), **policies.get(s, {})) for s in steps],
            version=version,
        )

    def log(self, *whats: str) -> list[tuple[str, str]]:
        return [(what, step) for what, step, _ in self.calls if not whats or what in whats]

    def keys(self, what: str, step: str) -> list[str]:
        return [key for w, s, key in self.calls if (w, s) == (what, step)]


@pytest.fixture
def app(env: Env, open_app: Callable[[Env], SagaApplication]) -> SagaApplication:
    """A `SagaApplication` on a fresh store whose recovery takes over any saga at once."""
    return open_app({**env, "SAGA_STEP_TIMEOUT": "0"})


@pytest.fixture
def shop() -> Shop:
    return Shop()


def crash(app: SagaApplication, definition: SagaDefinition, key: str, context: Any = None) -> UUID:
    """Run a saga whose worker dies mid-call; its id."""
    with pytest.raises(WorkerDied):
        app.run(definition, {} if context is None else context, key=key)
    return SagaApplication.saga_id(definition.name, key)


def moves(app: SagaApplication, saga_id: UUID) -> Moves:
    """The saga's history as (event, step, attempt), plus the fields that tell outcomes apart."""
    rows: Moves = []
    for event in app.saga_events(saga_id):
        data = vars(event)
        row: tuple[Any, ...] = (type(event).__name__,)
        if "step" in data:
            row += (data["step"], data.get("attempt"))
        if "took_effect" in data:
            row += (data["took_effect"],)
        if "will_retry" in data:
            row += (data["error_type"], data["will_retry"])
        if "compensate" in data:
            row += (data["compensate"],)
        rows.append(row)
    return rows


def started(*steps: str) -> Moves:
    """SagaStarted, then each step started and completed on attempt 1."""
    rows: Moves = [("SagaStarted",)]
    for step in steps:
        rows += [("StepStarted", step, 1), ("StepCompleted", step, 1)]
    return rows


def only(report: RecoveryReport, saga_id: UUID, outcome: str) -> None:
    """`report` found exactly this saga, and put it under `outcome`."""
    lists = {
        "resumed": report.resumed,
        "waiting": report.waiting,
        "taken_over": report.taken_over,
        "failed": list(report.failed),
    }
    assert {name: ids for name, ids in lists.items() if ids} == {outcome: [saga_id]}
    assert report.found == 1


# -- forward: a step whose outcome is unknown -------------------------------------------


@pytest.mark.parametrize("dies_in", ["a", "b", "c"])
def test_an_interrupted_step_is_run_again_with_the_same_key_as_the_next_attempt(
    app: SagaApplication, shop: Shop, dies_in: str
) -> None:
    shop.die = {("do", dies_in)}
    definition = shop.definition()
    saga_id = crash(app, definition, "ada", {"customer": "ada"})
    before = app.get(saga_id)
    assert (before.status, before.in_flight) == ("running", {dies_in: 1})
    assert app.statuses()[0].step == dies_in

    report = app.recover()

    only(report, saga_id, "resumed")
    done = "abc"[: "abc".index(dies_in)]
    assert moves(app, saga_id) == [
        *started(*done),
        ("StepStarted", dies_in, 1),
        ("StepStarted", dies_in, 2),
        ("StepCompleted", dies_in, 2),
        *[row for s in "abc"[len(done) + 1 :] for row in started(s)[1:]],
        ("SagaCompleted",),
    ]
    assert shop.log() == [("do", s) for s in "abc"[: len(done) + 1]] + [
        ("do", s) for s in "abc"[len(done) :]
    ]
    first, second = shop.keys("do", dies_in)
    assert first == second == before.step_key(dies_in)
    saga = app.get(saga_id)
    assert saga.status == "completed"
    assert saga.context == {"customer": "ada", "a": "done", "b": "done", "c": "done"}
    assert saga.results == {"a": "a-ref", "b": "b-ref", "c": "c-ref"}
    assert app.verify() == []


def test_a_re_run_that_fails_compensates_like_any_failure(app: SagaApplication, shop: Shop) -> None:
    shop.die = {("do", "b")}
    saga_id = crash(app, shop.definition(), "k")
    shop.fail = {"b"}

    only(app.recover(), saga_id, "resumed")

    assert moves(app, saga_id) == [
        *started("a"),
        ("StepStarted", "b", 1),
        ("StepStarted", "b", 2),
        ("StepFailed", "b", 2, "NoRooms", False, False),
        ("CompensationStarted", "a", 1),
        ("CompensationRan", "a", 1),
        ("SagaCompensated",),
    ]
    assert app.verify() == []


def test_a_recovery_that_dies_too_is_recovered_by_the_next_one(
    app: SagaApplication, shop: Shop
) -> None:
    shop.die = {("do", "b")}
    saga_id = crash(app, shop.definition(), "k")
    shop.die = {("do", "b")}
    with pytest.raises(WorkerDied):
        app.recover()
    assert app.get(saga_id).in_flight == {"b": 2}

    only(app.recover(), saga_id, "resumed")

    assert moves(app, saga_id)[3:7] == [
        ("StepStarted", "b", 1),
        ("StepStarted", "b", 2),
        ("StepStarted", "b", 3),
        ("StepCompleted", "b", 3),
    ]
    assert len(set(shop.keys("do", "b"))) == 1
    assert app.get(saga_id).status == "completed"
    assert app.recover().found == 0
    assert app.verify() == []


def test_fail_records_an_unknown_outcome_and_compensates_what_completed(
    app: SagaApplication, shop: Shop
) -> None:
    shop.die = {("do", "b")}
    definition = shop.definition(b={"recovery": "fail"})
    saga_id = crash(app, definition, "k")

    only(app.recover(), saga_id, "resumed")

    assert moves(app, saga_id) == [
        *started("a"),
        ("StepStarted", "b", 1),
        ("StepFailed", "b", 1, "OutcomeUnknown", False, False),
        ("CompensationStarted", "a", 1),
        ("CompensationRan", "a", 1),
        ("SagaCompensated",),
    ]
    assert shop.log() == [("do", "a"), ("do", "b"), ("undo", "a")]
    saga = app.get(saga_id)
    assert saga.status == "compensated"
    assert saga.error is not None
    assert (saga.error["step"], saga.error["type"]) == ("b", "OutcomeUnknown")
    assert app.verify() == []


def test_compensate_fails_the_step_and_undoes_its_own_effect_first(
    app: SagaApplication, shop: Shop
) -> None:
    shop.die = {("do", "b")}
    definition = shop.definition(b={"recovery": "compensate"})
    saga_id = crash(app, definition, "k")

    only(app.recover(), saga_id, "resumed")

    assert moves(app, saga_id) == [
        *started("a"),
        ("StepStarted", "b", 1),
        ("StepFailed", "b", 1, "OutcomeUnknown", False, True),
        ("CompensationStarted", "b", 1),
        ("CompensationRan", "b", 1),
        ("CompensationStarted", "a", 1),
        ("CompensationRan", "a", 1),
        ("SagaCompensated",),
    ]
    assert shop.log() == [("do", "a"), ("do", "b"), ("undo", "b"), ("undo", "a")]
    assert shop.keys("undo", "b") == [app.get(saga_id).step_key("b")]
    assert app.get(saga_id).compensated == ["b", "a"]
    assert app.verify() == []


def test_compensate_on_the_first_step_undoes_only_that_step(
    app: SagaApplication, shop: Shop
) -> None:
    shop.die = {("do", "a")}
    saga_id = crash(app, shop.definition(a={"recovery": "compensate"}), "k")
    only(app.recover(), saga_id, "resumed")
    assert moves(app, saga_id)[-4:] == [
        ("StepFailed", "a", 1, "OutcomeUnknown", False, True),
        ("CompensationStarted", "a", 1),
        ("CompensationRan", "a", 1),
        ("SagaCompensated",),
    ]
    assert shop.log() == [("do", "a"), ("undo", "a")]


def async_reconcile(shop: Shop, step: str, what: str = "check") -> Callable[[Any, str], Any]:
    sync = shop.reconcile(step, what)

    async def reconcile(context: Any, key: str) -> Any:
        await asyncio.sleep(0)
        return sync(context, key)

    return reconcile


RECONCILERS = {"sync": Shop.reconcile, "async": async_reconcile}


@pytest.mark.parametrize("kind", RECONCILERS)
def test_reconcile_that_took_effect_completes_the_attempt_with_what_it_found(
    app: SagaApplication, shop: Shop, kind: str
) -> None:
    shop.die = {("do", "b")}
    shop.answers["check", "b"] = True
    definition = shop.definition(b={"reconcile": RECONCILERS[kind](shop, "b")})
    assert definition.step("b").recovery == "reconcile"
    saga_id = crash(app, definition, "k", {"customer": "ada"})

    only(app.recover(), saga_id, "resumed")

    assert moves(app, saga_id) == [
        *started("a"),
        ("StepStarted", "b", 1),
        ("StepReconciled", "b", 1, True),
        ("StepCompleted", "b", 1),
        ("StepStarted", "c", 1),
        ("StepCompleted", "c", 1),
        ("SagaCompleted",),
    ]
    assert shop.log() == [("do", "a"), ("do", "b"), ("check", "b"), ("do", "c")]
    assert shop.keys("check", "b") == shop.keys("do", "b")  # the reconcile asks by the same key
    history = app.saga_events(saga_id)
    assert vars(history[5])["changes"] == {"b-check": "looked"}  # what reconcile changed
    saga = app.get(saga_id)
    assert saga.context == {"customer": "ada", "a": "done", "b-check": "looked", "c": "done"}
    assert saga.status == "completed"
    assert app.verify() == []


@pytest.mark.parametrize("kind", RECONCILERS)
def test_reconcile_without_effect_runs_the_next_attempt_and_keeps_no_changes(
    app: SagaApplication, shop: Shop, kind: str
) -> None:
    shop.die = {("do", "b")}
    shop.answers["check", "b"] = False
    definition = shop.definition(b={"reconcile": RECONCILERS[kind](shop, "b")})
    saga_id = crash(app, definition, "k")

    only(app.recover(), saga_id, "resumed")

    assert moves(app, saga_id) == [
        *started("a"),
        ("StepStarted", "b", 1),
        ("StepReconciled", "b", 1, False),
        ("StepStarted", "b", 2),
        ("StepCompleted", "b", 2),
        ("StepStarted", "c", 1),
        ("StepCompleted", "c", 1),
        ("SagaCompleted",),
    ]
    assert shop.log() == [("do", "a"), ("do", "b"), ("check", "b"), ("do", "b"), ("do", "c")]
    assert len(set(shop.keys("do", "b"))) == 1
    assert app.get(saga_id).context == {"a": "done", "b": "done", "c": "done"}


def test_a_reconcile_that_raises_is_reported_and_nothing_is_appended(
    app: SagaApplication, shop: Shop
) -> None:
    shop.die = {("do", "b")}
    shop.answers["check", "b"] = ConnectionError("supplier unreachable")
    definition = shop.definition(b={"reconcile": shop.reconcile("b")})
    saga_id = crash(app, definition, "k")
    history = moves(app, saga_id)
    (row,) = app.statuses()

    report = app.recover()

    only(report, saga_id, "failed")
    reason = report.failed[saga_id]
    assert "'b'" in reason
    assert "supplier unreachable" in reason
    assert moves(app, saga_id) == history
    assert app.statuses() == [row]
    assert shop.log() == [("do", "a"), ("do", "b"), ("check", "b")]

    shop.answers["check", "b"] = True  # the supplier answers again: a later pass resumes it
    only(app.recover(), saga_id, "resumed")
    assert app.get(saga_id).status == "completed"
    assert shop.log("do") == [("do", "a"), ("do", "b"), ("do", "c")]


# -- backward: a compensation whose outcome is unknown ------------------------------------


def interrupted_compensation(
    app: SagaApplication, shop: Shop, key: str = "k", **policies: Any
) -> UUID:
    """Steps a, b, c; c fails; the worker dies inside b's compensation."""
    shop.fail = {"c"}
    shop.die = {("undo", "b")}
    saga_id = crash(app, shop.definition(**policies), key, {"customer": "ada"})
    shop.fail = set()
    saga = app.get(saga_id)
    assert (saga.status, saga.compensating) == ("compensating", {"b": 1})
    return saga_id


UNTIL_B_UNDOING: Moves = [
    *started("a", "b"),
    ("StepStarted", "c", 1),
    ("StepFailed", "c", 1, "NoRooms", False, False),
    ("CompensationStarted", "b", 1),
]


def test_an_interrupted_compensation_is_run_again_with_the_same_key(
    app: SagaApplication, shop: Shop
) -> None:
    saga_id = interrupted_compensation(app, shop)

    only(app.recover(), saga_id, "resumed")

    assert moves(app, saga_id) == [
        *UNTIL_B_UNDOING,
        ("CompensationStarted", "b", 2),
        ("CompensationRan", "b", 2),
        ("CompensationStarted", "a", 1),
        ("CompensationRan", "a", 1),
        ("SagaCompensated",),
    ]
    assert shop.log("undo") == [("undo", "b"), ("undo", "b"), ("undo", "a")]
    first, second = shop.keys("undo", "b")
    assert first == second == app.get(saga_id).step_key("b")
    saga = app.get(saga_id)
    assert saga.status == "compensated"
    assert saga.context == {"customer": "ada", "a": "undone", "b": "undone"}
    assert app.verify() == []


def test_a_re_run_compensation_that_fails_leaves_the_saga_stuck(
    app: SagaApplication, shop: Shop
) -> None:
    saga_id = interrupted_compensation(app, shop)
    undo_b = shop.compensation("b")

    def broken(context: Any, key: str) -> None:
        undo_b(context, key)
        raise RuntimeError("cannot cancel b")

    app.register(
        SagaDefinition(
            "trip",
            [
                Step("a", shop.action("a"), shop.compensation("a")),
                Step("b", shop.action("b"), broken),
                Step("c", shop.action("c"), shop.compensation("c")),
            ],
        )
    )

    only(app.recover(), saga_id, "resumed")

    assert moves(app, saga_id) == [
        *UNTIL_B_UNDOING,
        ("CompensationStarted", "b", 2),
        ("CompensationFailed", "b", 2, "RuntimeError", False),
        ("SagaStuck", "b", None),
    ]
    assert shop.log("undo") == [("undo", "b"), ("undo", "b")]
    assert app.verify() == []


def test_an_interrupted_compensation_with_fail_leaves_the_saga_stuck(
    app: SagaApplication, shop: Shop
) -> None:
    saga_id = interrupted_compensation(app, shop, b={"compensation_recovery": "fail"})

    only(app.recover(), saga_id, "resumed")

    assert moves(app, saga_id) == [
        *UNTIL_B_UNDOING,
        ("CompensationFailed", "b", 1, "OutcomeUnknown", False),
        ("SagaStuck", "b", None),
    ]
    assert shop.log("undo") == [("undo", "b")]  # nothing else runs: a person decides
    saga = app.get(saga_id)
    assert saga.status == "stuck"
    assert saga.error is not None
    assert saga.error["type"] == "OutcomeUnknown"
    assert app.statuses(status="stuck")[0].saga_id == saga_id
    assert app.recover().found == 0  # stuck is not recovery's to resume
    assert app.verify() == []


@pytest.mark.parametrize("kind", RECONCILERS)
def test_a_compensation_reconcile_that_took_effect_records_it_and_goes_on(
    app: SagaApplication, shop: Shop, kind: str
) -> None:
    shop.answers["check-undo", "b"] = True
    reconcile = RECONCILERS[kind](shop, "b", "check-undo")
    saga_id = interrupted_compensation(app, shop, b={"reconcile_compensation": reconcile})

    only(app.recover(), saga_id, "resumed")

    assert moves(app, saga_id) == [
        *UNTIL_B_UNDOING,
        ("CompensationReconciled", "b", 1, True),
        ("CompensationRan", "b", 1),
        ("CompensationStarted", "a", 1),
        ("CompensationRan", "a", 1),
        ("SagaCompensated",),
    ]
    assert shop.log("undo", "check-undo") == [
        ("undo", "b"),
        ("check-undo", "b"),
        ("undo", "a"),
    ]
    assert shop.keys("check-undo", "b") == shop.keys("undo", "b")
    ran = app.saga_events(saga_id)[len(UNTIL_B_UNDOING) + 1]
    assert vars(ran)["changes"] == {"b-check-undo": "looked"}
    saga = app.get(saga_id)
    assert saga.context == {"customer": "ada", "a": "undone", "b": "done", "b-check-undo": "looked"}
    assert app.verify() == []


def test_a_compensation_reconcile_without_effect_runs_the_next_attempt(
    app: SagaApplication, shop: Shop
) -> None:
    shop.answers["check-undo", "b"] = False
    reconcile = shop.reconcile("b", "check-undo")
    saga_id = interrupted_compensation(app, shop, b={"reconcile_compensation": reconcile})

    only(app.recover(), saga_id, "resumed")

    assert moves(app, saga_id) == [
        *UNTIL_B_UNDOING,
        ("CompensationReconciled", "b", 1, False),
        ("CompensationStarted", "b", 2),
        ("CompensationRan", "b", 2),
        ("CompensationStarted", "a", 1),
        ("CompensationRan", "a", 1),
        ("SagaCompensated",),
    ]
    assert shop.log("undo", "check-undo") == [
        ("undo", "b"),
        ("check-undo", "b"),
        ("undo", "b"),
        ("undo", "a"),
    ]
    assert "b-check-undo" not in app.get(saga_id).context


def test_a_compensation_reconcile_that_raises_is_reported_and_nothing_is_appended(
    app: SagaApplication, shop: Shop
) -> None:
    shop.answers["check-undo", "b"] = TimeoutError("no answer")
    reconcile = shop.reconcile("b", "check-undo")
    saga_id = interrupted_compensation(app, shop, b={"reconcile_compensation": reconcile})

    report = app.recover()

    only(report, saga_id, "failed")
    assert "no answer" in report.failed[saga_id]
    assert moves(app, saga_id) == UNTIL_B_UNDOING
    assert shop.log("undo") == [("undo", "b")]


# -- what recovery finds, and what it leaves alone -------------------------------------------


def test_a_pending_saga_is_started(app: SagaApplication, shop: Shop) -> None:
    definition = shop.definition()
    app.register(definition)
    saga = Saga.start(
        id=SagaApplication.saga_id(definition.name, "pending"),
        name=definition.name,
        definition_version=definition.version,
        steps=definition.step_names,
        compensable=definition.compensable,
        key="pending",
        context_type="builtins:dict",
        context={"customer": "bo"},
    )
    app.save(saga)
    (row,) = app.statuses()
    assert (row.saga_id, row.status, row.step, row.version) == (saga.id, "pending", None, 1)

    only(app.recover(), saga.id, "resumed")

    assert moves(app, saga.id) == [*started("a", "b", "c"), ("SagaCompleted",)]
    assert shop.log() == [("do", "a"), ("do", "b"), ("do", "c")]


def test_a_missing_definition_is_reported_for_that_saga_and_the_others_are_recovered(
    app: SagaApplication, shop: Shop
) -> None:
    shop.die = {("do", "b")}
    trip = crash(app, shop.definition("trip"), "k")
    shop.die = {("do", "b")}
    hotel_v2 = shop.definition("hotel", version=2)
    hotel = crash(app, hotel_v2, "k")
    app.definitions.clear()
    app.register(shop.definition("trip"), shop.definition("hotel", version=1))
    hotel_before = moves(app, hotel)

    report = app.recover()

    assert report.resumed == [trip]
    assert list(report.failed) == [hotel]
    assert "'hotel' version 2" in report.failed[hotel]
    assert moves(app, hotel) == hotel_before
    assert app.get(trip).status == "completed"

    app.register(hotel_v2)
    only(app.recover(), hotel, "resumed")
    assert app.get(hotel).status == "completed"


def test_the_definition_is_looked_up_by_the_name_and_version_recorded(
    app: SagaApplication, shop: Shop
) -> None:
    v1 = shop.definition("trip", version=1)
    v2 = shop.definition("trip", steps="ab", version=2)
    app.register(v1, v2)
    assert app.definition("trip", 1) is v1
    assert app.definition("trip", 2) is v2
    with pytest.raises(DefinitionNotFound) as caught:
        app.definition("trip", 3)
    assert isinstance(caught.value, SagaError)
    assert isinstance(caught.value, KeyError)
    assert (caught.value.name, caught.value.version) == ("trip", 3)
    with pytest.raises(TypeError):
        app.register("trip")  # type: ignore[arg-type]

    shop.die = {("do", "b")}
    saga_id = crash(app, v1, "k")
    app.register(v2)
    only(app.recover(), saga_id, "resumed")
    assert shop.log("do")[-2:] == [("do", "b"), ("do", "c")]  # v1 has "c"; v2 has not


def test_a_definition_that_no_longer_has_the_step_is_reported_and_nothing_is_appended(
    app: SagaApplication, shop: Shop
) -> None:
    shop.die = {("do", "b")}
    saga_id = crash(app, shop.definition("trip"), "k")
    history = moves(app, saga_id)
    app.register(shop.definition("trip", steps="ac"))  # same name and version, "b" is gone

    report = app.recover()

    only(report, saga_id, "failed")
    assert "'b'" in report.failed[saga_id]
    assert moves(app, saga_id) == history


def test_a_saga_within_its_step_timeout_is_waiting_and_untouched(
    env: Env, open_app: Callable[[Env], SagaApplication], shop: Shop
) -> None:
    app = open_app(env)  # the default: 60 s
    assert app.default_step_timeout == SagaApplication.DEFAULT_STEP_TIMEOUT == 60
    shop.die = {("do", "b")}
    saga_id = crash(app, shop.definition(), "k")
    history = moves(app, saga_id)
    rows = app.statuses()

    only(app.recover(), saga_id, "waiting")

    assert moves(app, saga_id) == history
    assert app.statuses() == rows
    assert shop.log() == [("do", "a"), ("do", "b")]


def test_a_steps_own_timeout_overrides_the_default(app: SagaApplication, shop: Shop) -> None:
    assert app.default_step_timeout == 0
    shop.die = {("do", "b")}
    saga_id = crash(app, shop.definition(b={"timeout": 3600}), "k")
    only(app.recover(), saga_id, "waiting")

    shop.die = {("do", "b")}
    other = crash(app, shop.definition("brief", b={"timeout": 1.0}), "k")
    report = app.recover()
    assert set(report.waiting) == {saga_id, other}
    time.sleep(1.1)
    report = app.recover()
    assert (report.waiting, report.resumed) == ([saga_id], [other])
    assert app.get(other).status == "completed"


class DiesWhileWaiting(FakeClock):
    """A clock whose worker dies in the wait before a retry (as a SIGKILL would)."""

    def sleep(self, seconds: float) -> None:
        raise WorkerDied(f"waiting {seconds}s")


@pytest.mark.parametrize("store", DURABLE_STORES)
def test_a_worker_that_died_waiting_to_retry_leaves_its_saga_to_recovery_after_the_timeout(
    env: Env, open_app: Callable[[Env], SagaApplication], shop: Shop
) -> None:
    """`StepFailed(will_retry=True)` with no new start: the next attempt is recovery's.

    The saga is left to its (possibly still waiting) worker within the step's timeout, like
    any running step; after it, recovery starts the next attempt at once, on the same key,
    without waiting the backoff again (retries.md).
    """
    retry = {"b": {"retry": Retry(attempts=3, delay=5.0, jitter=0)}}
    shop.fail = {"b"}
    worker = SagaApplication(env=env, clock=DiesWhileWaiting())
    try:
        saga_id = crash(worker, shop.definition(**retry), "k")
    finally:
        worker.close()
    assert [move[:5] for move in moves(open_app(env), saga_id)[-2:]] == [
        ("StepStarted", "b", 1),
        ("StepFailed", "b", 1, "NoRooms", True),
    ]

    waiting = open_app(env)  # the default timeout: 60 s
    waiting.register(shop.definition(**retry))
    only(waiting.recover(), saga_id, "waiting")

    shop.fail = set()
    clock = FakeClock()
    rescuer = SagaApplication(env={**env, "SAGA_STEP_TIMEOUT": "0"}, clock=clock)
    try:
        rescuer.register(shop.definition(**retry))
        only(rescuer.recover(), saga_id, "resumed")
        assert rescuer.get(saga_id).status == "completed"
        assert rescuer.get(saga_id).attempts["b"] == 2
    finally:
        rescuer.close()
    assert clock.sleeps == []
    assert len(set(shop.keys("do", "b"))) == 1
    assert shop.log("do") == [("do", "a"), ("do", "b"), ("do", "b"), ("do", "c")]


@pytest.mark.parametrize("setting", ["1e300", "1e12"])
def test_a_step_timeout_setting_of_centuries_leaves_every_saga_in_flight_waiting(
    env: Env, open_app: Callable[[Env], SagaApplication], shop: Shop, setting: str
) -> None:
    app = open_app({**env, "SAGA_STEP_TIMEOUT": setting})
    shop.die = {("do", "b")}
    saga_id = crash(app, shop.definition(), "k")
    shop.die = {("do", "b")}
    other = crash(app, shop.definition("own", b={"timeout": float(setting)}), "k")
    history = moves(app, saga_id)

    report = app.recover()

    assert (set(report.waiting), report.failed) == ({saga_id, other}, {})
    assert moves(app, saga_id) == history


def test_a_step_timeout_of_centuries_leaves_the_saga_waiting_and_the_worker_alive(
    app: SagaApplication, shop: Shop
) -> None:
    """Beyond what a `timedelta` holds it is still a wait: not an OverflowError per saga."""
    shop.die = {("do", "b")}
    saga_id = crash(app, shop.definition(b={"timeout": 1e300}), "k")
    only(app.recover(), saga_id, "waiting")
    report = app.work(until_idle=True, poll_interval=0.01)
    assert report.failed == {}
    assert app.get(saga_id).status == "running"


@pytest.mark.parametrize(
    ("given", "setting", "expected"),
    [(None, None, 60.0), (None, "2.5", 2.5), (7, "2.5", 7.0), (0, None, 0.0)],
)
def test_the_default_step_timeout_comes_from_the_argument_else_the_setting(
    env: Env, given: float | None, setting: str | None, expected: float
) -> None:
    settings = {**env} if setting is None else {**env, "SAGA_STEP_TIMEOUT": setting}
    app = SagaApplication(env=settings, default_step_timeout=given)
    try:
        assert app.default_step_timeout == expected
    finally:
        app.close()


@pytest.mark.parametrize("store", ["popo"])
@pytest.mark.parametrize("value", ["soon", "-1", "nan", "inf"])
def test_a_bad_step_timeout_setting_is_a_configuration_error_naming_it(
    env: Env, value: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        SagaApplication(env={**env, "SAGA_STEP_TIMEOUT": value})
    assert caught.value.setting == "SAGA_STEP_TIMEOUT"
    assert value in str(caught.value)


def test_recovery_reads_only_the_streams_of_sagas_in_flight(
    app: SagaApplication, shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    definition = shop.definition()
    finished = [app.run(definition, {}).id for _ in range(5)]
    shop.fail = {"b"}
    finished += [app.run(definition, {}).id for _ in range(3)]
    shop.fail = set()
    shop.die = {("do", "c")}
    saga_id = crash(app, definition, "k")
    read: list[UUID] = []
    recorder: Any = app.recorder
    select_events = recorder.select_events

    def spy(originator_id: UUID, **kwargs: Any) -> Any:
        read.append(originator_id)
        return select_events(originator_id, **kwargs)

    monkeypatch.setattr(recorder, "select_events", spy)
    only(app.recover(), saga_id, "resumed")
    assert set(read) == {saga_id}
    assert not set(read) & set(finished)


def test_progress_is_reported_after_each_saga(app: SagaApplication, shop: Shop) -> None:
    ids = []
    for key in ("k1", "k2", "k3"):
        shop.die = {("do", "a")}
        ids.append(crash(app, shop.definition(), key))
    seen: list[tuple[int, int]] = []
    report = app.recover(progress=lambda done, total: seen.append((done, total)))
    assert sorted(report.resumed) == sorted(ids)
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert app.recover().found == 0


# -- a later process ----------------------------------------------------------------------


@pytest.mark.parametrize("store", DURABLE_STORES)
def test_a_later_process_recovers_what_an_earlier_one_left(
    env: Env, open_app: Callable[[Env], SagaApplication], shop: Shop
) -> None:
    first = open_app(env)
    shop.die = {("do", "b")}
    forward = crash(first, shop.definition("trip"), "k")
    backward = interrupted_compensation(first, shop, key="other")
    first.close()

    later = open_app({**env, "SAGA_STEP_TIMEOUT": "0"})
    later.register(shop.definition("trip"))
    report = later.recover()

    assert sorted(report.resumed) == sorted([forward, backward])
    assert later.get(forward).status == "completed"
    assert later.get(backward).status == "compensated"
    assert later.verify() == []
    assert {row.status for row in later.statuses()} == {"completed", "compensated"}


# -- fencing: one worker per step attempt ------------------------------------------------------


@pytest.fixture
def worker(
    store: str, env: Env, app: SagaApplication, open_app: Callable[[Env], SagaApplication]
) -> SagaApplication:
    """Another worker on `app`'s store (for POPO, whose store lives in `app`, `app` itself)."""
    if store == "popo":
        return app
    return open_app({**env, "SAGA_STEP_TIMEOUT": "0"})


def test_two_workers_resuming_the_same_saga_only_one_runs_it(
    app: SagaApplication,
    worker: SagaApplication,
    shop: Shop,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    shop.die = {("do", "b")}
    definition = shop.definition()
    saga_id = crash(app, definition, "k")
    worker.register(definition)
    winner: list[RecoveryReport] = []
    raced: list[bool] = []
    rebuild = recovery.rebuild

    def load_then_lose_the_race(reader: SagaApplication, saga_id: UUID) -> Saga:
        saga = rebuild(reader, saga_id)
        if not raced:  # both have read the saga; the other worker appends first
            raced.append(True)
            winner.append(app.recover())
        return saga

    monkeypatch.setattr(recovery, "rebuild", load_then_lose_the_race)
    shop.calls.clear()
    with caplog.at_level(logging.WARNING, logger="saga_es"):
        loser = worker.recover()

    (won,) = winner
    only(won, saga_id, "resumed")
    only(loser, saga_id, "taken_over")
    assert shop.log() == [("do", "b"), ("do", "c")]  # by the winner only, once each
    assert moves(app, saga_id) == [
        *started("a"),
        ("StepStarted", "b", 1),
        ("StepStarted", "b", 2),
        ("StepCompleted", "b", 2),
        ("StepStarted", "c", 1),
        ("StepCompleted", "c", 1),
        ("SagaCompleted",),
    ]
    assert any(str(saga_id) in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert app.verify() == []


@pytest.mark.parametrize("mode", ["run", "arun"])
def test_a_late_completion_after_a_takeover_is_rejected_and_logged(
    app: SagaApplication,
    worker: SagaApplication,
    shop: Shop,
    caplog: pytest.LogCaptureFixture,
    mode: str,
) -> None:
    # The first worker is still inside b's action when recovery elsewhere decides it is
    # gone, takes the saga over and finishes it. Then the first worker's action returns.
    takeover: list[RecoveryReport] = []
    taken: list[bool] = []

    def slow_b(context: Any, key: str) -> str:
        shop.calls.append(("do", "b", key))
        if not taken:
            taken.append(True)
            takeover.append(worker.recover())
        context["b"] = "done"
        return "b-ref"

    definition = SagaDefinition(
        "trip",
        [
            Step("a", shop.action("a"), shop.compensation("a")),
            Step("b", slow_b, shop.compensation("b")),
            Step("c", shop.action("c"), shop.compensation("c")),
        ],
    )
    worker.register(definition)
    with caplog.at_level(logging.WARNING, logger="saga_es"):
        if mode == "run":
            saga = app.run(definition, {}, key="k")
        else:
            saga = asyncio.run(app.arun(definition, {}, key="k"))

    only(takeover[0], saga.id, "resumed")
    newer = [
        *started("a"),
        ("StepStarted", "b", 1),
        ("StepStarted", "b", 2),
        ("StepCompleted", "b", 2),
        ("StepStarted", "c", 1),
        ("StepCompleted", "c", 1),
        ("SagaCompleted",),
    ]
    assert moves(app, saga.id) == newer  # no StepCompleted for attempt 1: it came too late
    assert saga.status == "completed"
    assert saga.version == len(newer)
    assert shop.log() == [("do", "a"), ("do", "b"), ("do", "b"), ("do", "c")]
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    (late,) = [r for r in warnings if "taken over" in r.getMessage()]
    assert str(saga.id) in late.getMessage()
    fields = (late.saga_id, late.saga_name, late.step, late.attempt)  # type: ignore[attr-defined]
    assert fields == (str(saga.id), "trip", "c", 1), "where the late worker's rejected boundary led"
    assert app.verify() == []


# -- the verifier, and what recovery does with streams it rejects ------------------------------


def forge(app: SagaApplication, saga_id: UUID, event_class: type[Saga.Event], **data: Any) -> int:
    """Append an event to a stored stream by hand, past the state machine; its version."""
    version = app.get(saga_id).version + 1
    event = event_class(  # type: ignore[call-arg]
        originator_id=saga_id,
        originator_version=version,
        timestamp=event_class.create_timestamp(),
        **data,
    )
    app.recorder.insert_events([app.mapper.to_stored_event(event)])
    return version


def write_raw(app: SagaApplication, saga_id: UUID, record: str) -> int:
    """Append a record of kind `record` (see `UNREADABLE`) that no reader can decode."""
    version = app.get(saga_id).version + 1
    topic, state = UNREADABLE[record]
    if state is None:  # a well-formed event of a type this version does not know
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


@pytest.fixture
def mixed(app: SagaApplication, shop: Shop) -> dict[str, UUID]:
    """One saga in each state: completed, compensated, stuck, running, compensating."""
    ids = {"completed": app.run(shop.definition(), {}, key="completed").id}
    shop.fail = {"b"}
    ids["compensated"] = app.run(shop.definition(), {}, key="compensated").id
    stuck = Shop()
    stuck.fail, stuck.die = {"c"}, set()
    definition = SagaDefinition(
        "trip",
        [
            Step("a", stuck.action("a"), stuck.compensation("a")),
            Step("b", stuck.action("b"), _raise),
            Step("c", stuck.action("c")),
        ],
    )
    ids["stuck"] = app.run(definition, {}, key="stuck").id
    shop.fail = set()
    shop.die = {("do", "b")}
    ids["running"] = crash(app, shop.definition(), "running")
    shop.fail = {"c"}
    shop.die = {("undo", "b")}
    ids["compensating"] = crash(app, shop.definition(), "compensating")
    shop.fail = set()
    app.register(shop.definition())
    return ids


def _raise(context: Any, key: str) -> None:
    raise RuntimeError("cannot cancel")


def test_verify_finds_nothing_wrong_in_a_healthy_store(
    app: SagaApplication, mixed: dict[str, UUID]
) -> None:
    assert {s: app.get(i).status for s, i in mixed.items()} == {s: s for s in mixed}
    assert app.verify() == []
    app.recover()
    assert app.verify() == []


TAMPERINGS: dict[str, tuple[type[Saga.Event], dict[str, Any], str, str]] = {
    "completed-never-started": (
        Saga.StepCompleted,
        {"step": "c", "attempt": 1, "changes": {}, "removed": [], "result": None},
        "complete_step",
        "'c' was not started",
    ),
    "started-out-of-turn": (
        Saga.StepStarted,
        {"step": "c", "attempt": 1},
        "start_step",
        "'b' is still in flight",
    ),
    "completed-too-soon": (Saga.SagaCompleted, {}, "complete_saga", "still in flight"),
}


@pytest.mark.parametrize("tampering", TAMPERINGS)
def test_verify_reports_a_tampered_stream_with_saga_and_version(
    app: SagaApplication, mixed: dict[str, UUID], tampering: str
) -> None:
    event_class, data, move, reason = TAMPERINGS[tampering]
    to_state = "completed" if event_class is Saga.SagaCompleted else "running"
    saga_id = mixed["running"]
    version = forge(app, saga_id, event_class, to_state=to_state, **data)

    (problem,) = app.verify()

    assert isinstance(problem, StreamProblem)
    assert (problem.saga_id, problem.version, problem.move) == (saga_id, version, move)
    assert reason in problem.reason
    assert str(saga_id) in str(problem)
    assert f"v{version}" in str(problem)


@pytest.mark.parametrize("tampering", TAMPERINGS)
def test_recovery_skips_a_stream_the_verifier_rejects_and_recovers_the_others(
    app: SagaApplication, shop: Shop, mixed: dict[str, UUID], tampering: str
) -> None:
    event_class, data, _, _ = TAMPERINGS[tampering]
    to_state = "completed" if event_class is Saga.SagaCompleted else "running"
    saga_id = mixed["running"]
    forge(app, saga_id, event_class, to_state=to_state, **data)
    history = moves(app, saga_id)
    in_flight = [row.saga_id for row in app.statuses(status=("running", "compensating"))]
    shop.calls.clear()

    report = app.recover()

    assert moves(app, saga_id) == history  # nothing appended to the rejected stream
    assert shop.log() == [("undo", "b"), ("undo", "a")]  # only the other saga's calls
    assert report.resumed == [mixed["compensating"]]
    assert app.get(mixed["compensating"]).status == "compensated"
    # Everything recovery found in flight is accounted for: one it cannot resume, it reports.
    assert report.found == len(in_flight)
    assert list(report.failed) == [i for i in in_flight if i == saga_id]


UNREADABLE: dict[str, tuple[str, bytes | None]] = {
    # An event type from a newer saga_es: well-formed, but unknown here.
    "unknown-topic": ("saga_es:StepSkipped", None),
    # Unknown, and nothing like an event.
    "unknown-topic-garbage": ("saga_es:Teleported", b"{}"),
    # A known type whose bytes were damaged after they were written.
    "corrupt-state": (Saga.StepCompleted.TOPIC, b"\x00\x9c garbled"),
}


@pytest.mark.parametrize("record", UNREADABLE)
def test_an_unreadable_record_is_reported_and_recovery_skips_that_saga(
    app: SagaApplication, shop: Shop, mixed: dict[str, UUID], record: str
) -> None:
    saga_id = mixed["running"]
    version = write_raw(app, saga_id, record)

    (problem,) = app.verify()
    assert (problem.saga_id, problem.version) == (saga_id, version)
    assert problem.move == UNREADABLE[record][0]
    assert "cannot be read" in problem.reason

    shop.calls.clear()
    report = app.recover()
    assert list(report.failed) == [saga_id]
    assert report.resumed == [mixed["compensating"]]
    assert shop.log() == [("undo", "b"), ("undo", "a")]
    assert len(list(app.recorder.select_events(saga_id))) == version


def mentions(text: str, version: int) -> bool:
    """`text` names `version` as a number of its own (not a digit inside a saga id)."""
    return re.search(rf"(?<![\w-]){version}(?![\w-])", text) is not None


@pytest.mark.parametrize("record", UNREADABLE)
def test_reading_an_unreadable_stream_is_a_clear_error_naming_saga_and_version(
    app: SagaApplication, mixed: dict[str, UUID], record: str
) -> None:
    saga_id = mixed["running"]
    version = write_raw(app, saga_id, record)
    for read in (app.get, app.history):
        with pytest.raises(SagaError) as caught:
            read(saga_id)
        assert str(saga_id) in str(caught.value)
        assert mentions(str(caught.value), version), str(caught.value)
    assert app.get(saga_id, version=version - 1).version == version - 1  # before it: readable
    report = app.recover()
    assert mentions(report.failed[saga_id], version), report.failed[saga_id]


def test_verify_reports_a_stream_written_past_the_application(app: SagaApplication) -> None:
    # Written straight to the recorder, as another writer sharing the store might: the
    # stream is stored, so the verifier must read it, status row or not.
    saga = Saga.start(
        id=SagaApplication.saga_id("trip", "raw"),
        name="trip",
        definition_version=1,
        steps=["a", "b"],
        compensable=["a", "b"],
        key="raw",
        context_type="builtins:dict",
        context={},
    )
    saga.start_step("a", 1)
    events = list(saga.collect_events())
    bad = Saga.SagaCompleted(  # type: ignore[call-arg]
        originator_id=saga.id,
        originator_version=3,
        timestamp=Saga.SagaCompleted.create_timestamp(),
        to_state="completed",
    )
    app.recorder.insert_events([app.mapper.to_stored_event(e) for e in [*events, bad]])

    (problem,) = app.verify()
    assert (problem.saga_id, problem.version, problem.move) == (saga.id, 3, "complete_saga")


# -- the status projection ------------------------------------------------------------------


def test_each_commit_leaves_the_status_row_as_of_its_last_event(
    app: SagaApplication, shop: Shop, commits: CommitSpy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Read right after each transaction returns: the row never lags behind the events.
    seen: list[tuple[int, SagaStatus]] = []
    recorder: Any = app.recorder
    insert_events = recorder.insert_events

    def spy(stored_events: Any, **kwargs: Any) -> Any:
        result = insert_events(stored_events, **kwargs)
        (row,) = app.statuses()
        seen.append((stored_events[-1].originator_version, row))
        return result

    monkeypatch.setattr(recorder, "insert_events", spy)
    shop.fail = {"c"}
    saga = app.run(shop.definition(), {}, key="k")

    assert len(seen) == commits.count == 6
    for version, row in seen:
        assert (row.saga_id, row.version) == (saga.id, version)
    assert [row.status for _, row in seen] == ["running"] * 3 + ["compensating"] * 2 + [
        "compensated"
    ]
    assert [row.step for _, row in seen] == ["a", "b", "c", "b", "a", "a"]


def test_a_status_row_describes_the_saga_as_of_its_last_event(
    app: SagaApplication, mixed: dict[str, UUID]
) -> None:
    expected_step = {
        "completed": "c",
        "compensated": "a",
        "stuck": "b",
        "running": "b",
        "compensating": "b",
    }
    by_id = {row.saga_id: row for row in app.statuses()}
    assert set(by_id) == set(mixed.values())
    for status, saga_id in mixed.items():
        row, history = by_id[saga_id], app.saga_events(saga_id)
        assert isinstance(row, SagaStatus)
        assert (row.name, row.definition_version, row.key) == ("trip", 1, status)
        assert (row.status, row.step, row.version) == (status, expected_step[status], len(history))
        assert row.started_at == history[0].timestamp
        assert row.updated_at == history[-1].timestamp


def test_statuses_filter_by_status_name_key_and_start_time(
    app: SagaApplication, shop: Shop, mixed: dict[str, UUID]
) -> None:
    hotel = app.run(shop.definition("hotel"), {}, key="completed").id
    everything = app.statuses()
    assert [row.saga_id for row in everything] == [*mixed.values(), hotel]  # oldest first

    def ids(**filters: Any) -> list[UUID]:
        return [row.saga_id for row in app.statuses(**filters)]

    assert ids(status="completed") == [mixed["completed"], hotel]
    assert ids(status=("running", "compensating")) == [mixed["running"], mixed["compensating"]]
    assert ids(status=["stuck"]) == [mixed["stuck"]]
    assert ids(name="hotel") == [hotel]
    assert ids(key="completed") == [mixed["completed"], hotel]
    assert ids(name="trip", key="completed", status="completed") == [mixed["completed"]]
    assert ids(name="nobody") == []
    third = everything[2].started_at
    assert ids(started_after=third) == [row.saga_id for row in everything[3:]]
    assert ids(started_before=third) == [row.saga_id for row in everything[:2]]
    assert ids(started_after=everything[0].started_at, started_before=third) == [
        everything[1].saga_id
    ]


@pytest.mark.parametrize("size", [1, 2, 4, 6, 7])
def test_statuses_paginate_with_after(
    app: SagaApplication, shop: Shop, mixed: dict[str, UUID], size: int
) -> None:
    app.run(shop.definition("hotel"), {})
    everything = app.statuses()
    assert len(everything) == 6
    pages: list[list[SagaStatus]] = []
    after: UUID | None = None
    while True:
        page = app.statuses(after=after, limit=size)
        assert len(page) <= size
        if not page:
            break
        pages.append(page)
        after = page[-1].saga_id
    assert [row for page in pages for row in page] == everything
    assert len(pages) == -(-6 // size)
    finished = app.statuses(status=("completed", "compensated"), limit=1)
    assert app.statuses(status=("completed", "compensated"), after=finished[0].saga_id) == [
        row for row in everything[1:] if row.status in ("completed", "compensated")
    ]


def test_rebuild_status_recomputes_the_same_rows_from_the_events(
    app: SagaApplication, mixed: dict[str, UUID]
) -> None:
    before = app.statuses()
    assert app.rebuild_status() == len(mixed)
    assert app.statuses() == before
    recorder: Any = app.recorder
    recorder.delete_statuses()
    assert app.statuses() == []
    assert app.rebuild_status() == len(mixed)
    assert app.statuses() == before


def test_recovery_keeps_the_projection_up_to_date(
    app: SagaApplication, mixed: dict[str, UUID]
) -> None:
    report = app.recover()
    assert sorted(report.resumed) == sorted([mixed["running"], mixed["compensating"]])
    rows = {row.saga_id: row for row in app.statuses()}
    assert rows[mixed["running"]].status == "completed"
    assert rows[mixed["compensating"]].status == "compensated"
    for saga_id in (mixed["running"], mixed["compensating"]):
        assert rows[saga_id].version == len(app.saga_events(saga_id))
    before = app.statuses()
    app.rebuild_status()
    assert app.statuses() == before


def test_stats_count_sagas_per_name_and_status(
    app: SagaApplication, shop: Shop, mixed: dict[str, UUID]
) -> None:
    app.run(shop.definition("hotel"), {})
    assert app.stats() == {
        ("trip", "completed"): 1,
        ("trip", "compensated"): 1,
        ("trip", "stuck"): 1,
        ("trip", "running"): 1,
        ("trip", "compensating"): 1,
        ("hotel", "completed"): 1,
    }
    app.recover()
    assert app.stats() == {
        ("trip", "completed"): 2,
        ("trip", "compensated"): 2,
        ("trip", "stuck"): 1,
        ("hotel", "completed"): 1,
    }


def test_rebuilding_the_projection_keeps_the_rows_of_readable_sagas(
    app: SagaApplication, mixed: dict[str, UUID]
) -> None:
    # One unreadable stream must not cost every other saga its row: without its row, a
    # saga in flight is never found by recovery again.
    before = app.statuses()
    write_raw(app, mixed["completed"], "unknown-topic")
    with contextlib.suppress(Exception):
        app.rebuild_status()
    after = {row.saga_id: row for row in app.statuses()}
    for row in before:
        if row.saga_id != mixed["completed"]:
            assert after.get(row.saga_id) == row


@pytest.mark.parametrize("record", UNREADABLE)
def test_an_unreadable_record_leaves_the_projection_readable(
    app: SagaApplication, mixed: dict[str, UUID], record: str
) -> None:
    # The saga it was appended to keeps a well-formed row (recovery must still find it, to
    # report it), and every other saga keeps its row unchanged.
    before = {row.saga_id: row for row in app.statuses()}
    saga_id = mixed["running"]
    write_raw(app, saga_id, record)
    after = {row.saga_id: row for row in app.statuses()}
    assert set(after) == set(before)
    for other, row in before.items():
        if other != saga_id:
            assert after[other] == row
    row = after[saga_id]
    assert row.status in ("running", "compensating")
    assert isinstance(row.updated_at, datetime)
    assert [r.saga_id for r in app.statuses(status="running")] == [saga_id]


@pytest.mark.parametrize("store", DURABLE_STORES)
def test_the_projection_survives_reopening_the_store(
    env: Env, open_app: Callable[[Env], SagaApplication], app: SagaApplication, mixed: Any
) -> None:
    before = app.statuses()
    app.close()
    reopened = open_app(env)
    assert reopened.statuses() == before
    assert reopened.statuses(status=("running", "compensating")) == [
        row for row in before if row.status in ("running", "compensating")
    ]


# -- policies are checked when the definition is built -----------------------------------------


def noop(context: Any, key: str) -> None:
    pass


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"recovery": "later"}, "recovery must be one of retry, fail, compensate, reconcile"),
        ({"recovery": "reconcile"}, "needs reconcile="),
        ({"recovery": "compensate", "compensation": None}, "needs a compensation"),
        ({"compensation_recovery": "compensate"}, "compensation_recovery must be one of"),
        ({"compensation_recovery": "reconcile"}, "needs reconcile_compensation="),
        ({"reconcile": "yes"}, "reconcile must be callable"),
        ({"reconcile_compensation": 1}, "reconcile_compensation must be callable"),
        ({"timeout": 0}, "timeout must be a finite number of seconds > 0"),
        ({"timeout": -1.5}, "timeout must be"),
        ({"timeout": "5"}, "timeout must be"),
        ({"timeout": True}, "timeout must be"),
    ],
)
def test_bad_policies_are_definition_errors(kwargs: dict[str, Any], message: str) -> None:
    compensation = kwargs.pop("compensation", noop)
    with pytest.raises(DefinitionError, match=message) as caught:
        Step("b", noop, compensation, **kwargs)
    assert "'b'" in str(caught.value)


def test_policy_defaults() -> None:
    plain = Step("a", noop)
    assert (plain.recovery, plain.compensation_recovery, plain.timeout) == ("retry", "retry", None)
    asked = Step("a", noop, noop, reconcile=noop, reconcile_compensation=noop, timeout=2)
    assert (asked.recovery, asked.compensation_recovery, asked.timeout) == (
        "reconcile",
        "reconcile",
        2,
    )
    told = Step("a", noop, noop, recovery="fail", reconcile=noop, compensation_recovery="fail")
    assert (told.recovery, told.compensation_recovery) == ("fail", "fail")
    assert SagaDefinition("d", [Step("a", noop, noop), Step("b", noop)]).compensable == ["a"]


# -- parallel groups: members in flight when the worker died ------------------------------


def grouped(shop: Shop, **policies: Any) -> SagaDefinition:
    """a, then b and c in parallel, then d; `policies[step]` are that step's kwargs."""

    def step(name: str) -> Step:
        return Step(name, shop.action(name), shop.compensation(name), **policies.get(name, {}))

    return SagaDefinition("grouped", [step("a"), Parallel(step("b"), step("c")), step("d")])


def test_recovery_re_runs_every_member_in_flight_and_the_saga_goes_on(
    app: SagaApplication, shop: Shop
) -> None:
    shop.die = {("do", "b"), ("do", "c")}
    saga_id = crash(app, grouped(shop), "both")
    assert set(app.get(saga_id).in_flight) == {"b", "c"}

    only(app.recover(), saga_id, "resumed")
    saga = app.get(saga_id)
    assert saga.status == "completed"
    assert saga.attempts == {"a": 1, "b": 2, "c": 2, "d": 1}
    assert shop.keys("do", "b") == [f"{saga_id}:b"] * 2
    assert saga.context_state == {"a": "done", "b": "done", "c": "done", "d": "done"}
    assert app.verify() == []


def test_a_member_whose_policy_is_fail_turns_the_whole_group_back(
    app: SagaApplication, shop: Shop
) -> None:
    shop.die = {("do", "b"), ("do", "c")}
    saga_id = crash(app, grouped(shop, c={"recovery": "fail"}), "fail")

    only(app.recover(), saga_id, "resumed")
    rows = moves(app, saga_id)[5:]
    assert rows[:2] == [
        ("StepFailed", "b", 1, "OutcomeUnknown", False, True),  # retry policy: may have run
        ("StepFailed", "c", 1, "OutcomeUnknown", False, False),  # fail: took no effect
    ]
    assert [r[:2] for r in rows[2:]] == [
        ("CompensationStarted", "b"),
        ("CompensationRan", "b"),
        ("CompensationStarted", "a"),
        ("CompensationRan", "a"),
        ("SagaCompensated",),
    ]
    assert app.get(saga_id).status == "compensated"
    assert app.verify() == []


# -- poison steps: an outcome lost on every resumption ------------------------------------


@pytest.mark.parametrize("limit", [0, 2])
def test_a_step_that_kills_every_worker_ends_stuck_after_the_set_resumptions(
    env: Env, open_app: Callable[[Env], SagaApplication], shop: Shop, limit: int
) -> None:
    app = open_app({**env, "SAGA_STEP_TIMEOUT": "0", "SAGA_MAX_RESUMPTIONS": str(limit)})
    assert app.max_resumptions == limit
    definition = shop.definition()
    shop.die = {("do", "b")}
    saga_id = crash(app, definition, "poison")
    for _ in range(limit):  # every resumption dies in b again
        shop.die = {("do", "b")}
        with pytest.raises(WorkerDied):
            app.recover()
    only(app.recover(), saga_id, "resumed")
    saga = app.get(saga_id)
    assert saga.status == "stuck"
    assert saga.in_flight == {"b": limit + 1}
    assert saga.error is not None
    assert saga.error["type"] == "PoisonStep"
    assert f"after {limit} resumption(s)" in saga.error["message"]
    assert shop.log("do").count(("do", "b")) == limit + 1
    assert app.recover().found == 0, "a stuck saga is left to a person"

    resolved = app.resolve(saga_id, "retry", by="ops", reason="fixed the bug in b")
    assert resolved.status == "completed"
    assert resolved.attempts["b"] == limit + 2
    assert shop.keys("do", "b") == [f"{saga_id}:b"] * (limit + 2)
    assert app.verify() == []


def test_a_poison_step_marked_compensated_undoes_what_came_before(
    env: Env, open_app: Callable[[Env], SagaApplication], shop: Shop
) -> None:
    app = open_app({**env, "SAGA_STEP_TIMEOUT": "0", "SAGA_MAX_RESUMPTIONS": "0"})
    definition = shop.definition()
    shop.die = {("do", "b")}
    saga_id = crash(app, definition, "poison")
    app.recover()
    assert app.get(saga_id).status == "stuck"
    resolved = app.resolve(saga_id, "mark-compensated", by="ops", reason="b never charged")
    assert resolved.status == "compensated"
    assert resolved.compensated == ["a"]
    assert shop.log("undo") == [("undo", "a")]
    assert [r.event for r in app.history(saga_id)][-5:] == [
        "SagaStuck",
        "SagaResolved",
        "CompensationStarted",
        "CompensationRan",
        "SagaCompensated",
    ]
    assert app.verify() == []


def test_a_bad_resumption_limit_names_the_setting(env: Env) -> None:
    with pytest.raises(ConfigurationError, match="SAGA_MAX_RESUMPTIONS"):
        SagaApplication(env={**env, "SAGA_MAX_RESUMPTIONS": "-1"})


POISON = """
import os, signal, sys
from saga_es import SagaApplication, SagaDefinition, Step


def kills(context, key):
    with open(os.environ["POISON_LOG"], "a") as log:
        log.write(key + "\\n")
    os.kill(os.getpid(), signal.SIGKILL)


POISON = SagaDefinition("poison", [Step("a", lambda c, k: None), Step("b", kills)])
store = ("PERSISTENCE", "SQLITE", "POSTGRES", "SAGA_")
app = SagaApplication(env={k: v for k, v in os.environ.items() if k.startswith(store)})
app.register(POISON)
if sys.argv[1] == "run":
    app.run(POISON, {}, key="p")
else:
    report = app.recover()
    print(len(report.resumed), len(report.failed))
"""


@pytest.mark.parametrize("store", DURABLE_STORES)
def test_a_step_that_kills_its_process_every_time_ends_stuck(
    store: str, env: Env, open_app: Callable[[Env], SagaApplication], tmp_path: Path
) -> None:
    script = tmp_path / "poison.py"
    script.write_text(POISON)
    settings = {**env, "SAGA_STEP_TIMEOUT": "0", "SAGA_MAX_RESUMPTIONS": "2"}
    process_env = {**os.environ, **settings, "POISON_LOG": str(tmp_path / "calls.log")}

    def attempt(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(script), *args],
            env=process_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    assert attempt("run").returncode == -signal.SIGKILL
    for _ in range(2):  # each resumption runs b again, and b kills that process too
        assert attempt("recover").returncode == -signal.SIGKILL
    last = attempt("recover")
    assert last.returncode == 0, last.stderr  # the third resumption does not run b again
    app = open_app(settings)
    saga = app.get(SagaApplication.saga_id("poison", "p"))
    assert saga.status == "stuck"
    assert saga.error is not None
    assert saga.error["type"] == "PoisonStep"
    calls = (tmp_path / "calls.log").read_text().split()
    assert calls == [f"{saga.id}:b"] * 3
    assert app.verify() == []
