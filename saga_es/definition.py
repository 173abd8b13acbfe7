"""What a saga is made of: named steps, each an action and an optional compensation.

Definitions are checked when they are built, so a malformed one fails at import
time, never half-way through a saga. Whether a callable is async is decided
here, once, not on every call.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from saga_es.errors import DefinitionError

Action = Callable[[Any, str], Any]
"""`action(context, idempotency_key)`: plain or async; it may change the context."""


def _is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 (an async __call__ counts)
    )


RETRY = "retry"
"""Recovery re-runs an interrupted call, with the same idempotency key (the default)."""
FAIL = "fail"
"""Recovery treats an interrupted call as failed, without effect."""
COMPENSATE = "compensate"
"""Recovery treats an interrupted action as failed and compensates its effect too."""
RECONCILE = "reconcile"
"""Recovery asks the step's reconcile function whether the interrupted call took effect."""

_ACTION_RECOVERY = (RETRY, FAIL, COMPENSATE, RECONCILE)
_COMPENSATION_RECOVERY = (RETRY, FAIL, RECONCILE)

Reconcile = Callable[[Any, str], Any]
"""`reconcile(context, key) -> bool`: plain or async; True if the interrupted call took effect."""


@dataclass(frozen=True)
class Step:
    """One step: `action(context, key)`, undone by `compensation(context, key)`.

    `recovery` says what recovery does with an action whose outcome is unknown (its
    `StepStarted` has no outcome): `"retry"` (default), `"fail"`, `"compensate"` (fail
    and undo its effect too) or `"reconcile"` (ask `reconcile`, the default when one is
    given). `compensation_recovery` and `reconcile_compensation` do the same for an
    interrupted compensation (`"retry"`, `"fail"`: the saga is stuck, or `"reconcile"`).
    `timeout` (seconds) is how long recovery leaves a running step to its worker.
    """

    name: str
    action: Action
    compensation: Action | None = None
    timeout: float | None = field(default=None, kw_only=True)
    recovery: str | None = field(default=None, kw_only=True)
    reconcile: Reconcile | None = field(default=None, kw_only=True, repr=False)
    compensation_recovery: str | None = field(default=None, kw_only=True)
    reconcile_compensation: Reconcile | None = field(default=None, kw_only=True, repr=False)
    action_is_async: bool = field(init=False, repr=False)
    compensation_is_async: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise DefinitionError(f"a step needs a non-empty name, got {self.name!r}")
        if not callable(self.action):
            raise DefinitionError(f"step {self.name!r}: action must be callable")
        for label, fn in (
            ("compensation", self.compensation),
            ("reconcile", self.reconcile),
            ("reconcile_compensation", self.reconcile_compensation),
        ):
            if fn is not None and not callable(fn):
                raise DefinitionError(f"step {self.name!r}: {label} must be callable or None")
        if self.timeout is not None and (
            isinstance(self.timeout, bool)
            or not isinstance(self.timeout, int | float)
            or self.timeout <= 0
        ):
            raise DefinitionError(
                f"step {self.name!r}: timeout must be a number of seconds > 0, got {self.timeout!r}"
            )
        recovery = self._policy("recovery", self.recovery, self.reconcile, _ACTION_RECOVERY)
        if recovery == COMPENSATE and self.compensation is None:
            raise DefinitionError(f"step {self.name!r}: recovery='compensate' needs a compensation")
        compensation_recovery = self._policy(
            "compensation_recovery",
            self.compensation_recovery,
            self.reconcile_compensation,
            _COMPENSATION_RECOVERY,
        )
        object.__setattr__(self, "recovery", recovery)
        object.__setattr__(self, "compensation_recovery", compensation_recovery)
        object.__setattr__(self, "action_is_async", _is_async(self.action))
        object.__setattr__(
            self,
            "compensation_is_async",
            self.compensation is not None and _is_async(self.compensation),
        )

    def _policy(
        self, label: str, value: str | None, reconcile: Reconcile | None, allowed: tuple[str, ...]
    ) -> str:
        if value is None:
            return RECONCILE if reconcile is not None else RETRY
        if value not in allowed:
            raise DefinitionError(
                f"step {self.name!r}: {label} must be one of {', '.join(allowed)}, got {value!r}"
            )
        if value == RECONCILE and reconcile is None:
            fn = "reconcile" if label == "recovery" else "reconcile_compensation"
            raise DefinitionError(f"step {self.name!r}: {label}='reconcile' needs {fn}=...")
        return value


class SagaDefinition:
    """A named, versioned, ordered list of steps; recorded by name and version."""

    def __init__(self, name: str, steps: Sequence[Step], version: int = 1) -> None:
        if not isinstance(name, str) or not name.strip():
            raise DefinitionError(f"a saga definition needs a non-empty name, got {name!r}")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise DefinitionError(f"saga {name!r}: version must be an int >= 1, got {version!r}")
        steps = tuple(steps)
        if not steps:
            raise DefinitionError(f"saga {name!r} has no steps")
        by_name: dict[str, Step] = {}
        for step in steps:
            if not isinstance(step, Step):
                raise DefinitionError(f"saga {name!r}: {step!r} is not a Step")
            if step.name in by_name:
                raise DefinitionError(f"saga {name!r}: step name {step.name!r} is used twice")
            by_name[step.name] = step
        self.name = name
        self.version = version
        self.steps: tuple[Step, ...] = steps
        self._by_name = by_name

    @property
    def compensable(self) -> list[str]:
        """Names of the steps that have a compensation: what `SagaStarted` records."""
        return [s.name for s in self.steps if s.compensation is not None]

    @property
    def step_names(self) -> list[str]:
        """The steps' names, in order: what `SagaStarted` records."""
        return [s.name for s in self.steps]

    def step(self, name: str) -> Step:
        """The step called `name`."""
        try:
            return self._by_name[name]
        except KeyError:
            raise DefinitionError(
                f"saga {self.name!r} v{self.version} has no step {name!r}"
            ) from None

    def __repr__(self) -> str:
        return f"SagaDefinition({self.name!r}, steps={self.step_names}, version={self.version})"
