"""A FakeClock moves only when told to, so time-dependent code is tested without waiting."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime, timedelta, timezone

import pytest

from saga_es.clock import SYSTEM_CLOCK, Clock, FakeClock, SystemClock

START = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_a_fake_clock_stands_still_until_advanced() -> None:
    clock = FakeClock(START)
    assert clock.now() == START
    assert clock.monotonic() == 0.0
    assert clock.now() == START
    clock.advance(2.5)
    assert clock.now() == START + timedelta(seconds=2.5)
    assert clock.monotonic() == 2.5
    assert clock.sleeps == []


def test_sleeping_records_the_delay_and_moves_time_on() -> None:
    clock = FakeClock(START)
    clock.sleep(1.0)
    clock.sleep(0.25)
    clock.sleep(0)
    assert clock.sleeps == [1.0, 0.25, 0]
    assert clock.monotonic() == 1.25
    assert clock.now() == START + timedelta(seconds=1.25)


def test_async_sleep_moves_time_and_lets_other_tasks_run() -> None:
    clock = FakeClock(START)
    ran: list[str] = []

    async def other() -> None:
        ran.append("other")

    async def main() -> None:
        task = asyncio.create_task(other())
        await clock.asleep(3.0)
        assert ran == ["other"]
        await task

    asyncio.run(main())
    assert clock.sleeps == [3.0]
    assert clock.now() == START + timedelta(seconds=3)


@pytest.mark.parametrize("call", ["sleep", "advance"])
def test_time_cannot_run_backwards(call: str) -> None:
    clock = FakeClock(START)
    with pytest.raises(ValueError, match=r"seconds must be >= 0, got -1"):
        getattr(clock, call)(-1)
    assert clock.monotonic() == 0.0
    assert clock.sleeps == []


def test_negative_async_sleep_is_refused() -> None:
    clock = FakeClock(START)
    with pytest.raises(ValueError, match="seconds must be >= 0"):
        asyncio.run(clock.asleep(-0.5))


def test_a_naive_start_is_taken_as_utc() -> None:
    clock = FakeClock(datetime(2024, 1, 2, 3, 4, 5))
    assert clock.now() == START
    assert clock.now().tzinfo is UTC


def test_an_aware_start_in_another_zone_is_kept_as_the_same_instant() -> None:
    plus_two = START.astimezone(timezone(timedelta(hours=2)))
    assert FakeClock(plus_two).now() == START
    assert FakeClock(plus_two).now().utcoffset() == timedelta(0)


def test_the_default_start_is_the_current_utc_time() -> None:
    before = datetime.now(UTC)
    now = FakeClock().now()
    assert before <= now <= datetime.now(UTC)
    assert now.utcoffset() == timedelta(0)


def test_a_fake_clock_is_safe_to_share_between_threads() -> None:
    clock = FakeClock(START)

    def work() -> None:
        for _ in range(1000):
            clock.sleep(1)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(clock.sleeps) == 8000
    assert clock.monotonic() == 8000.0


def test_the_system_clock_gives_aware_utc_time_and_real_waits() -> None:
    clock: Clock = SYSTEM_CLOCK
    assert isinstance(SYSTEM_CLOCK, SystemClock)
    before = datetime.now(UTC)
    now = clock.now()
    assert now.tzinfo is UTC
    assert before <= now <= datetime.now(UTC)
    first = clock.monotonic()
    clock.sleep(0)
    asyncio.run(clock.asleep(0))
    assert clock.monotonic() >= first


def test_both_clocks_satisfy_the_protocol() -> None:
    clocks: list[Clock] = [SystemClock(), FakeClock(START)]
    assert all(isinstance(clock.monotonic(), float) for clock in clocks)
    assert "FakeClock" in repr(clocks[1])
