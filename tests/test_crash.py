"""Crash safety: sagas killed with SIGKILL at random points, then recovered in a new process.

The harness (`tests/crash_harness.py`) runs sagas in forked child processes that kill
themselves at a point chosen from a seed: right before or right after a commit, inside
an action or a compensation (before or after its effect), between two compensations;
some recoveries are killed too. A fresh process then recovers with
`default_step_timeout=0`, and every saga and every call in the side-effect log is
checked (see `crash_harness.check_sagas`).

Settings (environment variables):
- `SAGA_ES_CRASH_KILLS`: kills in all, shared by SQLite and PostgreSQL (default 200);
  the long mode is e.g. `SAGA_ES_CRASH_KILLS=5000 pytest tests/test_crash.py`.
- `SAGA_ES_CRASH_SEED`: the seed of the plans and kill points (default 1). A failure
  names the round's seed.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import crash_harness as harness
import pytest
from conftest import DURABLE_STORES, Env

from saga_es import Saga, SagaApplication, SagaDefinition, Step, runner

KILLS = int(os.environ.get("SAGA_ES_CRASH_KILLS", "200"))
SEED = int(os.environ.get("SAGA_ES_CRASH_SEED", "1"))


@pytest.mark.parametrize("store", DURABLE_STORES)
def test_every_saga_survives_sigkill_at_random_points(
    store: str, store_env: Callable[..., Env], tmp_path: Path
) -> None:
    kills = -(-KILLS // len(DURABLE_STORES))
    stats = harness.crash_campaign(store_env(store), tmp_path, kills=kills, seed=SEED)
    print(f"\n{store}: {stats.summary()}")
    assert stats.kills >= kills
    assert set(stats.categories) == set(harness.CATEGORIES)
    assert stats.recovery_kills > 0
    assert stats.outcomes["completed"] > 0
    assert stats.outcomes["compensated"] > 0


def test_racing_workers_share_the_work_and_never_run_a_step_twice(
    store_env: Callable[..., Env], tmp_path: Path
) -> None:
    """4 workers recover 1,000 sagas on one PostgreSQL: 500 pending, 500 left by a crash.

    The crashed ones are left by one SIGKILL of a process running them all at once, each
    blocked inside an action or a compensation, before or after its effect. The workers
    start together (each creating the schema, which exists) and loop `recover()` with a
    2 s step timeout, far above a step's few milliseconds: a live worker's step is never
    due for takeover, so every overlap of two calls of one step is a fencing failure.
    """
    result = harness.race(store_env("postgres"), tmp_path, seed=SEED)
    print(f"\n{result.summary()}")
    problems = result.problems
    kinds = Counter(
        "two attempts of one step ran at once"
        if "s before attempt" in p
        else "an action took effect after its compensation"
        if "took effect again" in p
        else "other"
        for p in problems
    )
    assert not problems, f"{dict(kinds)}:\n" + "\n".join(problems[:40])
    assert result.outcomes["completed"] + result.outcomes["compensated"] == 1000
    for worker in result.workers:
        assert worker["resumed"] >= 50, f"a worker hardly worked: {result.summary()}"
        assert result.sagas_by_worker[worker["pid"]] >= 50, result.summary()


def test_the_checks_catch_what_they_must(store_env: Callable[..., Env], tmp_path: Path) -> None:
    """The harness's checks are not vacuous: each tampered log is caught."""
    env = store_env("sqlite")
    log = tmp_path / "calls.log"
    harness.reset(log_path=log)
    app = harness.HarnessApp(env=env, definitions=harness.DEFINITIONS)
    try:
        plan = harness.Plan("crash-three", "checked", "ship", "run")
        harness.run_plans(app, [plan])
    finally:
        harness.reset()
    lines = harness.read_log(log)
    assert [(x["kind"], x["step"]) for x in lines] == [
        ("action", "reserve"),
        ("action", "charge"),
        ("action", "ship"),
        ("compensation", "charge"),
        ("compensation", "reserve"),
    ]
    sagas = [(plan.saga_id, plan.fail_at)]

    def problems(tampered: list[dict[str, Any]]) -> str:
        for n, line in enumerate(tampered):
            line["n"] = n
        return "\n".join(harness.check_sagas(app, sagas, tampered))

    def copy() -> list[dict[str, Any]]:
        return [dict(x) for x in lines]

    assert problems(copy()) == ""
    twice = copy()
    twice.insert(1, dict(twice[0]))
    assert "'reserve' attempt 1 ran 2 times" in problems(twice)
    early = copy()
    early[1]["durable"] = None
    assert "last start its process had committed was attempt None" in problems(early)
    unstarted = copy()
    unstarted[1]["attempt"] = unstarted[1]["durable"] = 2
    assert "ran attempt 2, which has no start in the store" in problems(unstarted)
    missing = copy()[:-1]
    assert "the compensation calls were ['charge']" in problems(missing)
    late = copy()
    late.append({**late[1], "attempt": 2, "durable": 2})
    assert "'charge' took effect again after its compensation ran" in problems(late)
    killed_call = {**lines[0], "attempt": 2, "durable": 1, "effect": False, "t1": None}
    killed = [*copy(), {"kind": "kill", "label": "in-action:before", "call": killed_call}]
    assert "ran attempt 2 while the last start its process had committed was attempt 1" in (
        problems(killed)
    )
    stray = [*copy(), {**lines[0], "saga": "someone-else"}]
    assert "calls ran for sagas nobody started" in problems(stray)
    overlapping = [
        {**lines[0], "attempt": 1, "t0": 1.0, "t1": 2.0},
        {**lines[0], "attempt": 2, "t0": 1.5, "t1": 2.5},
    ]
    assert "started 0.500 s before attempt 1" in "".join(harness.check_overlaps(overlapping, {}))
    app.close()


@pytest.mark.parametrize("listed_as", ["pending", "interrupted"])
def test_recovery_leaves_alone_a_step_another_worker_started_after_the_listing(
    listed_as: str, store_env: Callable[..., Env], open_app: Callable[[Env], SagaApplication]
) -> None:
    """Recovery lists the sagas in flight, then resumes them one by one.

    By the time it reaches the second saga, another worker has started that saga's step
    (it is running it right now, well within the step timeout). Recovery must leave it to
    that worker; it must not judge the saga by the row it listed before (pending, or
    interrupted long ago), append a new attempt and run the step a second time at once.
    """
    timeout = 0.5
    env = {**store_env("sqlite"), "SAGA_STEP_TIMEOUT": str(timeout)}
    ran: list[str] = []
    definition = SagaDefinition("listing", [Step("a", lambda context, key: ran.append(key))])
    worker_a, worker_b = open_app(env), open_app(env)
    worker_a.register(definition)
    worker_b.register(definition)
    first, second = (
        Saga.start(
            id=SagaApplication.saga_id("listing", key),
            name="listing",
            definition_version=1,
            steps=["a"],
            compensable=[],
            key=key,
            context_type="builtins:dict",
            context={},
        )
        for key in ("first", "second")
    )
    for saga in (first, second):
        if listed_as == "interrupted":
            runner.begin(saga)  # its worker died in the action
        worker_a.save(saga)
    if listed_as == "interrupted":
        time.sleep(timeout + 0.1)  # both are due for recovery now

    def progress(done: int, total: int) -> None:
        if done == 1:  # worker B has listed both and recovered the first: A takes the second
            saga = worker_a.get(second.id)
            runner.resume(saga, definition)
            worker_a._save(saga)  # its step's start is durable; A is running the action now

    before = [
        (type(e).__name__, getattr(e, "attempt", None)) for e in worker_a.saga_events(second.id)
    ]
    report = worker_b.recover(progress=progress)
    after = [
        (type(e).__name__, getattr(e, "attempt", None)) for e in worker_a.saga_events(second.id)
    ]
    a_started = [*before, ("StepStarted", 2 if listed_as == "interrupted" else 1)]
    assert first.id in report.resumed
    assert after == a_started, "worker B appended to a saga whose step A is running"
    assert second.id in report.waiting
    assert f"{second.id}:a" not in ran
