"""`check`: stored sagas replayed against a new definition, before it is deployed.

The sagas are made by really running them, on every store: one completed, one
compensated, one whose worker died mid-action (`WorkerDied`, a `BaseException` the
runner does not catch, leaves the action's start recorded without an outcome) and one
stuck on a failed compensation. Each test then checks them against a changed definition.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
from eventsourcing.persistence import StoredEvent

from saga_es import Parallel, SagaApplication, SagaDefinition, Step
from saga_es.compat import KINDS, CheckReport, Divergence, check


class WorkerDied(BaseException):
    """Stands in for the process dying mid-call; the runner does not catch it."""


def action(step: str) -> Callable[[Any, str], Any]:
    """Dies if the context says `die` at this step, fails if it says `fail`."""

    def run(context: Any, key: str) -> None:
        if context.get("die") == step:
            raise WorkerDied(step)
        if context.get("fail") == step:
            raise RuntimeError(f"{step} failed")
        context[step] = "done"

    return run


def undo(step: str) -> Callable[[Any, str], Any]:
    def run(context: Any, key: str) -> None:
        if context.get("undo_fail") == step:
            raise RuntimeError(f"undoing {step} failed")
        context[step] = "undone"

    return run


def trip(
    steps: str = "a b c", *, version: int = 1, without_undo: str = "", name: str = "trip"
) -> SagaDefinition:
    """Compensable steps named in `steps`, except those in `without_undo`."""
    return SagaDefinition(
        name,
        [Step(s, action(s), None if s in without_undo.split() else undo(s)) for s in steps.split()],
        version=version,
    )


Sagas = dict[str, UUID]
LIVE = ("flying", "stuck")


@pytest.fixture
def sagas(app: SagaApplication) -> Sagas:
    """One saga in each state that matters to a deploy, all started from `trip()` v1."""
    definition = trip()
    ids = {
        "completed": app.run(definition, {}, key="completed").id,
        "compensated": app.run(definition, {"fail": "c"}, key="compensated").id,
    }
    with pytest.raises(WorkerDied):
        app.run(definition, {"die": "b"}, key="flying")
    ids["flying"] = SagaApplication.saga_id("trip", "flying")
    ids["stuck"] = app.run(definition, {"fail": "c", "undo_fail": "b"}, key="stuck").id
    states = {which: app.get(saga_id).status for which, saga_id in ids.items()}
    assert states == {
        "completed": "completed",
        "compensated": "compensated",
        "flying": "running",
        "stuck": "stuck",
    }
    app.definitions.clear()  # the new code registers only what each test checks
    return ids


def found(report: CheckReport, sagas: Sagas) -> dict[str, list[tuple[str, str | None, bool]]]:
    """Each saga's divergences as (kind, step, blocking), by the saga's role."""
    role = {saga_id: which for which, saga_id in sagas.items()}
    return {
        role[saga_id]: [(d.kind, d.step, d.blocking) for d in divergences]
        for saga_id, divergences in report.by_saga().items()
    }


def first_version(app: SagaApplication, saga_id: UUID, event: str, step: str) -> int:
    return next(
        e.originator_version
        for e in app.saga_events(saga_id)
        if type(e).__name__ == event and vars(e).get("step") == step
    )


def test_the_same_definition_finds_nothing(app: SagaApplication, sagas: Sagas) -> None:
    report = check(app, trip())
    assert report.ok
    assert report.divergences == []
    assert (report.definition, report.version) == ("trip", 1)
    # Live sagas first (new code must drive them), then the recently ended ones.
    live, ended = report.checked[:2], report.checked[2:]
    assert set(live) == {sagas["flying"], sagas["stuck"]}
    assert set(ended) == {sagas["completed"], sagas["compensated"]}
    assert found(report, sagas) == {which: [] for which in sagas}
    assert str(report) == "check of 'trip' v1:\n4 saga(s) checked, 0 diverge (0 blocking)"


def test_a_renamed_step_blocks_the_sagas_that_still_need_it(
    app: SagaApplication, sagas: Sagas
) -> None:
    report = check(app, trip("a b2 c"))
    assert found(report, sagas) == {
        "flying": [("renamed", "b", True)],  # b's action is in flight
        "stuck": [("renamed", "b", True)],  # b's compensation is what a person retries
        "completed": [("renamed", "b", False)],
        "compensated": [("renamed", "b", False)],
    }
    assert not report.ok
    for which, saga_id in sagas.items():
        (divergence,) = report.by_saga()[saga_id]
        assert "'b2'" in divergence.message
        assert divergence.version == first_version(app, saga_id, "StepStarted", "b"), which
    (flying,) = report.by_saga()[sagas["flying"]]
    assert "in flight" in flying.message


def test_a_removed_step_blocks_only_a_saga_that_has_yet_to_run_it(
    app: SagaApplication, sagas: Sagas
) -> None:
    report = check(app, trip("a b"))
    assert found(report, sagas) == {
        "flying": [("removed", "c", True)],
        # Stuck sagas only go backwards, and c never took effect: nothing calls it.
        "stuck": [("removed", "c", False)],
        "completed": [("removed", "c", False)],
        "compensated": [("removed", "c", False)],
    }
    (flying,) = report.by_saga()[sagas["flying"]]
    assert flying.version == 1  # c has not started: SagaStarted recorded it
    assert "yet to run" in flying.message
    (done,) = report.by_saga()[sagas["completed"]]
    assert done.version == first_version(app, sagas["completed"], "StepStarted", "c")


def test_reordered_steps_block_a_saga_that_has_yet_to_run_them(
    app: SagaApplication, sagas: Sagas
) -> None:
    report = check(app, trip("a c b"))
    found_by_role = found(report, sagas)
    assert found_by_role["flying"] == [("reordered", "c", True)]
    for which in ("stuck", "completed", "compensated"):
        assert found_by_role[which] == [("reordered", "c", False)], which
    (flying,) = report.by_saga()[sagas["flying"]]
    assert "before 'b'" in flying.message
    assert "'a', 'b', 'c'" in flying.message  # the order this saga keeps


def test_a_removed_compensation_blocks_sagas_that_may_still_undo_the_step(
    app: SagaApplication, sagas: Sagas
) -> None:
    report = check(app, trip(without_undo="a"))
    assert found(report, sagas) == {
        "flying": [("compensation-removed", "a", True)],
        "stuck": [("compensation-removed", "a", True)],
        "completed": [("compensation-removed", "a", False)],
        "compensated": [("compensation-removed", "a", False)],
    }
    for which, saga_id in sagas.items():
        (divergence,) = report.by_saga()[saga_id]
        assert divergence.version == first_version(app, saga_id, "StepCompleted", "a"), which
    (stuck,) = report.by_saga()[sagas["stuck"]]
    assert "stuck" in stuck.message


def test_a_bumped_version_blocks_live_sagas_until_the_old_one_stays_registered(
    app: SagaApplication, sagas: Sagas
) -> None:
    report = check(app, trip(version=2))
    assert found(report, sagas) == {
        "flying": [("version", None, True)],
        "stuck": [("version", None, True)],
        "completed": [("version", None, False)],
        "compensated": [("version", None, False)],
    }
    for divergence in report.divergences:
        assert divergence.version == 1
        assert "keep v1 registered alongside v2" in divergence.message
    assert report.version == 2

    app.register(trip())  # the new code keeps v1 for the sagas started from it
    kept = check(app, trip(version=2))
    assert kept.ok  # the mismatch is still reported, but recovery will use v1
    assert found(kept, sagas) == {which: [("version", None, False)] for which in sagas}
    assert all("v1 is registered here too" in d.message for d in kept.divergences)
    app.register(trip("a b2 c"))  # ... but a v1 that lost step b cannot drive them
    assert found(check(app, trip(version=2)), sagas)["flying"] == [
        ("version", None, False),
        ("renamed", "b", True),
    ]


def test_a_version_mismatch_is_reported_by_the_application_that_ran_the_sagas(
    app: SagaApplication,
) -> None:
    """`run` registers v1, as a running application does; checking v2 still names it."""
    definition = trip()
    done = app.run(definition, {}, key="done").id
    with pytest.raises(WorkerDied):
        app.run(definition, {"die": "b"}, key="flying")
    flying = SagaApplication.saga_id("trip", "flying")
    assert app.definitions[("trip", 1)] is definition

    report = check(app, trip(version=2))
    assert report.ok
    mismatches = {d.saga_id: (d.kind, d.step, d.version, d.blocking) for d in report.divergences}
    assert mismatches == {done: ("version", None, 1, False), flying: ("version", None, 1, False)}

    renamed = check(app, trip("a b2 c", version=2))  # v1 still drives them: no rename matters
    assert {(d.saga_id, d.kind) for d in renamed.divergences} == {
        (done, "version"),
        (flying, "version"),
    }


def test_a_step_added_at_the_end_is_reported_but_blocks_nothing(
    app: SagaApplication, sagas: Sagas
) -> None:
    report = check(app, trip("a b c d"))
    assert report.ok
    assert found(report, sagas) == {which: [("added", "d", False)] for which in sagas}
    assert all("will not run it" in d.message for d in report.divergences)


def test_a_definition_of_another_name_is_a_clear_error(app: SagaApplication, sagas: Sagas) -> None:
    with pytest.raises(ValueError, match="no saga") as caught:
        check(app, trip(name="hotel"))
    assert "'hotel'" in str(caught.value)
    assert "'trip'" in str(caught.value)


def test_recent_leaves_out_sagas_that_ended_before_it(app: SagaApplication) -> None:
    definition = trip()
    old = app.run(definition, {}, key="old").id
    time.sleep(0.3)
    new = app.run(definition, {"fail": "c"}, key="new").id
    with pytest.raises(WorkerDied):
        app.run(definition, {"die": "a"}, key="flying")
    flying = SagaApplication.saga_id("trip", "flying")
    rows = {row.saga_id: row for row in app.statuses(name="trip")}
    between = rows[old].updated_at + (rows[new].updated_at - rows[old].updated_at) / 2
    recent = datetime.now(UTC) - between

    assert check(app, definition, recent=recent).checked == [flying, new]
    assert check(app, definition, recent=timedelta(0)).checked == [flying]  # live ones only
    assert check(app, definition, recent=None).checked == [flying, old, new]
    assert check(app, definition).checked == [flying, old, new]  # a day, by default


def test_a_recently_cancelled_saga_is_checked_as_ended_never_blocking(
    app: SagaApplication,
) -> None:
    definition = trip()
    done = app.run(definition, {}, key="done").id
    cancelled = app.submit(definition, {}, key="cancelled")
    assert app.cancel(cancelled, by="ada", reason="customer asked").status == "cancelled"

    report = check(app, definition)
    assert report.checked == [done, cancelled]  # it ended, as the completed one did
    renamed = check(app, trip("a b2 c"))
    assert [(d.saga_id, d.kind, d.blocking) for d in renamed.divergences] == [
        (done, "renamed", False),
        (cancelled, "renamed", False),
    ]
    assert "cancelled, so nothing will drive it again" in renamed.divergences[1].message
    assert renamed.ok


def test_limit_checks_live_sagas_first_and_says_it_stopped(
    app: SagaApplication, sagas: Sagas
) -> None:
    report = check(app, trip(), limit=2)
    assert set(report.checked) == {sagas[which] for which in LIVE}
    assert report.truncated
    assert "limit" in str(report).splitlines()[-1]
    assert not check(app, trip(), limit=4).truncated
    with pytest.raises(ValueError, match="limit"):
        check(app, trip(), limit=0)
    with pytest.raises(ValueError, match="recent"):
        check(app, trip(), recent=timedelta(seconds=-1))
    with pytest.raises(TypeError, match="recent must be None or a timedelta, got 3600"):
        check(app, trip(), recent=3600)  # type: ignore[arg-type]


def test_an_unreadable_stream_blocks_a_live_saga(app: SagaApplication, sagas: Sagas) -> None:
    saga_id = sagas["flying"]
    version = app.get(saga_id).version + 1
    app.recorder.insert_events([StoredEvent(saga_id, version, "saga_es:Teleported", b"{}")])
    report = check(app, trip())
    assert found(report, sagas)["flying"] == [("unreadable", None, True)]
    (divergence,) = report.by_saga()[saga_id]
    assert divergence.version == version
    assert not report.ok
    assert found(report, sagas)["completed"] == []  # one bad stream does not stop the rest


def test_the_report_reads_one_line_per_divergence_ordered_by_saga_then_version(
    app: SagaApplication, sagas: Sagas
) -> None:
    report = check(app, trip("a b2 c", version=2, without_undo="a"))
    lines = str(report).splitlines()
    assert lines[0] == "check of 'trip' v2:"
    assert lines[-1] == "4 saga(s) checked, 4 diverge (2 blocking)"
    body = lines[1:-1]
    assert len(body) == len(report.divergences)
    pattern = re.compile(r"  saga (\S+) v(\d+): ([a-z-]+)(?: (\S+))?: (.+)")
    order = [UUID(pattern.fullmatch(line).group(1)) for line in body]  # type: ignore[union-attr]
    assert order == sorted(order, key=report.checked.index)
    for saga_id, divergences in report.by_saga().items():
        versions = [d.version for d in divergences]
        assert versions == sorted(versions), saga_id
        assert {d.kind for d in divergences} <= set(KINDS)
    flying = [str(d) for d in report.by_saga()[sagas["flying"]]]
    assert all(line.endswith("[blocking]") for line in flying)
    assert any(
        line.startswith(f"saga {sagas['flying']} v4: renamed b: renamed to 'b2'") for line in flying
    )
    assert {d.kind for d in report.by_saga()[sagas["flying"]]} == {
        "version",
        "renamed",
        "compensation-removed",
    }


def test_changed_parallel_groups_block_a_saga_that_has_yet_to_run_them(
    app: SagaApplication,
) -> None:
    steps = {s: Step(s, action(s), undo(s)) for s in "abc"}
    grouped = SagaDefinition("tour", [steps["a"], Parallel(steps["b"], steps["c"])])
    done = app.run(grouped, {}, key="done").id
    with pytest.raises(WorkerDied):
        app.run(grouped, {"die": "a"}, key="flying")
    flying = SagaApplication.saga_id("tour", "flying")

    report = check(app, SagaDefinition("tour", list(steps.values())))
    assert [(d.saga_id, d.kind, d.step, d.blocking) for d in report.divergences] == [
        (flying, "group-changed", "b", True),
        (done, "group-changed", "b", False),
    ]
    assert "recorded as Parallel(b, c), now b, c" in report.divergences[0].message
    assert check(app, grouped).ok
    # Order within one group is not an order: nothing changes for the sagas.
    swapped = SagaDefinition("tour", [steps["a"], Parallel(steps["c"], steps["b"])])
    assert check(app, swapped).divergences == []


def test_a_saga_on_its_fallback_needs_the_fallback_and_its_compensation(
    app: SagaApplication,
) -> None:
    def died(context: Any, key: str) -> None:
        raise WorkerDied("fallback")

    def unused(context: Any, key: str) -> None:
        raise AssertionError("not called")

    def fails(context: Any, key: str) -> None:
        raise RuntimeError("primary failed")

    a = Step("a", action("a"), undo("a"))
    b = Step("b", fails, undo("b"), fallback=died, fallback_compensation=unused)
    with pytest.raises(WorkerDied):
        app.run(SagaDefinition("ship", [a, b]), {}, key="flying")
    saga_id = SagaApplication.saga_id("ship", "flying")
    assert app.get(saga_id).on_fallback == ["b"]

    without_fallback = SagaDefinition("ship", [a, Step("b", fails, undo("b"))])
    report = check(app, without_fallback)
    assert [(d.kind, d.step, d.blocking) for d in report.divergences] == [
        ("compensation-removed", "b", True),
        ("fallback-removed", "b", True),
    ]
    assert "fallback's compensation" in report.divergences[0].message

    keeps_fallback = SagaDefinition("ship", [a, Step("b", fails, undo("b"), fallback=unused)])
    (divergence,) = check(app, keeps_fallback).divergences
    assert (divergence.kind, divergence.step, divergence.blocking) == (
        "compensation-removed",
        "b",
        True,
    )


def test_divergences_are_values(app: SagaApplication, sagas: Sagas) -> None:
    (divergence,) = check(app, trip("a b"), recent=timedelta(0)).by_saga()[sagas["flying"]]
    assert isinstance(divergence, Divergence)
    assert divergence == Divergence(
        sagas["flying"], 1, "removed", "c", divergence.message, blocking=True
    )
    assert str(divergence).startswith(f"saga {sagas['flying']} v1: removed c: ")
