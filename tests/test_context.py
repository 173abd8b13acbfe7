"""The context: dict, dataclass or pydantic model; what each step changed; bad values refused."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from enum import Enum, IntEnum, StrEnum
from typing import Any, cast
from uuid import UUID, uuid4

import pytest
from eventsourcing.persistence import JSONTranscoder, Transcoding
from pydantic import BaseModel, ConfigDict

from saga_es import (
    ContextError,
    SagaApplication,
    SagaDefinition,
    SagaError,
    SagaNotFound,
    Step,
    StepCompleted,
    StepFailed,
)

Env = dict[str, str]
DURABLE_STORES = ("sqlite", "postgres")
AT = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
ORDER_ID = UUID("12345678-1234-5678-1234-567812345678")


@dataclass
class Order:
    sku: str
    qty: int
    at: datetime = AT
    order_id: UUID = ORDER_ID
    price: Decimal = Decimal("9.99")
    tags: list[str] = field(default_factory=list)
    reserved: bool = False


class Trip(BaseModel):
    customer: str
    qty: int
    at: datetime = AT
    tags: list[str] = []
    reserved: bool = False


@dataclass
class Holder:
    thing: Any


class Loose(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)
    name: str = "x"
    thing: Any = None


def get(context: Any, name: str) -> Any:
    return context[name] if isinstance(context, dict) else getattr(context, name)


def put(context: Any, name: str, value: Any) -> None:
    if isinstance(context, dict):
        context[name] = value
    else:
        setattr(context, name, value)


CONTEXTS: dict[str, Callable[[], Any]] = {
    "dict": lambda: {"sku": "X1", "qty": 1, "at": AT, "tags": [], "reserved": False},
    "dataclass": lambda: Order(sku="X1", qty=1),
    "pydantic": lambda: Trip(customer="ada", qty=1),
}


def reserve(context: Any, key: str) -> None:
    put(context, "reserved", True)
    get(context, "tags").append("reserved")  # in place: must still be seen as a change


def double(context: Any, key: str) -> None:
    put(context, "qty", get(context, "qty") * 2)


@pytest.mark.parametrize("kind", CONTEXTS)
def test_contexts_round_trip_through_the_store(
    kind: str, app: SagaApplication, reader: SagaApplication
) -> None:
    original = CONTEXTS[kind]()
    definition = SagaDefinition("order", [Step("reserve", reserve), Step("double", double)])
    saga = app.run(definition, original)
    assert saga.status == "completed"
    expected = CONTEXTS[kind]()
    put(expected, "reserved", True)
    put(expected, "tags", ["reserved"])
    put(expected, "qty", 2)
    for source in (saga, app.get(saga.id), reader.get(saga.id)):
        assert type(source.context) is type(original)
        assert source.context == expected
    assert original == CONTEXTS[kind]()  # the caller's object is never changed
    first = app.get(saga.id, version=1).context
    assert type(first) is type(original)
    assert first == CONTEXTS[kind]()


def test_a_step_records_what_it_changed_and_removed(app: SagaApplication) -> None:
    def edit(context: dict[str, Any], key: str) -> None:
        context["added"] = 1
        context["changed"] = "new"
        context["nested"]["list"].append(3)
        del context["gone"]

    def nothing(context: dict[str, Any], key: str) -> None:
        pass

    context = {"kept": True, "changed": "old", "gone": 0, "nested": {"list": [1, 2]}}
    definition = SagaDefinition("edit", [Step("edit", edit), Step("nothing", nothing)])
    saga = app.run(definition, context)
    completed = [e for e in app.saga_events(saga.id) if isinstance(e, StepCompleted)]
    assert [e.step for e in completed] == ["edit", "nothing"]
    assert completed[0].changes == {"added": 1, "changed": "new", "nested": {"list": [1, 2, 3]}}
    assert completed[0].removed == ["gone"]
    assert completed[1].changes == {}
    assert completed[1].removed == []
    assert app.get(saga.id).context == {
        "kept": True,
        "changed": "new",
        "added": 1,
        "nested": {"list": [1, 2, 3]},
    }


@pytest.mark.parametrize("kind", CONTEXTS)
def test_a_dataclass_or_model_step_records_only_the_fields_it_changed(
    kind: str, app: SagaApplication
) -> None:
    saga = app.run(SagaDefinition("order", [Step("double", double)]), CONTEXTS[kind]())
    (completed,) = [e for e in app.saga_events(saga.id) if isinstance(e, StepCompleted)]
    assert completed.changes == {"qty": 2}
    assert completed.removed == []


def test_the_context_at_each_version_is_the_context_as_of_that_event(
    app: SagaApplication,
) -> None:
    def add(name: str) -> Callable[[dict[str, Any], str], None]:
        def action(context: dict[str, Any], key: str) -> None:
            context[name] = len(context)

        return action

    def undo_b(context: dict[str, Any], key: str) -> None:
        context["b"] = "undone"

    def fail(context: dict[str, Any], key: str) -> None:
        context["c"] = "never recorded"
        raise RuntimeError("no")

    definition = SagaDefinition(
        "versions",
        [Step("a", add("a")), Step("b", add("b"), compensation=undo_b), Step("c", fail)],
    )
    saga = app.run(definition, {"start": 0})
    assert saga.status == "compensated"
    after_a = {"start": 0, "a": 1}
    after_b = {**after_a, "b": 2}
    undone = {**after_a, "b": "undone"}
    expected = [
        ("SagaStarted", {"start": 0}),
        ("StepStarted", {"start": 0}),
        ("StepCompleted", after_a),
        ("StepStarted", after_a),
        ("StepCompleted", after_b),
        ("StepStarted", after_b),
        ("StepFailed", after_b),  # the failed step's changes are not kept
        ("CompensationStarted", after_b),
        ("CompensationRan", undone),
        ("SagaCompensated", undone),
    ]
    history = app.saga_events(saga.id)
    assert [type(e).__name__ for e in history] == [name for name, _ in expected]
    for version, (_, context) in enumerate(expected, start=1):
        assert app.get(saga.id, version=version).context == context, version
    assert app.get(saga.id).context == undone


UNSERIALISABLE: dict[str, Callable[[], Any]] = {
    "dict": lambda: {"ok": 1, "when": object()},
    "dict-nested": lambda: {"ok": 1, "when": {"inner": [object()]}},
    "dataclass": lambda: Holder(thing=object()),
    "pydantic": lambda: Loose(thing=object()),
}
FIELD = {"dict": "when", "dict-nested": "when", "dataclass": "thing", "pydantic": "thing"}


@pytest.mark.parametrize("kind", UNSERIALISABLE)
def test_an_unserialisable_context_is_refused_at_start_naming_the_field(
    kind: str, app: SagaApplication
) -> None:
    calls: list[str] = []
    definition = SagaDefinition("bad", [Step("a", lambda c, k: calls.append(k))])
    with pytest.raises(ContextError) as caught:
        app.run(definition, UNSERIALISABLE[kind](), key="k1")
    error = caught.value
    assert error.field == FIELD[kind]
    assert repr(FIELD[kind]) in str(error)
    assert isinstance(error, SagaError)
    assert isinstance(error, TypeError)
    assert calls == []
    assert list(app.all_sagas()) == []
    with pytest.raises(SagaNotFound):
        app.get(SagaApplication.saga_id("bad", "k1"))


def test_arun_and_stream_refuse_an_unserialisable_context_too(app: SagaApplication) -> None:
    definition = SagaDefinition("bad", [Step("a", lambda c, k: None)])

    async def stream() -> None:
        async for _ in app.stream(definition, {"when": object()}):
            raise AssertionError("nothing may be yielded")

    with pytest.raises(ContextError, match="'when'"):
        asyncio.run(app.arun(definition, {"when": object()}))
    with pytest.raises(ContextError, match="'when'"):
        asyncio.run(stream())
    assert list(app.all_sagas()) == []


@pytest.mark.parametrize("context", [[1, 2], 42, "text", None])
def test_a_context_must_be_a_dict_dataclass_or_model(context: Any, app: SagaApplication) -> None:
    definition = SagaDefinition("bad", [Step("a", lambda c, k: None)])
    with pytest.raises(ContextError, match="dict, a dataclass or a pydantic model"):
        app.run(definition, context)
    assert list(app.all_sagas()) == []


def test_a_context_whose_type_cannot_be_found_again_is_refused(app: SagaApplication) -> None:
    @dataclass
    class Local:
        n: int

    definition = SagaDefinition("bad", [Step("a", lambda c, k: None)])
    with pytest.raises(ContextError, match="cannot be found again"):
        app.run(definition, Local(1))
    assert list(app.all_sagas()) == []


@pytest.mark.parametrize(
    ("kind", "field_name"),
    [("dict", "bad"), ("pydantic", "thing"), ("result", "(result)")],
)
def test_a_step_that_makes_the_context_unserialisable_fails_cleanly(
    kind: str, field_name: str, app: SagaApplication, reader: SagaApplication
) -> None:
    undone: list[str] = []

    def spoil(context: Any, key: str) -> Any:
        if kind == "dict":
            context["bad"] = object()
        elif kind == "pydantic":
            context.thing = object()
        else:
            return object()
        return None

    definition = SagaDefinition(
        "spoil",
        [
            Step("first", lambda c, k: None, compensation=lambda c, k: undone.append("first")),
            Step("spoil", spoil),
        ],
    )
    context = {"ok": 1} if kind != "pydantic" else Loose()
    saga = app.run(definition, context)
    assert saga.status == "compensated"
    assert undone == ["first"]
    failed = [e for e in reader.saga_events(saga.id) if isinstance(e, StepFailed)]
    assert [(e.step, e.error_type) for e in failed] == [("spoil", "ContextError")]
    assert repr(field_name) in failed[0].error_message
    stored = reader.get(saga.id)
    assert stored.status == "compensated"
    assert stored.context == context
    assert stored.error is not None
    assert stored.error["type"] == "ContextError"


@pytest.mark.parametrize("value", [float("nan"), "a\x00b", "\udc80"])
def test_a_step_that_puts_a_value_some_store_refuses_fails_cleanly_on_every_store(
    value: Any, app: SagaApplication, reader: SagaApplication
) -> None:
    """Not left `running` by a store's error at save: the attempt fails, the saga compensates."""

    def spoil(context: Any, key: str) -> None:
        context["bad"] = value

    definition = SagaDefinition("spoil", [Step("first", lambda c, k: None), Step("spoil", spoil)])
    saga = app.run(definition, {"ok": 1})
    assert saga.status == "compensated"
    stored = reader.get(saga.id)
    assert stored.status == "compensated"
    assert stored.error is not None
    assert stored.error["type"] == "ContextError"
    assert "'bad'" in stored.error["message"]


@pytest.mark.parametrize("store", DURABLE_STORES)
def test_a_later_application_rebuilds_each_context_type(
    app: SagaApplication, env: Env, open_app: Callable[[Env], SagaApplication]
) -> None:
    definition = SagaDefinition("order", [Step("double", double)])
    ids = {kind: app.run(definition, make()).id for kind, make in CONTEXTS.items()}
    later = open_app(env)
    for kind, saga_id in ids.items():
        context = later.get(saga_id).context
        expected = CONTEXTS[kind]()
        put(expected, "qty", 2)
        assert type(context) is type(expected)
        assert context == expected


def test_each_call_gets_its_own_copy_of_the_context(app: SagaApplication) -> None:
    seen: list[Any] = []

    def keep(context: dict[str, Any], key: str) -> None:
        seen.append(context)
        context["items"].append(len(seen))

    definition = SagaDefinition("copies", [Step("one", keep), Step("two", keep)])
    start = {"items": [], "id": str(uuid4())}
    saga = app.run(definition, start)
    assert seen[0] is not seen[1]
    assert seen[0]["items"] is not seen[1]["items"]
    assert start["items"] == []
    assert saga.context["items"] == [1, 2]


# -- the user's own types, with transcodings registered -----------------------------------------


class Speed(Enum):
    STANDARD = "standard"
    EXPRESS = "express"


class Currency(StrEnum):
    EUR = "EUR"
    GBP = "GBP"


class Priority(IntEnum):
    LOW = 1
    HIGH = 2


@dataclass
class Parcel:
    weight: Decimal
    size: tuple[int, int]


@dataclass
class Shipment:
    parcel: Parcel
    due: date
    price: Decimal
    currency: Currency
    speed: Speed
    priority: Priority
    booked: bool = False


def _transcoding(kind: type, name: str, encode: Any, decode: Any) -> Transcoding:
    cls = type(
        f"{name}Transcoding",
        (Transcoding,),
        {
            "type": kind,
            "name": name,
            "encode": lambda self, obj: encode(obj),
            "decode": lambda self, data: decode(data),
        },
    )
    return cast(Transcoding, cls())


class ShippingSagas(SagaApplication):
    name = SagaApplication.name

    def register_transcodings(self, transcoder: JSONTranscoder) -> None:
        super().register_transcodings(transcoder)
        transcoder.register(
            _transcoding(Parcel, "parcel", vars, lambda d: Parcel(d["weight"], tuple(d["size"])))
        )
        transcoder.register(_transcoding(date, "date", date.isoformat, date.fromisoformat))
        for enum in (Speed, Currency, Priority):
            transcoder.register(_transcoding(enum, enum.__name__, lambda e: e.value, enum))


def book(shipment: Shipment, key: str) -> None:
    shipment.booked = True
    shipment.currency = Currency.GBP
    shipment.priority = Priority.HIGH


def test_registered_transcodings_bring_each_type_back_str_and_int_enums_too(
    env: Env, store: str
) -> None:
    first = ShippingSagas(env=env)
    shipment = Shipment(
        Parcel(Decimal("1.5"), (30, 20)),
        date(2025, 6, 5),
        Decimal("4.90"),
        Currency.EUR,
        Speed.EXPRESS,
        Priority.LOW,
    )
    saga = first.run(SagaDefinition("ship", [Step("book", book)]), shipment)
    later = first if store == "popo" else ShippingSagas(env=env)
    try:
        stored = later.get(saga.id)
        assert stored.context == Shipment(
            Parcel(Decimal("1.5"), (30, 20)),
            date(2025, 6, 5),
            Decimal("4.90"),
            Currency.GBP,
            Speed.EXPRESS,
            Priority.HIGH,
            booked=True,
        )
        assert type(stored.context.currency) is Currency
        assert type(stored.context.priority) is Priority
        assert type(stored.context.parcel.size) is tuple
        assert type(later.get(saga.id, version=1).context.priority) is Priority, "as started"

        # A plain SagaApplication knows none of them: refused at start, nothing stored.
        plain = SagaApplication(env=env)
        with pytest.raises(ContextError, match="'parcel' holds a value of type Parcel") as raised:
            plain.submit(SagaDefinition("ship", [Step("book", book)]), shipment, key="other")
        assert raised.value.field == "parcel"
        assert plain.sagas(key="other") == []
        plain.close()
    finally:
        for app in {first, later}:
            app.close()


def test_a_cycle_is_refused_with_the_transcodings_of_json_native_types_registered(
    env: Env,
) -> None:
    app = ShippingSagas(env=env)  # registers str and int enums: the transcoder walks them first
    try:
        order: dict[str, Any] = {"priority": Priority.LOW}
        order["again"] = order
        with pytest.raises(ContextError, match=r"'again' .*Circular reference detected"):
            app.submit(SagaDefinition("ship", [Step("book", book)]), order, key="cycle")
        assert app.sagas(key="cycle") == []
    finally:
        app.close()
