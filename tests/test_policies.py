"""Resilience policies on every store: retries, timeouts, deadlines, fallbacks, breakers,
parallel groups, stuck sagas resolved by hand, and undoing a failed step's own effect.

Each behaviour is asserted on the history read back from the store, on the saga's final
status and context, on the idempotency keys the callables saw, and on `app.verify()`.
Retry waits, breakers and deadlines run on a `FakeClock`, so nothing here sleeps; step
timeouts run on real time but are tiny (`TICK`), and a sync action that hangs waits on a
`Gate` that is opened at teardown, so no thread outlives its test.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import pytest
from conftest import DURABLE_STORES, CommitSpy, Env

from saga_es import (
    CircuitBreaker,
    CompensationFailed,
    CompensationStarted,
    DefinitionError,
    FakeClock,
    IllegalTransition,
    Parallel,
    Retry,
    Saga,
    SagaApplication,
    SagaDefinition,
    SagaResolved,
    SagaStarted,
    SagaStuck,
    SagaTimedOut,
    Step,
    StepCompleted,
    StepFailed,
    StepReconciled,
    StepStarted,
)
from saga_es import runner as saga_runner
from saga_es.breaker import reset_breakers

START = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
MODES = ("run", "arun")
KINDS = ("sync", "async")
TICK = 0.02
"""A step timeout in real seconds: long enough for a quick action, short enough to wait out."""
HANG = 5.0
"""How long a hanging action waits at most, should a gate never open (a test then fails)."""

Body = Callable[[Any, str], Any]


class Transient(Exception):
    pass


class Fatal(Transient):
    pass


class Permanent(Exception):
    pass


class CardDeclined(Exception):
    pass


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def fresh_breakers() -> Iterator[None]:
    """Breaker state is per process: every test starts, and leaves, with none."""
    reset_breakers()
    yield
    reset_breakers()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def app(env: Env, clock: FakeClock) -> Iterator[SagaApplication]:
    """The store under test (POPO, SQLite, PostgreSQL), with time on `clock`."""
    application = SagaApplication(env=env, clock=clock)
    yield application
    application.close()


class Gate:
    """Sync actions that must hang wait here; `release()` lets them all go and waits for them."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._changed = threading.Condition()
        self.waiting = 0

    def wait(self) -> None:
        with self._changed:
            self.waiting += 1
        try:
            self._open.wait(HANG)
        finally:
            with self._changed:
                self.waiting -= 1
                self._changed.notify_all()

    def release(self) -> None:
        self._open.set()
        with self._changed:
            self._changed.wait_for(lambda: self.waiting == 0, timeout=HANG)


@pytest.fixture
def gate() -> Iterator[Gate]:
    gate = Gate()
    yield gate
    gate.release()


# -- helpers ---------------------------------------------------------------------------


def as_kind(body: Body, kind: str) -> Body:
    """`body` as a plain function, or as an async one that yields to the loop first."""
    if kind == "sync":
        return body

    async def action(context: Any, key: str) -> Any:
        await asyncio.sleep(0)
        return body(context, key)

    return action


class Script:
    """Actions and compensations that log each call as (what, name, key) and fail on cue.

    `errors` are raised by the first calls, one each (None: that call succeeds); later
    calls raise `always`, if given, else succeed. A successful call sets
    `context[name]` to "done" (action) or "undone" (compensation).
    """

    def __init__(self) -> None:
        self.log: list[tuple[str, str, str]] = []

    def _body(
        self,
        what: str,
        name: str,
        errors: tuple[type[Exception] | None, ...],
        always: type[Exception] | None,
    ) -> Body:
        queue = list(errors)

        def body(context: Any, key: str) -> Any:
            self.log.append((what, name, key))
            error = queue.pop(0) if queue else always
            if error is not None:
                raise error(f"{what} {name} failed")
            context[name] = "done" if what == "do" else "undone"
            return f"{name}-ref" if what == "do" else None

        return body

    def do(
        self,
        name: str,
        *errors: type[Exception] | None,
        always: type[Exception] | None = None,
        kind: str = "sync",
    ) -> Body:
        return as_kind(self._body("do", name, errors, always), kind)

    def undo(
        self,
        name: str,
        *errors: type[Exception] | None,
        always: type[Exception] | None = None,
        kind: str = "sync",
    ) -> Body:
        return as_kind(self._body("undo", name, errors, always), kind)

    def calls(self, what: str | None = None) -> list[str]:
        return [name for kind, name, _ in self.log if what in (None, kind)]

    def keys(self, name: str, what: str | None = None) -> list[str]:
        return [key for kind, n, key in self.log if n == name and what in (None, kind)]


class Stall:
    """An action that hangs on its first `times` calls, then succeeds.

    A sync one hangs on the gate (then sets `context["late"]` and returns "late", which
    must be discarded); an async one sleeps until it is cancelled, which it records.
    """

    def __init__(self, name: str, kind: str, gate: Gate, times: int = 1) -> None:
        self.name, self.kind, self.gate, self.times = name, kind, gate, times
        self.keys: list[str] = []
        self.cancelled: list[int] = []
        self.late = threading.Event()

    def _begin(self, key: str) -> int:
        self.keys.append(key)
        return len(self.keys)

    @property
    def action(self) -> Body:
        if self.kind == "sync":

            def sync_action(context: Any, key: str) -> Any:
                if self._begin(key) <= self.times:
                    self.gate.wait()
                    context["late"] = True
                    self.late.set()
                    return "late"
                context[self.name] = "done"
                return f"{self.name}-ref"

            return sync_action

        async def async_action(context: Any, key: str) -> Any:
            call = self._begin(key)
            if call <= self.times:
                try:
                    await asyncio.sleep(HANG)
                except asyncio.CancelledError:
                    self.cancelled.append(call)
                    raise
                context["late"] = True
                return "late"
            context[self.name] = "done"
            return f"{self.name}-ref"

        return async_action


def execute(
    app: SagaApplication,
    definition: SagaDefinition,
    context: Any,
    mode: str,
    *,
    key: str | None = None,
    gate: Gate | None = None,
) -> Saga:
    """Run through `app.run` or `app.arun`.

    Under `arun` a sync action abandoned by a timeout holds a thread of the loop's
    executor, which `asyncio.run` waits for on exit: `gate` is opened before that.
    """
    if mode == "run":
        return app.run(definition, context, key=key)

    async def main() -> Saga:
        try:
            return await app.arun(definition, context, key=key)
        finally:
            if gate is not None:
                gate.release()

    return asyncio.run(main())


def rows(app: SagaApplication, saga_id: Any) -> list[tuple[Any, ...]]:
    """The stored history: (event,), plus its step and attempt where it has them."""
    out: list[tuple[Any, ...]] = []
    for event in app.saga_events(saga_id):
        data = vars(event)
        row: tuple[Any, ...] = (type(event).__name__,)
        if "step" in data:
            row += (data["step"],)
        if "attempt" in data:
            row += (data["attempt"],)
        out.append(row)
    return out


def step_failures(app: SagaApplication, saga_id: Any) -> list[tuple[Any, ...]]:
    """Stored StepFailed: (step, attempt, error_type, will_retry, compensate, delay, breaker)."""
    return [
        (e.step, e.attempt, e.error_type, e.will_retry, e.compensate, e.delay, e.breaker)
        for e in app.saga_events(saga_id)
        if isinstance(e, StepFailed)
    ]


def compensation_failures(app: SagaApplication, saga_id: Any) -> list[tuple[Any, ...]]:
    """Stored CompensationFailed: (step, attempt, error_type, will_retry, delay)."""
    return [
        (e.step, e.attempt, e.error_type, e.will_retry, e.delay)
        for e in app.saga_events(saga_id)
        if isinstance(e, CompensationFailed)
    ]


def of_type(app: SagaApplication, saga_id: Any, cls: type[Any]) -> list[Any]:
    return [e for e in app.saga_events(saga_id) if isinstance(e, cls)]


def noop(context: Any, key: str) -> None:
    pass


# -- retries ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_a_step_is_retried_with_backoff_until_it_succeeds_on_the_same_key(
    app: SagaApplication, clock: FakeClock, mode: str, kind: str
) -> None:
    script = Script()
    retry = Retry(attempts=3, delay=1.0, backoff=2.0, jitter=0)
    definition = SagaDefinition(
        "retries",
        [
            Step("a", script.do("a", kind=kind), script.undo("a")),
            Step("b", script.do("b", Transient, Transient, kind=kind), retry=retry),
            Step("c", script.do("c", kind=kind)),
        ],
    )
    saga = execute(app, definition, {"n": 1}, mode)
    assert saga.status == "completed"
    assert rows(app, saga.id) == [
        ("SagaStarted",),
        ("StepStarted", "a", 1),
        ("StepCompleted", "a", 1),
        ("StepStarted", "b", 1),
        ("StepFailed", "b", 1),
        ("StepStarted", "b", 2),
        ("StepFailed", "b", 2),
        ("StepStarted", "b", 3),
        ("StepCompleted", "b", 3),
        ("StepStarted", "c", 1),
        ("StepCompleted", "c", 1),
        ("SagaCompleted",),
    ]
    assert step_failures(app, saga.id) == [
        ("b", 1, "Transient", True, False, 1.0, None),
        ("b", 2, "Transient", True, False, 2.0, None),
    ]
    assert clock.sleeps == [1.0, 2.0]
    assert script.keys("b") == [f"{saga.id}:b"] * 3
    stored = app.get(saga.id)
    assert stored.context == {"n": 1, "a": "done", "b": "done", "c": "done"}
    assert stored.results == {"a": "a-ref", "b": "b-ref", "c": "c-ref"}
    assert app.verify() == []


def test_a_retry_commits_the_failure_then_waits_on_the_clock_then_commits_the_next_start(
    app: SagaApplication, clock: FakeClock, commits: CommitSpy
) -> None:
    script = Script()
    commits_at_sleep: list[int] = []
    sleep = clock.sleep

    def watched_sleep(seconds: float) -> None:
        commits_at_sleep.append(commits.count)
        sleep(seconds)

    clock.sleep = watched_sleep  # type: ignore[method-assign]
    retry = Retry(attempts=2, delay=3.0, jitter=0)
    definition = SagaDefinition("wait", [Step("a", script.do("a", Transient), retry=retry)])
    saga = app.run(definition, {})
    assert saga.status == "completed"
    assert commits.calls == [
        ["SagaStarted", "StepStarted"],
        ["StepFailed"],
        ["StepStarted"],
        ["StepCompleted", "SagaCompleted"],
    ]
    assert commits_at_sleep == [2]  # the failure was durable before the wait
    assert clock.sleeps == [3.0]


def test_a_retry_without_delay_starts_the_next_attempt_in_the_failures_commit(
    app: SagaApplication, clock: FakeClock, commits: CommitSpy
) -> None:
    script = Script()
    retry = Retry(attempts=2, delay=0, jitter=0)
    definition = SagaDefinition("nowait", [Step("a", script.do("a", Transient), retry=retry)])
    saga = app.run(definition, {})
    assert saga.status == "completed"
    assert commits.calls == [
        ["SagaStarted", "StepStarted"],
        ["StepFailed", "StepStarted"],
        ["StepCompleted", "SagaCompleted"],
    ]
    assert clock.sleeps == []
    assert step_failures(app, saga.id) == [("a", 1, "Transient", True, False, 0.0, None)]


@pytest.mark.parametrize("mode", MODES)
def test_exhausted_retries_fail_the_step_and_compensate_the_completed_steps(
    app: SagaApplication, clock: FakeClock, mode: str
) -> None:
    script = Script()
    definition = SagaDefinition(
        "exhausted",
        [
            Step("a", script.do("a"), script.undo("a")),
            Step(
                "b",
                script.do("b", always=Transient),
                script.undo("b"),
                retry=Retry(attempts=2, delay=0.5, jitter=0),
            ),
            Step("c", script.do("c")),
        ],
    )
    saga = execute(app, definition, {}, mode)
    assert saga.status == "compensated"
    assert rows(app, saga.id) == [
        ("SagaStarted",),
        ("StepStarted", "a", 1),
        ("StepCompleted", "a", 1),
        ("StepStarted", "b", 1),
        ("StepFailed", "b", 1),
        ("StepStarted", "b", 2),
        ("StepFailed", "b", 2),
        ("CompensationStarted", "a", 1),
        ("CompensationRan", "a", 1),
        ("SagaCompensated",),
    ]
    assert step_failures(app, saga.id) == [
        ("b", 1, "Transient", True, False, 0.5, None),
        ("b", 2, "Transient", False, False, 0.0, None),
    ]
    assert clock.sleeps == [0.5]
    assert script.calls() == ["a", "b", "b", "a"]
    stored = app.get(saga.id)
    assert stored.context == {"a": "undone"}
    assert stored.error == {"step": "b", "type": "Transient", "message": "do b failed"}
    assert app.verify() == []


@pytest.mark.parametrize(
    ("error", "tries"),
    [
        pytest.param(Transient, 3, id="retry_on-matches"),
        pytest.param(Permanent, 1, id="not-in-retry_on"),
        pytest.param(Fatal, 1, id="in-give_up_on"),
    ],
)
def test_retry_on_and_give_up_on_decide_which_errors_are_retried(
    app: SagaApplication, error: type[Exception], tries: int
) -> None:
    script = Script()
    retry = Retry(attempts=3, delay=0, retry_on=(Transient,), give_up_on=(Fatal,))
    definition = SagaDefinition(
        "filtered",
        [
            Step("a", script.do("a"), script.undo("a")),
            Step("b", script.do("b", always=error), retry=retry),
        ],
    )
    saga = app.run(definition, {})
    assert saga.status == "compensated"
    assert script.calls("do") == ["a"] + ["b"] * tries
    failures = step_failures(app, saga.id)
    assert [f[:4] for f in failures] == [
        *[("b", n, error.__name__, True) for n in range(1, tries)],
        ("b", tries, error.__name__, False),
    ]
    assert script.calls("undo") == ["a"]
    assert app.verify() == []


def test_an_int_retry_means_that_many_attempts_with_the_default_backoff_and_jitter(
    app: SagaApplication, clock: FakeClock
) -> None:
    script = Script()
    definition = SagaDefinition("three", [Step("a", script.do("a", always=Transient), retry=3)])
    saga = app.run(definition, {})
    assert saga.status == "compensated"
    assert script.calls() == ["a", "a", "a"]
    first, second = clock.sleeps
    assert 0.1 * 0.9 <= first <= 0.1
    assert 0.2 * 0.9 <= second <= 0.2
    assert [f[5] for f in step_failures(app, saga.id)] == [first, second, 0.0]


def test_backoff_is_capped_at_max_delay(app: SagaApplication, clock: FakeClock) -> None:
    script = Script()
    retry = Retry(attempts=5, delay=1.0, backoff=10.0, max_delay=5.0, jitter=0)
    definition = SagaDefinition(
        "capped", [Step("a", script.do("a", always=Transient), retry=retry)]
    )
    saga = app.run(definition, {})
    assert clock.sleeps == [1.0, 5.0, 5.0, 5.0]
    assert [f[5] for f in step_failures(app, saga.id)] == [1.0, 5.0, 5.0, 5.0, 0.0]


def test_jittered_waits_stay_between_their_share_and_the_capped_delay(
    app: SagaApplication, clock: FakeClock
) -> None:
    script = Script()
    retry = Retry(attempts=8, delay=1.0, backoff=3.0, max_delay=5.0, jitter=0.5)
    definition = SagaDefinition(
        "jitter", [Step("a", script.do("a", always=Transient), retry=retry)]
    )
    saga = app.run(definition, {})
    bases = [1.0, 3.0, 5.0, 5.0, 5.0, 5.0, 5.0]
    assert len(clock.sleeps) == len(bases)
    for waited, base in zip(clock.sleeps, bases, strict=True):
        assert base * 0.5 <= waited <= base
    assert max(clock.sleeps) <= 5.0
    assert len(set(clock.sleeps[2:])) > 1  # jittered, not a fixed schedule
    # What was waited is what was recorded.
    assert [f[5] for f in step_failures(app, saga.id)][:-1] == clock.sleeps


@pytest.mark.parametrize("jitter", [0.0, 0.1, 0.5, 1.0])
def test_retry_wait_is_within_jitter_of_the_capped_exponential_delay(jitter: float) -> None:
    retry = Retry(attempts=10, delay=0.5, backoff=2.0, max_delay=8.0, jitter=jitter)
    rng = random.Random(4)
    for attempt in range(1, 10):
        base = min(8.0, 0.5 * 2.0 ** (attempt - 1))
        for _ in range(200):
            waited = retry.wait(attempt, rng)
            assert base * (1 - jitter) <= waited <= base


def test_an_unstorable_result_is_never_retried(app: SagaApplication) -> None:
    calls: list[str] = []

    def unstorable(context: Any, key: str) -> Any:
        calls.append(key)
        return object()

    definition = SagaDefinition(
        "unstorable", [Step("a", unstorable, retry=Retry(attempts=3, delay=0))]
    )
    saga = app.run(definition, {})
    assert saga.status == "compensated"
    assert len(calls) == 1
    assert [f[:4] for f in step_failures(app, saga.id)] == [("a", 1, "ContextError", False)]


# -- compensation retries, stuck sagas, resolve -----------------------------------------


def undo_b_definition(script: Script, undo_b: Body, retry: Retry) -> SagaDefinition:
    """a and b undoable, b's compensation under `retry`; c always fails."""
    return SagaDefinition(
        "undo-b",
        [
            Step("a", script.do("a"), script.undo("a")),
            Step("b", script.do("b"), undo_b, compensation_retry=retry),
            Step("c", script.do("c", always=Permanent)),
        ],
    )


def test_a_compensation_is_retried_with_backoff_until_it_succeeds(
    app: SagaApplication, clock: FakeClock
) -> None:
    script = Script()
    retry = Retry(attempts=3, delay=2.0, jitter=0)
    definition = undo_b_definition(script, script.undo("b", Transient), retry)
    saga = app.run(definition, {})
    assert saga.status == "compensated"
    assert rows(app, saga.id)[6:] == [
        ("StepFailed", "c", 1),
        ("CompensationStarted", "b", 1),
        ("CompensationFailed", "b", 1),
        ("CompensationStarted", "b", 2),
        ("CompensationRan", "b", 2),
        ("CompensationStarted", "a", 1),
        ("CompensationRan", "a", 1),
        ("SagaCompensated",),
    ]
    assert compensation_failures(app, saga.id) == [("b", 1, "Transient", True, 2.0)]
    assert clock.sleeps == [2.0]
    assert script.keys("b", "undo") == [f"{saga.id}:b"] * 2
    assert script.keys("b", "undo")[0] == script.keys("b", "do")[0]
    assert app.get(saga.id).context == {"a": "undone", "b": "undone"}
    assert app.verify() == []


@pytest.mark.parametrize("mode", MODES)
def test_a_compensation_that_exhausts_its_retries_leaves_the_saga_stuck(
    app: SagaApplication, clock: FakeClock, mode: str
) -> None:
    script = Script()
    retry = Retry(attempts=2, delay=1.0, jitter=0)
    definition = undo_b_definition(script, script.undo("b", always=Transient), retry)
    saga = execute(app, definition, {}, mode)
    assert saga.status == "stuck"
    assert rows(app, saga.id)[6:] == [
        ("StepFailed", "c", 1),
        ("CompensationStarted", "b", 1),
        ("CompensationFailed", "b", 1),
        ("CompensationStarted", "b", 2),
        ("CompensationFailed", "b", 2),
        ("SagaStuck", "b"),
    ]
    assert compensation_failures(app, saga.id) == [
        ("b", 1, "Transient", True, 1.0),
        ("b", 2, "Transient", False, 0.0),
    ]
    (stuck,) = of_type(app, saga.id, SagaStuck)
    assert (stuck.step, stuck.error_type, stuck.error_message) == (
        "b",
        "Transient",
        "undo b failed",
    )
    assert clock.sleeps == [1.0]
    assert script.calls("undo") == ["b", "b"]  # a waits for a person
    stored = app.get(saga.id)
    assert stored.status == "stuck"
    assert stored.error == {"step": "b", "type": "Transient", "message": "undo b failed"}
    assert app.verify() == []


def test_compensation_retry_on_filters_errors_too(app: SagaApplication) -> None:
    script = Script()
    retry = Retry(attempts=3, delay=0, retry_on=(Transient,))
    definition = undo_b_definition(script, script.undo("b", always=Permanent), retry)
    saga = app.run(definition, {})
    assert saga.status == "stuck"
    assert compensation_failures(app, saga.id) == [("b", 1, "Permanent", False, 0.0)]


def stuck_saga(app: SagaApplication, script: Script, undo_b: Body) -> Saga:
    definition = undo_b_definition(script, undo_b, Retry(attempts=2, delay=0))
    saga = app.run(definition, {})
    assert saga.status == "stuck"
    return saga


def test_resolve_retry_runs_the_failed_compensation_again_and_finishes(
    app: SagaApplication,
) -> None:
    script = Script()
    saga = stuck_saga(app, script, script.undo("b", Transient, Transient))
    before = len(app.saga_events(saga.id))
    resolved = app.resolve(saga.id, "retry", by="ada", reason="the hotel API is back")
    assert resolved.status == "compensated"
    assert rows(app, saga.id)[before:] == [
        ("SagaResolved", "b"),
        ("CompensationStarted", "b", 3),
        ("CompensationRan", "b", 3),
        ("CompensationStarted", "a", 1),
        ("CompensationRan", "a", 1),
        ("SagaCompensated",),
    ]
    (resolution,) = of_type(app, saga.id, SagaResolved)
    assert (resolution.step, resolution.action, resolution.by, resolution.reason) == (
        "b",
        "retry",
        "ada",
        "the hotel API is back",
    )
    assert script.calls("undo") == ["b", "b", "b", "a"]
    assert set(script.keys("b", "undo")) == {f"{saga.id}:b"}
    stored = app.get(saga.id)
    assert stored.status == "compensated"
    assert stored.compensated == ["b", "a"]
    assert stored.context == {"a": "undone", "b": "undone"}
    assert app.verify() == []


def test_resolve_retry_that_fails_again_leaves_it_stuck_and_mark_compensated_finishes_it(
    app: SagaApplication,
) -> None:
    script = Script()
    saga = stuck_saga(app, script, script.undo("b", always=Transient))
    before = len(app.saga_events(saga.id))
    again = app.resolve(saga.id, "retry", by="ada", reason="try once more")
    assert again.status == "stuck"
    after_retry = rows(app, saga.id)[before:]
    assert after_retry[:2] == [("SagaResolved", "b"), ("CompensationStarted", "b", 3)]
    assert after_retry[-2:] == [("CompensationFailed", "b", after_retry[-2][2]), ("SagaStuck", "b")]
    assert app.get(saga.id).status == "stuck"
    assert "a" not in script.calls("undo")

    undo_calls = len(script.calls("undo"))
    before = len(app.saga_events(saga.id))
    done = app.resolve(saga.id, "mark-compensated", by="bob", reason="refunded by phone")
    assert done.status == "compensated"
    assert rows(app, saga.id)[before:] == [
        ("SagaResolved", "b"),
        ("CompensationStarted", "a", 1),
        ("CompensationRan", "a", 1),
        ("SagaCompensated",),
    ]
    assert script.calls("undo")[undo_calls:] == ["a"]  # b is not called again
    resolutions = [(e.step, e.action, e.by, e.reason) for e in of_type(app, saga.id, SagaResolved)]
    assert resolutions == [
        ("b", "retry", "ada", "try once more"),
        ("b", "mark-compensated", "bob", "refunded by phone"),
    ]
    stored = app.get(saga.id)
    assert stored.status == "compensated"
    assert stored.compensated == ["b", "a"]
    assert app.verify() == []


@pytest.mark.parametrize("action", ["retry", "mark-compensated"])
@pytest.mark.parametrize("outcome", ["completed", "compensated"])
def test_resolve_on_a_saga_that_is_not_stuck_raises_and_appends_nothing(
    app: SagaApplication, outcome: str, action: str
) -> None:
    script = Script()
    fails = Permanent if outcome == "compensated" else None
    definition = SagaDefinition(
        "fine",
        [Step("a", script.do("a"), script.undo("a")), Step("b", script.do("b", always=fails))],
    )
    saga = app.run(definition, {})
    assert saga.status == outcome
    before = app.saga_events(saga.id)
    with pytest.raises(IllegalTransition, match=outcome):
        app.resolve(saga.id, action, by="ada", reason="no reason")
    assert len(app.saga_events(saga.id)) == len(before)
    assert app.get(saga.id).status == outcome
    assert app.verify() == []


@pytest.mark.parametrize("store", DURABLE_STORES)
def test_resolve_on_a_saga_that_is_not_stuck_says_so_even_where_its_definition_is_unknown(
    app: SagaApplication, env: Env, open_app: Callable[[Env], SagaApplication]
) -> None:
    script = Script()
    definition = SagaDefinition("fine", [Step("a", script.do("a"))])
    saga = app.run(definition, {})
    elsewhere = open_app(env)  # another process: no definitions registered
    with pytest.raises(IllegalTransition, match="only a stuck saga can be resolved"):
        elsewhere.resolve(saga.id, "mark-compensated", by="ada", reason="no reason")
    assert len(elsewhere.saga_events(saga.id)) == 4
    assert elsewhere.get(saga.id).status == "completed"


@pytest.mark.parametrize(
    ("action", "by", "reason", "error", "message"),
    [
        pytest.param(
            "undo-everything",
            "ada",
            "why",
            IllegalTransition,
            "resolve with one of retry, mark-compensated",
            id="unknown-action",
        ),
        pytest.param("retry", "", "why", ValueError, "resolve needs by=", id="no-by"),
        pytest.param("retry", "ada", "  ", ValueError, "resolve needs reason=", id="no-reason"),
        pytest.param("retry", "a\x00da", "why", ValueError, "by=.*NUL", id="nul-by"),
        pytest.param("retry", "ada", "why\udc80", ValueError, "reason=.*Unicode", id="bad-reason"),
    ],
)
def test_a_bad_resolution_of_a_stuck_saga_raises_and_appends_nothing(
    app: SagaApplication,
    action: str,
    by: str,
    reason: str,
    error: type[Exception],
    message: str,
) -> None:
    script = Script()
    saga = stuck_saga(app, script, script.undo("b", always=Transient))
    before = len(app.saga_events(saga.id))
    calls = len(script.log)
    with pytest.raises(error, match=message):
        app.resolve(saga.id, action, by=by, reason=reason)
    assert len(app.saga_events(saga.id)) == before
    assert len(script.log) == calls
    assert app.get(saga.id).status == "stuck"


# -- timeouts --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_sync_action_past_its_timeout_is_cut_and_its_late_result_is_discarded(
    app: SagaApplication, gate: Gate, mode: str
) -> None:
    script = Script()
    stall = Stall("b", "sync", gate)
    definition = SagaDefinition(
        "slow",
        [
            Step("a", script.do("a"), script.undo("a")),
            Step("b", stall.action, script.undo("b"), timeout=TICK),
            Step("c", script.do("c")),
        ],
    )
    began = time.monotonic()
    saga = execute(app, definition, {}, mode, gate=gate)
    assert time.monotonic() - began < HANG / 2  # the saga did not wait for the action
    assert saga.status == "compensated"
    assert rows(app, saga.id) == [
        ("SagaStarted",),
        ("StepStarted", "a", 1),
        ("StepCompleted", "a", 1),
        ("StepStarted", "b", 1),
        ("StepFailed", "b", 1),
        ("CompensationStarted", "b", 1),
        ("CompensationRan", "b", 1),
        ("CompensationStarted", "a", 1),
        ("CompensationRan", "a", 1),
        ("SagaCompensated",),
    ]
    # Outcome unknown under the default recovery (retry) with no retry left: undo it too.
    assert step_failures(app, saga.id) == [("b", 1, "StepTimeout", False, True, 0.0, None)]
    history = len(app.saga_events(saga.id))
    gate.release()
    assert stall.late.wait(HANG)  # the abandoned call has now finished...
    time.sleep(0.005)
    assert len(app.saga_events(saga.id)) == history  # ...and nothing of it was recorded
    stored = app.get(saga.id)
    assert stored.context == {"a": "undone", "b": "undone"}
    assert "b" not in stored.results
    assert stall.keys == [f"{saga.id}:b"]
    assert app.verify() == []


@pytest.mark.parametrize("mode", MODES)
def test_an_async_action_past_its_timeout_is_cancelled(
    app: SagaApplication, gate: Gate, mode: str
) -> None:
    script = Script()
    stall = Stall("b", "async", gate)
    definition = SagaDefinition(
        "slow",
        [
            Step("a", script.do("a"), script.undo("a")),
            Step("b", stall.action, script.undo("b"), timeout=TICK, recovery="fail"),
        ],
    )
    began = time.monotonic()
    saga = execute(app, definition, {}, mode)
    assert time.monotonic() - began < HANG / 2
    assert stall.cancelled == [1]
    assert saga.status == "compensated"
    (failure,) = of_type(app, saga.id, StepFailed)
    assert (failure.step, failure.error_type, failure.will_retry, failure.compensate) == (
        "b",
        "StepTimeout",
        False,
        False,
    )
    assert "timeout" in failure.error_message
    assert script.calls("undo") == ["a"]
    assert app.get(saga.id).context == {"a": "undone"}
    assert app.verify() == []


class TimeoutCase:
    """One recovery policy under a timeout, and what it must lead to."""

    def __init__(
        self,
        policies: dict[str, Any],
        *,
        stalls: int,
        failures: list[tuple[Any, ...]],
        status: str,
        undone: list[str],
        reconciled: bool | None = None,
    ) -> None:
        self.policies, self.stalls, self.failures = policies, stalls, failures
        self.status, self.undone, self.reconciled = status, undone, reconciled


TIMEOUT_CASES = [
    pytest.param(
        TimeoutCase(
            {"retry": Retry(attempts=2, delay=0)},
            stalls=1,
            failures=[("b", 1, "StepTimeout", True, False)],
            status="completed",
            undone=[],
        ),
        id="retry-then-success",
    ),
    pytest.param(
        TimeoutCase(
            {"retry": Retry(attempts=2, delay=0)},
            stalls=2,
            failures=[("b", 1, "StepTimeout", True, False), ("b", 2, "StepTimeout", False, True)],
            status="compensated",
            undone=["b", "a"],
        ),
        id="retry-exhausted",
    ),
    pytest.param(
        TimeoutCase(
            {"recovery": "fail", "retry": Retry(attempts=3, delay=0)},
            stalls=1,
            failures=[("b", 1, "StepTimeout", False, False)],
            status="compensated",
            undone=["a"],
        ),
        id="fail",
    ),
    pytest.param(
        TimeoutCase(
            {"recovery": "compensate", "retry": Retry(attempts=3, delay=0)},
            stalls=1,
            failures=[("b", 1, "StepTimeout", False, True)],
            status="compensated",
            undone=["b", "a"],
        ),
        id="compensate",
    ),
    pytest.param(
        TimeoutCase(
            {"recovery": "reconcile"},
            stalls=1,
            failures=[],
            status="completed",
            undone=[],
            reconciled=True,
        ),
        id="reconcile-took-effect",
    ),
    pytest.param(
        TimeoutCase(
            {"recovery": "reconcile"},
            stalls=1,
            failures=[("b", 1, "StepTimeout", False, False)],
            status="compensated",
            undone=["a"],
            reconciled=False,
        ),
        id="reconcile-no-effect",
    ),
    pytest.param(
        TimeoutCase(
            {"recovery": "reconcile", "retry": Retry(attempts=2, delay=0)},
            stalls=1,
            failures=[("b", 1, "StepTimeout", True, False)],
            status="completed",
            undone=[],
            reconciled=False,
        ),
        id="reconcile-no-effect-retried",
    ),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", TIMEOUT_CASES)
def test_a_timed_out_step_is_handled_by_its_recovery_policy(
    app: SagaApplication, gate: Gate, case: TimeoutCase, kind: str
) -> None:
    script = Script()
    stall = Stall("b", kind, gate, times=case.stalls)
    asked: list[str] = []

    def reconcile(context: Any, key: str) -> bool:
        asked.append(key)
        return bool(case.reconciled)

    policies = dict(case.policies)
    if case.reconciled is not None:
        policies["reconcile"] = reconcile
    definition = SagaDefinition(
        "timeouts",
        [
            Step("a", script.do("a"), script.undo("a")),
            Step("b", stall.action, script.undo("b"), timeout=TICK, **policies),
            Step("c", script.do("c")),
        ],
    )
    saga = app.run(definition, {})
    assert saga.status == case.status
    assert [f[:5] for f in step_failures(app, saga.id)] == case.failures
    assert script.calls("undo") == case.undone
    assert set(stall.keys) == {f"{saga.id}:b"}
    stored = app.get(saga.id)
    assert "late" not in stored.context
    if case.reconciled is not None:
        assert asked == [f"{saga.id}:b"]
    reconciled = of_type(app, saga.id, StepReconciled)
    if case.reconciled:
        assert [(e.step, e.attempt, e.took_effect) for e in reconciled] == [("b", 1, True)]
        assert rows(app, saga.id)[4:7] == [
            ("StepReconciled", "b", 1),
            ("StepCompleted", "b", 1),
            ("StepStarted", "c", 1),
        ]
        assert stored.context == {"a": "done", "c": "done"}  # the cut call's changes are lost
    else:
        assert not any(e.took_effect for e in reconciled)
    if case.status == "completed":
        assert script.calls("do") == ["a", "c"]
    assert app.verify() == []


# -- the saga's deadline ---------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_saga_past_its_deadline_between_steps_times_out_and_compensates(
    app: SagaApplication, clock: FakeClock, mode: str
) -> None:
    script = Script()
    do_a = script.do("a")

    def slow_a(context: Any, key: str) -> Any:
        clock.advance(10)  # the step took longer than the saga may
        return do_a(context, key)

    definition = SagaDefinition(
        "deadline",
        [Step("a", slow_a, script.undo("a")), Step("b", script.do("b"), script.undo("b"))],
        deadline=5,
    )
    saga = execute(app, definition, {}, mode)
    assert saga.status == "compensated"
    assert rows(app, saga.id) == [
        ("SagaStarted",),
        ("StepStarted", "a", 1),
        ("StepCompleted", "a", 1),
        ("SagaTimedOut",),
        ("CompensationStarted", "a", 1),
        ("CompensationRan", "a", 1),
        ("SagaCompensated",),
    ]
    (started,) = of_type(app, saga.id, SagaStarted)
    assert started.deadline == START + timedelta(seconds=5)
    (timed_out,) = of_type(app, saga.id, SagaTimedOut)
    assert timed_out.deadline == START + timedelta(seconds=5)
    assert script.calls() == ["a", "a"]  # b never started
    stored = app.get(saga.id)
    assert stored.error is not None
    assert stored.error["type"] == "DeadlineExceeded"
    assert stored.context == {"a": "undone"}
    assert app.verify() == []


def test_a_retry_whose_wait_would_pass_the_deadline_is_not_attempted(
    app: SagaApplication, clock: FakeClock
) -> None:
    script = Script()
    retry = Retry(attempts=5, delay=2.0, backoff=2.0, jitter=0)
    definition = SagaDefinition(
        "hurry",
        [
            Step("a", script.do("a"), script.undo("a")),
            Step("b", script.do("b", always=Transient), retry=retry),
        ],
        deadline=5,
    )
    saga = app.run(definition, {})
    assert saga.status == "compensated"
    # Waited 2 s after try 1 (3 s left); waiting 4 s after try 2 would pass the deadline.
    assert clock.sleeps == [2.0]
    assert [f[:4] for f in step_failures(app, saga.id)] == [
        ("b", 1, "Transient", True),
        ("b", 2, "Transient", False),
    ]
    assert script.calls() == ["a", "b", "b", "a"]
    assert app.verify() == []


@pytest.mark.parametrize("mode", MODES)
def test_no_retry_is_scheduled_once_the_deadline_passed_during_the_attempt(
    app: SagaApplication, clock: FakeClock, mode: str
) -> None:
    calls: list[str] = []

    def slow_failure(context: Any, key: str) -> Any:
        calls.append(key)
        clock.advance(3)  # each try takes 3 s of the saga's 5
        raise Transient("still down")

    retry = Retry(attempts=5, delay=0.5, backoff=1.0, jitter=0)
    definition = SagaDefinition("late", [Step("a", slow_failure, noop, retry=retry)], deadline=5)
    saga = execute(app, definition, {}, mode)
    assert saga.status == "compensated"
    # Try 1 ends at 3 s: 2 s left, so wait 0.5 s. Try 2 ends at 6.5 s, past the deadline.
    assert [f[:4] for f in step_failures(app, saga.id)] == [
        ("a", 1, "Transient", True),
        ("a", 2, "Transient", False),
    ]
    assert clock.sleeps == [0.5]
    assert len(calls) == 2
    assert app.verify() == []


def test_an_action_still_running_at_the_deadline_is_cut_and_not_retried(
    app: SagaApplication, gate: Gate
) -> None:
    script = Script()
    stall = Stall("b", "sync", gate, times=5)
    definition = SagaDefinition(
        "cut",
        [
            Step("a", script.do("a"), script.undo("a")),
            Step("b", stall.action, script.undo("b"), retry=Retry(attempts=3, delay=0)),
        ],
        deadline=0.05,
    )
    began = time.monotonic()
    saga = app.run(definition, {})
    assert time.monotonic() - began < HANG / 2
    assert saga.status == "compensated"
    (failure,) = of_type(app, saga.id, StepFailed)
    assert (failure.step, failure.attempt, failure.error_type, failure.will_retry) == (
        "b",
        1,
        "StepTimeout",
        False,
    )
    assert "deadline" in failure.error_message
    assert len(stall.keys) == 1
    assert "a" in script.calls("undo")
    assert "late" not in app.get(saga.id).context
    assert app.verify() == []


# -- fallbacks -------------------------------------------------------------------------


def trip_with_charge(script: Script, charge: Step, *, ship_fails: bool = True) -> SagaDefinition:
    """reserve (undoable), then `charge`, then ship (which fails, if asked)."""
    return SagaDefinition(
        "shop",
        [
            Step("reserve", script.do("reserve"), script.undo("reserve")),
            charge,
            Step("ship", script.do("ship", always=Permanent if ship_fails else None)),
        ],
    )


@pytest.mark.parametrize("mode", MODES)
def test_when_the_primary_fails_the_fallback_runs_and_its_own_compensation_undoes_it(
    app: SagaApplication, commits: CommitSpy, mode: str
) -> None:
    script = Script()
    charge = Step(
        "charge",
        script.do("card", always=CardDeclined),
        script.undo("card"),
        fallback=script.do("wallet"),
        fallback_compensation=script.undo("wallet"),
        fallback_on=(CardDeclined,),
    )
    saga = execute(app, trip_with_charge(script, charge), {}, mode)
    assert saga.status == "compensated"
    assert rows(app, saga.id) == [
        ("SagaStarted",),
        ("StepStarted", "reserve", 1),
        ("StepCompleted", "reserve", 1),
        ("StepStarted", "charge", 1),
        ("StepFailed", "charge", 1),
        ("StepStarted", "charge", 2),
        ("StepCompleted", "charge", 2),
        ("StepStarted", "ship", 1),
        ("StepFailed", "ship", 1),
        ("CompensationStarted", "charge", 1),
        ("CompensationRan", "charge", 1),
        ("CompensationStarted", "reserve", 1),
        ("CompensationRan", "reserve", 1),
        ("SagaCompensated",),
    ]
    starts = [(e.step, e.attempt, e.fallback) for e in of_type(app, saga.id, StepStarted)]
    assert ("charge", 1, False) in starts
    assert ("charge", 2, True) in starts
    assert step_failures(app, saga.id) == [
        ("charge", 1, "CardDeclined", True, False, 0.0, None),
        ("ship", 1, "Permanent", False, False, 0.0, None),
    ]
    assert commits.calls[2] == ["StepFailed", "StepStarted"]  # failure and fallback: one commit
    assert script.log == [
        ("do", "reserve", f"{saga.id}:reserve"),
        ("do", "card", f"{saga.id}:charge"),
        ("do", "wallet", f"{saga.id}:charge"),
        ("do", "ship", f"{saga.id}:ship"),
        ("undo", "wallet", f"{saga.id}:charge"),
        ("undo", "reserve", f"{saga.id}:reserve"),
    ]
    assert app.get(saga.id).context == {"reserve": "undone", "wallet": "undone"}
    assert app.verify() == []


def test_an_error_outside_fallback_on_fails_the_step_without_the_fallback(
    app: SagaApplication,
) -> None:
    script = Script()
    charge = Step(
        "charge",
        script.do("card", always=Permanent),
        script.undo("card"),
        fallback=script.do("wallet"),
        fallback_compensation=script.undo("wallet"),
        fallback_on=(CardDeclined,),
    )
    saga = app.run(trip_with_charge(script, charge), {})
    assert saga.status == "compensated"
    assert step_failures(app, saga.id) == [("charge", 1, "Permanent", False, False, 0.0, None)]
    assert script.calls() == ["reserve", "card", "reserve"]
    assert app.verify() == []


def test_when_the_primary_takes_effect_its_own_compensation_runs_later(
    app: SagaApplication,
) -> None:
    script = Script()
    charge = Step(
        "charge",
        script.do("card"),
        script.undo("card"),
        fallback=script.do("wallet"),
        fallback_compensation=script.undo("wallet"),
    )
    saga = app.run(trip_with_charge(script, charge), {})
    assert saga.status == "compensated"
    assert script.calls() == ["reserve", "card", "ship", "card", "reserve"]
    assert [e.fallback for e in of_type(app, saga.id, StepStarted)] == [False] * 3
    assert app.verify() == []


def test_a_fallback_without_a_compensation_of_its_own_leaves_nothing_to_undo(
    app: SagaApplication,
) -> None:
    script = Script()
    charge = Step(
        "charge", script.do("card", always=CardDeclined), script.undo("card"), fallback=noop
    )
    saga = app.run(trip_with_charge(script, charge), {})
    assert saga.status == "compensated"
    assert script.calls("undo") == ["reserve"]  # not the card's refund: the card took no effect
    assert [e.step for e in of_type(app, saga.id, CompensationStarted)] == ["reserve"]
    assert app.verify() == []


def test_the_primary_uses_its_retries_before_the_fallback_runs(
    app: SagaApplication, clock: FakeClock
) -> None:
    script = Script()
    charge = Step(
        "charge",
        script.do("card", always=CardDeclined),
        script.undo("card"),
        retry=Retry(attempts=2, delay=1.0, jitter=0),
        fallback=script.do("wallet"),
        fallback_compensation=script.undo("wallet"),
    )
    saga = app.run(trip_with_charge(script, charge, ship_fails=False), {})
    assert saga.status == "completed"
    assert [f[:4] for f in step_failures(app, saga.id)] == [
        ("charge", 1, "CardDeclined", True),
        ("charge", 2, "CardDeclined", True),
    ]
    starts = [(e.step, e.attempt, e.fallback) for e in of_type(app, saga.id, StepStarted)]
    assert starts == [
        ("reserve", 1, False),
        ("charge", 1, False),
        ("charge", 2, False),
        ("charge", 3, True),
        ("ship", 1, False),
    ]
    assert clock.sleeps == [1.0]  # no wait before the fallback
    assert script.calls() == ["reserve", "card", "card", "wallet", "ship"]
    assert app.get(saga.id).context == {"reserve": "done", "wallet": "done", "ship": "done"}
    assert app.verify() == []


def test_a_failing_fallback_fails_the_step(app: SagaApplication) -> None:
    script = Script()
    charge = Step(
        "charge",
        script.do("card", always=CardDeclined),
        script.undo("card"),
        fallback=script.do("wallet", always=Permanent),
        fallback_compensation=script.undo("wallet"),
    )
    saga = app.run(trip_with_charge(script, charge), {})
    assert saga.status == "compensated"
    assert [f[:5] for f in step_failures(app, saga.id)] == [
        ("charge", 1, "CardDeclined", True, False),
        ("charge", 2, "Permanent", False, False),
    ]
    assert script.calls() == ["reserve", "card", "wallet", "reserve"]
    assert app.verify() == []


def test_a_stuck_fallback_compensation_is_the_one_a_resolve_retries(
    app: SagaApplication,
) -> None:
    script = Script()
    charge = Step(
        "charge",
        script.do("card", always=CardDeclined),
        script.undo("card"),
        fallback=script.do("wallet"),
        fallback_compensation=script.undo("wallet", Transient),
    )
    saga = app.run(trip_with_charge(script, charge), {})
    assert saga.status == "stuck"
    assert compensation_failures(app, saga.id) == [("charge", 1, "Transient", False, 0.0)]
    resolved = app.resolve(saga.id, "retry", by="ada", reason="wallet service back")
    assert resolved.status == "compensated"
    assert script.calls("undo") == ["wallet", "wallet", "reserve"]
    assert set(script.keys("wallet")) == {f"{saga.id}:charge"}
    assert app.get(saga.id).context == {"reserve": "undone", "wallet": "undone"}
    assert app.verify() == []


# -- circuit breakers ------------------------------------------------------------------


class Card:
    """A primary action that fails while `failing`, counting its calls."""

    def __init__(self, failing: bool = True) -> None:
        self.failing = failing
        self.calls = 0

    def __call__(self, context: Any, key: str) -> Any:
        self.calls += 1
        if self.failing:
            raise CardDeclined("declined")
        context["paid_by"] = "card"
        return "card-ref"


def wallet(context: Any, key: str) -> Any:
    context["paid_by"] = "wallet"
    return "wallet-ref"


def pay(
    name: str, card: Card, breaker: CircuitBreaker, fallback_on: Any = Exception
) -> SagaDefinition:
    return SagaDefinition(
        name,
        [
            Step(
                "charge",
                card,
                noop,
                fallback=wallet,
                fallback_compensation=noop,
                fallback_on=fallback_on,
                breaker=breaker,
            )
        ],
    )


@pytest.mark.parametrize(
    "fallback_on",
    [pytest.param(Exception, id="any-error"), pytest.param((CardDeclined,), id="CardDeclined")],
)
def test_a_breaker_opens_at_its_threshold_then_the_fallback_runs_without_the_primary(
    app: SagaApplication, fallback_on: Any
) -> None:
    card = Card()
    definition = pay("pay", card, CircuitBreaker("cards", failure_threshold=2), fallback_on)
    states = []
    for _ in range(3):
        saga = app.run(definition, {})
        assert saga.status == "completed"
        assert app.get(saga.id).context == {"paid_by": "wallet"}
        states.append(step_failures(app, saga.id))
    assert states == [
        [("charge", 1, "CardDeclined", True, False, 0.0, "closed")],
        [("charge", 1, "CardDeclined", True, False, 0.0, "open")],
        [("charge", 1, "CircuitOpen", True, False, 0.0, "open")],
    ]
    assert card.calls == 2  # the third saga did not call the card service
    starts = [(e.step, e.attempt, e.fallback) for e in of_type(app, saga.id, StepStarted)]
    assert starts == [("charge", 1, False), ("charge", 2, True)]
    assert app.verify() == []


def test_a_breaker_is_shared_by_every_definition_using_its_name(app: SagaApplication) -> None:
    cards_a, cards_b, stock = Card(), Card(), Card()
    first = pay("pay", cards_a, CircuitBreaker("cards", failure_threshold=2))
    second = pay("refill", cards_b, CircuitBreaker("cards", failure_threshold=2))
    other = pay("restock", stock, CircuitBreaker("stock", failure_threshold=2))
    app.run(first, {})
    app.run(first, {})
    saga = app.run(second, {})
    assert saga.status == "completed"
    assert cards_b.calls == 0
    assert step_failures(app, saga.id) == [("charge", 1, "CircuitOpen", True, False, 0.0, "open")]
    restocked = app.run(other, {})
    assert stock.calls == 1  # another name has its own state
    assert step_failures(app, restocked.id)[0][6] == "closed"
    assert app.verify() == []


def test_after_its_reset_timeout_a_breaker_lets_one_trial_through_and_success_closes_it(
    app: SagaApplication, clock: FakeClock
) -> None:
    card = Card()
    breaker = CircuitBreaker("cards", failure_threshold=1, reset_timeout=30)
    definition = pay("pay", card, breaker)
    app.run(definition, {})
    assert card.calls == 1
    clock.advance(29.9)
    refused = app.run(definition, {})
    assert card.calls == 1
    assert step_failures(app, refused.id)[0][2] == "CircuitOpen"
    clock.advance(0.1)
    card.failing = False
    trial = app.run(definition, {})
    assert card.calls == 2
    assert rows(app, trial.id) == [
        ("SagaStarted",),
        ("StepStarted", "charge", 1),
        ("StepCompleted", "charge", 1),
        ("SagaCompleted",),
    ]
    assert app.get(trial.id).context == {"paid_by": "card"}
    assert breaker.state(clock.monotonic()) == "closed"
    card.failing = True
    again = app.run(definition, {})
    assert card.calls == 3  # closed: the primary is called again
    assert step_failures(app, again.id)[0][2:] == ("CardDeclined", True, False, 0.0, "open")
    assert app.verify() == []


def test_a_failed_trial_opens_the_breaker_again(app: SagaApplication, clock: FakeClock) -> None:
    card = Card()
    definition = pay("pay", card, CircuitBreaker("cards", failure_threshold=1, reset_timeout=30))
    app.run(definition, {})
    clock.advance(30)
    trial = app.run(definition, {})
    assert card.calls == 2
    assert step_failures(app, trial.id) == [("charge", 1, "CardDeclined", True, False, 0.0, "open")]
    assert app.get(trial.id).context == {"paid_by": "wallet"}
    clock.advance(29)
    refused = app.run(definition, {})
    assert card.calls == 2
    assert step_failures(app, refused.id)[0][2] == "CircuitOpen"
    assert app.verify() == []


@pytest.mark.parametrize("mode", MODES)
def test_a_half_open_trial_cancelled_with_its_group_does_not_jam_the_breaker(
    app: SagaApplication, clock: FakeClock, mode: str
) -> None:
    card = Card()
    breaker = CircuitBreaker("cards", failure_threshold=1, reset_timeout=30)
    definition = pay("pay", card, breaker)
    app.run(definition, {})
    clock.advance(30)
    assert breaker.state(clock.monotonic()) == "half-open"
    trial_began = asyncio.Event()

    async def slow_card(context: Any, key: str) -> Any:
        trial_began.set()
        await asyncio.sleep(HANG)  # cancelled when its sibling fails

    async def sibling(context: Any, key: str) -> Any:
        await trial_began.wait()
        raise Permanent("sibling failed")

    group = SagaDefinition(
        "group",
        [Parallel(Step("charge", slow_card, noop, breaker=breaker), Step("other", sibling))],
    )
    began = time.monotonic()
    cut = execute(app, group, {}, mode)
    assert time.monotonic() - began < HANG / 2
    assert cut.status == "compensated"
    assert ("charge", 1, "StepCancelled", False, True, 0.0, None) in step_failures(app, cut.id)
    card.failing = False
    after = app.run(definition, {})  # the next call is the trial: the card is called
    assert card.calls == 2
    assert after.status == "completed"
    assert app.get(after.id).context == {"paid_by": "card"}
    assert breaker.state(clock.monotonic()) == "closed"
    assert app.verify() == []


# -- parallel groups -------------------------------------------------------------------


def meeting(name: str, mine: asyncio.Event, other: asyncio.Event, seen: dict[str, Any]) -> Body:
    """An async member that proves it overlaps the other: it waits for the other's signal."""

    async def action(context: Any, key: str) -> Any:
        seen[name] = (dict(context), key)
        mine.set()
        await asyncio.wait_for(other.wait(), 2.0)
        context[name] = "done"
        return f"{name}-ref"

    return action


@pytest.mark.parametrize("mode", MODES)
def test_parallel_members_run_at_once_and_all_their_changes_are_merged(
    app: SagaApplication, commits: CommitSpy, mode: str
) -> None:
    script = Script()
    seen: dict[str, Any] = {}
    b_ready, c_ready = asyncio.Event(), asyncio.Event()
    d_saw: list[dict[str, Any]] = []
    do_d = script.do("d")

    def d(context: Any, key: str) -> Any:
        d_saw.append(dict(context))
        return do_d(context, key)

    definition = SagaDefinition(
        "group",
        [
            Step("a", script.do("a"), script.undo("a")),
            Parallel(
                Step("b", meeting("b", b_ready, c_ready, seen), noop),
                Step("c", meeting("c", c_ready, b_ready, seen), noop),
            ),
            Step("d", d),
        ],
    )
    saga = execute(app, definition, {"n": 0}, mode)
    assert saga.status == "completed"
    history = rows(app, saga.id)
    assert history[:3] == [("SagaStarted",), ("StepStarted", "a", 1), ("StepCompleted", "a", 1)]
    assert sorted(history[3:5]) == [("StepStarted", "b", 1), ("StepStarted", "c", 1)]
    assert sorted(history[5:7]) == [("StepCompleted", "b", 1), ("StepCompleted", "c", 1)]
    assert history[7:] == [("StepStarted", "d", 1), ("StepCompleted", "d", 1), ("SagaCompleted",)]
    assert commits.calls[1] == ["StepCompleted", "StepStarted", "StepStarted"]  # one commit
    # Each member got the context as of the group's start, and its own key.
    assert seen == {
        "b": ({"n": 0, "a": "done"}, f"{saga.id}:b"),
        "c": ({"n": 0, "a": "done"}, f"{saga.id}:c"),
    }
    changes = {e.step: e.changes for e in of_type(app, saga.id, StepCompleted)}
    assert changes["b"] == {"b": "done"}
    assert changes["c"] == {"c": "done"}
    assert d_saw == [{"n": 0, "a": "done", "b": "done", "c": "done"}]
    stored = app.get(saga.id)
    assert stored.context == {"n": 0, "a": "done", "b": "done", "c": "done", "d": "done"}
    assert stored.results == {"a": "a-ref", "b": "b-ref", "c": "c-ref", "d": "d-ref"}
    assert app.verify() == []


@pytest.mark.parametrize("mode", MODES)
def test_sync_parallel_members_run_at_once_in_threads(app: SagaApplication, mode: str) -> None:
    barrier = threading.Barrier(2, timeout=2.0)

    def member(name: str) -> Body:
        def action(context: Any, key: str) -> Any:
            barrier.wait()  # both must be running for either to pass
            context[name] = key

        return action

    definition = SagaDefinition(
        "threads", [Parallel(Step("b", member("b")), Step("c", member("c")))]
    )
    saga = execute(app, definition, {}, mode)
    assert saga.status == "completed"
    assert app.get(saga.id).context == {"b": f"{saga.id}:b", "c": f"{saga.id}:c"}
    assert app.verify() == []


@pytest.mark.parametrize("mode", MODES)
def test_a_failing_member_cancels_the_running_ones_and_completed_members_are_undone_in_reverse(
    app: SagaApplication, commits: CommitSpy, mode: str
) -> None:
    script = Script()
    b_done, c_done = asyncio.Event(), asyncio.Event()
    cancelled: list[str] = []

    async def b(context: Any, key: str) -> Any:
        await asyncio.sleep(0)
        context["b"] = "done"
        b_done.set()

    async def c(context: Any, key: str) -> Any:
        await b_done.wait()
        context["c"] = "done"
        c_done.set()

    def hanging(name: str) -> Body:
        async def action(context: Any, key: str) -> Any:
            try:
                await asyncio.sleep(HANG)
            except asyncio.CancelledError:
                cancelled.append(name)
                raise
            context[name] = "late"

        return action

    async def f(context: Any, key: str) -> Any:
        await c_done.wait()
        raise Permanent("f failed")

    definition = SagaDefinition(
        "group",
        [
            Step("a", script.do("a"), script.undo("a")),
            Parallel(
                Step("b", b, script.undo("b")),
                Step("c", c, script.undo("c")),
                Step("x", hanging("x"), script.undo("x")),
                Step("y", hanging("y"), script.undo("y"), recovery="fail"),
                Step("f", f, script.undo("f")),
            ),
            Step("z", script.do("z")),
        ],
    )
    began = time.monotonic()
    saga = execute(app, definition, {}, mode)
    assert time.monotonic() - began < HANG / 2
    assert saga.status == "compensated"
    assert sorted(cancelled) == ["x", "y"]
    completed = [e.step for e in of_type(app, saga.id, StepCompleted)]
    assert completed == ["a", "b", "c"]
    failures = step_failures(app, saga.id)
    assert failures[0] == ("f", 1, "Permanent", False, False, 0.0, None)
    assert sorted(failures[1:]) == [
        ("x", 1, "StepCancelled", False, True, 0.0, None),  # outcome unknown: undone
        ("y", 1, "StepCancelled", False, False, 0.0, None),  # recovery="fail": no effect
    ]
    cancel_messages = [e.error_message for e in of_type(app, saga.id, StepFailed)[1:]]
    assert all("'f'" in message for message in cancel_messages)
    assert ["StepFailed", "StepFailed", "StepFailed", "CompensationStarted"] in commits.calls
    # The cancelled member first, then completed members in reverse order, then earlier steps.
    assert script.calls("undo") == ["x", "c", "b", "a"]
    assert [e.step for e in of_type(app, saga.id, CompensationStarted)] == ["x", "c", "b", "a"]
    assert "z" not in script.calls()
    members = {"b", "c", "x", "y", "f"}
    started = {e.step for e in of_type(app, saga.id, StepStarted)} & members
    assert started == members  # every member's events carry its own name
    stored = app.get(saga.id)
    assert stored.context == {"a": "undone", "b": "undone", "c": "undone", "x": "undone"}
    assert app.verify() == []


@pytest.mark.parametrize("mode", MODES)
def test_a_sync_member_still_running_when_a_sibling_fails_does_not_hold_up_the_saga(
    app: SagaApplication, mode: str
) -> None:
    script = Script()
    release = threading.Event()
    hang_for = 1.0

    def hanging(context: Any, key: str) -> Any:
        release.wait(hang_for)  # a sync call cannot be cancelled: it is abandoned
        context["x"] = "late"

    async def f(context: Any, key: str) -> Any:
        await asyncio.sleep(0.005)
        raise Permanent("f failed")

    definition = SagaDefinition(
        "group",
        [
            Step("a", script.do("a"), script.undo("a")),
            Parallel(Step("x", hanging, script.undo("x")), Step("f", f)),
        ],
    )
    began = time.monotonic()
    if mode == "run":
        saga = app.run(definition, {})
        took = time.monotonic() - began
    else:

        async def main() -> tuple[Saga, float]:
            try:
                return await app.arun(definition, {}), time.monotonic() - began
            finally:
                release.set()

        saga, took = asyncio.run(main())
    release.set()
    assert saga.status == "compensated"
    assert [f[:5] for f in step_failures(app, saga.id)] == [
        ("f", 1, "Permanent", False, False),
        ("x", 1, "StepCancelled", False, True),
    ]
    assert script.calls("undo") == ["x", "a"]
    assert took < hang_for / 2  # compensation did not wait for the abandoned call
    assert app.get(saga.id).context == {"a": "undone", "x": "undone"}  # not x's late "late"
    assert app.verify() == []


def test_a_parallel_member_is_retried_on_its_own(app: SagaApplication, clock: FakeClock) -> None:
    script = Script()
    definition = SagaDefinition(
        "group",
        [
            Parallel(
                Step(
                    "b",
                    script.do("b", Transient, kind="async"),
                    retry=Retry(attempts=2, delay=1.0, jitter=0),
                ),
                Step("c", script.do("c", kind="async")),
            )
        ],
    )
    saga = app.run(definition, {})
    assert saga.status == "completed"
    assert step_failures(app, saga.id) == [("b", 1, "Transient", True, False, 1.0, None)]
    assert clock.sleeps == [1.0]
    assert script.keys("b") == [f"{saga.id}:b"] * 2
    assert app.get(saga.id).context == {"b": "done", "c": "done"}
    assert app.verify() == []


def _elsewhere(
    app: SagaApplication, env: Env, open_app: Callable[[Env], SagaApplication]
) -> SagaApplication:
    """Another process on the same store (on POPO, which has no other, the same application)."""
    return app if env["PERSISTENCE_MODULE"].endswith("popo") else open_app(env)


@pytest.mark.parametrize("winner", ["cancel", "take-over"])
@pytest.mark.parametrize("mode", MODES)
def test_a_member_ending_after_a_lost_append_writes_nothing_over_the_newer_history(
    app: SagaApplication,
    env: Env,
    open_app: Callable[[Env], SagaApplication],
    mode: str,
    winner: str,
) -> None:
    """Another writer appends while a group runs: no member writes past it unchecked.

    The saga in memory is then one event behind the store; had a member committed from
    it, its events would have taken versions after the newer ones, unchecked. A cancel is
    obeyed on the stored saga: the members' completions are recorded after it, nothing
    starts, and the saga ends `cancelled` at once. Another worker's take-over (its new
    attempts) stops the group: none of its members writes anything more.
    """
    elsewhere = _elsewhere(app, env, open_app)
    saga_id = SagaApplication.saga_id("lost-append", "k")
    ran: list[str] = []

    def take_over() -> None:
        stored = elsewhere.get(saga_id)
        saga_runner.resume(stored, definition)  # attempt 2 of each member, written ahead
        elsewhere.save(stored)

    async def first(context: Any, key: str) -> None:
        if winner == "cancel":
            await asyncio.to_thread(elsewhere.cancel, saga_id, by="ops", reason="stop")
        else:
            await asyncio.to_thread(take_over)
        await asyncio.sleep(0)
        context["first"] = True

    async def second(context: Any, key: str) -> None:
        while len(app.saga_events(saga_id)) == 3:  # until the other writer has appended
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.002)  # past `first`'s lost append
        context["second"] = True

    definition = SagaDefinition(
        "lost-append",
        [
            Parallel(Step("first", first), Step("second", second)),
            Step("after", lambda c, k: ran.append("after")),
        ],
    )
    saga = execute(app, definition, {}, mode, key="k")
    assert app.verify() == []
    assert ran == []
    events = [type(e).__name__ for e in app.saga_events(saga_id)]
    if winner == "cancel":
        assert saga.status == app.get(saga_id).status == "cancelled"
        assert events[3:] == ["CancelRequested", "StepCompleted", "StepCompleted", "SagaCancelled"]
        assert saga.context == {"first": True, "second": True}
    else:
        assert events == ["SagaStarted", *["StepStarted"] * 4]
        assert saga.status == "running"
        assert saga.in_flight == {"first": 2, "second": 2}


@pytest.mark.parametrize("mode", MODES)
def test_a_cancel_landing_while_a_group_runs_ends_the_saga_cancelled_at_once(
    app: SagaApplication, env: Env, open_app: Callable[[Env], SagaApplication], mode: str
) -> None:
    """`a` completes, another process cancels, then `b` completes and loses its append.

    The runner records `b`'s completion on the stored saga, lets `c` (still running) end
    on its own, starts nothing more and compensates every completed step once, in reverse
    order of completion: `run`/`arun` return the saga `cancelled`, no recovery needed.
    """
    elsewhere = _elsewhere(app, env, open_app)
    saga_id = SagaApplication.saga_id("cancel-group", "k")
    calls: list[str] = []
    cancelled = threading.Event()

    def stored(step: str) -> None:
        """Wait until `step`'s completion is in the store."""
        deadline = time.monotonic() + HANG
        while step not in elsewhere.get(saga_id).completed and time.monotonic() < deadline:
            time.sleep(0.001)

    def do(name: str) -> Body:
        def action(context: Any, key: str) -> None:
            if name == "b":
                stored("a")
                elsewhere.cancel(saga_id, by="ops", reason="stop")
                cancelled.set()
            elif name == "c":
                cancelled.wait(HANG)
                stored("b")  # still running when the cancel is obeyed
            calls.append(f"do {name}")
            context[name] = True

        return action

    def undo(name: str) -> Body:
        return lambda context, key: calls.append(f"undo {name}")

    definition = SagaDefinition(
        "cancel-group",
        [
            Step("reserve", do("reserve"), undo("reserve")),
            Parallel(*(Step(n, do(n), undo(n)) for n in "abc")),
            Step("ship", do("ship"), undo("ship")),
        ],
    )
    saga = execute(app, definition, {}, mode, key="k")
    assert saga.status == app.get(saga_id).status == "cancelled"
    assert saga.compensated == ["c", "b", "a", "reserve"]
    assert calls == [
        *["do reserve", "do a", "do b", "do c"],
        *["undo c", "undo b", "undo a", "undo reserve"],
    ]
    assert [(r.event, r.step) for r in app.history(saga_id)][6:] == [
        ("StepCompleted", "a"),
        ("CancelRequested", None),
        ("StepCompleted", "b"),
        ("StepCompleted", "c"),
        *[
            (e, s)
            for s in ("c", "b", "a", "reserve")
            for e in ("CompensationStarted", "CompensationRan")
        ],
        ("SagaCancelled", None),
    ]
    assert app.verify() == []


@pytest.mark.parametrize("mode", MODES)
def test_a_cancellable_member_is_cut_when_a_cancel_lands_while_its_group_runs(
    app: SagaApplication, env: Env, open_app: Callable[[Env], SagaApplication], mode: str
) -> None:
    """A cancel lands while a group runs: a `cancellable` member is cut, the others end.

    `c` cancels and completes (its append lost to the cancel), `b` is cut at the runner's
    next look at the store: its attempt failed with `StepCancelled`, outcome unknown, so
    it is undone too. Every step that ended is compensated once, in reverse order.
    """
    elsewhere = _elsewhere(app, env, open_app)
    saga_id = SagaApplication.saga_id("cut-group", "k")
    calls: list[str] = []

    def do(name: str) -> Body:
        def action(context: Any, key: str) -> None:
            if name == "c":
                deadline = time.monotonic() + HANG
                while "a" not in elsewhere.get(saga_id).completed and time.monotonic() < deadline:
                    time.sleep(0.001)
                elsewhere.cancel(saga_id, by="ops", reason="stop")
            calls.append(f"do {name}")

        return action

    async def slow(context: Any, key: str) -> None:
        calls.append("do b")
        await asyncio.sleep(HANG)  # cut by the cancel
        calls.append("b ran to its end")

    def undo(name: str) -> Body:
        return lambda context, key: calls.append(f"undo {name}")

    definition = SagaDefinition(
        "cut-group",
        [
            Step("reserve", do("reserve"), undo("reserve")),
            Parallel(
                Step("a", do("a"), undo("a")),
                Step("b", slow, undo("b"), cancellable=True),
                Step("c", do("c"), undo("c")),
            ),
            Step("ship", do("ship"), undo("ship")),
        ],
    )
    saga = execute(app, definition, {}, mode, key="k")
    assert saga.status == app.get(saga_id).status == "cancelled"
    history = app.history(saga_id)
    ended = [r.step for r in history if r.event in ("StepCompleted", "StepFailed")]
    assert sorted(ended) == ["a", "b", "c", "reserve"]
    assert [r.error.type for r in history if r.event == "StepFailed"] == ["StepCancelled"]
    assert saga.compensated == ended[::-1]
    assert sorted(calls[:4]) == ["do a", "do b", "do c", "do reserve"]
    assert calls[4:] == [f"undo {s}" for s in ended[::-1]]
    assert app.verify() == []


@pytest.mark.parametrize("mode", MODES)
def test_a_cancel_landing_while_a_member_waits_to_retry_starts_no_new_attempt(
    app: SagaApplication,
    env: Env,
    open_app: Callable[[Env], SagaApplication],
    clock: FakeClock,
    mode: str,
) -> None:
    """A cancel lands while a member waits to retry and another runs: no new attempt starts.

    The retry's start (or the other member's completion) loses its append to the cancel;
    the group takes the cancel on, and the saga ends `cancelled` with `a` undone.
    """
    elsewhere = _elsewhere(app, env, open_app)
    saga_id = SagaApplication.saga_id("cancel-retry", "k")
    calls: list[str] = []
    asleep = clock.asleep

    cancelled = threading.Event()

    async def cancel_while_waiting(seconds: float) -> None:
        await asyncio.to_thread(elsewhere.cancel, saga_id, by="ops", reason="stop")
        cancelled.set()
        await asleep(seconds)

    clock.asleep = cancel_while_waiting  # type: ignore[method-assign]

    def slow(context: Any, key: str) -> None:
        cancelled.wait(HANG)  # in flight while the cancel lands: nobody else drives the saga
        calls.append("do a")

    def flaky(context: Any, key: str) -> None:
        calls.append("do b")
        raise Transient("busy")

    definition = SagaDefinition(
        "cancel-retry",
        [
            Parallel(
                Step("a", slow, lambda c, k: calls.append("undo a")),
                Step("b", flaky, retry=Retry(attempts=3, delay=1.0, jitter=0)),
            ),
            Step("ship", lambda c, k: calls.append("do ship")),
        ],
    )
    saga = execute(app, definition, {}, mode, key="k")
    assert saga.status == app.get(saga_id).status == "cancelled"
    assert sorted(calls[:2]) == ["do a", "do b"]
    assert calls[2:] == ["undo a"]
    assert step_failures(app, saga_id) == [("b", 1, "Transient", True, False, 1.0, None)]
    assert app.verify() == []


def test_the_state_machine_guards_each_member_of_a_group() -> None:
    saga = Saga.start(
        id=uuid4(),
        name="group",
        definition_version=1,
        steps=["a", "b", "c", "d"],
        compensable=["a", "b", "c"],
        key=None,
        context_type="builtins:dict",
        context={},
        parallel=[["b", "c"]],
    )
    saga.start_step("a", 1)
    saga.complete_step("a", 1, changes={}, removed=[])
    saga.start_step("b", 1)
    saga.start_step("c", 1)
    with pytest.raises(IllegalTransition, match="still in flight"):
        saga.start_step("d", 1)
    with pytest.raises(IllegalTransition, match="attempt 1, not 2"):
        saga.complete_step("c", 2, changes={}, removed=[])
    saga.complete_step("c", 1, changes={"c": 1}, removed=[])
    with pytest.raises(IllegalTransition, match="'c' was not started"):
        saga.complete_step("c", 1, changes={}, removed=[])
    with pytest.raises(IllegalTransition, match="still in flight"):
        saga.complete()
    saga.fail_step("b", 1, error_type="E", error_message="m", will_retry=False)
    with pytest.raises(IllegalTransition, match="next compensation is 'c'"):
        saga.start_compensation("a", 1)
    saga.start_compensation("c", 1)
    assert [type(e).__name__ for e in saga.pending_events][-3:] == [
        "StepCompleted",
        "StepFailed",
        "CompensationStarted",
    ]


# -- compensating a failed step's own effect -------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_compensate_on_failure_undoes_the_failed_steps_own_effect_first(
    app: SagaApplication, mode: str
) -> None:
    script = Script()
    definition = SagaDefinition(
        "partial",
        [
            Step("a", script.do("a"), script.undo("a")),
            Step(
                "b",
                script.do("b", always=Permanent),
                script.undo("b"),
                compensate_on_failure=True,
            ),
            Step("c", script.do("c")),
        ],
    )
    saga = execute(app, definition, {}, mode)
    assert saga.status == "compensated"
    assert rows(app, saga.id)[3:] == [
        ("StepStarted", "b", 1),
        ("StepFailed", "b", 1),
        ("CompensationStarted", "b", 1),
        ("CompensationRan", "b", 1),
        ("CompensationStarted", "a", 1),
        ("CompensationRan", "a", 1),
        ("SagaCompensated",),
    ]
    assert step_failures(app, saga.id) == [("b", 1, "Permanent", False, True, 0.0, None)]
    assert script.log[-2:] == [("undo", "b", f"{saga.id}:b"), ("undo", "a", f"{saga.id}:a")]
    assert app.get(saga.id).compensated == ["b", "a"]
    assert app.verify() == []


def test_compensate_on_failure_waits_until_the_retries_are_spent(app: SagaApplication) -> None:
    script = Script()
    definition = SagaDefinition(
        "partial",
        [
            Step(
                "b",
                script.do("b", Permanent, Permanent),
                script.undo("b"),
                retry=Retry(attempts=3, delay=0),
                compensate_on_failure=True,
            )
        ],
    )
    saga = app.run(definition, {})
    assert saga.status == "completed"
    assert [f[:5] for f in step_failures(app, saga.id)] == [
        ("b", 1, "Permanent", True, False),
        ("b", 2, "Permanent", True, False),
    ]
    assert script.calls("undo") == []


# -- bad input -------------------------------------------------------------------------

BAD_INPUT = [
    pytest.param(lambda: Retry(attempts=0), "attempts", id="Retry-zero-attempts"),
    pytest.param(lambda: Retry(attempts=-1), "attempts", id="Retry-negative-attempts"),
    pytest.param(lambda: Retry(attempts=True), "attempts", id="Retry-bool-attempts"),
    pytest.param(lambda: Retry(attempts=1.5), "attempts", id="Retry-float-attempts"),
    pytest.param(lambda: Step("s", noop, retry=0), "attempts", id="step-retry-0"),
    pytest.param(lambda: Step("s", noop, retry=-2), "attempts", id="step-retry-negative"),
    pytest.param(
        lambda: Step("s", noop, noop, compensation_retry=0),
        "attempts",
        id="compensation-retry-0",
    ),
    pytest.param(lambda: Retry(delay=-1), "delay", id="negative-delay"),
    pytest.param(lambda: Retry(backoff=0), "backoff", id="zero-backoff"),
    pytest.param(lambda: Retry(jitter=1.5), "jitter", id="jitter-above-1"),
    pytest.param(lambda: Retry(retry_on=(ValueError, "x")), "retry_on", id="retry_on-not-error"),
    pytest.param(lambda: Step("s", noop, timeout=0), "timeout", id="zero-timeout"),
    pytest.param(lambda: Step("s", noop, timeout=-0.5), "timeout", id="negative-timeout"),
    pytest.param(lambda: Step("s", noop, timeout=float("nan")), "timeout", id="NaN-timeout"),
    pytest.param(lambda: Step("s", noop, timeout=float("inf")), "timeout", id="infinite-timeout"),
    pytest.param(
        lambda: SagaDefinition("d", [Step("a", noop)], deadline=float("inf")),
        "deadline",
        id="infinite-deadline",
    ),
    pytest.param(
        lambda: SagaDefinition("d", [Step("a", noop)], deadline=0), "deadline", id="zero-deadline"
    ),
    pytest.param(
        lambda: Step("s", None, fallback=noop),  # type: ignore[arg-type]
        "fallback needs a primary",
        id="fallback-without-primary",
    ),
    pytest.param(
        lambda: Step("s", fallback=noop),
        "fallback needs a primary",
        id="fallback-without-primary-argument",
    ),
    pytest.param(lambda: Step("s"), "needs an action", id="step-without-action"),
    pytest.param(
        lambda: Step("s", noop, fallback_compensation=noop),
        "fallback_compensation needs a fallback",
        id="fallback-compensation-without-fallback",
    ),
    pytest.param(lambda: Parallel(), "at least one step", id="empty-Parallel"),
    pytest.param(
        lambda: Parallel(Step("a", noop), Parallel(Step("b", noop))),  # type: ignore[arg-type]
        "cannot hold another Parallel",
        id="nested-Parallel",
    ),
    pytest.param(
        lambda: SagaDefinition("d", [Step("a", noop), Parallel(Step("a", noop), Step("b", noop))]),
        "'a' is used twice",
        id="duplicate-member-name",
    ),
    pytest.param(
        lambda: Step("s", noop, compensate_on_failure=True),
        "compensate_on_failure=True needs a compensation",
        id="compensate_on_failure-without-compensation",
    ),
    pytest.param(
        lambda: Step("s", noop, recovery="compensate"),
        "recovery='compensate' needs a compensation",
        id="compensate-recovery-without-compensation",
    ),
    pytest.param(
        lambda: Step("s", noop, recovery="reconcile"), "needs reconcile", id="reconcile-without-fn"
    ),
    pytest.param(
        lambda: CircuitBreaker("cards", failure_threshold=0),
        "failure_threshold",
        id="breaker-threshold-0",
    ),
    pytest.param(
        lambda: CircuitBreaker("cards", reset_timeout=0), "reset_timeout", id="breaker-reset-0"
    ),
    pytest.param(
        lambda: Step("s", noop, noop, fallback=noop, compensate_on_failure=True),
        "cannot be combined with a fallback",
        id="compensate_on_failure-with-fallback",
    ),
]


@pytest.mark.parametrize(("build", "message"), BAD_INPUT)
def test_bad_policies_are_refused_with_a_clear_error_when_built(
    build: Callable[[], Any], message: str
) -> None:
    with pytest.raises(DefinitionError, match=message):
        build()


def test_bad_input_appends_nothing(app: SagaApplication) -> None:
    for param in BAD_INPUT:
        build = param.values[0]
        with pytest.raises(DefinitionError):
            build()  # type: ignore[operator]
    assert list(app.stream_ids()) == []
    assert app.statuses() == []
