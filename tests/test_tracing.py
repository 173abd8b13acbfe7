"""OpenTelemetry spans, checked with the SDK's in-memory exporter on every store."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from saga_es import SagaApplication, SagaDefinition, Step, tracing


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.instrument(provider)
    yield exporter
    tracing.uninstrument()


def declined(context: Any, key: str) -> None:
    raise ValueError("card declined")


ORDER = SagaDefinition(
    "order",
    [Step("reserve", lambda c, k: None, lambda c, k: None), Step("pay", declined)],
)


def test_a_saga_run_is_one_span_with_a_child_per_attempt(
    app: SagaApplication, spans: InMemorySpanExporter
) -> None:
    saga = app.run(ORDER, {})
    finished = spans.get_finished_spans()
    (root,) = [s for s in finished if s.name == "saga order"]
    assert root.attributes is not None
    assert dict(root.attributes) == {
        "saga.id": str(saga.id),
        "saga.name": "order",
        "saga.operation": "run",
        "saga.status": "compensated",
    }
    children = [s for s in finished if s.parent is not None]
    assert [s.name for s in children] == ["action reserve", "action pay", "compensation reserve"]
    assert all(s.parent.span_id == root.context.span_id for s in children)  # type: ignore[union-attr]
    pay = children[1]
    assert pay.attributes is not None
    assert (pay.attributes["saga.step"], pay.attributes["saga.step.attempt"]) == ("pay", 1)
    assert pay.status.status_code == StatusCode.ERROR
    assert "ValueError: card declined" in str(pay.status.description)
    assert children[0].status.status_code == StatusCode.UNSET


def test_async_runs_and_workers_are_traced_too(
    app: SagaApplication, spans: InMemorySpanExporter
) -> None:
    asyncio.run(app.arun(ORDER, {}))
    app.submit(ORDER, {})
    app.work(until_idle=True)
    operations = [
        s.attributes["saga.operation"]
        for s in spans.get_finished_spans()
        if s.attributes and "saga.operation" in s.attributes
    ]
    assert operations == ["arun", "work"]
    assert len([s for s in spans.get_finished_spans() if s.name == "action pay"]) == 2


def test_resolve_and_cancel_open_a_saga_span_over_the_calls_they_make(
    app: SagaApplication, spans: InMemorySpanExporter
) -> None:
    failing = [RuntimeError("refund service down")]

    def refund(context: Any, key: str) -> None:
        if failing:
            raise failing.pop()

    shop = SagaDefinition(
        "shop",
        [Step("reserve", lambda c, k: None, refund, compensation_retry=1), Step("pay", declined)],
    )
    stuck = app.run(shop, {})
    assert stuck.status == "stuck"
    spans.clear()
    assert app.resolve(stuck.id, by="ada", reason="refund is back").status == "compensated"
    pending = app.submit(shop, {})
    assert app.cancel(pending, by="ada", reason="asked").status == "cancelled"
    finished = spans.get_finished_spans()
    roots = {s.attributes["saga.operation"]: s for s in finished if s.name == "saga shop"}  # type: ignore[index]
    assert set(roots) == {"resolve", "cancel"}
    (undo,) = [s for s in finished if s.name == "compensation reserve"]
    assert undo.parent.span_id == roots["resolve"].context.span_id  # type: ignore[union-attr]


def test_nothing_is_traced_once_uninstrumented(
    app: SagaApplication, spans: InMemorySpanExporter
) -> None:
    tracing.uninstrument()
    app.run(ORDER, {})
    assert spans.get_finished_spans() == ()
