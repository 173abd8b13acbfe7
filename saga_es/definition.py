"""What a saga is made of: named steps, each an action and an optional compensation.

Definitions are checked when they are built, so a malformed one fails at import
time, never half-way through a saga. Whether a callable is async is decided
here, once, not on every call.
"""

from __future__ import annotations

import contextvars
import inspect
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from saga_es.breaker import CircuitBreaker
from saga_es.context import LONGEST_NAME, refused_text, shown_text
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

Errors = type[BaseException] | tuple[type[BaseException], ...]


def _refuses_two_arguments(fn: Callable[..., Any]) -> str | None:
    """The signature of `fn` if it cannot take `(context, key)`: caught here, not mid-saga.

    A callable whose signature Python cannot read (some builtins) is given the benefit
    of the doubt.
    """
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(None, None)
    except TypeError:
        return f"{getattr(fn, '__qualname__', type(fn).__qualname__)}{signature}"
    return None


# A deadline this many seconds ahead is past the largest date a timestamp can hold.
_LONGEST_DEADLINE = (datetime.max.replace(tzinfo=UTC) - datetime.now(UTC)) / 2


def _storable_name(what: str, name: str) -> None:
    """Names are stored in every event: refuse one that some store could not keep."""
    reason = refused_text(name, LONGEST_NAME)
    if reason is not None:
        raise DefinitionError(f"{what} name {shown_text(name)} cannot be stored: {reason}")


def _positive(value: Any, *, allow_zero: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return value >= 0 if allow_zero else value > 0


def _errors(owner: str, label: str, value: Errors) -> tuple[type[BaseException], ...]:
    errors = value if isinstance(value, tuple) else (value,)
    for error in errors:
        if not (isinstance(error, type) and issubclass(error, BaseException)):
            raise DefinitionError(f"{owner}: {label} must hold exception classes, got {error!r}")
    return errors


@dataclass(frozen=True)
class Retry:
    """How often a failing call is tried, and how long to wait between tries.

    `attempts` counts every try, the first included. The wait before try n+1 is
    `delay * backoff**(n-1)`, capped at `max_delay`, less a random share of up to
    `jitter` of it (so sagas failing together do not retry together). Errors in
    `retry_on` are retried unless they are also in `give_up_on`.
    """

    attempts: int = 3
    delay: float = 0.1
    backoff: float = 2.0
    max_delay: float = 30.0
    jitter: float = 0.1
    retry_on: Errors = Exception
    give_up_on: Errors = ()

    def __post_init__(self) -> None:
        owner = f"Retry(attempts={self.attempts!r})"
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise DefinitionError(f"{owner}: attempts must be an int >= 1")
        if self.attempts < 1:
            raise DefinitionError(f"{owner}: attempts must be >= 1 (the first try counts)")
        for label, value, zero in (
            ("delay", self.delay, True),
            ("backoff", self.backoff, False),
            ("max_delay", self.max_delay, True),
        ):
            if not _positive(value, allow_zero=zero):
                bound = ">= 0" if zero else "> 0"
                raise DefinitionError(f"{owner}: {label} must be a number {bound}, got {value!r}")
        if not _positive(self.jitter, allow_zero=True) or self.jitter > 1:
            raise DefinitionError(f"{owner}: jitter must be between 0 and 1, got {self.jitter!r}")
        object.__setattr__(self, "retry_on", _errors(owner, "retry_on", self.retry_on))
        object.__setattr__(self, "give_up_on", _errors(owner, "give_up_on", self.give_up_on))

    def retries(self, error: BaseException, attempt: int) -> bool:
        """Whether `error`, raised by try number `attempt`, earns another try."""
        return (
            attempt < self.attempts
            and isinstance(error, self.retry_on)
            and not isinstance(error, self.give_up_on)
        )

    def wait(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after try number `attempt` failed."""
        base = min(self.max_delay, self.delay * self.backoff ** (attempt - 1))
        share = (rng or random).random() * self.jitter
        return base * (1.0 - share)


NO_RETRY = Retry(attempts=1, delay=0.0)
"""One try, no retry: every step's default."""


def _retry(owner: str, label: str, value: Retry | int | None) -> Retry:
    if value is None:
        return NO_RETRY
    if isinstance(value, Retry):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise DefinitionError(f"{owner}: {label} attempts must be >= 1, got {value!r}")
        return Retry(attempts=value)
    raise DefinitionError(
        f"{owner}: {label} must be a Retry or a number of attempts, got {value!r}"
    )


@dataclass(frozen=True)
class Step:
    """One step: `action(context, key)`, undone by `compensation(context, key)`.

    Policies, each recorded in the step's events when it acts:

    - `retry` / `compensation_retry`: a `Retry` (or a number of attempts) for the action
      and for the compensation; a compensation that exhausts its tries leaves the saga
      `stuck`.
    - `timeout` (seconds): an attempt still running then is cut (an async one is
      cancelled; a sync one's late result is discarded) and its outcome is unknown, so
      `recovery` decides. It is also how long recovery leaves a running step to its worker.
    - `recovery`: what happens to an attempt whose outcome is unknown (cut by a timeout,
      or interrupted by a crash): `"retry"` (default), `"fail"`, `"compensate"` (fail and
      undo its effect too) or `"reconcile"` (ask `reconcile`, the default when one is
      given). `compensation_recovery` and `reconcile_compensation` do the same for an
      interrupted compensation (`"retry"`, `"fail"`: the saga is stuck, or `"reconcile"`).
    - `fallback`: run instead when the action fails with one of `fallback_on` (after its
      retries), or at once while `breaker` is open; `fallback_compensation` undoes it.
    - `compensate_on_failure`: a failed action may leave a partial effect, so its own
      compensation runs too.
    - `cancellable`: a cancel of the saga also cancels this step's async action while it
      runs (else the step runs to its end first). The cut attempt's outcome is unknown,
      so `recovery` decides, as for a timeout: it is undone unless that is `"fail"`.
    """

    name: str
    action: Action = None  # type: ignore[assignment]  # refused below: a clear DefinitionError
    compensation: Action | None = None
    retry: Retry | int | None = field(default=None, kw_only=True)
    compensation_retry: Retry | int | None = field(default=None, kw_only=True)
    timeout: float | None = field(default=None, kw_only=True)
    recovery: str | None = field(default=None, kw_only=True)
    reconcile: Reconcile | None = field(default=None, kw_only=True, repr=False)
    compensation_recovery: str | None = field(default=None, kw_only=True)
    reconcile_compensation: Reconcile | None = field(default=None, kw_only=True, repr=False)
    fallback: Action | None = field(default=None, kw_only=True, repr=False)
    fallback_compensation: Action | None = field(default=None, kw_only=True, repr=False)
    fallback_on: Errors = field(default=Exception, kw_only=True, repr=False)
    breaker: CircuitBreaker | None = field(default=None, kw_only=True)
    compensate_on_failure: bool = field(default=False, kw_only=True)
    cancellable: bool = field(default=False, kw_only=True)
    action_is_async: bool = field(init=False, repr=False)
    compensation_is_async: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise DefinitionError(f"a step needs a non-empty name, got {self.name!r}")
        _storable_name("step", self.name)
        if self.action is None and self.fallback is not None:
            raise DefinitionError(
                f"step {self.name!r}: a fallback needs a primary action to fall back from"
            )
        if self.action is None:
            raise DefinitionError(f"step {self.name!r} needs an action")
        if not callable(self.action):
            raise DefinitionError(f"step {self.name!r}: action must be callable")
        for label, fn in (
            ("action", self.action),
            ("compensation", self.compensation),
            ("reconcile", self.reconcile),
            ("reconcile_compensation", self.reconcile_compensation),
            ("fallback", self.fallback),
            ("fallback_compensation", self.fallback_compensation),
        ):
            if fn is not None and not callable(fn):
                raise DefinitionError(f"step {self.name!r}: {label} must be callable or None")
            refused = None if fn is None else _refuses_two_arguments(fn)
            if refused is not None:
                raise DefinitionError(
                    f"step {self.name!r}: {label} is called with (context, key), "
                    f"but {refused} cannot take them"
                )
        owner = f"step {self.name!r}"
        if self.fallback is None and self.fallback_compensation is not None:
            raise DefinitionError(f"{owner}: fallback_compensation needs a fallback")
        if self.breaker is not None and not isinstance(self.breaker, CircuitBreaker):
            raise DefinitionError(
                f"{owner}: breaker must be a CircuitBreaker, got {self.breaker!r}"
            )
        if not isinstance(self.compensate_on_failure, bool):
            raise DefinitionError(f"{owner}: compensate_on_failure must be True or False")
        if self.compensate_on_failure and self.compensation is None:
            raise DefinitionError(f"{owner}: compensate_on_failure=True needs a compensation")
        if self.compensate_on_failure and self.fallback is not None:
            # A step records one compensation, that of the action that took effect: the
            # primary's partial effect would go unrecorded, and so never be undone.
            raise DefinitionError(
                f"{owner}: compensate_on_failure=True cannot be combined with a fallback "
                "(the failed primary's effect would never be undone); undo it inside the "
                "fallback, or split the step in two"
            )
        if not isinstance(self.cancellable, bool):
            raise DefinitionError(f"{owner}: cancellable must be True or False")
        if self.cancellable and not _is_async(self.action):
            raise DefinitionError(
                f"{owner}: cancellable=True needs an async action (a running thread cannot "
                "be stopped)"
            )
        object.__setattr__(self, "retry", _retry(owner, "retry", self.retry))
        object.__setattr__(
            self, "compensation_retry", _retry(owner, "compensation_retry", self.compensation_retry)
        )
        object.__setattr__(self, "fallback_on", _errors(owner, "fallback_on", self.fallback_on))
        if self.timeout is not None and not (  # NaN too; None, not infinity, means none
            _positive(self.timeout) and math.isfinite(self.timeout)
        ):
            raise DefinitionError(
                f"step {self.name!r}: timeout must be a finite number of seconds > 0 (or None), "
                f"got {self.timeout!r}"
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

    @classmethod
    def saga(
        cls,
        name: str,
        definition: SagaDefinition,
        *,
        context: Callable[[Any], Any] | None = None,
        **policies: Any,
    ) -> Step:
        """A step that runs a whole saga, whose completion completes the step.

        Compensating the step compensates the child's completed steps in reverse order.
        `context(parent_context)` builds the child's context (default: the parent's).
        """
        if not isinstance(definition, SagaDefinition):
            raise DefinitionError(f"step {name!r}: Step.saga needs a SagaDefinition")
        return cls(name, ChildSaga(definition, context), RevertChildSaga(definition), **policies)

    @property
    def children(self) -> list[SagaDefinition]:
        """The definitions this step runs as child sagas (none for a plain step)."""
        return [self.action.definition] if isinstance(self.action, ChildSaga) else []

    @property
    def retries(self) -> Retry:
        """The action's `Retry` (typed: `retry` is normalised at definition time)."""
        assert isinstance(self.retry, Retry)
        return self.retry

    @property
    def compensation_retries(self) -> Retry:
        """The compensation's `Retry`."""
        assert isinstance(self.compensation_retry, Retry)
        return self.compensation_retry

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


CURRENT_APP: contextvars.ContextVar[Any] = contextvars.ContextVar("saga_es_current_app")
"""The application driving the saga whose step is running: a nested step starts its child there."""


class ChildSaga:
    """A step's action that runs a whole saga (see `Step.saga`): the child, keyed by the step.

    The child's key is the parent step's idempotency key (`<parent id>:<step>`), so each
    parent step starts it exactly once, and its `SagaStarted` names the parent and step.
    """

    def __init__(self, definition: SagaDefinition, context: Callable[[Any], Any] | None) -> None:
        self.definition = definition
        self.context = context
        self.__name__ = f"saga {definition.name}"

    def __call__(self, context: Any, key: str) -> dict[str, str]:
        """Run the child (or find the one this step already started) to its end."""
        app = CURRENT_APP.get()
        child_context = context if self.context is None else self.context(context)
        return app._run_child(self.definition, child_context, key)  # type: ignore[no-any-return]


class RevertChildSaga:
    """The compensation of a `Step.saga`: the child's completed steps, in reverse order."""

    def __init__(self, definition: SagaDefinition) -> None:
        self.definition = definition
        self.__name__ = f"revert saga {definition.name}"

    def __call__(self, context: Any, key: str) -> None:
        """Compensate the child this step started."""
        CURRENT_APP.get()._revert_child(self.definition, key)


class Parallel:
    """Steps that run concurrently: `Parallel(step, step, ...)` in a definition's steps.

    If a member fails, the members that completed are compensated in reverse order of
    completion, members still running are cancelled (their outcome is unknown, so
    their `recovery` policy decides), and then the steps before the group are
    compensated.
    """

    def __init__(self, *steps: Step) -> None:
        if not steps:
            raise DefinitionError("Parallel() needs at least one step")
        for step in steps:
            if isinstance(step, Parallel):
                raise DefinitionError("a Parallel group cannot hold another Parallel group")
            if not isinstance(step, Step):
                raise DefinitionError(f"Parallel: {step!r} is not a Step")
        self.steps: tuple[Step, ...] = steps

    def __iter__(self) -> Iterator[Step]:
        return iter(self.steps)

    def __repr__(self) -> str:
        return f"Parallel({', '.join(repr(s.name) for s in self.steps)})"


class SagaDefinition:
    """A named, versioned, ordered list of steps; recorded by name and version.

    `deadline` (seconds) bounds the whole saga: once it has passed, no further step
    starts, a running one is cut, and the saga compensates.
    """

    def __init__(
        self,
        name: str,
        steps: Sequence[Step | Parallel],
        version: int = 1,
        *,
        deadline: float | None = None,
    ) -> None:
        if not isinstance(name, str) or not name.strip():
            raise DefinitionError(f"a saga definition needs a non-empty name, got {name!r}")
        _storable_name("saga", name)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise DefinitionError(f"saga {name!r}: version must be an int >= 1, got {version!r}")
        if deadline is not None and not (_positive(deadline) and math.isfinite(deadline)):
            raise DefinitionError(
                f"saga {name!r}: deadline must be a finite number of seconds > 0, got {deadline!r}"
            )
        if deadline is not None and deadline > _LONGEST_DEADLINE.total_seconds():
            raise DefinitionError(
                f"saga {name!r}: a deadline of {deadline!r} seconds ends past the largest "
                "date a timestamp can hold"
            )
        items = tuple(steps)
        if not items:
            raise DefinitionError(f"saga {name!r} has no steps")
        flat: list[Step] = []
        groups: list[tuple[str, ...]] = []
        for item in items:
            if isinstance(item, Parallel):
                flat.extend(item.steps)
                groups.append(tuple(s.name for s in item.steps))
            elif isinstance(item, Step):
                flat.append(item)
            else:
                raise DefinitionError(f"saga {name!r}: {item!r} is not a Step or Parallel")
        by_name: dict[str, Step] = {}
        for step in flat:
            if step.name in by_name:
                raise DefinitionError(f"saga {name!r}: step name {step.name!r} is used twice")
            by_name[step.name] = step
        _refuse_cycles(name, list(by_name.values()))
        self.name = name
        self.version = version
        self.deadline = deadline
        self.steps: tuple[Step, ...] = tuple(flat)
        self.groups: tuple[tuple[str, ...], ...] = tuple(groups)
        """The members of each `Parallel` group, by name: what `SagaStarted` records."""
        self._by_name = by_name
        # What every saga's `SagaStarted` records, worked out once (steps are frozen).
        self._step_names = tuple(s.name for s in flat)
        self._compensable = tuple(s.name for s in flat if s.compensation is not None)
        self._fallback_compensable = tuple(
            s.name for s in flat if s.fallback_compensation is not None
        )
        self._children = {s.name: s.children[0].name for s in flat if s.children}

    @property
    def compensable(self) -> list[str]:
        """Names of the steps that have a compensation: what `SagaStarted` records."""
        return list(self._compensable)

    @property
    def children(self) -> dict[str, str]:
        """Each `Step.saga` step, with the name of the definition its child saga runs."""
        return dict(self._children)

    @property
    def fallback_compensable(self) -> list[str]:
        """Steps whose fallback has a compensation: what `SagaStarted` records."""
        return list(self._fallback_compensable)

    @property
    def step_names(self) -> list[str]:
        """The steps' names, in order: what `SagaStarted` records."""
        return list(self._step_names)

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


def _refuse_cycles(name: str, steps: list[Step], path: tuple[str, ...] = ()) -> None:
    """A nested definition that contains itself, at any depth, could never end."""
    for step in steps:
        for child in step.children:
            if child.name == name or child.name in path:
                raise DefinitionError(
                    f"saga {name!r}: step {step.name!r} runs saga {child.name!r}, "
                    "which contains itself"
                )
            _refuse_cycles(name, list(child.steps), (*path, child.name))
