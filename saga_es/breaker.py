"""A small circuit breaker whose state is shared, by name, across the whole process.

Why our own: pybreaker is synchronous (async only through tornado), aiobreaker is async only,
and purgatory wraps the call itself. None lets the caller read and record the state around a
call it makes itself, nor takes an injected clock; saga_es records the breaker's state in its
events, so it needs both. Times are monotonic seconds passed in by the caller (see
`saga_es.clock`), so tests never sleep.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from saga_es.errors import DefinitionError

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half-open"


@dataclass
class _State:
    """One name's shared state; its lock makes each decision atomic."""

    failures: int = 0
    opened_at: float | None = None
    trial_out: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


_registry: dict[str, _State] = {}
_registry_lock = threading.Lock()


def _state_for(name: str) -> _State:
    """The one state of that name, created on first use."""
    with _registry_lock:
        state = _registry.get(name)
        if state is None:
            state = _registry[name] = _State()
        return state


def reset_breakers() -> None:
    """Forget every breaker's state, so one test cannot trip another's."""
    with _registry_lock:
        _registry.clear()


class CircuitBreaker:
    """Guards a step's primary action; every breaker with the same name shares one state."""

    def __init__(
        self, name: str, *, failure_threshold: int = 5, reset_timeout: float = 30.0
    ) -> None:
        if not isinstance(name, str) or not name:
            raise DefinitionError(f"circuit breaker name must be a non-empty str, got {name!r}")
        if (
            isinstance(failure_threshold, bool)
            or not isinstance(failure_threshold, int)
            or failure_threshold < 1
        ):
            raise DefinitionError(
                f"circuit breaker {name!r}: failure_threshold must be an int >= 1, "
                f"got {failure_threshold!r}"
            )
        if (
            isinstance(reset_timeout, bool)
            or not isinstance(reset_timeout, int | float)
            or not reset_timeout > 0
        ):
            raise DefinitionError(
                f"circuit breaker {name!r}: reset_timeout must be a number > 0, "
                f"got {reset_timeout!r}"
            )
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_timeout = float(reset_timeout)

    @property
    def _state(self) -> _State:
        """Looked up each time, so `reset_breakers()` takes effect on existing instances."""
        return _state_for(self.name)

    def _current(self, state: _State, now: float) -> str:
        """The state as seen at `now`; the caller holds `state.lock`."""
        if state.opened_at is None:
            return CLOSED
        if state.trial_out or now - state.opened_at >= self.reset_timeout:
            return HALF_OPEN
        return OPEN

    def state(self, now: float) -> str:
        """What a caller would record: CLOSED, OPEN, or HALF_OPEN once the timeout has passed."""
        state = self._state
        with state.lock:
            return self._current(state, now)

    def allow(self, now: float) -> bool:
        """Whether to make the call; once half-open, only one trial call is let through."""
        return self.admit(now) is not None

    def admit(self, now: float) -> str | None:
        """Let a call through: CLOSED, or HALF_OPEN for the one trial; None if refused."""
        state = self._state
        with state.lock:
            current = self._current(state, now)
            if current == CLOSED:
                return CLOSED
            if current == OPEN or state.trial_out:
                return None
            state.trial_out = True
            return HALF_OPEN

    def record_success(self, now: float) -> str:
        """A success proves the service is back: close and forget earlier failures."""
        state = self._state
        with state.lock:
            state.failures = 0
            state.opened_at = None
            state.trial_out = False
            return self._current(state, now)

    def record_failure(self, now: float) -> str:
        """Count consecutive failures; open at the threshold, or again if the trial failed."""
        state = self._state
        with state.lock:
            current = self._current(state, now)
            if current == CLOSED:
                state.failures += 1
                if state.failures >= self.failure_threshold:
                    state.opened_at = now
            elif current == HALF_OPEN:
                state.opened_at = now
                state.trial_out = False
            return self._current(state, now)

    def abandon_trial(self) -> None:
        """The trial call was cut off before it ended (cancelled): it proves nothing.

        Free the slot so that the next call is the trial; otherwise the breaker
        would stay half-open and refuse every call from then on.
        """
        state = self._state
        with state.lock:
            state.trial_out = False

    def reset(self) -> None:
        """Close the breaker by hand, for tests and operators."""
        state = self._state
        with state.lock:
            state.failures = 0
            state.opened_at = None
            state.trial_out = False

    def __repr__(self) -> str:
        return (
            f"CircuitBreaker({self.name!r}, failure_threshold={self.failure_threshold}, "
            f"reset_timeout={self.reset_timeout})"
        )
