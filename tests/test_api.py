"""The public surface: what `saga_es` exports, documented, with errors under one base."""

from __future__ import annotations

import ast
import inspect
import itertools
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import saga_es
from saga_es import SagaError

PUBLIC = sorted(saga_es.__all__)


def public_names() -> set[str]:
    """What `import saga_es` offers that is not private and not a submodule."""
    return {
        name
        for name, value in vars(saga_es).items()
        if not name.startswith("_") and not isinstance(value, ModuleType)
    }


def test_all_lists_exactly_the_public_names() -> None:
    assert sorted(set(saga_es.__all__)) == sorted(public_names())
    assert len(saga_es.__all__) == len(set(saga_es.__all__)), "a name is listed twice"
    for name in saga_es.__all__:
        assert hasattr(saga_es, name), name


def test_the_core_names_are_exported() -> None:
    expected = {
        "SagaApplication",
        "SagaDefinition",
        "Step",
        "Saga",
        "SagaUpdate",
        "SagaStarted",
        "StepStarted",
        "StepCompleted",
        "StepFailed",
        "CompensationStarted",
        "CompensationRan",
        "CompensationFailed",
        "SagaCompleted",
        "SagaCompensated",
        "SagaStuck",
        "SagaError",
        "DefinitionError",
        "ContextError",
        "ConfigurationError",
        "SagaNotFound",
        "VersionNotFound",
        "IllegalTransition",
    }
    assert expected <= set(saga_es.__all__)


def attribute_docstrings() -> dict[str, str]:
    """`NAME = value` followed by a string, at the top of any saga_es module."""
    found: dict[str, str] = {}
    for path in sorted(Path(saga_es.__file__).parent.glob("*.py")):  # read, never imported
        body = ast.parse(path.read_text()).body
        for node, after in itertools.pairwise(body):
            targets = []
            if isinstance(node, ast.Assign):
                targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                targets = [node.target.id]
            if (
                targets
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                for target in targets:
                    found[target] = after.value.value
    return found


def own_doc(obj: Any) -> str:
    """The docstring `obj` itself declares (a class must not just inherit one)."""
    if inspect.isclass(obj):
        return str(obj.__dict__.get("__doc__") or "")
    return inspect.getdoc(obj) or ""


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_name_has_a_docstring(name: str) -> None:
    obj = getattr(saga_es, name)
    if inspect.isclass(obj) or inspect.isfunction(obj):
        assert own_doc(obj).strip(), f"{name} has no docstring"
    else:
        assert attribute_docstrings().get(name, "").strip(), f"{name} has no docstring"


@pytest.mark.parametrize("name", [n for n in PUBLIC if inspect.isclass(getattr(saga_es, n))])
def test_every_public_method_of_a_public_class_has_a_docstring(name: str) -> None:
    cls = getattr(saga_es, name)
    missing = []
    for attr, value in vars(cls).items():
        if attr.startswith("_"):
            continue
        fn = value.fget if isinstance(value, property) else value
        fn = getattr(fn, "__func__", fn)  # classmethod, staticmethod
        if inspect.isfunction(fn) and not (fn.__doc__ or "").strip():
            missing.append(attr)
    assert not missing, f"{name}: {missing} have no docstring"


def test_the_package_has_a_docstring() -> None:
    assert (saga_es.__doc__ or "").strip()


@pytest.mark.parametrize(
    ("name", "builtin"),
    [
        ("DefinitionError", ValueError),
        ("ContextError", TypeError),
        ("ConfigurationError", ValueError),
        ("SagaNotFound", KeyError),
        ("VersionNotFound", KeyError),
        ("IllegalTransition", Exception),
    ],
)
def test_every_error_is_a_saga_error_and_the_builtin_it_resembles(
    name: str, builtin: type[Exception]
) -> None:
    cls = getattr(saga_es, name)
    assert issubclass(cls, SagaError)
    assert issubclass(cls, builtin)


def test_exported_events_are_the_aggregates_own_classes() -> None:
    for name in (
        "SagaStarted",
        "StepStarted",
        "StepCompleted",
        "StepFailed",
        "CompensationStarted",
        "CompensationRan",
        "CompensationFailed",
        "SagaCompleted",
        "SagaCompensated",
        "SagaStuck",
    ):
        event = getattr(saga_es, name)
        assert getattr(saga_es.Saga, name) is event
        assert issubclass(event, saga_es.SagaEvent)
