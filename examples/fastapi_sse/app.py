"""An order service: each order runs a saga, whose progress streams as server-sent events.

Run it with `uvicorn --app-dir examples/fastapi_sse --factory app:main`, then
`curl -N -X POST localhost:8000/orders/A-1001/saga -H 'content-type: application/json'
-d '{"item": "teapot"}'`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from saga_es import (
    TERMINAL_STATES,
    SagaApplication,
    SagaDefinition,
    SagaNotFound,
    SagaUpdate,
    Step,
)

log = logging.getLogger("orders")

DECLINED_TOKEN = "tok_declined"
"""The payment token the card processor declines (like a real processor's test cards)."""


class PaymentDeclined(Exception):
    """The card processor refused the charge."""


# -- the saga: each call stands for a supplier's API, which gets the step's idempotency key --


async def reserve_stock(order: dict[str, Any], key: str) -> None:
    """Hold the items in the warehouse."""
    await asyncio.sleep(0)
    order["reservation"] = f"RSV-{order['order_id']}"


async def release_stock(order: dict[str, Any], key: str) -> None:
    """Put the held items back on the shelf."""
    await asyncio.sleep(0)
    order["reservation"] = None


async def book_courier(order: dict[str, Any], key: str) -> None:
    """Book a pick-up for the parcel."""
    await asyncio.sleep(0)
    order["courier"] = f"CR-{order['order_id']}"


async def cancel_courier(order: dict[str, Any], key: str) -> None:
    """Cancel the pick-up."""
    await asyncio.sleep(0)
    order["courier"] = None


async def charge_card(order: dict[str, Any], key: str) -> None:
    """Take the payment: the last step, so nothing after it can fail and call for a refund."""
    await asyncio.sleep(0)
    if order["payment_token"] == DECLINED_TOKEN:
        raise PaymentDeclined(f"card declined for order {order['order_id']}")
    order["payment"] = f"PAY-{order['order_id']}"


ORDER = SagaDefinition(
    "order",
    [
        Step("reserve_stock", reserve_stock, release_stock),
        Step("book_courier", book_courier, cancel_courier),
        Step("charge_card", charge_card),
    ],
)

ENDED = frozenset({*TERMINAL_STATES, "stuck"})
"""States after which a saga appends nothing more by itself (`stuck` waits for a person)."""


class OrderRequest(BaseModel):
    """The body of `POST /orders/{order_id}/saga`."""

    item: str
    quantity: int = Field(default=1, ge=1)
    payment_token: str = "tok_visa"


# -- the service ------------------------------------------------------------------------------


def sse(update: SagaUpdate) -> str:
    """One server-sent event: named after the saga event, with the saga's version as its id."""
    return f"id: {update.version}\nevent: {update.event}\ndata: {update.to_json()}\n\n"


def create_app(
    saga_app: SagaApplication, definition: SagaDefinition = ORDER, *, poll_interval: float = 0.2
) -> FastAPI:
    """The HTTP API over `saga_app`; `definition` is the saga each order runs."""
    running: set[asyncio.Task[None]] = set()

    @asynccontextmanager
    async def lifespan(api: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.gather(*running)  # let the sagas in hand finish before shutting down

    api = FastAPI(title="Orders", lifespan=lifespan)

    @api.exception_handler(SagaNotFound)
    async def not_found(request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=404)

    async def run(
        order: dict[str, Any], key: str, updates: asyncio.Queue[SagaUpdate | Exception | None]
    ) -> None:
        """Run the saga (or replay the one under `key`), handing each durable update over."""
        try:
            async for update in saga_app.stream(definition, order, key=key):
                updates.put_nowait(update)
        except Exception as e:
            log.exception("order %s: the saga could not be run", key)
            updates.put_nowait(e)
        finally:
            updates.put_nowait(None)

    async def follow(saga_id: UUID, version: int) -> AsyncIterator[SagaUpdate]:
        """The saga's updates after `version`, read from the store until it has ended."""
        while True:
            await asyncio.sleep(poll_interval)
            events = await asyncio.to_thread(saga_app.saga_events, saga_id)
            for event in events[version:]:
                update = SagaUpdate.from_event(event)
                yield update
                if update.status in ENDED:
                    return
            version = len(events)

    async def frames(updates: asyncio.Queue[SagaUpdate | Exception | None]) -> AsyncIterator[str]:
        last: SagaUpdate | None = None
        while (item := await updates.get()) is not None:
            if isinstance(item, Exception):
                error = {"type": type(item).__name__, "message": str(item)}
                yield f"event: error\ndata: {json.dumps(error)}\n\n"
                return
            last = item
            yield sse(item)
        # A retry of an order still running (here or in another process) replays its events
        # so far: follow the rest from the store.
        if last is not None and last.status not in ENDED:
            async for update in follow(last.saga_id, last.version):
                yield sse(update)

    @api.post(
        "/orders/{order_id}/saga",
        responses={200: {"content": {"text/event-stream": {}}, "description": "saga events"}},
        response_class=StreamingResponse,
    )
    async def place_order(order_id: str, body: OrderRequest) -> StreamingResponse:
        """Run the order's saga, streaming its events; a retry replays the first run's."""
        updates: asyncio.Queue[SagaUpdate | Exception | None] = asyncio.Queue()
        order = {"order_id": order_id, **body.model_dump()}
        # The saga runs in its own task: a client that hangs up does not stop it half-way.
        task = asyncio.create_task(run(order, order_id, updates))
        running.add(task)
        task.add_done_callback(running.discard)
        return StreamingResponse(
            frames(updates),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @api.get("/sagas/{saga_id}")
    def saga_status(saga_id: UUID) -> dict[str, Any]:
        """Where the saga stands: its status, context, error and compensations."""
        saga = saga_app.get(saga_id)
        return {
            "saga_id": str(saga.id),
            "name": saga.name,
            "key": saga.key,
            "status": saga.status,
            "version": saga.version,
            "context": saga.context,
            "error": saga.error,
            "compensated": saga.compensated,
        }

    @api.get("/sagas/{saga_id}/history")
    def saga_history(saga_id: UUID) -> list[dict[str, Any]]:
        """The saga's history, one record per event, as an auditor reads it."""
        return [record.to_dict() for record in saga_app.history(saga_id)]

    return api


def main() -> FastAPI:
    """The service on the SQLite file `orders.db`, for `uvicorn --factory app:main`."""
    return create_app(SagaApplication(env={"SQLITE_DBNAME": "orders.db"}))
