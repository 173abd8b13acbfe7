"""Time, behind a small protocol, so retries, timeouts and breakers can be tested without sleeping.

Production code takes a `Clock` and defaults to `SYSTEM_CLOCK`; tests pass a `FakeClock`,
whose time moves only when something sleeps on it or calls `advance()`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    """What saga_es needs to know about time, so a test can substitute its own."""

    def now(self) -> datetime:
        """Timezone-aware UTC wall time: deadlines and retry waits read it.

        Event timestamps are eventsourcing's own (the real wall clock).
        """
        ...

    def monotonic(self) -> float:
        """Seconds that never go backwards, for measuring timeouts and breaker resets."""
        ...

    def sleep(self, seconds: float) -> None:
        """Wait in a synchronous caller, e.g. between retries."""
        ...

    async def asleep(self, seconds: float) -> None:
        """Wait without blocking the event loop."""
        ...


class SystemClock:
    """The real clock, used unless a test injects another."""

    def now(self) -> datetime:
        """Aware, so stored times never depend on the host's time zone."""
        return datetime.now(UTC)

    def monotonic(self) -> float:
        """Immune to wall-clock adjustments, unlike `now()`."""
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        """Block the calling thread."""
        time.sleep(seconds)

    async def asleep(self, seconds: float) -> None:
        """Yield to the event loop while waiting."""
        await asyncio.sleep(seconds)

    def __repr__(self) -> str:
        return "SystemClock()"


SYSTEM_CLOCK = SystemClock()


class FakeClock:
    """Time that moves only when someone sleeps or calls advance()."""

    def __init__(self, start: datetime | None = None) -> None:
        if start is None:
            start = datetime.now(UTC)
        elif start.tzinfo is None:
            start = start.replace(tzinfo=UTC)
        self._start = start.astimezone(UTC)
        self._elapsed = 0.0
        self._lock = threading.Lock()
        self.sleeps: list[float] = []
        """Every sleep requested, in order, so tests can assert on back-off schedules."""

    def now(self) -> datetime:
        """The start time plus whatever has elapsed, so wall and monotonic time agree."""
        with self._lock:
            return self._start + timedelta(seconds=self._elapsed)

    def monotonic(self) -> float:
        """Seconds elapsed since construction; only differences are meaningful."""
        with self._lock:
            return self._elapsed

    def sleep(self, seconds: float) -> None:
        """Record the request and move time on at once, so tests never wait."""
        _check_seconds(seconds)
        with self._lock:
            self.sleeps.append(seconds)
            self._elapsed += seconds

    async def asleep(self, seconds: float) -> None:
        """Like `sleep`, then give other tasks a turn, as a real await would."""
        self.sleep(seconds)
        await asyncio.sleep(0)

    def advance(self, seconds: float) -> None:
        """Let a test move time on without it counting as a sleep."""
        _check_seconds(seconds)
        with self._lock:
            self._elapsed += seconds

    def __repr__(self) -> str:
        return f"FakeClock(now={self.now().isoformat()!r}, monotonic={self.monotonic()!r})"


def _check_seconds(seconds: float) -> None:
    """Time must not run backwards; a negative delay is a caller's bug, caught here."""
    if seconds < 0:
        raise ValueError(f"seconds must be >= 0, got {seconds!r}")
