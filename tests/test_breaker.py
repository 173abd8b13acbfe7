"""A circuit breaker opens after consecutive failures, lets one trial through, and is shared."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from saga_es.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, reset_breakers
from saga_es.clock import FakeClock
from saga_es.errors import DefinitionError


@pytest.fixture(autouse=True)
def fresh_breakers() -> Iterator[None]:
    """Every test starts, and leaves, with no breaker state."""
    reset_breakers()
    yield
    reset_breakers()


def test_a_breaker_opens_after_threshold_consecutive_failures() -> None:
    breaker = CircuitBreaker("cards", failure_threshold=3, reset_timeout=10)
    assert breaker.state(0) == CLOSED
    assert breaker.allow(0)
    assert breaker.record_failure(1) == CLOSED
    assert breaker.record_failure(2) == CLOSED
    assert breaker.allow(2)
    assert breaker.record_failure(3) == OPEN
    assert breaker.state(3) == OPEN


def test_a_success_resets_the_consecutive_count() -> None:
    breaker = CircuitBreaker("cards", failure_threshold=3)
    breaker.record_failure(0)
    breaker.record_failure(1)
    assert breaker.record_success(2) == CLOSED
    assert breaker.record_failure(3) == CLOSED
    assert breaker.record_failure(4) == CLOSED
    assert breaker.record_failure(5) == OPEN


def test_an_open_breaker_refuses_calls_until_the_reset_timeout() -> None:
    breaker = CircuitBreaker("cards", failure_threshold=1, reset_timeout=10)
    breaker.record_failure(100)
    assert not breaker.allow(100)
    assert not breaker.allow(109.9)
    assert breaker.state(109.9) == OPEN
    assert breaker.state(110) == HALF_OPEN


def test_half_open_admits_exactly_one_trial() -> None:
    breaker = CircuitBreaker("cards", failure_threshold=1, reset_timeout=10)
    breaker.record_failure(0)
    assert breaker.allow(10)
    assert breaker.state(10) == HALF_OPEN
    assert not breaker.allow(10)
    assert not breaker.allow(50)


def test_a_successful_trial_closes_the_breaker() -> None:
    breaker = CircuitBreaker("cards", failure_threshold=2, reset_timeout=10)
    breaker.record_failure(0)
    breaker.record_failure(0)
    assert breaker.allow(10)
    assert breaker.record_success(11) == CLOSED
    assert breaker.allow(11)
    assert breaker.allow(11)
    assert breaker.record_failure(12) == CLOSED  # the count started again


def test_a_failed_trial_reopens_with_a_new_opened_at() -> None:
    breaker = CircuitBreaker("cards", failure_threshold=1, reset_timeout=10)
    breaker.record_failure(0)
    assert breaker.allow(15)
    assert breaker.record_failure(16) == OPEN
    assert not breaker.allow(20)
    assert breaker.state(25.9) == OPEN
    assert breaker.state(26) == HALF_OPEN
    assert breaker.allow(26)


def test_admit_says_whether_a_call_is_the_half_open_trial() -> None:
    breaker = CircuitBreaker("cards", failure_threshold=1, reset_timeout=10)
    assert breaker.admit(0) == CLOSED
    breaker.record_failure(0)
    assert breaker.admit(5) is None
    assert breaker.admit(10) == HALF_OPEN
    assert breaker.admit(10) is None  # the trial is out


def test_an_abandoned_trial_lets_the_next_call_be_the_trial() -> None:
    breaker = CircuitBreaker("cards", failure_threshold=1, reset_timeout=10)
    breaker.record_failure(0)
    assert breaker.admit(10) == HALF_OPEN
    breaker.abandon_trial()  # the trial was cancelled: it proved nothing
    assert breaker.state(11) == HALF_OPEN
    assert breaker.admit(11) == HALF_OPEN
    assert breaker.record_success(12) == CLOSED


def test_a_fake_clock_drives_the_breaker() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("cards", failure_threshold=1, reset_timeout=30)
    breaker.record_failure(clock.monotonic())
    clock.sleep(29)
    assert not breaker.allow(clock.monotonic())
    clock.advance(1)
    assert breaker.allow(clock.monotonic())


def test_breakers_with_the_same_name_share_state() -> None:
    first = CircuitBreaker("cards", failure_threshold=2, reset_timeout=10)
    second = CircuitBreaker("cards", failure_threshold=2, reset_timeout=10)
    first.record_failure(0)
    assert second.record_failure(1) == OPEN
    assert first.state(1) == OPEN
    assert second.allow(11)
    assert not first.allow(11)  # the one trial is already out
    first.record_success(12)
    assert second.state(12) == CLOSED


def test_thresholds_come_from_the_instance_asking() -> None:
    strict = CircuitBreaker("cards", failure_threshold=1, reset_timeout=5)
    lenient = CircuitBreaker("cards", failure_threshold=3, reset_timeout=50)
    assert lenient.record_failure(0) == CLOSED
    assert lenient.record_failure(0) == CLOSED
    assert strict.state(0) == CLOSED  # a threshold applies only when its instance records
    assert lenient.record_failure(0) == OPEN
    assert strict.state(5) == HALF_OPEN
    assert lenient.state(5) == OPEN


def test_breakers_with_different_names_are_independent() -> None:
    cards = CircuitBreaker("cards", failure_threshold=1)
    stock = CircuitBreaker("stock", failure_threshold=1)
    cards.record_failure(0)
    assert cards.state(0) == OPEN
    assert stock.state(0) == CLOSED
    assert stock.allow(0)


def test_reset_closes_the_breaker_for_every_instance() -> None:
    breaker = CircuitBreaker("cards", failure_threshold=1)
    breaker.record_failure(0)
    CircuitBreaker("cards").reset()
    assert breaker.state(0) == CLOSED
    assert breaker.record_failure(0) == OPEN


def test_reset_breakers_forgets_every_state() -> None:
    breaker = CircuitBreaker("cards", failure_threshold=1)
    breaker.record_failure(0)
    reset_breakers()
    assert breaker.state(0) == CLOSED


def fail_from_threads(threshold: int, threads_count: int, per_thread: int) -> None:
    """Record failures on "cards" from many threads at once, each through its own instance."""
    barrier = threading.Barrier(threads_count)

    def work() -> None:
        mine = CircuitBreaker("cards", failure_threshold=threshold)
        barrier.wait()
        for _ in range(per_thread):
            mine.record_failure(0)

    threads = [threading.Thread(target=work) for _ in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_concurrent_failures_are_all_counted() -> None:
    total = 8 * 500
    fail_from_threads(total + 1, threads_count=8, per_thread=500)
    breaker = CircuitBreaker("cards", failure_threshold=total + 1)
    assert breaker.state(0) == CLOSED  # no failure was counted twice
    assert breaker.record_failure(0) == OPEN  # and none was lost


def test_concurrent_failures_open_the_breaker_once() -> None:
    fail_from_threads(100, threads_count=8, per_thread=500)
    breaker = CircuitBreaker("cards", failure_threshold=100)
    assert breaker.state(0) == OPEN
    assert breaker.state(30) == HALF_OPEN  # opened_at is the time of the 100th failure, 0


def test_concurrent_trials_let_exactly_one_through() -> None:
    breaker = CircuitBreaker("cards", failure_threshold=1, reset_timeout=1)
    breaker.record_failure(0)
    threads_count = 16
    barrier = threading.Barrier(threads_count)
    admitted: list[bool] = []
    lock = threading.Lock()

    def work() -> None:
        barrier.wait()
        allowed = CircuitBreaker("cards", failure_threshold=1, reset_timeout=1).allow(5)
        with lock:
            admitted.append(allowed)

    threads = [threading.Thread(target=work) for _ in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert admitted.count(True) == 1
    assert len(admitted) == threads_count


def test_repr_names_the_breaker_and_its_settings() -> None:
    text = repr(CircuitBreaker("cards", failure_threshold=2, reset_timeout=7))
    assert text == "CircuitBreaker('cards', failure_threshold=2, reset_timeout=7.0)"


@pytest.mark.parametrize("name", ["", None, 3])
def test_a_breaker_needs_a_name(name: Any) -> None:
    with pytest.raises(DefinitionError, match="circuit breaker name must be a non-empty str"):
        CircuitBreaker(name)


@pytest.mark.parametrize(
    ("threshold", "shown"), [(0, "0"), (-1, "-1"), (True, "True"), (1.5, "1.5"), ("3", "'3'")]
)
def test_failure_threshold_must_be_a_positive_int(threshold: Any, shown: str) -> None:
    message = f"circuit breaker 'cards': failure_threshold must be an int >= 1, got {shown}"
    with pytest.raises(DefinitionError) as caught:
        CircuitBreaker("cards", failure_threshold=threshold)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("timeout", "shown"), [(0, "0"), (-1, "-1"), (True, "True"), (-0.5, "-0.5"), ("1", "'1'")]
)
def test_reset_timeout_must_be_a_positive_number(timeout: Any, shown: str) -> None:
    message = f"circuit breaker 'cards': reset_timeout must be a number > 0, got {shown}"
    with pytest.raises(DefinitionError) as caught:
        CircuitBreaker("cards", reset_timeout=timeout)
    assert str(caught.value) == message


def test_bad_configuration_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitBreaker("cards", failure_threshold=0)
