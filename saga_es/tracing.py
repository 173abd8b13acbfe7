"""Optional OpenTelemetry spans: one per saga run, one per step attempt (extra `saga_es[otel]`).

Off until `instrument()` is called, and then only the OpenTelemetry API is used: the
application picks the SDK and the exporter. While off, each hook costs one global
check, so sagas that are not traced pay nothing measurable.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

_tracer: Any = None


def instrument(tracer_provider: Any = None) -> None:
    """Start tracing sagas with `tracer_provider` (default: OpenTelemetry's global one)."""
    global _tracer
    try:
        from opentelemetry import trace
    except ImportError:  # pragma: no cover - the message is the point
        raise ImportError(
            "saga_es tracing needs the OpenTelemetry API: pip install 'saga_es[otel]'"
        ) from None
    _tracer = trace.get_tracer("saga_es", tracer_provider=tracer_provider)


def uninstrument() -> None:
    """Stop tracing."""
    global _tracer
    _tracer = None


_OFF = contextlib.nullcontext()


def saga_span(saga: Any, operation: str) -> contextlib.AbstractContextManager[None]:
    """A span around one run of a saga (`run`, `arun`, a resumption by recovery or a worker)."""
    return _OFF if _tracer is None else _saga_span(saga, operation)


@contextlib.contextmanager
def _saga_span(saga: Any, operation: str) -> Iterator[None]:
    attributes = {"saga.id": str(saga.id), "saga.name": saga.name, "saga.operation": operation}
    with _tracer.start_as_current_span(f"saga {saga.name}", attributes=attributes) as span:
        yield
        span.set_attribute("saga.status", saga.status)


@contextlib.contextmanager
def attempt_span(saga: Any, step: str, kind: str, attempt: int) -> Iterator[Any]:
    """A span around one call of a step's action, compensation or reconcile."""
    if _tracer is None:
        yield None
        return
    attributes = {
        "saga.id": str(saga.id),
        "saga.name": saga.name,
        "saga.step": step,
        "saga.step.kind": kind,
        "saga.step.attempt": attempt,
    }
    with _tracer.start_as_current_span(f"{kind} {step}", attributes=attributes) as span:
        yield span


def record_outcome(span: Any, error: BaseException | None) -> None:
    """Mark the attempt's span failed with the error its call raised (if any)."""
    if span is None or error is None:
        return
    from opentelemetry.trace import Status, StatusCode

    span.record_exception(error)
    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
