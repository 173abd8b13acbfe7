"""Sagas started by domain events: `SagaProcess` in an eventsourcing `System`.

An order domain (`Order`, placed and cancelled, in the user's own `Orders` application)
and `PaymentSagas`, a `SagaProcess` whose policy starts a payment saga for each
`Order.Placed`. Both live in one store: one SQLite file, one PostgreSQL database (or
memory). The runners are eventsourcing's own, single- and multi-threaded.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar
from uuid import UUID

import pytest
from conftest import Env
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import IntegrityError, Notification, OperationalError, Tracking
from eventsourcing.system import (
    MultiThreadedRunner,
    NotificationLogReader,
    ProcessApplication,
    Runner,
    SingleThreadedRunner,
    System,
)

import saga_es
from saga_es import (
    FakeClock,
    SagaDefinition,
    SagaNotFound,
    SagaProcess,
    StartSaga,
    Step,
    StepFailed,
)

# -- the user's order domain ------------------------------------------------------------------


class Order(Aggregate):
    @event("Placed")
    def __init__(self, customer: str, amount: int, card: str = "ok") -> None:
        self.customer = customer
        self.amount = amount
        self.card = card
        self.cancelled = False

    @event("Cancelled")
    def cancel(self) -> None:
        self.cancelled = True


class Orders(Application[UUID]):
    def place(self, customer: str, amount: int, card: str = "ok") -> UUID:
        order = Order(customer, amount, card)
        self.save(order)
        return order.id

    def cancel(self, order_id: UUID) -> None:
        order: Order = self.repository.get(order_id)
        order.cancel()
        self.save(order)


# -- the payment saga and the process that starts it ---------------------------------------

EFFECTS: list[str] = []
"""What the steps did, in order (this process only)."""


def reserve(payment: dict[str, Any], key: str) -> None:
    EFFECTS.append(f"reserve {payment['customer']}")


def release(payment: dict[str, Any], key: str) -> None:
    EFFECTS.append(f"release {payment['customer']}")


def charge(payment: dict[str, Any], key: str) -> None:
    if payment["card"] == "declined":
        raise RuntimeError("card declined")
    EFFECTS.append(f"charge {payment['customer']} {payment['amount']}")


payment = SagaDefinition("payment", [Step("reserve", reserve, release), Step("charge", charge)])


def payment_context(placed: Any) -> dict[str, Any]:
    if placed.amount <= 0:
        raise ValueError(f"amount must be positive, got {placed.amount}")
    return {
        "order_id": str(placed.originator_id),
        "customer": placed.customer,
        "amount": placed.amount,
        "card": placed.card,
    }


class PaymentSagas(SagaProcess):
    """Records pending sagas for `work()`, as a system whose workers run them would."""

    starts = {Order.Placed: StartSaga(payment, context=payment_context)}  # noqa: RUF012
    run_sagas = False


class OnePerCustomer(SagaProcess):
    """One payment saga per customer, whatever they order."""

    starts = {  # noqa: RUF012
        Aggregate.Created: StartSaga(  # a base class matches its subclasses' events
            payment, context=payment_context, key=lambda placed: placed.customer
        )
    }
    run_sagas = False


class FailuresPerStep:
    """A dashboard following the sagas' notification log: failures counted per step."""

    def __init__(self, sagas: SagaProcess) -> None:
        self.sagas = sagas
        self.reader = NotificationLogReader(sagas.notification_log)
        self.position = 0
        self.counts: Counter[str] = Counter()

    def catch_up(self) -> Counter[str]:
        pages = self.reader.select(
            start=self.position, topics=[StepFailed.TOPIC], inclusive_of_start=False
        )
        for page in pages:
            for notification in page:
                failed = self.sagas.mapper.to_domain_event(notification)
                self.counts[failed.step] += 1  # type: ignore[attr-defined]
                self.position = notification.id
        return self.counts


# -- fixtures -----------------------------------------------------------------------------------

RUNNERS = [SingleThreadedRunner, MultiThreadedRunner]


@pytest.fixture(autouse=True)
def _no_effects() -> Iterator[None]:
    EFFECTS.clear()
    yield
    EFFECTS.clear()


@pytest.fixture
def systems(env: Env) -> Iterator[Callable[..., Runner[Any]]]:
    """`systems(runner_class, pipes=...)`: a started runner on `env`, stopped at teardown."""
    runners: list[Runner[Any]] = []

    def start(
        runner_class: type[Runner[Any]] = SingleThreadedRunner,
        pipes: list[list[type[Application[Any]]]] | None = None,
        settings: Env | None = None,
    ) -> Runner[Any]:
        system = System(pipes=pipes or [[Orders, PaymentSagas]])
        runner = runner_class(system, env={**env, **(settings or {})})
        runner.start()
        runners.append(runner)
        return runner

    yield start
    for runner in reversed(runners):
        if runner.is_started and getattr(runner, "apps", None):
            runner.stop()


@pytest.fixture
def standalone(env: Env) -> Iterator[Callable[..., Any]]:
    """`standalone(cls)`: an application on `env` outside any system, closed at teardown."""
    apps: list[Application[Any]] = []

    def make(cls: type[Application[Any]], **options: Any) -> Any:
        app = cls(env=env, **options)  # type: ignore[call-arg]
        apps.append(app)
        return app

    yield make
    for app in reversed(apps):
        app.close()


def processed(runner: Runner[Any]) -> tuple[Orders, PaymentSagas]:
    """The two applications, once the sagas' process has caught up with the orders."""
    orders, payments = runner.get(Orders), runner.get(PaymentSagas)
    last = orders.recorder.max_notification_id()
    if last:
        payments.recorder.wait("Orders", last, timeout=20)
    return orders, payments


def saga_of(order_id: UUID) -> UUID:
    return PaymentSagas.saga_id("payment", f"{order_id}:1")


def orders_log(orders: Orders) -> list[Notification]:
    return list(orders.recorder.select_notifications(None, limit=1000))


# -- an order placed starts one payment saga, run after the commit -----------------------------


@pytest.mark.parametrize("runner_class", RUNNERS, ids=lambda c: c.__name__)
def test_an_order_placed_starts_one_pending_saga_that_work_runs(
    systems: Callable[..., Runner[Any]], runner_class: type[Runner[Any]]
) -> None:
    runner = systems(runner_class)
    orders = runner.get(Orders)
    ada = orders.place("ada", 30)
    bob = orders.place("bob", 50, card="declined")
    orders, payments = processed(runner)

    # The policy recorded pending sagas and ran nothing.
    assert payments.stats() == {("payment", "pending"): 2}
    assert EFFECTS == []
    saga = payments.get(saga_of(ada))
    assert (saga.status, saga.version, saga.key) == ("pending", 1, f"{ada}:1")
    assert saga.context == {"order_id": str(ada), "customer": "ada", "amount": 30, "card": "ok"}

    report = payments.work(until_idle=True)
    assert sorted(report.resumed) == sorted([saga_of(ada), saga_of(bob)])
    assert payments.get(saga_of(ada)).status == "completed"
    declined = payments.get(saga_of(bob))
    assert declined.status == "compensated"
    assert declined.compensated == ["reserve"]
    assert sorted(EFFECTS) == ["charge ada 30", "release bob", "reserve ada", "reserve bob"]
    assert payments.verify() == []


class Payments(SagaProcess):
    """Runs the sagas it starts once they are committed: the default."""

    starts = {Order.Placed: StartSaga(payment, context=payment_context)}  # noqa: RUF012


def ended(payments: SagaProcess, *saga_ids: UUID, timeout: float = 20) -> list[Any]:
    """The sagas, once each has ended (a multi-threaded runner runs them in its own thread)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sagas = [payments.get(saga_id) for saga_id in saga_ids]
        except SagaNotFound:
            sagas = []
        if sagas and all(saga.status in saga_es.TERMINAL_STATES for saga in sagas):
            return sagas
        assert time.monotonic() < deadline, f"not ended after {timeout} s: {sagas}"
        time.sleep(0.01)


@pytest.mark.parametrize("runner_class", RUNNERS, ids=lambda c: c.__name__)
def test_an_order_placed_runs_its_payment_saga_once_it_is_committed(
    systems: Callable[..., Runner[Any]], runner_class: type[Runner[Any]]
) -> None:
    runner = systems(runner_class, pipes=[[Orders, Payments]])
    orders, payments = runner.get(Orders), runner.get(Payments)
    ada = orders.place("ada", 30)
    if runner_class is SingleThreadedRunner:  # processed, and run, before `place` returns
        assert payments.get(saga_of(ada)).status == "completed"
    bob = orders.place("bob", 50, card="declined")

    paid, declined = ended(payments, saga_of(ada), saga_of(bob))
    assert (paid.status, paid.key, paid.context["customer"]) == ("completed", f"{ada}:1", "ada")
    assert (declined.status, declined.compensated) == ("compensated", ["reserve"])
    assert EFFECTS == ["reserve ada", "charge ada 30", "reserve bob", "release bob"]
    assert payments.verify() == []
    # Nothing is left for a worker, and a redelivered event runs nothing twice.
    assert payments.work(until_idle=True).resumed == []
    payments.pull_and_process("Orders", start=0)
    assert len(EFFECTS) == 4
    assert payments.stats() == {("payment", "completed"): 1, ("payment", "compensated"): 1}


class Witnessed(SagaProcess):
    """Its first step looks at what its own store holds when it runs."""

    app: ClassVar[SagaProcess | None] = None
    seen: ClassVar[list[tuple[int | None, list[str]]]] = []

    @staticmethod
    def look(context: dict[str, Any], key: str) -> None:
        app = Witnessed.app
        assert app is not None
        saga_id = app.saga_id("witnessed", context["key"])
        topics = [e.topic for e in app.recorder.select_events(saga_id)]
        Witnessed.seen.append((app.recorder.max_tracking_id("Orders"), topics))

    starts = {  # noqa: RUF012
        Order.Placed: StartSaga(
            SagaDefinition("witnessed", [Step("look", look)]),
            context=lambda placed: {"key": f"{placed.originator_id}:1"},
        )
    }


def test_the_first_action_runs_after_the_saga_and_tracking_record_are_committed(
    standalone: Callable[..., Any],
) -> None:
    Witnessed.seen.clear()
    orders: Orders = standalone(Orders)
    Witnessed.app = witnessed = standalone(Witnessed)
    orders.place("ada", 30)
    (placed,) = orders_log(orders)
    witnessed.process_event(orders.mapper.to_domain_event(placed), Tracking("Orders", placed.id))
    # The step saw the tracking record and its saga's start (and its own StepStarted) stored.
    assert Witnessed.seen == [
        (placed.id, ["saga_es:SagaStarted", "saga_es:StepStarted"]),
    ]
    assert witnessed.stats() == {("witnessed", "completed"): 1}


def test_a_saga_that_cannot_go_on_here_is_logged_and_left_in_flight_for_work(
    standalone: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    def slow(payment: dict[str, Any], key: str) -> None:
        time.sleep(0.3)

    def unsure(payment: dict[str, Any], key: str) -> bool:
        raise ConnectionError("the supplier is down")

    class Unsure(SagaProcess):
        starts = {  # noqa: RUF012
            Order.Placed: StartSaga(
                SagaDefinition("unsure", [Step("charge", slow, timeout=0.05, reconcile=unsure)]),
                context=payment_context,
            )
        }

    orders: Orders = standalone(Orders)
    process = standalone(Unsure)
    ada = orders.place("ada", 30)
    (placed,) = orders_log(orders)
    with caplog.at_level(logging.ERROR, logger="saga_es"):
        # The domain event is processed (its tracking record committed) whatever the saga does.
        process.process_event(orders.mapper.to_domain_event(placed), Tracking("Orders", placed.id))
    assert process.recorder.max_tracking_id("Orders") == placed.id
    saga = process.get(process.saga_id("unsure", f"{ada}:1"))
    assert saga.status == "running"
    assert any(
        "stopped before its end" in r.getMessage() and str(saga.id) in r.getMessage()
        for r in caplog.records
    )


@pytest.mark.parametrize("value", ["no", "n", "false", "0"])
def test_the_run_sagas_setting_leaves_started_sagas_pending_for_work(
    standalone: Callable[..., Any], env: Env, value: str
) -> None:
    orders: Orders = standalone(Orders)
    payments = Payments(env={**env, "RUN_SAGAS": value})
    try:
        ada = orders.place("ada", 30)
        (placed,) = orders_log(orders)
        payments.process_event(orders.mapper.to_domain_event(placed), Tracking("Orders", placed.id))
        assert payments.get(saga_of(ada)).status == "pending"
        assert EFFECTS == []
        payments.work(until_idle=True)
        assert payments.get(saga_of(ada)).status == "completed"
    finally:
        payments.close()


def test_an_empty_run_sagas_setting_keeps_the_class_default(
    standalone: Callable[..., Any], env: Env
) -> None:
    # As for SAGA_STEP_TIMEOUT (and eventsourcing's own flags), an empty setting is unset.
    orders: Orders = standalone(Orders)
    payments = Payments(env={**env, "RUN_SAGAS": ""})
    try:
        ada = orders.place("ada", 30)
        (placed,) = orders_log(orders)
        payments.process_event(orders.mapper.to_domain_event(placed), Tracking("Orders", placed.id))
        assert payments.get(saga_of(ada)).status == "completed"
    finally:
        payments.close()


def test_a_malformed_run_sagas_setting_names_the_setting(env: Env) -> None:
    with pytest.raises(saga_es.ConfigurationError, match=r"RUN_SAGAS.*maybe"):
        Payments(env={**env, "RUN_SAGAS": "maybe"})


@pytest.mark.parametrize("runner_class", RUNNERS, ids=lambda c: c.__name__)
def test_a_redelivered_domain_event_starts_nothing_twice(
    systems: Callable[..., Runner[Any]], runner_class: type[Runner[Any]]
) -> None:
    runner = systems(runner_class)
    order_id = runner.get(Orders).place("ada", 30)
    orders, payments = processed(runner)
    saga_log = payments.recorder.max_notification_id()

    payments.pull_and_process("Orders", start=0)  # the whole log again
    (placed,) = orders_log(orders)
    payments.process_event(orders.mapper.to_domain_event(placed), Tracking("Orders", placed.id))

    assert payments.stats() == {("payment", "pending"): 1}
    assert payments.recorder.max_notification_id() == saga_log, "nothing more was recorded"
    assert payments.get(saga_of(order_id)).version == 1
    assert payments.start_failures() == []


@pytest.mark.parametrize("runner_class", RUNNERS, ids=lambda c: c.__name__)
def test_every_record_carries_the_saga_step_and_attempt_from_the_start(
    systems: Callable[..., Runner[Any]],
    runner_class: type[Runner[Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="saga_es")
    runner = systems(runner_class)
    ada = runner.get(Orders).place("ada", 30, card="declined")
    runner.get(Orders).place("bob", 0)  # no saga: its context cannot be built
    _, payments = processed(runner)
    payments.work(until_idle=True)
    payments.pull_and_process("Orders", start=0)  # redelivered: logged, starts nothing

    records = [r for r in caplog.records if r.name == "saga_es"]
    fields = ("saga_id", "saga_name", "step", "attempt")
    assert records
    assert [r.getMessage() for r in records if not all(hasattr(r, f) for f in fields)] == []
    formatter = logging.Formatter("%(saga_id)s %(saga_name)s %(step)s %(attempt)s %(message)s")
    assert all(formatter.format(r) for r in records)

    ada_records = [r for r in records if r.saga_id == str(saga_of(ada))]
    events = [r.getMessage().partition(": ")[2].split(" ")[0] for r in ada_records]
    assert events[0] == "SagaStarted", "the pending saga the policy recorded is logged too"
    assert events.count("SagaStarted") == 1, "and only once, though redelivered"
    assert "SagaCompensated" in events
    failed = next(r for r in ada_records if "StepFailed" in r.getMessage())
    assert (failed.saga_name, failed.step, failed.attempt) == ("payment", "charge", 1)
    (no_saga,) = [r for r in records if r.levelname == "ERROR"]
    assert (no_saga.saga_id, no_saga.saga_name, no_saga.step) == (None, "payment", None)


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_a_restarted_system_goes_on_where_it_stopped(
    systems: Callable[..., Runner[Any]],
) -> None:
    first = systems()
    ada = first.get(Orders).place("ada", 30)
    processed(first)
    first.stop()

    second = systems()
    bob = second.get(Orders).place("bob", 40)
    _, payments = processed(second)
    assert payments.recorder.max_tracking_id("Orders") == 2
    assert {row.key for row in payments.sagas()} == {f"{ada}:1", f"{bob}:1"}
    payments.work(until_idle=True)
    assert payments.stats() == {("payment", "completed"): 2}
    assert sorted(EFFECTS) == ["charge ada 30", "charge bob 40", "reserve ada", "reserve bob"]


def test_the_saga_and_the_tracking_record_commit_together_or_not_at_all(
    standalone: Callable[..., Any],
) -> None:
    orders: Orders = standalone(Orders)
    payments: PaymentSagas = standalone(PaymentSagas)
    calls: list[tuple[list[str], Tracking | None]] = []
    insert_events = payments.recorder.insert_events

    def spy(stored_events: Any, **kwargs: Any) -> Any:
        calls.append(([s.topic for s in stored_events], kwargs.get("tracking")))
        return insert_events(stored_events, **kwargs)

    payments.recorder.insert_events = spy  # type: ignore[method-assign]
    orders.place("ada", 30)
    orders.place("bob", 40)
    first, second = (
        (orders.mapper.to_domain_event(n), Tracking("Orders", n.id)) for n in orders_log(orders)
    )

    payments.process_event(*first)
    assert calls == [(["saga_es:SagaStarted"], Tracking("Orders", 1))]

    # The position of the second event is taken (another instance got there first): its
    # saga is refused with the tracking record, and the event counts as processed.
    payments.recorder.insert_tracking(Tracking("Orders", 2))
    payments.process_event(*second)
    assert payments.stats() == {("payment", "pending"): 1}
    assert payments.recorder.max_tracking_id("Orders") == 2


def test_ciphered_sagas_started_by_events_keep_their_status_rows(
    systems: Callable[..., Runner[Any]],
) -> None:
    # The database cannot read ciphered states: the status rows come from the application,
    # on the tracked save too.
    from eventsourcing.cryptography import AESCipher

    cipher = {
        "CIPHER_TOPIC": "eventsourcing.cryptography:AESCipher",
        "CIPHER_KEY": AESCipher.create_key(16),
    }
    runner = systems(settings=cipher)
    ada = runner.get(Orders).place("ada", 30)
    _, payments = processed(runner)
    assert payments.mapper.cipher is not None
    assert [(row.key, row.status) for row in payments.sagas()] == [(f"{ada}:1", "pending")]
    payments.work(until_idle=True)
    assert payments.stats() == {("payment", "completed"): 1}


def test_a_saga_started_meanwhile_under_the_same_key_is_found_not_started_again(
    standalone: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    orders: Orders = standalone(Orders)
    payments: PaymentSagas = standalone(PaymentSagas)
    order_id = orders.place("ada", 30)
    (placed,) = orders_log(orders)
    # Someone submitted it by key already, and this process's first look misses it.
    payments.submit(payment, {"customer": "ada", "card": "ok", "amount": 30}, key=f"{order_id}:1")
    real_get = payments.get
    looks: list[UUID] = []

    def get_missing_once(saga_id: Any, version: int | None = None) -> Any:
        looks.append(saga_id)
        if len(looks) == 1:
            raise SagaNotFound(saga_id)
        return real_get(saga_id, version)

    monkeypatch.setattr(payments, "get", get_missing_once)
    payments.process_event(orders.mapper.to_domain_event(placed), Tracking("Orders", placed.id))

    assert looks == [saga_of(order_id)] * 2, "processed again after the conflict"
    assert payments.stats() == {("payment", "pending"): 1}
    assert payments.recorder.max_tracking_id("Orders") == placed.id


def test_a_conflict_that_is_not_a_redelivery_is_raised(
    standalone: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    orders: Orders = standalone(Orders)
    payments: PaymentSagas = standalone(PaymentSagas)
    orders.place("ada", 30)
    (placed,) = orders_log(orders)

    def conflict(*args: Any, **kwargs: Any) -> Any:
        raise IntegrityError("always")

    monkeypatch.setattr(payments.recorder, "insert_events", conflict)
    with pytest.raises(IntegrityError):
        payments.process_event(orders.mapper.to_domain_event(placed), Tracking("Orders", 1))


# -- bad input -----------------------------------------------------------------------------------


def test_an_event_type_with_no_saga_is_ignored_and_tracked(
    systems: Callable[..., Runner[Any]],
) -> None:
    runner = systems()
    orders = runner.get(Orders)
    order_id = orders.place("ada", 30)
    orders.cancel(order_id)  # Order.Cancelled starts nothing
    orders, payments = processed(runner)
    assert payments.recorder.max_tracking_id("Orders") == 2
    assert payments.stats() == {("payment", "pending"): 1}
    assert payments.start_failures() == []


def test_a_context_builder_that_raises_starts_no_saga_and_records_why(
    systems: Callable[..., Runner[Any]], caplog: pytest.LogCaptureFixture
) -> None:
    runner = systems()
    with caplog.at_level(logging.ERROR, logger="saga_es"):
        order_id = runner.get(Orders).place("cy", 0)
        runner.get(Orders).place("dee", 10)
        orders, payments = processed(runner)
        payments.pull_and_process("Orders", start=0)  # redelivered: nothing more

    assert payments.stats() == {("payment", "pending"): 1}  # dee's only
    with pytest.raises(SagaNotFound):
        payments.get(saga_of(order_id))
    (failure,) = payments.start_failures()
    assert (failure.definition, failure.definition_version) == ("payment", 1)
    assert (failure.leader, failure.position) == ("Orders", 1)
    assert failure.event_topic == "test_process:Order.Placed"
    assert (failure.event_id, failure.event_version) == (str(order_id), 1)
    assert (failure.error_type, failure.error_message) == (
        "ValueError",
        "amount must be positive, got 0",
    )
    (logged,) = [r.getMessage() for r in caplog.records]
    assert logged == (
        f"no payment saga started for Order.Placed {order_id} v1 (Orders #1): "
        "ValueError: amount must be positive, got 0"
    )
    assert payments.recorder.max_tracking_id("Orders") == 2
    assert payments.verify() == [], "saga tools skip the failure records"
    assert list(payments.stream_ids()) == [saga_of(orders_log(orders)[1].originator_id)]


def test_a_context_that_cannot_be_stored_is_a_start_failure_too(
    standalone: Callable[..., Any],
) -> None:
    class Unstorable(SagaProcess):
        starts = {Order.Placed: StartSaga(payment, context=lambda placed: {"me": object()})}  # noqa: RUF012

    orders: Orders = standalone(Orders)
    payments = standalone(Unstorable)
    orders.place("ada", 30)
    (placed,) = orders_log(orders)
    payments.process_event(orders.mapper.to_domain_event(placed), Tracking("Orders", placed.id))
    (failure,) = payments.start_failures()
    assert failure.error_type == "ContextError"
    assert payments.stats() == {}


def test_a_saga_error_raised_by_the_context_builder_is_a_start_failure(
    standalone: Callable[..., Any],
) -> None:
    # Only the store's errors leave the event unprocessed: a builder that looks up a saga
    # that is not there would otherwise fail again on every delivery, and block the runner.
    lookups: list[SagaProcess] = []

    def refund_context(placed: Any) -> dict[str, Any]:
        lookups[0].get(saga_of(placed.originator_id))  # SagaNotFound: no payment saga
        return payment_context(placed)

    class Refunds(SagaProcess):
        starts = {Order.Placed: StartSaga(payment, context=refund_context)}  # noqa: RUF012

    orders: Orders = standalone(Orders)
    refunds = standalone(Refunds)
    lookups.append(refunds)
    orders.place("ada", 30)
    (placed,) = orders_log(orders)
    refunds.process_event(orders.mapper.to_domain_event(placed), Tracking("Orders", placed.id))
    (failure,) = refunds.start_failures()
    assert failure.error_type == "SagaNotFound"
    assert refunds.recorder.max_tracking_id("Orders") == placed.id
    assert refunds.stats() == {}


def test_a_store_error_is_no_start_failure_the_event_stays_unprocessed(
    standalone: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    orders: Orders = standalone(Orders)
    payments: PaymentSagas = standalone(PaymentSagas)
    orders.place("ada", 30)
    (placed,) = orders_log(orders)
    job = (orders.mapper.to_domain_event(placed), Tracking("Orders", placed.id))

    def store_down(*args: Any, **kwargs: Any) -> Any:
        raise OperationalError("server closed the connection")

    with monkeypatch.context() as patch:
        patch.setattr(payments, "get", store_down)  # the look-up by key fails
        with pytest.raises(OperationalError):
            payments.process_event(*job)
    assert payments.recorder.max_tracking_id("Orders") is None
    assert payments.start_failures() == []

    payments.process_event(*job)  # the runner's next pull
    assert payments.stats() == {("payment", "pending"): 1}


def test_a_mapping_mistake_fails_when_the_class_is_defined() -> None:
    with pytest.raises(TypeError, match="expected a SagaDefinition"):
        StartSaga("payment", context=dict)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="context must be a function"):
        StartSaga(payment, context={"amount": 1})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not a domain event class"):

        class ByName(SagaProcess):
            starts = {"Order.Placed": StartSaga(payment, context=dict)}  # type: ignore[dict-item]  # noqa: RUF012

    with pytest.raises(TypeError, match=r"starts\[Order.Placed\] must be a StartSaga"):

        class Bare(SagaProcess):
            starts = {Order.Placed: payment}  # type: ignore[dict-item]  # noqa: RUF012


# -- mapping features ----------------------------------------------------------------------------


def test_a_key_builder_makes_one_saga_per_business_key(
    systems: Callable[..., Runner[Any]],
) -> None:
    runner = systems(pipes=[[Orders, OnePerCustomer]])
    orders = runner.get(Orders)
    orders.place("ada", 30)
    orders.place("ada", 40)
    orders.place("bob", 50)
    process = runner.get(OnePerCustomer)
    process.recorder.wait("Orders", 3, timeout=20)
    assert sorted(row.key for row in process.sagas()) == ["ada", "bob"]
    assert process.get(OnePerCustomer.saga_id("payment", "ada")).context["amount"] == 30


def test_one_event_may_start_several_sagas_and_options_reach_the_application(
    standalone: Callable[..., Any],
) -> None:
    refund = SagaDefinition("refund-window", [Step("open", reserve)])

    class Both(SagaProcess):
        starts = {  # noqa: RUF012
            Order.Placed: [
                StartSaga(payment, context=payment_context),
                StartSaga(refund, context=lambda placed: {"customer": placed.customer}),
            ]
        }

    clock = FakeClock()
    orders: Orders = standalone(Orders)
    process = standalone(Both, clock=clock, max_resumptions=7)
    assert (process.clock, process.max_resumptions) == (clock, 7)
    assert set(process.definitions) == {("payment", 1), ("refund-window", 1)}
    orders.place("ada", 30)
    (placed,) = orders_log(orders)
    process.process_event(orders.mapper.to_domain_event(placed), Tracking("Orders", placed.id))
    # Both were run once committed, one after the other, in the order they are mapped.
    assert process.stats() == {("payment", "completed"): 1, ("refund-window", "completed"): 1}
    assert EFFECTS == ["reserve ada", "charge ada 30", "reserve ada"]


def test_two_starts_of_one_saga_for_one_event_start_it_once(
    standalone: Callable[..., Any],
) -> None:
    class Twice(SagaProcess):  # both name the same saga: same definition, same (default) key
        starts = {  # noqa: RUF012
            Order.Placed: [
                StartSaga(payment, context=payment_context),
                StartSaga(payment, context=lambda placed: {**payment_context(placed), "n": 2}),
            ]
        }

    orders: Orders = standalone(Orders)
    process = standalone(Twice)
    order_id = orders.place("ada", 30)
    (placed,) = orders_log(orders)
    process.process_event(orders.mapper.to_domain_event(placed), Tracking("Orders", placed.id))
    assert process.stats() == {("payment", "completed"): 1}
    assert EFFECTS == ["reserve ada", "charge ada 30"]  # run once
    assert "n" not in process.get(saga_of(order_id)).context  # the first start is the saga
    assert process.recorder.max_tracking_id("Orders") == placed.id


class BothFail(SagaProcess):
    """Two payment sagas per order, one under the customer's name: one context for both."""

    starts = {  # noqa: RUF012
        Order.Placed: [
            StartSaga(payment, context=payment_context),
            StartSaga(payment, context=payment_context, key=lambda placed: placed.customer),
        ]
    }


@pytest.mark.parametrize("runner_class", RUNNERS, ids=lambda c: c.__name__)
def test_two_starts_of_one_definition_that_both_fail_record_one_failure(
    systems: Callable[..., Runner[Any]], runner_class: type[Runner[Any]]
) -> None:
    # Both failures would be the same StartFailure (one per definition and event): saving
    # it twice broke the event's transaction, and the leader's save (or the runner's thread).
    runner = systems(runner_class, pipes=[[Orders, BothFail]])
    orders, process = runner.get(Orders), runner.get(BothFail)
    order_id = orders.place("cy", 0)  # payment_context raises, for both starts
    orders.place("dee", 10)
    process.recorder.wait("Orders", 2, timeout=20)

    (failure,) = process.start_failures()
    assert (failure.definition, failure.event_id, failure.position) == ("payment", str(order_id), 1)
    assert failure.error_message == "amount must be positive, got 0"
    sagas = ended(
        process, saga_of(orders_log(orders)[1].originator_id), BothFail.saga_id("payment", "dee")
    )
    assert [saga.status for saga in sagas] == ["completed", "completed"]
    assert process.recorder.max_tracking_id("Orders") == 2


def test_saga_process_is_exported_and_is_an_eventsourcing_process_application() -> None:
    for name in ("SagaProcess", "StartSaga", "StartFailure"):
        assert name in saga_es.__all__
    assert issubclass(PaymentSagas, ProcessApplication)
    assert issubclass(PaymentSagas, saga_es.SagaApplication)


# -- one store, two applications -----------------------------------------------------------------


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_both_applications_share_one_store_each_with_its_own_tables(
    store: str, env: Env, systems: Callable[..., Runner[Any]]
) -> None:
    runner = systems()
    order_id = runner.get(Orders).place("ada", 30)
    runner.get(Orders).cancel(order_id)
    orders, payments = processed(runner)
    payments.work(until_idle=True)

    if store == "sqlite":
        with sqlite3.connect(env["SQLITE_DBNAME"]) as db:
            rows = db.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")
            tables = sorted(name for (name,) in rows)
        assert tables == [
            "paymentsagas_events",
            "paymentsagas_events_status",
            "paymentsagas_events_status_in_flight",
            "paymentsagas_events_status_live",
            "paymentsagas_snapshots",
            "paymentsagas_tracking",
            "stored_events",  # Orders: eventsourcing's own table name on SQLite
        ]
    else:
        with payments.recorder.datastore.transaction(commit=False) as curs:  # type: ignore[attr-defined]
            curs.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            )
            tables = sorted(row["table_name"] for row in curs.fetchall())
        assert tables == [
            "orders_events",
            "paymentsagas_events",
            "paymentsagas_events_status",
            "paymentsagas_events_status_live",
            "paymentsagas_snapshots",
            "paymentsagas_tracking",
        ]

    assert [n.topic for n in orders_log(orders)] == [
        "test_process:Order.Placed",
        "test_process:Order.Cancelled",
    ]
    saga_topics = [n.topic for n in payments.recorder.select_notifications(None, limit=100)]
    assert saga_topics[0] == "saga_es:SagaStarted"
    assert saga_topics[-1] == "saga_es:SagaCompleted"
    assert all(topic.startswith("saga_es:") for topic in saga_topics)


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_a_worker_process_over_the_same_store_runs_the_started_sagas(
    env: Env, systems: Callable[..., Runner[Any]]
) -> None:
    runner = systems()
    ada = runner.get(Orders).place("ada", 30)
    bob = runner.get(Orders).place("bob", 40, card="declined")
    _, payments = processed(runner)

    code = (
        "import json, sys, test_process\n"
        "app = test_process.PaymentSagas(env=json.loads(sys.argv[1]))\n"
        "print(len(app.work(until_idle=True).resumed))\n"
        "app.close()\n"
    )
    tests = str(Path(__file__).parent)
    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps(env)],
        env={**os.environ, "PYTHONPATH": os.pathsep.join([tests, *sys.path])},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2"]
    assert payments.get(saga_of(ada)).status == "completed"
    assert payments.get(saga_of(bob)).status == "compensated"
    assert EFFECTS == [], "the worker ran them, not this process"


# -- followers -------------------------------------------------------------------------------------


def test_saga_events_are_in_the_notification_log_in_order_and_a_projection_follows_them(
    systems: Callable[..., Runner[Any]],
) -> None:
    runner = systems()
    orders = runner.get(Orders)
    ada = orders.place("ada", 30)
    bob = orders.place("bob", 50, card="declined")
    _, payments = processed(runner)
    payments.work(until_idle=True)

    log = list(payments.recorder.select_notifications(None, limit=1000))
    assert [n.id for n in log] == sorted(n.id for n in log)
    for saga_id in (saga_of(ada), saga_of(bob)):
        stream = [n for n in log if n.originator_id == saga_id]
        assert [n.originator_version for n in stream] == list(range(1, len(stream) + 1))
        events = [type(e).__name__ for e in payments.saga_events(saga_id)]
        assert [n.topic.removeprefix("saga_es:") for n in stream] == events
    assert [type(e).__name__ for e in payments.saga_events(saga_of(bob))] == [
        "SagaStarted",
        "StepStarted",
        "StepCompleted",
        "StepStarted",
        "StepFailed",
        "CompensationStarted",
        "CompensationRan",
        "SagaCompensated",
    ]

    dashboard = FailuresPerStep(payments)
    assert dashboard.catch_up() == {"charge": 1}
    orders.place("cy", 20, card="declined")
    orders.place("dee", 20)
    processed(runner)
    payments.work(until_idle=True)
    assert dashboard.catch_up() == {"charge": 2}  # only what is new is read
    assert dashboard.position == max(
        n.id
        for n in payments.recorder.select_notifications(None, limit=1000)
        if n.topic == StepFailed.TOPIC
    )


class Dashboard(ProcessApplication[UUID]):
    """An eventsourcing follower of the sagas: failures per step, from its policy."""

    def __init__(self, env: Any = None) -> None:
        super().__init__(env)
        self.failures: Counter[str] = Counter()
        self.seen: list[str] = []

    def policy(self, domain_event: Any, processing_event: Any) -> None:
        self.seen.append(type(domain_event).__name__)
        if isinstance(domain_event, StepFailed):
            self.failures[domain_event.step] += 1


def test_an_eventsourcing_follower_downstream_of_the_sagas_sees_every_saga_event(
    store: str, tmp_path: Path, systems: Callable[..., Runner[Any]]
) -> None:
    # On SQLite, eventsourcing's own applications need a file each (one `stored_events`).
    settings = {"DASHBOARD_SQLITE_DBNAME": str(tmp_path / "dashboard.db")}
    runner = systems(pipes=[[Orders, PaymentSagas, Dashboard]], settings=settings)
    orders = runner.get(Orders)
    orders.place("ada", 30)
    orders.place("bob", 50, card="declined")
    payments = runner.get(PaymentSagas)
    payments.work(until_idle=True)  # each save prompts the runner, which feeds the dashboard

    dashboard = runner.get(Dashboard)
    assert dashboard.failures == {"charge": 1}
    assert Counter(dashboard.seen) == Counter(
        n.topic.removeprefix("saga_es:")
        for n in payments.recorder.select_notifications(None, limit=1000)
    )


def test_a_run_sagas_that_is_not_a_bool_is_refused(env: Env) -> None:
    class Vague(SagaProcess):
        starts = {Order.Placed: StartSaga(payment, context=payment_context)}  # noqa: RUF012
        run_sagas = "no"  # type: ignore[assignment]

    with pytest.raises(TypeError, match="run_sagas must be True or False, got 'no'"):
        Vague(env=env)
