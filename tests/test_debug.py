"""Re-running one recorded step in isolation: `app.rerun_step(saga_id, step, version=None)`.

The call gets the context the saga recorded when that call started (or as of `version`),
the step's own idempotency key, and appends nothing: the stream, as read by this
application or another one, is what it was. Every behaviour runs on POPO, SQLite and
PostgreSQL through the `app` fixture.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID, uuid4

import pytest
from conftest import DURABLE_STORES, Env
from pydantic import BaseModel

from saga_es import (
    DefinitionNotFound,
    FakeClock,
    Retry,
    SagaApplication,
    SagaDefinition,
    SagaError,
    SagaNotFound,
    Step,
    VersionNotFound,
)
from saga_es.debug import RerunResult
from saga_es.errors import StepNotReached
from saga_es.history import ABSENT, REMOVED, Change, HistoryRecord


class WorkerDied(BaseException):
    """Stands in for the process dying mid-call; the runner does not catch it."""


class Declined(Exception):
    """An action's ordinary failure."""


@dataclass
class Order:
    sku: str
    qty: int
    tags: list[str] = field(default_factory=list)


class Trip(BaseModel):
    sku: str
    qty: int
    tags: list[str] = []


class Desk:
    """Callables that log each call as (what, step, key, context seen), failing where told.

    Step "c" fails with `Declined` until `fixed` is set; then it adds "c", changes "a" and
    removes "order".
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str, dict[str, Any]]] = []
        self.fixed = False
        self.die: set[tuple[str, str]] = set()

    def _enter(self, what: str, step: str, context: Any, key: str) -> None:
        seen = copy.deepcopy(context if isinstance(context, dict) else vars(context))
        self.calls.append((what, step, key, seen))
        if (what, step) in self.die:
            self.die.discard((what, step))
            raise WorkerDied(f"{what} {step}")

    def do(self, step: str) -> Callable[[Any, str], Any]:
        def action(context: dict[str, Any], key: str) -> str:
            self._enter("do", step, context, key)
            context[step] = f"{step}-done"
            return f"{step}-ref"

        return action

    def undo(self, step: str) -> Callable[[Any, str], Any]:
        def compensation(context: dict[str, Any], key: str) -> None:
            self._enter("undo", step, context, key)
            context[step] = f"{step}-undone"

        return compensation

    def flaky(self, context: dict[str, Any], key: str) -> str:
        self._enter("do", "c", context, key)
        context["c"] = "half-done"  # a failed attempt's changes are not kept
        if not self.fixed:
            raise Declined("no rooms left")
        context["c"] = "c-done"
        context["a"] += "+c"
        del context["order"]
        return "c-ref"

    def definition(self, name: str = "trip", version: int = 1) -> SagaDefinition:
        """a, b compensable; c fails (twice) until fixed; d is never reached."""
        return SagaDefinition(
            name,
            [
                Step("a", self.do("a"), self.undo("a")),
                Step("b", self.do("b"), self.undo("b")),
                Step("c", self.flaky, retry=Retry(attempts=2, delay=0.0, jitter=0)),
                Step("d", self.do("d"), self.undo("d")),
            ],
            version=version,
        )

    def seen(self, what: str, step: str) -> list[dict[str, Any]]:
        """The contexts each call of (what, step) started with."""
        return [seen for w, s, _, seen in self.calls if (w, s) == (what, step)]

    def keys(self, what: str, step: str) -> list[str]:
        return [key for w, s, key, _ in self.calls if (w, s) == (what, step)]


@pytest.fixture
def desk() -> Desk:
    return Desk()


def version_of(app: SagaApplication, saga_id: UUID, event: str, step: str) -> int:
    """The version of the saga's latest `event` naming `step`."""
    found = [r.version for r in app.history(saga_id) if (r.event, r.step) == (event, step)]
    assert found, (event, step)
    return found[-1]


def unchanged(app: SagaApplication, saga_id: UUID) -> Callable[[], None]:
    """A check that the saga's stream and status row are still as they are now."""
    records: list[HistoryRecord] = app.history(saga_id)
    version = app.get(saga_id).version
    rows = app.statuses()

    def check(reader: SagaApplication = app) -> None:
        assert reader.history(saga_id) == records
        assert reader.get(saga_id).version == version == len(records)
        assert reader.statuses() == rows

    return check


def failed_saga(app: SagaApplication, desk: Desk) -> UUID:
    saga = app.run(desk.definition(), {"order": 1})
    assert saga.status == "compensated"
    return saga.id


AFTER_A = {"order": 1, "a": "a-done"}
AFTER_B = {**AFTER_A, "b": "b-done"}


# -- a failed step ---------------------------------------------------------------------


def test_a_failed_step_reruns_with_the_context_of_its_latest_attempt(
    app: SagaApplication, reader: SagaApplication, desk: Desk
) -> None:
    saga_id = failed_saga(app, desk)
    check = unchanged(app, saga_id)
    calls = len(desk.calls)

    result = app.rerun_step(saga_id, "c")

    assert isinstance(result, RerunResult)
    assert (result.saga_id, result.step, result.kind) == (saga_id, "c", "action")
    assert result.version == version_of(app, saga_id, "StepStarted", "c")
    assert app.history(saga_id)[result.version - 1].attempt == 2
    # Earlier steps' changes are in it; the compensations that came later are not.
    assert result.context_before == AFTER_B
    assert result.context_before == desk.seen("do", "c")[-1]
    assert desk.seen("do", "c")[-1] == desk.seen("do", "c")[0]
    assert len(desk.calls) == calls + 1  # called once, no retries
    assert isinstance(result.error, Declined)
    assert str(result.error) == "no rooms left"
    assert not result.ok
    assert "Traceback" in result.traceback
    assert "Declined: no rooms left" in result.traceback
    assert "flaky" in result.traceback
    assert (result.result, result.context_after, result.changes) == (None, None, {})
    check()
    check(reader)


def test_after_a_fix_the_rerun_returns_the_result_and_the_changes(
    app: SagaApplication, reader: SagaApplication, desk: Desk
) -> None:
    saga_id = failed_saga(app, desk)
    check = unchanged(app, saga_id)
    desk.fixed = True

    result = app.rerun_step(saga_id, "c")

    assert result.ok
    assert result.error is None
    assert result.traceback == ""
    assert result.result == "c-ref"
    assert result.context_before == AFTER_B
    assert result.context_after == {"a": "a-done+c", "b": "b-done", "c": "c-done"}
    assert result.changes == {
        "c": Change(ABSENT, "c-done"),
        "a": Change("a-done", "a-done+c"),
        "order": Change(1, REMOVED),
    }
    assert app.get(saga_id).status == "compensated"
    check()
    check(reader)


def test_a_rerun_never_changes_the_recorded_context(app: SagaApplication) -> None:
    def grow(context: dict[str, Any], key: str) -> None:
        context["tags"].append("again")
        context["nested"]["n"] += 1

    saga = app.run(SagaDefinition("grow", [Step("grow", grow)]), {"tags": [], "nested": {"n": 0}})
    before = app.get(saga.id, version=2).context_state
    result = app.rerun_step(saga.id, "grow")
    assert result.context_before == {"tags": [], "nested": {"n": 0}} == before
    assert result.context_after == {"tags": ["again"], "nested": {"n": 1}}
    assert result.changes == {
        "tags": Change([], ["again"]),
        "nested": Change({"n": 0}, {"n": 1}),
    }
    assert app.get(saga.id, version=2).context_state == before
    assert app.get(saga.id).context_state == {"tags": ["again"], "nested": {"n": 1}}
    again = app.rerun_step(saga.id, "grow")
    assert again.context_before == before  # the first rerun left nothing behind


def test_version_picks_the_context_as_of_that_event(app: SagaApplication, desk: Desk) -> None:
    saga_id = failed_saga(app, desk)
    check = unchanged(app, saga_id)
    a_done = version_of(app, saga_id, "StepCompleted", "a")
    last = app.get(saga_id).version

    early = app.rerun_step(saga_id, "c", a_done)
    assert (early.version, early.context_before) == (a_done, AFTER_A)
    late = app.rerun_step(saga_id, "c", version=last)
    assert late.version == last
    assert late.context_before == app.get(saga_id).context_state
    assert late.context_before == {"order": 1, "a": "a-undone", "b": "b-undone"}
    assert desk.seen("do", "c")[-2:] == [AFTER_A, late.context_before]
    check()


def test_a_completed_steps_action_reruns_with_the_context_it_started_with(
    app: SagaApplication, desk: Desk
) -> None:
    saga_id = failed_saga(app, desk)
    check = unchanged(app, saga_id)

    result = app.rerun_step(saga_id, "b")

    assert (result.kind, result.version) == ("action", version_of(app, saga_id, "StepStarted", "b"))
    assert result.context_before == AFTER_A == desk.seen("do", "b")[0]
    assert result.result == "b-ref"
    assert result.changes == {"b": Change(ABSENT, "b-done")}
    assert result.ok
    check()


def test_a_compensation_reruns_with_the_context_it_started_with(
    app: SagaApplication, reader: SagaApplication, desk: Desk
) -> None:
    saga_id = failed_saga(app, desk)
    check = unchanged(app, saga_id)

    result = app.rerun_step(saga_id, "a", compensation=True)

    assert result.kind == "compensation"
    assert result.version == version_of(app, saga_id, "CompensationStarted", "a")
    # b was compensated first: its compensation's change is in; a's own is not.
    assert result.context_before == {**AFTER_A, "b": "b-undone"}
    assert result.context_before == desk.seen("undo", "a")[-1]
    assert desk.seen("undo", "a")[-1] == desk.seen("undo", "a")[0]
    assert result.changes == {"a": Change("a-done", "a-undone")}
    assert result.result is None
    assert result.ok
    check()
    check(reader)


def test_a_failing_compensation_reruns_its_latest_attempt(
    app: SagaApplication, reader: SagaApplication
) -> None:
    attempts: list[dict[str, Any]] = []

    def jammed(context: dict[str, Any], key: str) -> None:
        attempts.append(dict(context))
        context["undo"] = len(attempts)
        raise Declined(f"jammed {len(attempts)}")

    definition = SagaDefinition(
        "stuck",
        [
            Step("a", lambda c, k: c.update(a=1), jammed, compensation_retry=2),
            Step("b", lambda c, k: c.update(b=1), lambda c, k: c.update(b=0)),
            Step("c", lambda c, k: 1 / 0),
        ],
    )
    app.clock = FakeClock()
    saga = app.run(definition, {})
    assert saga.status == "stuck"
    check = unchanged(app, saga.id)

    result = app.rerun_step(str(saga.id), "a", compensation=True)

    assert result.version == version_of(app, saga.id, "CompensationStarted", "a")
    assert app.history(saga.id)[result.version - 1].attempt == 2
    assert result.context_before == {"a": 1, "b": 0} == attempts[1]
    assert (type(result.error), str(result.error)) == (Declined, "jammed 3")
    assert "jammed" in result.traceback
    at = app.rerun_step(
        saga.id, "a", version_of(app, saga.id, "StepCompleted", "b"), compensation=True
    )
    assert at.context_before == {"a": 1, "b": 1}
    assert at.kind == "compensation"
    check()
    check(reader)


def test_the_step_key_is_passed_as_in_the_real_attempts(app: SagaApplication, desk: Desk) -> None:
    saga_id = failed_saga(app, desk)
    real = {("do", "c"): desk.keys("do", "c"), ("undo", "a"): desk.keys("undo", "a")}
    desk.calls.clear()

    for step, compensation in (("c", False), ("a", True), ("b", False)):
        result = app.rerun_step(saga_id, step, compensation=compensation)
        assert result.key == f"{saga_id}:{step}" == app.get(saga_id).step_key(step)
    assert [key for _, _, key, _ in desk.calls] == [f"{saga_id}:{s}" for s in "cab"]
    assert real[("do", "c")] == [f"{saga_id}:c"] * 2
    assert real[("undo", "a")] == [f"{saga_id}:a"]


def test_an_interrupted_step_reruns_with_the_context_it_started_with(
    app: SagaApplication, reader: SagaApplication, desk: Desk
) -> None:
    desk.die = {("do", "b")}
    with pytest.raises(WorkerDied):
        app.run(desk.definition(), {"order": 1}, key="k")
    saga_id = SagaApplication.saga_id("trip", "k")
    assert app.get(saga_id).in_flight == {"b": 1}
    check = unchanged(app, saga_id)

    result = app.rerun_step(saga_id, "b")

    assert (result.context_before, result.result) == (AFTER_A, "b-ref")
    assert app.get(saga_id).status == "running"
    check()
    check(reader)


# -- fallbacks, async, typed contexts --------------------------------------------------


def fallback_definition(desk: Desk) -> SagaDefinition:
    def card(context: dict[str, Any], key: str) -> None:
        desk._enter("card", "pay", context, key)
        raise Declined("card declined")

    def wallet(context: dict[str, Any], key: str) -> str:
        desk._enter("wallet", "pay", context, key)
        context["paid_by"] = "wallet"
        return "wallet-ref"

    def refund_card(context: dict[str, Any], key: str) -> None:
        desk._enter("refund-card", "pay", context, key)

    def refund_wallet(context: dict[str, Any], key: str) -> None:
        desk._enter("refund-wallet", "pay", context, key)
        context["paid_by"] = "refunded"

    def ship(context: dict[str, Any], key: str) -> None:
        raise Declined("no truck")

    return SagaDefinition(
        "pay",
        [
            Step(
                "pay",
                card,
                refund_card,
                fallback=wallet,
                fallback_compensation=refund_wallet,
                fallback_on=(Declined,),
            ),
            Step("ship", ship),
        ],
    )


def test_a_step_that_fell_back_reruns_its_fallback(app: SagaApplication, desk: Desk) -> None:
    saga = app.run(fallback_definition(desk), {"amount": 5})
    assert saga.status == "compensated"
    check = unchanged(app, saga.id)
    desk.calls.clear()

    result = app.rerun_step(saga.id, "pay")
    assert (result.kind, result.result) == ("fallback", "wallet-ref")
    assert result.version == version_of(app, saga.id, "StepStarted", "pay")
    assert app.history(saga.id)[result.version - 1].details == {"fallback": True}
    assert result.context_before == {"amount": 5}
    assert result.changes == {"paid_by": Change(ABSENT, "wallet")}

    primary = app.rerun_step(saga.id, "pay", version=2)  # as of the primary's attempt
    assert (primary.kind, type(primary.error)) == ("action", Declined)

    undo = app.rerun_step(saga.id, "pay", compensation=True)
    assert undo.kind == "compensation"
    assert undo.version == version_of(app, saga.id, "CompensationStarted", "pay")
    assert undo.context_before == {"amount": 5, "paid_by": "wallet"}
    assert undo.changes == {"paid_by": Change("wallet", "refunded")}
    assert [what for what, *_ in desk.calls] == ["wallet", "card", "refund-wallet"]
    check()


def test_async_callables_are_awaited(app: SagaApplication, reader: SagaApplication) -> None:
    fixed: list[bool] = []

    async def book(context: dict[str, Any], key: str) -> str:
        await asyncio.sleep(0)
        context["booked"] = key
        return "booked"

    async def pay(context: dict[str, Any], key: str) -> str:
        await asyncio.sleep(0)
        if not fixed:
            raise Declined("async decline")
        context["paid"] = True
        return "paid"

    async def cancel(context: dict[str, Any], key: str) -> None:
        await asyncio.sleep(0)
        context["booked"] = None

    definition = SagaDefinition("async", [Step("book", book, cancel), Step("pay", pay)])
    saga = asyncio.run(app.arun(definition, {}))
    assert saga.status == "compensated"
    check = unchanged(app, saga.id)

    failed = app.rerun_step(saga.id, "pay")
    assert isinstance(failed.error, Declined)
    assert "async decline" in failed.traceback
    fixed.append(True)
    paid = app.rerun_step(saga.id, "pay")
    assert (paid.result, paid.changes) == ("paid", {"paid": Change(ABSENT, True)})
    booked = app.rerun_step(saga.id, "book")
    assert booked.result == "booked"
    assert booked.context_after == {"booked": f"{saga.id}:book"}
    cancelled = app.rerun_step(saga.id, "book", compensation=True)
    assert cancelled.changes == {"booked": Change(f"{saga.id}:book", None)}

    async def inside_a_loop() -> RerunResult:
        return app.rerun_step(saga.id, "pay")  # called from a thread that runs a loop

    assert asyncio.run(inside_a_loop()).result == "paid"
    check()
    check(reader)


@pytest.mark.parametrize("kind", ["dataclass", "pydantic"])
def test_typed_contexts_are_passed_as_their_type(app: SagaApplication, kind: str) -> None:
    seen: list[Any] = []

    def more(context: Any, key: str) -> None:
        seen.append(type(context))
        context.qty *= 2
        context.tags.append("x")

    context: Any = Order("X1", 1) if kind == "dataclass" else Trip(sku="X1", qty=1)
    saga = app.run(SagaDefinition("typed", [Step("more", more)]), context)
    result = app.rerun_step(saga.id, "more")
    assert seen == [type(context)] * 2
    assert result.context_before == {"sku": "X1", "qty": 1, "tags": []}
    assert result.changes == {"qty": Change(1, 2), "tags": Change([], ["x"])}


# -- bad input -------------------------------------------------------------------------


def test_a_step_never_started_is_not_reached(app: SagaApplication, desk: Desk) -> None:
    saga_id = failed_saga(app, desk)
    check = unchanged(app, saga_id)
    calls = len(desk.calls)

    for step, kwargs in (
        ("d", {}),  # in the definition, never started
        ("zzz", {}),  # in no definition
        ("d", {"version": 3}),
        ("zzz", {"version": 3}),
        ("d", {"compensation": True}),
    ):
        with pytest.raises(StepNotReached) as caught:
            app.rerun_step(saga_id, step, **kwargs)
        error = caught.value
        assert (error.saga_id, error.step) == (saga_id, step)
        assert repr(step) in str(error)
        assert isinstance(error, KeyError)
        assert isinstance(error, SagaError)
    assert len(desk.calls) == calls
    check()


def test_a_compensation_never_started_is_not_reached(app: SagaApplication, desk: Desk) -> None:
    saga_id = failed_saga(app, desk)
    desk.fixed = True
    completed = app.run(desk.definition(), {"order": 2})
    assert completed.status == "completed"
    calls = len(desk.calls)
    for saga, step in ((saga_id, "c"), (completed.id, "a"), (completed.id, "c")):
        with pytest.raises(StepNotReached, match=repr(step)):
            app.rerun_step(saga, step, compensation=True)
    assert len(desk.calls) == calls


def test_a_compensation_never_started_is_not_reached_at_a_version_either(
    app: SagaApplication, desk: Desk
) -> None:
    desk.fixed = True
    saga = app.run(desk.definition(), {"order": 1})
    assert saga.status == "completed"
    calls = len(desk.calls)
    # The saga completed: a's compensation never started, so, as without a version,
    # there is no recorded call to re-run (and the compensation must not be called).
    with pytest.raises(StepNotReached, match="'a'"):
        app.rerun_step(saga.id, "a", saga.version, compensation=True)
    assert len(desk.calls) == calls


def test_a_step_without_a_compensation_has_none_to_rerun(app: SagaApplication) -> None:
    definition = SagaDefinition(
        "bare", [Step("a", lambda c, k: None), Step("b", lambda c, k: 1 / 0)]
    )
    saga = app.run(definition, {})
    with pytest.raises(StepNotReached, match="'a'"):
        app.rerun_step(saga.id, "a", compensation=True)


@pytest.mark.parametrize("version", [0, -1, 15, 1000])
def test_a_version_outside_the_stream_is_refused(
    app: SagaApplication, desk: Desk, version: int
) -> None:
    saga_id = failed_saga(app, desk)
    assert app.get(saga_id).version == 14
    calls = len(desk.calls)
    with pytest.raises(VersionNotFound) as caught:
        app.rerun_step(saga_id, "c", version)
    assert (caught.value.saga_id, caught.value.last) == (saga_id, 14)
    assert len(desk.calls) == calls


def test_an_unknown_saga_is_not_found(app: SagaApplication, desk: Desk) -> None:
    failed_saga(app, desk)
    with pytest.raises(SagaNotFound):
        app.rerun_step(uuid4(), "c")


@pytest.mark.parametrize("store", DURABLE_STORES)
def test_an_unregistered_definition_is_named(
    app: SagaApplication, env: Env, open_app: Callable[[Env], SagaApplication], desk: Desk
) -> None:
    saga_id = failed_saga(app, desk)
    fresh = open_app(env)
    calls = len(desk.calls)

    with pytest.raises(DefinitionNotFound) as caught:
        fresh.rerun_step(saga_id, "c")
    assert (caught.value.name, caught.value.version) == ("trip", 1)
    assert "'trip' version 1" in str(caught.value)
    fresh.register(desk.definition(version=2))  # another version does not do
    with pytest.raises(DefinitionNotFound):
        fresh.rerun_step(saga_id, "c")
    assert len(desk.calls) == calls

    fresh.register(desk.definition())
    assert fresh.rerun_step(saga_id, "c").context_before == AFTER_B
