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


@dataclass(frozen=True)
class Step:
    """One step: `action(context, key)`, undone by `compensation(context, key)`."""

    name: str
    action: Action
    compensation: Action | None = None
    action_is_async: bool = field(init=False, repr=False)
    compensation_is_async: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise DefinitionError(f"a step needs a non-empty name, got {self.name!r}")
        if not callable(self.action):
            raise DefinitionError(f"step {self.name!r}: action must be callable")
        if self.compensation is not None and not callable(self.compensation):
            raise DefinitionError(f"step {self.name!r}: compensation must be callable or None")
        object.__setattr__(self, "action_is_async", _is_async(self.action))
        object.__setattr__(
            self,
            "compensation_is_async",
            self.compensation is not None and _is_async(self.compensation),
        )


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
