"""The example service in examples/fastapi_sse, driven over HTTP on each store.

The saga's progress arrives as server-sent events, parsed here as a browser would; the
documentation page shows the example's code verbatim.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any
from uuid import uuid4

import httpx
import pytest

from saga_es import SagaApplication, SagaDefinition, Step

ROOT = Path(__file__).resolve().parent.parent
APP_PY = ROOT / "examples" / "fastapi_sse" / "app.py"


def load_example() -> ModuleType:
    name = "saga_es_example_fastapi_sse"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, APP_PY)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # pydantic resolves the body model's annotations through it
        spec.loader.exec_module(module)
    return sys.modules[name]


example = load_example()

HAPPY = [
    ("SagaStarted", None, "pending"),
    ("StepStarted", "reserve_stock", "running"),
    ("StepCompleted", "reserve_stock", "running"),
    ("StepStarted", "book_courier", "running"),
    ("StepCompleted", "book_courier", "running"),
    ("StepStarted", "charge_card", "running"),
    ("StepCompleted", "charge_card", "running"),
    ("SagaCompleted", None, "completed"),
]
DECLINED = [
    *HAPPY[:6],
    ("StepFailed", "charge_card", "compensating"),
    ("CompensationStarted", "book_courier", "compensating"),
    ("CompensationRan", "book_courier", "compensating"),
    ("CompensationStarted", "reserve_stock", "compensating"),
    ("CompensationRan", "reserve_stock", "compensating"),
    ("SagaCompensated", None, "compensated"),
]


@dataclass(frozen=True)
class Frame:
    """One server-sent event, as an `EventSource` would dispatch it."""

    id: str | None
    event: str
    data: dict[str, Any]


def parse_sse(text: str) -> list[Frame]:
    """Frames per the SSE format: `field: value` lines, a blank line ending each event."""
    assert text.endswith("\n\n"), "the stream must end with a complete event"
    frames = []
    for block in text.split("\n\n")[:-1]:
        fields: dict[str, list[str]] = {}
        for line in block.split("\n"):
            name, _, value = line.partition(":")
            fields.setdefault(name, []).append(value.removeprefix(" "))
        assert set(fields) <= {"id", "event", "data"}, block
        frames.append(
            Frame(
                id=fields.get("id", [None])[-1],
                event=fields["event"][-1],
                data=json.loads("\n".join(fields["data"])),
            )
        )
    return frames


def outline(frames: list[Frame]) -> list[tuple[str, str | None, str]]:
    return [(f.event, f.data["step"], f.data["status"]) for f in frames]


def client(api: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://shop")


def serve(
    saga_app: SagaApplication,
    scenario: Callable[[httpx.AsyncClient], Awaitable[Any]],
    **options: Any,
) -> Any:
    """Run `scenario` against the example service over `saga_app`, on a fresh event loop."""

    async def main() -> Any:
        async with client(example.create_app(saga_app, **options)) as http:
            return await scenario(http)

    return asyncio.run(main())


async def place(http: httpx.AsyncClient, order_id: str, **body: Any) -> list[Frame]:
    response = await http.post(f"/orders/{order_id}/saga", json={"item": "teapot", **body})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    return parse_sse(response.text)


# -- the stream ---------------------------------------------------------------------------------


def test_an_order_streams_its_saga_to_completion(app: SagaApplication) -> None:
    frames = serve(app, lambda http: place(http, "A-1001", quantity=2))

    assert outline(frames) == HAPPY
    saga_id = str(SagaApplication.saga_id("order", "A-1001"))
    assert {f.data["saga_id"] for f in frames} == {saga_id}
    assert [f.id for f in frames] == [str(v) for v in range(1, 9)]
    assert [f.data["version"] for f in frames] == list(range(1, 9))
    assert [f.data["changes"] for f in frames if f.event == "StepCompleted"] == [
        {"reservation": "RSV-A-1001"},
        {"courier": "CR-A-1001"},
        {"payment": "PAY-A-1001"},
    ]
    saga = app.get(saga_id)
    assert saga.status == "completed"
    assert saga.context["quantity"] == 2


def test_a_declined_payment_is_compensated_in_reverse(app: SagaApplication) -> None:
    frames = serve(app, lambda http: place(http, "B-7", payment_token=example.DECLINED_TOKEN))

    assert outline(frames) == DECLINED
    failed = frames[6]
    assert failed.data["error"] == {
        "type": "PaymentDeclined",
        "message": "card declined for order B-7",
    }
    assert [f.data["changes"] for f in frames if f.event == "CompensationRan"] == [
        {"courier": None},
        {"reservation": None},
    ]
    assert frames[-1].data["status"] == "compensated"


def test_a_retried_order_starts_nothing_new(app: SagaApplication) -> None:
    async def twice(http: httpx.AsyncClient) -> tuple[list[Frame], int, list[Frame]]:
        first = await place(http, "C-3")
        recorded = len(app.history(first[0].data["saga_id"]))
        # A retry replays the first run, even if its body differs: the first order stands.
        again = await place(http, "C-3", payment_token=example.DECLINED_TOKEN)
        return first, recorded, again

    first, recorded, again = serve(app, twice)

    assert again == first
    assert outline(again) == HAPPY
    saga_id = first[0].data["saga_id"]
    assert len(app.history(saga_id)) == recorded == len(HAPPY)
    assert [str(row.saga_id) for row in app.statuses(key="C-3")] == [saga_id]
    assert len(app.statuses()) == 1


def test_a_retry_while_the_saga_runs_follows_it_to_the_end(app: SagaApplication) -> None:
    async def scenario() -> tuple[list[Frame], list[Frame]]:
        entered, gate = asyncio.Event(), asyncio.Event()

        async def confirm(order: dict[str, Any], key: str) -> None:
            entered.set()
            await gate.wait()  # the supplier is slow to answer
            order["confirmed"] = True

        slow = SagaDefinition(
            "order",
            [
                Step("reserve_stock", example.reserve_stock, example.release_stock),
                Step("confirm", confirm),
            ],
        )
        api = example.create_app(app, slow, poll_interval=0.01)
        async with client(api) as http:
            first = asyncio.create_task(place(http, "D-9"))
            await asyncio.wait_for(entered.wait(), 5)
            asyncio.get_running_loop().call_later(0.05, gate.set)
            again = await asyncio.wait_for(place(http, "D-9"), 5)  # the client retried
            return await first, again

    first, again = asyncio.run(scenario())

    expected = [*HAPPY[:3], ("StepStarted", "confirm", "running")]
    expected += [("StepCompleted", "confirm", "running"), ("SagaCompleted", None, "completed")]
    assert outline(first) == expected
    assert again == first  # the events so far, then the rest as they were recorded, once each


def test_a_client_hanging_up_does_not_stop_the_saga(app: SagaApplication) -> None:
    """Events arrive while the saga runs; after the client hangs up, the saga still finishes.

    Shutting the service down waits for it.
    """

    async def scenario() -> tuple[bytes, str]:
        gate, hung_up = asyncio.Event(), asyncio.Event()

        async def confirm(order: dict[str, Any], key: str) -> None:
            await gate.wait()
            order["confirmed"] = True

        slow = SagaDefinition("order", [Step("confirm", confirm)])
        api = example.create_app(app, slow)
        body = json.dumps({"item": "teapot"}).encode()
        requests = [{"type": "http.request", "body": body, "more_body": False}]
        received = b""

        async def receive() -> dict[str, Any]:
            if requests:
                return requests.pop()
            await hung_up.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal received
            received += message.get("body", b"")
            if b"event: StepStarted" in received:
                hung_up.set()  # the client has seen the step start, and closes the tab

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/orders/E-5/saga",
            "raw_path": b"/orders/E-5/saga",
            "root_path": "",
            "query_string": b"",
            "headers": [(b"content-type", b"application/json"), (b"host", b"shop")],
            "client": ("127.0.0.1", 50000),
            "server": ("shop", 80),
        }
        async with api.router.lifespan_context(api):
            await asyncio.wait_for(api(scope, receive, send), 5)
            status_when_hung_up = app.get(SagaApplication.saga_id("order", "E-5")).status
            asyncio.get_running_loop().call_later(0.05, gate.set)
        # Shutting down waited for the saga in hand.
        return received, status_when_hung_up

    received, status_when_hung_up = asyncio.run(scenario())

    assert [f.event for f in parse_sse(received.decode())] == ["SagaStarted", "StepStarted"]
    assert status_when_hung_up == "running"
    saga = app.get(SagaApplication.saga_id("order", "E-5"))
    assert saga.status == "completed"
    assert saga.context["confirmed"] is True


def test_a_store_failure_ends_the_stream_with_an_error_event(
    app: SagaApplication, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def unavailable(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        raise ConnectionError("the store is unreachable")
        yield  # an async generator, as `stream` is

    monkeypatch.setattr(app, "stream", unavailable)
    frames = serve(app, lambda http: place(http, "H-4"))

    assert frames == [
        Frame(None, "error", {"type": "ConnectionError", "message": "the store is unreachable"})
    ]


# -- reading sagas back ---------------------------------------------------------------------


def test_status_and_history_read_back(app: SagaApplication) -> None:
    async def scenario(http: httpx.AsyncClient) -> tuple[list[Frame], Any, Any]:
        frames = await place(http, "F-2", payment_token=example.DECLINED_TOKEN)
        saga_id = frames[0].data["saga_id"]
        status = await http.get(f"/sagas/{saga_id}")
        history = await http.get(f"/sagas/{saga_id}/history")
        assert status.status_code == history.status_code == 200
        return frames, status.json(), history.json()

    frames, status, history = serve(app, scenario)

    saga_id = frames[0].data["saga_id"]
    assert status == {
        "saga_id": saga_id,
        "name": "order",
        "key": "F-2",
        "status": "compensated",
        "version": len(DECLINED),
        "context": {
            "order_id": "F-2",
            "item": "teapot",
            "quantity": 1,
            "payment_token": example.DECLINED_TOKEN,
            "reservation": None,
            "courier": None,
        },
        "error": {
            "step": "charge_card",
            "type": "PaymentDeclined",
            "message": "card declined for order F-2",
        },
        "compensated": ["book_courier", "reserve_stock"],
    }
    assert [(r["event"], r["step"], r["status"]) for r in history] == DECLINED
    assert [r["version"] for r in history] == [f.data["version"] for f in frames]
    assert history == [record.to_dict() for record in app.history(saga_id)]


def test_an_unknown_saga_is_404(app: SagaApplication) -> None:
    async def scenario(http: httpx.AsyncClient) -> list[tuple[int, Any]]:
        unknown = uuid4()
        responses = [
            await http.get(f"/sagas/{unknown}"),
            await http.get(f"/sagas/{unknown}/history"),
            await http.get("/sagas/not-a-uuid"),
        ]
        return [(r.status_code, r.json()) for r in responses]

    (status, body), (history, _), (malformed, _) = serve(app, scenario)

    assert (status, history, malformed) == (404, 404, 422)
    assert "detail" in body


def test_an_invalid_order_starts_no_saga(app: SagaApplication) -> None:
    async def scenario(http: httpx.AsyncClient) -> list[int]:
        responses = [
            await http.post("/orders/G-1/saga", json={"item": "teapot", "quantity": 0}),
            await http.post("/orders/G-1/saga", json={"quantity": 1}),
        ]
        return [r.status_code for r in responses]

    assert serve(app, scenario) == [422, 422]
    assert app.statuses() == []


# -- the documentation shows this code ---------------------------------------------------------


def test_the_docs_page_shows_the_example_verbatim() -> None:
    page = (ROOT / "docs" / "examples.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```$", page, re.MULTILINE | re.DOTALL)
    assert APP_PY.read_text() in blocks, "docs/examples.md must show examples/fastapi_sse/app.py"
