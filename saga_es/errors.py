"""Every error saga_es raises derives from `SagaError`.

    SagaError
    ├── DefinitionError (ValueError)     a SagaDefinition or Step is malformed
    ├── ContextError (TypeError)         a context cannot be stored as it is
    ├── ConfigurationError (ValueError)  a setting is missing or wrong
    ├── SagaNotFound (KeyError)          no saga has that id
    ├── DefinitionNotFound (KeyError)    no definition is registered under that name and version
    ├── VersionNotFound (KeyError)       the saga has no event at that version
    ├── StepNotReached (KeyError)        the saga never started that step (or its compensation)
    ├── ForkRefused (ValueError)         the new definition cannot carry the steps a fork keeps
    ├── ChildSagaFailed                  a nested saga did not complete: its parent step fails
    ├── UnreadableEvent (ValueError)     a stored event cannot be decoded (unknown type, corrupt)
    ├── IllegalTransition                the state machine refused a move
    ├── StepTimeout (TimeoutError)       an attempt outlived its timeout or the saga's deadline
    ├── StepCancelled                    a parallel member was cut off because its group failed
    └── CircuitOpen                      a step's breaker is open: its primary action was not called

Errors carry what they concern as attributes, so callers need not parse messages.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import eventsourcing.persistence


class SagaError(Exception):
    """Base class of every error raised by saga_es."""


class DefinitionError(SagaError, ValueError):
    """Raised when a saga definition is built, never later at run time."""


class ContextError(SagaError, TypeError):
    """Raised before anything is stored, when a context field cannot be serialised."""

    def __init__(self, field: str, value: Any, reason: str) -> None:
        super().__init__(
            f"context field {field!r} holds a value of type {type(value).__name__}, which "
            f"cannot be stored: {reason}. Use JSON-friendly values or register a transcoding."
        )
        self.field = field
        self.value = value


class ConfigurationError(SagaError, ValueError):
    """Raised at construction when a setting is missing, malformed or unusable.

    `unreachable` is True when the store could not be reached (refused, timed out, a
    file that cannot be opened): trying again later may succeed, as a worker does.
    Otherwise the setting itself is wrong, and no retry can mend it.
    """

    def __init__(self, setting: str, message: str, *, unreachable: bool = False) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
        self.unreachable = unreachable


class SagaNotFound(SagaError, KeyError):
    """Raised when no saga is stored under the given id."""

    def __init__(self, saga_id: UUID) -> None:
        super().__init__(f"no saga with id {saga_id}")
        self.saga_id = saga_id

    def __str__(self) -> str:
        return str(self.args[0])


class DefinitionNotFound(SagaError, KeyError):
    """Raised when a stored saga names a definition this application does not know."""

    def __init__(self, name: str, version: int | None = None) -> None:
        which = f"{name!r}" if version is None else f"{name!r} version {version}"
        super().__init__(
            f"no saga definition {which} is registered; "
            "pass it in definitions=[...] or call register()"
        )
        self.name, self.version = name, version

    def __str__(self) -> str:
        return str(self.args[0])


class VersionNotFound(SagaError, KeyError):
    """Raised when asking for a version beyond the end of a saga's stream."""

    def __init__(self, saga_id: UUID, version: int, last: int) -> None:
        super().__init__(f"saga {saga_id} has versions 1..{last}; there is no version {version}")
        self.saga_id, self.version, self.last = saga_id, version, last

    def __str__(self) -> str:
        return str(self.args[0])


class StepNotReached(SagaError, KeyError):
    """Raised when asking to re-run a step the saga never started (or never compensated)."""

    def __init__(self, saga_id: UUID, step: str, what: str = "step") -> None:
        super().__init__(f"saga {saga_id} never started {what} {step!r}")
        self.saga_id, self.step = saga_id, step

    def __str__(self) -> str:
        return str(self.args[0])


class ForkRefused(SagaError, ValueError):
    """Raised, before anything is stored, when a fork's definition lacks a carried-over step."""

    def __init__(self, saga_id: UUID, divergences: list[Any]) -> None:
        lines = "; ".join(str(d) for d in divergences)
        super().__init__(f"saga {saga_id} cannot be forked under this definition: {lines}")
        self.saga_id, self.divergences = saga_id, divergences


class ChildSagaFailed(SagaError):
    """What a `Step.saga` records when its child saga ended without completing."""

    def __init__(self, child_id: UUID, status: str, error: Any = None) -> None:
        why = f": {error['type']}: {error['message']}" if isinstance(error, dict) else ""
        super().__init__(f"child saga {child_id} ended {status}{why}")
        self.child_id, self.status = child_id, status


class UnreadableEvent(SagaError, ValueError):
    """Raised when a stored event cannot be turned back into a saga event."""

    def __init__(self, saga_id: UUID, version: int, topic: str, reason: str) -> None:
        super().__init__(f"saga {saga_id} version {version} ({topic}) cannot be read: {reason}")
        self.saga_id, self.version, self.topic, self.reason = saga_id, version, topic, reason


class IllegalTransition(SagaError):
    """Raised before anything is appended, when the machine refuses a trigger."""

    def __init__(self, saga_id: UUID, state: str, trigger: str, reason: str = "") -> None:
        message = f"saga {saga_id} is {state}; cannot {trigger}"
        super().__init__(f"{message}: {reason}" if reason else message)
        self.saga_id = saga_id
        self.state = state
        self.trigger = trigger
        self.reason = reason


class StepTimeout(SagaError, TimeoutError):
    """What a step records when an attempt is cut: its outcome is unknown."""

    def __init__(self, step: str, attempt: int, seconds: float, *, deadline: bool = False) -> None:
        limit = "the saga's deadline" if deadline else f"its {seconds:g}s timeout"
        super().__init__(f"step {step!r} attempt {attempt} was cut by {limit}")
        self.step, self.attempt, self.seconds, self.deadline = step, attempt, seconds, deadline


class StepCancelled(SagaError):
    """What a step records when its running attempt was cut off, outcome unknown.

    A parallel member cut by a sibling's failure, or a `cancellable` step's async action
    cancelled because the saga was.
    """

    def __init__(self, step: str, attempt: int, cause: str) -> None:
        super().__init__(f"step {step!r} attempt {attempt} was cancelled because {cause}")
        self.step, self.attempt, self.cause = step, attempt, cause


class CircuitOpen(SagaError):
    """What a step records when its breaker refused to call the primary action."""

    def __init__(self, breaker: str) -> None:
        super().__init__(f"circuit breaker {breaker!r} is open: the primary action was not called")
        self.breaker = breaker


_PEP_249 = frozenset(
    {
        "InterfaceError",
        "DataError",
        "OperationalError",
        "IntegrityError",
        "InternalError",
        "ProgrammingError",
        "NotSupportedError",
        "DatabaseError",
    }
)


def persistence_error(error: Exception) -> eventsourcing.persistence.PersistenceError:
    """Eventsourcing's error for a DB-API driver's (psycopg, sqlite3), as its recorders raise.

    Both drivers name their classes after PEP 249, so the most specific one decides.
    """
    for cls in type(error).__mro__:
        if cls.__name__ in _PEP_249:
            translated: type[eventsourcing.persistence.PersistenceError]
            translated = getattr(eventsourcing.persistence, cls.__name__)
            return translated(str(error))
    return eventsourcing.persistence.PersistenceError(str(error))
