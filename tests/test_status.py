"""The status projection read back: every reader agrees with the saga's own stream.

Stores keep the rows their own way (POPO: rows the application writes; SQLite:
triggers and a live view; PostgreSQL: rows written when a status changes, read
live while in flight), so each test runs on all three, through a second
application where the store allows one.
"""

from __future__ import annotations

from uuid import UUID, uuid4

from saga_es import Saga, SagaApplication
from saga_es.status import IN_FLIGHT_STATES, SagaStatus


def started(key: str = "k", steps: tuple[str, ...] = ("a", "b", "c")) -> Saga:
    """A 'trip' saga started, not saved: the tests drive it event by event."""
    return Saga.start(
        id=uuid4(),
        name="trip",
        definition_version=1,
        steps=list(steps),
        compensable=list(steps),
        key=key,
        context_type="builtins:dict",
        context={},
    )


def reads_as_its_events(
    app: SagaApplication, saga_id: UUID, reader: SagaApplication | None = None
) -> SagaStatus:
    """Every reader returns the row `SagaStatus.of` computes from the saga's stream."""
    reader = reader or app
    expected = SagaStatus.of(app.get(saga_id))
    assert [r for r in reader.sagas() if r.saga_id == saga_id] == [expected]
    assert [r for r in reader.sagas(status=expected.status) if r.saga_id == saga_id] == [expected]
    assert [r for r in reader.sagas(key=expected.key, name="trip") if r.saga_id == saga_id] == [
        expected
    ]
    in_flight = reader.sagas(status=IN_FLIGHT_STATES)
    assert [r for r in in_flight if r.saga_id == saga_id] == (
        [expected] if expected.status in IN_FLIGHT_STATES else []
    )
    assert reader.stats()[("trip", expected.status)] >= 1
    assert reader.stats(status=expected.status)[("trip", expected.status)] >= 1
    return expected


def test_readers_see_the_latest_step_and_version_of_a_saga_in_flight(
    app: SagaApplication, reader: SagaApplication
) -> None:
    saga = started()
    saga.start_step("a", 1)
    app.save(saga)
    assert reads_as_its_events(app, saga.id, reader).step == "a"

    saga.complete_step("a", 1, changes={"x": 1}, removed=[])
    saga.start_step("b", 1)
    app.save(saga)
    row = reads_as_its_events(app, saga.id, reader)
    assert (row.status, row.step, row.version) == ("running", "b", 4)

    saga.fail_step("b", 1, error_type="E", error_message="again", will_retry=True)
    app.save(saga)
    assert reads_as_its_events(app, saga.id, reader).version == 5
    saga.start_step("b", 2)
    app.save(saga)
    assert reads_as_its_events(app, saga.id, reader).version == 6

    other = started(key="other")
    app.save(other)
    first = reader.sagas(status=IN_FLIGHT_STATES, limit=1)
    second = reader.sagas(status=IN_FLIGHT_STATES, after=saga.id)
    assert [r.saga_id for r in first + second] == [saga.id, other.id]
    assert second == [SagaStatus.of(app.get(other.id))]

    saga.complete_step("b", 2, changes={}, removed=[])
    saga.start_step("c", 1)
    saga.complete_step("c", 1, changes={}, removed=[])
    saga.complete()
    app.save(saga)
    row = reads_as_its_events(app, saga.id, reader)
    assert (row.status, row.step, row.version) == ("completed", "c", 10)


def test_each_change_of_status_is_read_at_once(
    app: SagaApplication, reader: SagaApplication
) -> None:
    saga = started()
    app.save(saga)
    assert reads_as_its_events(app, saga.id, reader).status == "pending"
    saga.start_step("a", 1)
    saga.complete_step("a", 1, changes={}, removed=[])
    app.save(saga)
    saga.start_step("b", 1)
    app.save(saga)
    saga.fail_step("b", 1, error_type="E", error_message="no", will_retry=False)
    app.save(saga)
    assert reads_as_its_events(app, saga.id, reader).status == "compensating"
    saga.start_compensation("a", 1)
    app.save(saga)
    assert reads_as_its_events(app, saga.id, reader).step == "a"
    saga.fail_compensation("a", 1, error_type="E", error_message="no", will_retry=False)
    app.save(saga)
    saga.halt("a", error_type="E", error_message="no")
    app.save(saga)
    assert reads_as_its_events(app, saga.id, reader).status == "stuck"
    saga.resolve("a", action="retry", by="ops", reason="fixed")
    app.save(saga)
    assert reads_as_its_events(app, saga.id, reader).status == "compensating"
    saga.start_compensation("a", 2)
    saga.complete_compensation("a", 2, changes={}, removed=[])
    app.save(saga)
    saga.compensate()  # saved alone: the step comes from the stored events
    app.save(saga)
    row = reads_as_its_events(app, saga.id, reader)
    assert (row.status, row.step) == ("compensated", "a")

    cancelled = started(key="cancelled")
    app.save(cancelled)
    cancelled.request_cancel(by="ops", reason="not wanted")
    app.save(cancelled)
    assert reads_as_its_events(app, cancelled.id, reader).status == "pending"
    cancelled.cancel()
    app.save(cancelled)
    assert reads_as_its_events(app, cancelled.id, reader).status == "cancelled"
    assert reader.stats() == {("trip", "compensated"): 1, ("trip", "cancelled"): 1}


def test_an_event_naming_no_step_leaves_the_step_of_a_saga_in_flight(
    app: SagaApplication, reader: SagaApplication
) -> None:
    saga = started()
    saga.start_step("a", 1)
    app.save(saga)
    saga.request_cancel(by="ops", reason="not wanted")  # while 'a' runs
    app.save(saga)
    row = reads_as_its_events(app, saga.id, reader)
    assert (row.status, row.step, row.version) == ("running", "a", 3)
