"""The audit view of a saga: typed history records, time travel, unreadable events, queries.

Every behaviour runs on POPO, SQLite and PostgreSQL through the `app` fixture. Records are
checked against what the steps did (their changes as before → after, their errors and
policies), against `app.get(id, version=N)` for every N, and against the notification
log, whose positions order the events of every saga.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from uuid import UUID, uuid4

import pytest
from conftest import DURABLE_STORES, Env
from eventsourcing.persistence import StoredEvent
from pydantic import BaseModel

from saga_es import (
    CircuitBreaker,
    FakeClock,
    Retry,
    Saga,
    SagaApplication,
    SagaDefinition,
    SagaError,
    SagaNotFound,
    Step,
    UnreadableEvent,
    VersionNotFound,
)
from saga_es.breaker import reset_breakers
from saga_es.history import ABSENT, REMOVED, Change, EventError, HistoryRecord

START = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

Action = Callable[[Any, str], Any]


class Declined(Exception):
    """An action's ordinary failure."""


class Jammed(Exception):
    """A compensation's failure."""


@dataclass
class Order:
    sku: str
    qty: int
    tags: list[str] = field(default_factory=list)


class Trip(BaseModel):
    customer: str
    qty: int
    tags: list[str] = []


@pytest.fixture(autouse=True)
def fresh_breakers() -> Iterator[None]:
    """Breaker state is per process: every test starts, and leaves, with none."""
    reset_breakers()
    yield
    reset_breakers()


# -- helpers ---------------------------------------------------------------------------


def noop(context: Any, key: str) -> None:
    pass


def sets(**values: Any) -> Action:
    """An action that sets each of `values` in a dict context."""

    def action(context: dict[str, Any], key: str) -> None:
        context.update(values)

    return action


def fails(error: Exception) -> Action:
    def action(context: Any, key: str) -> None:
        raise error

    return action


def events(records: list[HistoryRecord]) -> list[tuple[Any, ...]]:
    """(event, step, attempt) of each record."""
    return [(r.event, r.step, r.attempt) for r in records]


def fold(records: list[HistoryRecord]) -> dict[str, Any]:
    """The context the records' changes add up to."""
    state: dict[str, Any] = {}
    for record in records:
        for name, change in record.changes.items():
            if change.after is REMOVED:
                del state[name]
            else:
                state[name] = change.after
    return state


def last_version(app: SagaApplication, saga_id: UUID) -> int:
    return len(app.saga_events(saga_id))


def forge(app: SagaApplication, saga_id: UUID, version: int, topic: str, state: bytes) -> None:
    app.recorder.insert_events([StoredEvent(saga_id, version, topic, state)])


# -- a completed saga ------------------------------------------------------------------


def edit_b(context: dict[str, Any], key: str) -> None:
    context["x"] = 1
    del context["gone"]
    context["tags"].append("b")  # in place


def edit_c(context: dict[str, Any], key: str) -> None:
    context["x"] = 2
    context["gone"] = "back"  # removed by b, added again
    context["tags"].append("c")


TRIP = SagaDefinition(
    "trip",
    [Step("a", sets(a="done")), Step("b", edit_b), Step("c", edit_c)],
)
TRIP_START = {"x": 0, "gone": True, "tags": []}
TRIP_EVENTS = [
    ("SagaStarted", None, None),
    ("StepStarted", "a", 1),
    ("StepCompleted", "a", 1),
    ("StepStarted", "b", 1),
    ("StepCompleted", "b", 1),
    ("StepStarted", "c", 1),
    ("StepCompleted", "c", 1),
    ("SagaCompleted", None, None),
]


def test_a_completed_saga_has_one_record_per_event_in_order(app: SagaApplication) -> None:
    saga = app.run(TRIP, dict(TRIP_START))
    records = app.history(saga.id)

    assert all(isinstance(r, HistoryRecord) for r in records)
    assert events(records) == TRIP_EVENTS
    assert [r.version for r in records] == list(range(1, len(TRIP_EVENTS) + 1))
    assert [r.event for r in records] == [type(e).__name__ for e in app.saga_events(saga.id)]
    positions = [r.position for r in records]
    assert all(isinstance(p, int) for p in positions)
    assert positions == sorted(set(positions))  # strictly increasing
    times = [r.timestamp for r in records]
    assert all(isinstance(t, datetime) and t.tzinfo is not None for t in times)
    assert times == sorted(times)
    assert times == [e.timestamp for e in app.saga_events(saga.id)]
    assert [r.status for r in records] == [
        "pending",
        *["running"] * 6,
        "completed",
    ]
    assert all(r.error is None and r.readable for r in records)
    assert app.history(str(saga.id)) == records  # an id as typed on a command line


def test_each_record_says_what_changed_before_and_after(app: SagaApplication) -> None:
    saga = app.run(TRIP, dict(TRIP_START))
    records = app.history(saga.id)
    changes = {(r.event, r.step): r.changes for r in records if r.changes}

    assert changes == {
        ("SagaStarted", None): {
            "x": Change(ABSENT, 0),
            "gone": Change(ABSENT, True),
            "tags": Change(ABSENT, []),
        },
        ("StepCompleted", "a"): {"a": Change(ABSENT, "done")},
        ("StepCompleted", "b"): {
            "x": Change(0, 1),
            "gone": Change(True, REMOVED),
            "tags": Change([], ["b"]),
        },
        ("StepCompleted", "c"): {
            "x": Change(1, 2),  # changed twice: each before is the value it replaced
            "gone": Change(ABSENT, "back"),  # added again after its removal
            "tags": Change(["b"], ["b", "c"]),
        },
    }
    assert repr(ABSENT) == "<absent>"
    assert repr(REMOVED) == "<removed>"
    assert fold(records) == app.get(saga.id).context_state
    assert fold(records) == {"x": 2, "gone": "back", "tags": ["b", "c"], "a": "done"}


def test_records_answer_to_the_names_an_auditor_uses(
    app: SagaApplication, reader: SagaApplication
) -> None:
    """time, event type, state after, and each change as a (before, after) pair."""
    saga = app.run(TRIP, dict(TRIP_START))
    for record in reader.history(saga.id):
        assert record.time == record.timestamp
        assert isinstance(record.time, datetime)
        assert record.event_type == record.event
        assert record.state == record.status
    completed_b = next(
        r for r in reader.history(saga.id) if (r.event, r.step) == ("StepCompleted", "b")
    )
    assert completed_b.changes["x"] == (0, 1)
    before, after = completed_b.changes["tags"]
    assert (before, after) == ([], ["b"])
    assert completed_b.changes["gone"] == (True, REMOVED)
    assert completed_b.changes["x"].before == 0


def test_records_on_another_application_reading_the_store_are_equal(
    app: SagaApplication, reader: SagaApplication
) -> None:
    saga = app.run(TRIP, dict(TRIP_START))
    assert reader.history(saga.id) == app.history(saga.id)


def test_positions_order_the_records_of_interleaved_sagas(
    app: SagaApplication, reader: SagaApplication
) -> None:
    inner = SagaDefinition("inner", [Step("i", sets(i=1)), Step("j", sets(j=1))])
    inner_ids: list[UUID] = []

    def run_inner(context: dict[str, Any], key: str) -> None:
        inner_ids.append(app.run(inner, {}).id)

    outer = SagaDefinition("outer", [Step("a", run_inner), Step("b", sets(b=1))])
    first = app.run(outer, {})
    later = app.run(inner, {})
    (nested,) = inner_ids

    outer_records = app.history(first.id)
    nested_records = app.history(nested)
    later_records = app.history(later.id)
    by_position = sorted(
        [(r.position, "outer") for r in outer_records]
        + [(r.position, "nested") for r in nested_records]
        + [(r.position, "later") for r in later_records]
    )
    positions = [r.position for r in [*outer_records, *nested_records, *later_records]]
    assert len(set(positions)) == len(positions)  # global: no two events share one
    # The nested saga ran inside step "a": its events fall between a's start and end.
    a_started, a_completed = (r.position for r in outer_records[1:3])
    assert all(a_started < r.position < a_completed for r in nested_records)
    assert max(r.position for r in outer_records) < min(r.position for r in later_records)
    assert [label for _, label in by_position] == [
        "outer",
        "outer",
        *["nested"] * len(nested_records),
        *["outer"] * (len(outer_records) - 2),
        *["later"] * len(later_records),
    ]
    # The positions are those of the application's notification log.
    log = {
        (n.originator_id, n.originator_version): n.id
        for n in app.recorder.select_notifications(None, limit=1000)
    }
    for saga_id, records in ((first.id, outer_records), (nested, nested_records)):
        assert [r.position for r in records] == [log[saga_id, r.version] for r in records]
    for saga_id in (first.id, nested, later.id):
        assert reader.history(saga_id) == app.history(saga_id)


# -- errors and policies ---------------------------------------------------------------


def test_failures_record_their_errors_and_policies(app: SagaApplication) -> None:
    clock = FakeClock(START)
    app.clock = clock
    definition = SagaDefinition(
        "pay",
        [
            Step(
                "hold",
                sets(held=True),
                fails(Jammed("the vault is jammed")),
                compensation_retry=Retry(attempts=2, delay=3.0, jitter=0),
            ),
            Step(
                "charge",
                fails(Declined("card declined")),
                retry=Retry(attempts=2, delay=5.0, jitter=0),
            ),
        ],
    )
    saga = app.run(definition, {"amount": 10})
    assert saga.status == "stuck"
    records = app.history(saga.id)

    failures = [
        (r.event, r.step, r.attempt, r.status, r.error, r.details)
        for r in records
        if r.error is not None
    ]
    declined = EventError("Declined", "card declined")
    jammed = EventError("Jammed", "the vault is jammed")
    assert failures == [
        (
            "StepFailed",
            "charge",
            1,
            "running",
            declined,
            {"will_retry": True, "compensate": False, "delay": 5.0, "breaker": None},
        ),
        (
            "StepFailed",
            "charge",
            2,
            "compensating",
            declined,
            {"will_retry": False, "compensate": False, "delay": 0.0, "breaker": None},
        ),
        (
            "CompensationFailed",
            "hold",
            1,
            "compensating",
            jammed,
            {"will_retry": True, "delay": 3.0},
        ),
        (
            "CompensationFailed",
            "hold",
            2,
            "compensating",
            jammed,
            {"will_retry": False, "delay": 0.0},
        ),
        ("SagaStuck", "hold", None, "stuck", jammed, {}),
    ]
    assert clock.sleeps == [5.0, 3.0]

    resolved = app.resolve(saga.id, "mark-compensated", by="ops@example.com", reason="undone")
    assert resolved.status == "compensated"
    tail = app.history(saga.id)[len(records) :]
    assert [(r.event, r.step, r.status) for r in tail] == [
        ("SagaResolved", "hold", "compensating"),
        ("SagaCompensated", None, "compensated"),
    ]
    assert tail[0].details == {
        "action": "mark-compensated",
        "by": "ops@example.com",
        "reason": "undone",
    }


def test_a_fallback_and_a_breaker_are_in_the_details(app: SagaApplication) -> None:
    breaker = CircuitBreaker(f"cards-{uuid4()}", failure_threshold=1)
    definition = SagaDefinition(
        "pay",
        [
            Step(
                "charge",
                fails(Declined("declined")),
                noop,
                fallback=sets(paid_by="wallet"),
                fallback_on=(Declined,),
                breaker=breaker,
            )
        ],
    )
    first = app.run(definition, {})
    second = app.run(definition, {})
    assert first.status == second.status == "completed"

    def rows(saga_id: UUID) -> list[tuple[Any, ...]]:
        return [
            (r.event, r.step, r.attempt, r.error, r.details)
            for r in app.history(saga_id)
            if r.step is not None
        ]

    def failed(error: EventError, breaker_state: str) -> tuple[Any, ...]:
        details = {"will_retry": True, "compensate": False, "delay": 0.0}
        return ("StepFailed", "charge", 1, error, {**details, "breaker": breaker_state})

    fallback_run = [
        ("StepStarted", "charge", 2, None, {"fallback": True}),
        ("StepCompleted", "charge", 2, None, {"result": None}),
    ]
    assert rows(first.id) == [
        ("StepStarted", "charge", 1, None, {"fallback": False}),
        failed(EventError("Declined", "declined"), "open"),
        *fallback_run,
    ]
    second_rows = rows(second.id)
    assert second_rows[1][3].type == "CircuitOpen"
    assert second_rows[1][4]["breaker"] == "open"
    assert second_rows[2:] == fallback_run
    assert app.history(second.id)[-2].changes == {"paid_by": Change(ABSENT, "wallet")}


def test_a_compensated_saga_records_the_compensations_changes(app: SagaApplication) -> None:
    definition = SagaDefinition(
        "trip",
        [
            Step("a", sets(a="booked"), sets(a="cancelled")),
            Step("b", fails(Declined("full"))),
        ],
    )
    saga = app.run(definition, {})
    records = app.history(saga.id)
    assert [(r.event, r.step, r.status, r.changes) for r in records[-4:]] == [
        ("StepFailed", "b", "compensating", {}),  # a failed step's changes are not kept
        ("CompensationStarted", "a", "compensating", {}),
        ("CompensationRan", "a", "compensating", {"a": Change("booked", "cancelled")}),
        ("SagaCompensated", None, "compensated", {}),
    ]
    assert records[-4].error == EventError("Declined", "full")


def test_a_failed_step_undone_by_its_own_compensation_says_so(app: SagaApplication) -> None:
    def partial(context: dict[str, Any], key: str) -> None:
        raise Declined("half charged")

    definition = SagaDefinition(
        "pay",
        [
            Step("hold", sets(held=True), sets(held=False)),
            Step("charge", partial, sets(refunded=True), compensate_on_failure=True),
        ],
    )
    saga = app.run(definition, {})
    rows = [(r.event, r.step, r.status) for r in app.history(saga.id)[4:]]
    assert rows == [
        ("StepFailed", "charge", "compensating"),
        ("CompensationStarted", "charge", "compensating"),
        ("CompensationRan", "charge", "compensating"),
        ("CompensationStarted", "hold", "compensating"),
        ("CompensationRan", "hold", "compensating"),
        ("SagaCompensated", None, "compensated"),
    ]
    failed = app.history(saga.id)[4]
    assert failed.details["compensate"] is True
    assert failed.details["will_retry"] is False
    assert app.history(saga.id)[6].changes == {"refunded": Change(ABSENT, True)}


def test_a_deadline_is_in_the_details(app: SagaApplication) -> None:
    clock = FakeClock(START)
    app.clock = clock

    def slow(context: dict[str, Any], key: str) -> None:
        context["a"] = 1
        clock.advance(120)

    definition = SagaDefinition("slow", [Step("a", slow, sets(a=0)), Step("b", noop)], deadline=60)
    saga = app.run(definition, {})
    records = app.history(saga.id)
    deadline = START + timedelta(seconds=60)
    assert records[0].details["deadline"] == deadline
    assert [(r.event, r.status) for r in records[2:5]] == [
        ("StepCompleted", "running"),
        ("SagaTimedOut", "compensating"),
        ("CompensationStarted", "compensating"),
    ]
    assert records[3].details == {"deadline": deadline}
    assert app.get(saga.id, version=4).error is not None
    assert app.get(saga.id, version=4).error["type"] == "DeadlineExceeded"


@pytest.mark.parametrize("kind", ["dataclass", "pydantic"])
def test_typed_contexts_have_their_changes_recorded_too(
    app: SagaApplication, reader: SagaApplication, kind: str
) -> None:
    def more(context: Any, key: str) -> None:
        context.qty *= 2
        context.tags.append("x")

    context: Any = Order("X1", 1) if kind == "dataclass" else Trip(customer="ada", qty=1)
    saga = app.run(SagaDefinition("typed", [Step("more", more)]), context)
    records = reader.history(saga.id)
    initial = {name: Change(ABSENT, value) for name, value in vars(context).items()}
    assert records[0].changes == initial
    assert records[2].changes == {"qty": Change(1, 2), "tags": Change([], ["x"])}
    assert fold(records) == app.get(saga.id).context_state


def test_to_dict_is_json_ready(app: SagaApplication) -> None:
    saga = app.run(TRIP, {**TRIP_START, "when": START})
    records = app.history(saga.id)
    dicts = [r.to_dict() for r in records]
    assert json.loads(json.dumps(dicts, default=str)) == json.loads(json.dumps(dicts))
    first, *_, last = dicts
    assert first["changes"]["x"] == {"before": None, "after": 0, "added": True}
    assert first["changes"]["when"]["after"] == START.isoformat()  # times as ISO 8601
    assert first["timestamp"] == records[0].timestamp.isoformat()
    assert last["event"] == "SagaCompleted"
    assert last["readable"] is True
    b = dicts[4]
    assert b["changes"]["gone"] == {"before": True, "after": None, "removed": True}
    assert b["changes"]["x"] == {"before": 0, "after": 1}
    assert [d["version"] for d in dicts] == [r.version for r in records]
    assert [d["position"] for d in dicts] == [r.position for r in records]

    failing = SagaDefinition("f", [Step("a", fails(Declined("no")))], deadline=60)
    failed = app.run(failing, {"n": 1})
    plain = [r.to_dict() for r in app.history(failed.id)]
    assert json.loads(json.dumps(plain)) == plain  # no default= needed
    assert plain[2]["error"] == {"type": "Declined", "message": "no"}
    deadline = app.history(failed.id)[0].details["deadline"]
    assert isinstance(deadline, datetime)
    assert plain[0]["details"]["deadline"] == deadline.isoformat()


# -- time travel -----------------------------------------------------------------------


def test_the_saga_at_every_version_matches_the_records_up_to_it(
    app: SagaApplication, reader: SagaApplication
) -> None:
    definition = SagaDefinition(
        "trip",
        [
            Step("a", sets(a="booked"), sets(a="cancelled")),
            Step("b", edit_b, sets(x=-1)),
            Step("c", fails(Declined("full"))),
        ],
    )
    saga = app.run(definition, dict(TRIP_START))
    records = app.history(saga.id)
    assert saga.status == "compensated"
    for n, record in enumerate(records, start=1):
        for source in (app, reader):
            then = source.get(saga.id, version=n)
            assert then.version == n
            assert then.status == record.status
            assert then.context_state == fold(records[:n]), n
            assert then.context == fold(records[:n])
    assert app.get(saga.id, version=len(records)).context_state == app.get(saga.id).context_state
    assert app.get(saga.id, version=1).context == TRIP_START
    assert app.get(str(saga.id), version=3).completed == ["a"]
    failed = app.get(saga.id, version=len(records) - 5)
    assert failed.error == {"step": "c", "type": "Declined", "message": "full"}


def test_time_travel_crosses_a_snapshot(app: SagaApplication, reader: SagaApplication) -> None:
    tries = {"n": 0}

    def flaky(context: dict[str, Any], key: str) -> None:
        tries["n"] += 1
        context["tries"] = tries["n"]
        if tries["n"] < 60:
            raise Declined(f"try {tries['n']}")

    retry = Retry(attempts=100, delay=0.0, jitter=0)
    definition = SagaDefinition(
        "long", [Step("a", sets(a=1)), Step("f", flaky, retry=retry), Step("b", sets(b=1))]
    )
    saga = app.run(definition, {})
    assert (saga.status, saga.version) == ("completed", 126)
    assert app.snapshots is not None
    assert [s.originator_version for s in app.snapshots.get(saga.id)] == [100]
    records = app.history(saga.id)
    assert len(records) == 126
    assert (records[122].event, records[122].attempt) == ("StepCompleted", 60)
    assert records[122].changes == {"tries": Change(ABSENT, 60)}
    for n in (*range(95, 127), 1, 2, 50):
        then = reader.get(saga.id, version=n)
        assert (then.version, then.status) == (n, records[n - 1].status)
        assert then.context_state == fold(records[:n]), n
        f = {"f": min(60, (n - 2) // 2)} if n >= 4 else {}
        b = {"b": 1} if n >= 124 else {}
        a = {"a": 1} if n >= 2 else {}
        assert then.attempts == {**a, **f, **b}, n


@pytest.mark.parametrize("beyond", [0, -1, 9, 100, True])
def test_a_version_outside_the_stream_is_refused_naming_the_last(
    app: SagaApplication, beyond: int
) -> None:
    saga = app.run(TRIP, dict(TRIP_START))
    assert last_version(app, saga.id) == 8
    with pytest.raises(VersionNotFound) as caught:
        app.get(saga.id, version=beyond)
    error = caught.value
    assert (error.saga_id, error.last) == (saga.id, 8)
    assert "1..8" in str(error)
    assert isinstance(error, KeyError)
    assert isinstance(error, SagaError)


def test_an_unknown_saga_is_not_found(app: SagaApplication) -> None:
    app.run(TRIP, dict(TRIP_START))
    unknown = uuid4()
    for read in (
        lambda: app.history(unknown),
        lambda: app.history(unknown, strict=False),
        lambda: app.get(unknown, version=1),
        lambda: app.get(unknown, version=0),
        lambda: app.history("not-a-uuid"),
    ):
        with pytest.raises(SagaNotFound):
            read()


# -- unreadable events -----------------------------------------------------------------

UNREADABLE = {
    "unknown-topic": ("nowhere:Ghost", b"{}"),
    "corrupt-state": (Saga.StepStarted.TOPIC, b"not json"),
}


@pytest.mark.parametrize("kind", UNREADABLE)
def test_an_unreadable_event_is_named_or_marked_with_the_rest_intact(
    app: SagaApplication, reader: SagaApplication, kind: str
) -> None:
    saga = app.run(TRIP, dict(TRIP_START))
    intact = app.history(saga.id)
    topic, state = UNREADABLE[kind]
    forge(app, saga.id, len(intact) + 1, topic, state)

    for source in (app, reader):
        with pytest.raises(UnreadableEvent) as caught:
            source.history(saga.id)
        error = caught.value
        assert (error.saga_id, error.version, error.topic) == (saga.id, 9, topic)
        assert "version 9" in str(error)
        assert isinstance(error, ValueError)

        records = source.history(saga.id, strict=False)
        assert records[:-1] == intact
        bad = records[-1]
        assert (bad.version, bad.event, bad.readable) == (9, topic, False)
        assert bad.error is not None
        assert bad.error.type
        assert bad.error.message
        assert isinstance(bad.position, int)
        assert bad.position > intact[-1].position
        assert json.loads(json.dumps(bad.to_dict(), default=str))["readable"] is False
    # Time travel to before the unreadable event still works.
    assert app.get(saga.id, version=8).status == "completed"


def test_an_unreadable_event_mid_stream_leaves_the_events_after_it_readable(
    app: SagaApplication,
) -> None:
    saga = app.run(TRIP, dict(TRIP_START))
    forged = uuid4()
    stored = app.recorder.select_events(saga.id)
    copies = [StoredEvent(forged, s.originator_version, s.topic, s.state) for s in stored]
    copies[3] = StoredEvent(forged, 4, "nowhere:Ghost", b"{}")  # b's StepStarted
    app.recorder.insert_events(copies)

    with pytest.raises(UnreadableEvent) as caught:
        app.history(forged)
    assert caught.value.version == 4
    records = app.history(forged, strict=False)
    assert [r.readable for r in records] == [True] * 3 + [False] + [True] * 4
    assert [r.event for r in records] == [
        *[e for e, _, _ in TRIP_EVENTS[:3]],
        "nowhere:Ghost",
        *[e for e, _, _ in TRIP_EVENTS[4:]],
    ]
    assert records[4].changes == app.history(saga.id)[4].changes
    assert app.get(forged, version=3).completed == ["a"]
    with pytest.raises(UnreadableEvent) as later:
        app.get(forged, version=5)
    assert later.value.version == 4


# -- queries ---------------------------------------------------------------------------


@pytest.fixture
def seven(app: SagaApplication) -> list[UUID]:
    """Seven sagas, in the order they started: trips and hotels, some compensated."""
    ids = []
    for i in range(7):
        name = "hotel" if i % 3 == 2 else "trip"
        steps = [Step("a", sets(a=i), noop)]
        if i in (1, 4):
            steps.append(Step("b", fails(Declined(f"no {i}"))))
        definition = SagaDefinition(name, steps)
        ids.append(app.run(definition, {"i": i}, key=f"k{i}" if i != 6 else None).id)
    return ids


def test_statuses_are_the_projection_of_each_saga(
    app: SagaApplication, reader: SagaApplication, seven: list[UUID]
) -> None:
    rows = app.statuses()
    assert [row.saga_id for row in rows] == seven
    for row in rows:
        saga = app.get(row.saga_id)
        records = app.history(row.saga_id)
        assert (row.name, row.definition_version, row.key) == (saga.name, 1, saga.key)
        assert (row.status, row.version) == (saga.status, saga.version)
        assert row.started_at == records[0].timestamp
        assert row.updated_at == records[-1].timestamp
    assert [row.status for row in rows] == [
        "completed",
        "compensated",
        "completed",
        "completed",
        "compensated",
        "completed",
        "completed",
    ]
    assert reader.statuses() == rows
    assert app.stats() == {
        ("trip", "completed"): 3,
        ("trip", "compensated"): 2,
        ("hotel", "completed"): 2,
    }


def test_statuses_filter_by_status_name_and_key(app: SagaApplication, seven: list[UUID]) -> None:
    def ids(**filters: Any) -> list[UUID]:
        return [row.saga_id for row in app.statuses(**filters)]

    assert ids(status="compensated") == [seven[1], seven[4]]
    assert ids(status=["completed", "compensated"]) == seven
    assert ids(status=("running", "stuck")) == []
    assert ids(name="hotel") == [seven[2], seven[5]]
    assert ids(name="trip", status="completed") == [seven[0], seven[3], seven[6]]
    assert ids(name="nothing") == []
    assert ids(key="k3") == [seven[3]] == [SagaApplication.saga_id("trip", "k3")]
    assert ids(key="k3", name="hotel") == []
    assert ids(key="k6") == []  # the seventh saga has no key


def test_statuses_filter_by_start_time(app: SagaApplication, seven: list[UUID]) -> None:
    rows = app.statuses()
    times = [row.started_at for row in rows]
    assert times == sorted(times)
    assert len(set(times)) == 7

    def ids(**filters: Any) -> list[UUID]:
        return [row.saga_id for row in app.statuses(**filters)]

    assert ids(started_after=times[2]) == seven[3:]  # strictly after
    assert ids(started_before=times[2]) == seven[:2]  # strictly before
    assert ids(started_after=times[1], started_before=times[5]) == seven[2:5]
    assert ids(started_after=times[6]) == []
    assert ids(started_after=times[0] - timedelta(days=1)) == seven
    assert ids(started_after=times[2], name="hotel") == [seven[5]]
    naive = times[2].astimezone(UTC).replace(tzinfo=None)  # taken as UTC
    assert ids(started_after=naive) == seven[3:]


def test_statuses_filter_by_start_time_given_in_another_time_zone(
    app: SagaApplication, seven: list[UUID]
) -> None:
    # An aware datetime names an instant, whatever its offset (the rows' times are UTC).
    times = [row.started_at for row in app.statuses()]
    east = timezone(timedelta(hours=5))
    west = timezone(timedelta(hours=-5))
    for zone in (east, west):
        after = [r.saga_id for r in app.statuses(started_after=times[2].astimezone(zone))]
        before = [r.saga_id for r in app.statuses(started_before=times[2].astimezone(zone))]
        assert (after, before) == (seven[3:], seven[:2]), zone


def test_statuses_are_paginated_with_after(app: SagaApplication, seven: list[UUID]) -> None:
    pages: list[list[UUID]] = []
    after: UUID | None = None
    while True:
        page = [row.saga_id for row in app.statuses(after=after, limit=3)]
        if not page:
            break
        pages.append(page)
        after = page[-1]
    assert pages == [seven[0:3], seven[3:6], seven[6:]]

    trips = [row.saga_id for row in app.statuses(name="trip", limit=2)]
    assert trips == [seven[0], seven[1]]
    more = [row.saga_id for row in app.statuses(name="trip", limit=2, after=trips[-1])]
    assert more == [seven[3], seven[4]]
    # The cursor need not match the filter: it only marks where the last page ended.
    hotels = [row.saga_id for row in app.statuses(name="hotel", after=seven[3])]
    assert hotels == [seven[5]]
    assert app.statuses(limit=1)[0].saga_id == seven[0]


def test_listing_reads_the_projection_without_replaying_any_stream(
    app: SagaApplication, seven: list[UUID], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def counting(name: str) -> Callable[..., Any]:
        def called(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            raise AssertionError(f"{name} was called while listing")

        return called

    monkeypatch.setattr(app.repository, "get", counting("repository.get"))
    monkeypatch.setattr(app.events, "get", counting("events.get"))
    monkeypatch.setattr(app.recorder, "select_events", counting("recorder.select_events"))
    monkeypatch.setattr(app.mapper, "to_domain_event", counting("mapper.to_domain_event"))
    monkeypatch.setattr(app, "get", counting("app.get"))

    assert len(app.statuses()) == 7
    assert len(app.statuses(status="compensated", name="trip", limit=1)) == 1
    assert len(app.statuses(key="k0")) == 1
    assert len(app.statuses(after=seven[2], limit=3)) == 3
    assert len(app.statuses(started_after=datetime(2000, 1, 1, tzinfo=UTC))) == 7
    assert sum(app.stats().values()) == 7
    assert calls == []


@pytest.mark.parametrize("store", DURABLE_STORES)
def test_a_fresh_application_reads_history_and_statuses_without_definitions(
    app: SagaApplication, env: Env, open_app: Callable[[Env], SagaApplication]
) -> None:
    saga = app.run(TRIP, dict(TRIP_START), key="k")
    fresh = open_app(env)
    assert fresh.definitions == {}
    assert fresh.history(saga.id) == app.history(saga.id)
    assert fresh.get(saga.id, version=5).context_state == {"x": 1, "tags": ["b"], "a": "done"}
    assert fresh.statuses(key="k") == app.statuses(key="k")
