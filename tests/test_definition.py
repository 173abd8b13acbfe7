"""Definitions are checked when they are built, and know which callables are async."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import pytest

from saga_es import DefinitionError, SagaDefinition, SagaError, Step


def act(context: Any, key: str) -> None:
    pass


async def aact(context: Any, key: str) -> None:
    pass


class SyncCallable:
    def __call__(self, context: Any, key: str) -> None:
        pass


class AsyncCallable:
    async def __call__(self, context: Any, key: str) -> None:
        pass


class Service:
    def book(self, context: Any, key: str) -> None:
        pass

    async def abook(self, context: Any, key: str) -> None:
        pass


def test_a_definition_keeps_its_name_version_and_ordered_steps() -> None:
    steps = [Step("reserve", act, compensation=act), Step("charge", act), Step("ship", act)]
    definition = SagaDefinition("order", steps)
    assert definition.name == "order"
    assert definition.version == 1
    assert definition.step_names == ["reserve", "charge", "ship"]
    assert definition.steps == tuple(steps)
    assert definition.step("charge") is steps[1]
    assert SagaDefinition("order", steps, version=3).version == 3
    assert "order" in repr(definition)


def test_a_step_keeps_its_action_and_optional_compensation() -> None:
    step = Step("reserve", act)
    assert (step.name, step.action, step.compensation) == ("reserve", act, None)
    assert Step("reserve", act, compensation=aact).compensation is aact


def test_steps_are_frozen() -> None:
    step = Step("reserve", act)
    with pytest.raises(dataclasses.FrozenInstanceError):
        step.name = "other"  # type: ignore[misc]


def test_duplicate_step_names_are_refused_at_definition_time() -> None:
    with pytest.raises(DefinitionError, match="'reserve'"):
        SagaDefinition("order", [Step("reserve", act), Step("charge", act), Step("reserve", act)])


@pytest.mark.parametrize("name", ["", "   ", None, 7])
def test_a_step_needs_a_non_empty_string_name(name: Any) -> None:
    with pytest.raises(DefinitionError):
        Step(name, act)


@pytest.mark.parametrize("name", ["", "  ", None, 7])
def test_a_definition_needs_a_non_empty_string_name(name: Any) -> None:
    with pytest.raises(DefinitionError):
        SagaDefinition(name, [Step("a", act)])


def test_a_definition_needs_at_least_one_step() -> None:
    with pytest.raises(DefinitionError, match="no steps"):
        SagaDefinition("order", [])


@pytest.mark.parametrize("version", [0, -1, "1", 1.0, True, None])
def test_a_definition_version_is_an_int_of_at_least_one(version: Any) -> None:
    with pytest.raises(DefinitionError, match="version"):
        SagaDefinition("order", [Step("a", act)], version=version)


@pytest.mark.parametrize("action", [None, "reserve", 42])
def test_an_action_must_be_callable(action: Any) -> None:
    with pytest.raises(DefinitionError, match="action"):
        Step("reserve", action)


def test_a_compensation_must_be_callable_or_none() -> None:
    with pytest.raises(DefinitionError, match="compensation"):
        Step("reserve", act, compensation="release")  # type: ignore[arg-type]


def test_only_steps_make_a_definition() -> None:
    with pytest.raises(DefinitionError, match="not a Step"):
        SagaDefinition("order", [act])  # type: ignore[list-item]


def test_asking_for_an_unknown_step_is_a_definition_error() -> None:
    definition = SagaDefinition("order", [Step("a", act)])
    with pytest.raises(DefinitionError, match="'b'"):
        definition.step("b")


def test_definition_errors_are_saga_errors_and_value_errors() -> None:
    with pytest.raises(DefinitionError) as caught:
        SagaDefinition("order", [])
    assert isinstance(caught.value, SagaError)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("fn", "is_async"),
    [
        (act, False),
        (aact, True),
        (lambda context, key: None, False),
        (SyncCallable(), False),
        (AsyncCallable(), True),
        (Service().book, False),
        (Service().abook, True),
        (functools.partial(act), False),
        (functools.partial(aact), True),
    ],
    ids=[
        "function",
        "async-function",
        "lambda",
        "callable-object",
        "async-callable-object",
        "method",
        "async-method",
        "partial",
        "async-partial",
    ],
)
def test_sync_or_async_is_decided_once_at_definition_time(fn: Any, is_async: bool) -> None:
    step = Step("a", fn, compensation=fn)
    assert step.action_is_async is is_async
    assert step.compensation_is_async is is_async


def test_a_missing_compensation_is_not_async() -> None:
    assert Step("a", aact).compensation_is_async is False
    assert Step("a", aact, compensation=act).compensation_is_async is False
    assert Step("a", act, compensation=aact).compensation_is_async is True


def takes_three(context: Any, key: str, extra: Any) -> None:
    pass


@pytest.mark.parametrize(
    ("label", "fn"),
    [
        ("action", lambda context: None),
        ("action", takes_three),
        ("compensation", lambda: None),
        ("fallback", lambda context: None),
        ("fallback_compensation", lambda context: None),
        ("reconcile", lambda context: True),
        ("reconcile_compensation", lambda context: True),
    ],
    ids=["one-arg", "three-args", "compensation", "fallback", "fb-comp", "rec", "rec-comp"],
)
def test_a_callable_that_cannot_take_context_and_key_is_refused_at_definition_time(
    label: str, fn: Any
) -> None:
    kwargs: dict[str, Any] = {label: fn}
    if label == "fallback_compensation":
        kwargs["fallback"] = act
    if label == "reconcile_compensation":
        kwargs["compensation"] = act
    action = kwargs.pop("action", act)
    with pytest.raises(DefinitionError, match=rf"{label} is called with \(context, key\)"):
        Step("reserve", action, **kwargs)


@pytest.mark.parametrize(
    "fn",
    [
        lambda *args: None,
        lambda context, key, extra=None: None,
        functools.partial(takes_three, "bound context"),
        max,  # a builtin whose signature cannot be read is given the benefit of the doubt
    ],
    ids=["varargs", "default", "partial", "builtin"],
)
def test_callables_that_can_take_context_and_key_are_accepted(fn: Any) -> None:
    assert Step("reserve", fn, compensation=fn).action is fn


@pytest.mark.parametrize("deadline", [1e12, 1e300])
def test_a_deadline_past_the_largest_date_is_refused_at_definition_time(deadline: float) -> None:
    with pytest.raises(DefinitionError, match="past the largest date"):
        SagaDefinition("order", [Step("a", act)], deadline=deadline)
    assert SagaDefinition("order", [Step("a", act)], deadline=1e9).deadline == 1e9


def test_a_name_too_long_for_postgresql_to_index_is_refused_at_definition_time() -> None:
    # PostgreSQL indexes the status rows by name (and a step's name is in its child's key):
    # refused on every store, so a definition that runs on one runs on all.
    for name in ("n" * 1001, "é" * 501):
        with pytest.raises(DefinitionError, match=r"step name .* bytes"):
            Step(name, act)
        with pytest.raises(DefinitionError, match=r"saga name .* bytes"):
            SagaDefinition(name, [Step("a", act)])
    assert SagaDefinition("n" * 1000, [Step("é" * 500, act)]).name == "n" * 1000


@pytest.mark.parametrize("name", ["pa\x00y", "pay\udc80"], ids=["nul", "surrogate"])
def test_a_name_no_store_could_keep_is_refused_at_definition_time(name: str) -> None:
    with pytest.raises(DefinitionError, match="step name"):
        Step(name, act)
    with pytest.raises(DefinitionError, match="saga name"):
        SagaDefinition(name, [Step("a", act)])
