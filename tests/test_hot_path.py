"""The hot path's shortcuts give exactly what the general paths they skip would give."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from enum import Enum, IntEnum, StrEnum
from typing import Any
from uuid import UUID, uuid4

import pytest
from eventsourcing.persistence import (
    DatetimeAsISO,
    DecimalAsStr,
    IntegrityError,
    JSONTranscoder,
    StoredEvent,
    TranscodingNotRegisteredError,
    UUIDAsHex,
)
from test_context import _transcoding

from saga_es import Parallel, Retry, Saga, SagaApplication, SagaDefinition, Step, machine
from saga_es.aggregate import _layout
from saga_es.context import SagaTranscoder
from saga_es.popo import POPOSagaRecorder
from saga_es.status import SagaStatus

AT = datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=UTC)


class Speed(Enum):
    STANDARD = "standard"
    EXPRESS = "express"


class Currency(StrEnum):
    EUR = "EUR"


class Priority(IntEnum):
    HIGH = 2


def _register(transcoder: JSONTranscoder) -> None:
    for builtin in (UUIDAsHex(), DecimalAsStr(), DatetimeAsISO()):
        transcoder.register(builtin)
    transcoder.register(_transcoding(date, "date", date.isoformat, date.fromisoformat))
    transcoder.register(_transcoding(tuple, "tuple", list, tuple))
    for enum in (Speed, Currency, Priority):
        transcoder.register(_transcoding(enum, enum.__name__, lambda e: e.value, enum))


VALUES: list[Any] = [
    None,
    True,
    0,
    -(2**70),
    1.5,
    1e300,
    -0.0,
    "",
    'quote " backslash \\ tab \t nul \x00 é ü 中 \u2028 \U0001f600',
    [],
    {},
    AT,
    AT.replace(tzinfo=None),
    UUID("12345678-1234-5678-1234-567812345678"),
    Decimal("9.990"),
    date(2025, 6, 5),
    (1, "two", (3.0,)),
    Speed.EXPRESS,
    Currency.EUR,
    Priority.HIGH,
    {"nested": {"deeper": {"at": AT, "ids": [uuid4(), uuid4()], "amount": Decimal("-1E+3")}}},
    {"tuple": (AT, {"k": Currency.EUR}), "list": [None, 1, [2, [3, {"x": Priority.HIGH}]]]},
    {"to_state": "running", "step": "s", "attempt": 1, "fallback": False, "child_saga_id": None},
]


def _transcoders() -> tuple[SagaTranscoder, SagaTranscoder]:
    fast, general = SagaTranscoder(), SagaTranscoder()
    general._encode_fast = None  # what every encode did before the one-shot encoder
    for transcoder in (fast, general):
        _register(transcoder)
    return fast, general


@pytest.mark.parametrize("value", VALUES, ids=range(len(VALUES)))
def test_the_one_shot_encoder_writes_the_bytes_of_the_general_path(value: Any) -> None:
    fast, general = _transcoders()
    encoded = fast.encode(value)
    assert encoded == general.encode(value)
    assert fast.decode(encoded) == general.decode(encoded)


def test_the_one_shot_encoder_is_eventsourcings_without_native_transcodings() -> None:
    plain, saga = JSONTranscoder(), SagaTranscoder()
    for transcoder in (plain, saga):
        for builtin in (UUIDAsHex(), DecimalAsStr(), DatetimeAsISO()):
            transcoder.register(builtin)
    for value in VALUES:
        if isinstance(value, date | tuple | Enum) or (isinstance(value, dict) and value):
            continue  # a type only SagaTranscoder's registrations know
        assert saga.encode(value) == plain.encode(value)
    state = {"timestamp": AT, "id": uuid4(), "big": 10**30, "tiny": -5e-324}
    assert saga.encode(state) == plain.encode(state)
    plain.encoder.allow_nan = False  # SagaTranscoder refuses what no store would take
    for value in (math.nan, math.inf, -math.inf):
        for transcoder in (plain, saga):
            with pytest.raises(ValueError, match="Out of range float values"):
                transcoder.encode({"at": AT, "x": value})


def test_the_one_shot_encoder_fails_as_the_general_path_does() -> None:
    fast, general = SagaTranscoder(), JSONTranscoder()  # no native transcodings: they recurse
    cycle: dict[str, Any] = {}
    cycle["self"] = [cycle]
    for transcoder in (fast, general):
        with pytest.raises(ValueError, match="Circular reference detected"):
            transcoder.encode(cycle)
        with pytest.raises(TranscodingNotRegisteredError, match="is not serializable"):
            transcoder.encode({"x": object()})
    assert fast.encode({"after": "errors"}) == general.encode({"after": "errors"})


# -- events built by `_move`, and what eventsourcing's __init__ would build -----------------


class Recording(SagaApplication):
    """Keeps every event as `_move` built it, before it is stored."""

    name = SagaApplication.name

    def __init__(self, **kwargs: Any) -> None:
        self.built: list[Saga.Event] = []
        super().__init__(**kwargs)

    def register_transcodings(self, transcoder: JSONTranscoder) -> None:
        super().register_transcodings(transcoder)
        transcoder.register(_transcoding(date, "date", date.isoformat, date.fromisoformat))
        for enum in (Speed, Currency, Priority):
            transcoder.register(_transcoding(enum, enum.__name__, lambda e: e.value, enum))

    def _write(self, batch: Sequence[tuple[Saga, Sequence[Saga.Event]]]) -> None:
        self.built += [event for _, events in batch for event in events]
        super()._write(batch)


def _change(context: dict[str, Any], key: str) -> dict[str, Any]:
    step = key.rsplit(":", 1)[1]
    context[step] = {
        "at": AT + timedelta(days=len(context)),
        "id": UUID(int=len(context)),
        "price": Decimal("4.90"),
        "due": date(2025, 6, 5),
        "speed": Speed.EXPRESS,
        "currency": Currency.EUR,
        "priority": Priority.HIGH,
        "nested": {"list": [1, 2.5, None, "é"]},
    }
    context.pop("drop", None)
    return {"done": step, "at": AT}


def _fail(context: dict[str, Any], key: str) -> None:
    raise RuntimeError(f"{key} failed")


_flaky_calls: dict[str, int] = {}


def _flaky(context: dict[str, Any], key: str) -> None:
    _flaky_calls[key] = _flaky_calls.get(key, 0) + 1
    if _flaky_calls[key] == 1:
        raise ValueError("first try fails")


CHILD = SagaDefinition("child", [Step("c1", _change, compensation=_change)])
STORIES = [
    SagaDefinition("ok", [Step("a", _change, compensation=_change), Step("b", _change)]),
    SagaDefinition(
        "retry-then-fail",
        [
            Step("a", _change, compensation=_change),
            Step("b", _flaky, retry=Retry(attempts=2, delay=0)),
            Step("c", _fail, fallback=_change, fallback_compensation=_change),
            Step("d", _fail, compensate_on_failure=True, compensation=_change),
        ],
    ),
    SagaDefinition("stuck", [Step("a", _change, compensation=_fail), Step("b", _fail)]),
    SagaDefinition(
        "parallel",
        [Parallel(Step("p", _change, compensation=_change), Step("q", _fail)), Step("r", _change)],
    ),
    SagaDefinition("nested", [Step.saga("child", CHILD), Step("after", _fail)]),
]


def test_events_built_by_move_are_those_eventsourcings_init_builds() -> None:
    with Recording(env={"PERSISTENCE_MODULE": "eventsourcing.popo"}) as app:
        for definition in STORIES:
            saga = app.run(definition, {"drop": 1, "start": AT})
            if saga.status == "stuck":
                app.resolve(saga.id, "mark-compensated", by="ops", reason="undone by hand")
        pending = app.submit(STORIES[0], {"n": 1})
        app.cancel(pending, by="ops", reason="not wanted")
        kinds = {type(event).__name__ for event in app.built}
        assert kinds >= {
            "StepStarted",
            "StepCompleted",
            "StepFailed",
            "CompensationStarted",
            "CompensationRan",
            "CompensationFailed",
            "SagaStuck",
            "SagaResolved",
            "SagaCompensated",
            "SagaCompleted",
            "SagaReverted",
            "CancelRequested",
            "SagaCancelled",
        }
        mapper = app.mapper
        for event in app.built:
            assert _layout(type(event)) is not None, type(event).__name__  # built by `_build`
            by_init = type(event)(**vars(event))
            assert list(vars(by_init).items()) == list(vars(event).items())
            stored = mapper.to_stored_event(event)
            assert stored == mapper.to_stored_event(by_init)
            assert mapper.to_domain_event(stored) == event


def test_a_started_saga_is_the_one_create_makes() -> None:
    payload: dict[str, Any] = {
        "name": "s",
        "definition_version": 2,
        "steps": ["a", "b"],
        "compensable": ["a"],
        "key": "k",
        "context_type": "builtins:dict",
        "context": {"at": AT, "n": 1},
        "parallel": [["a", "b"]],
        "fallback_compensable": [],
        "deadline": AT,
        "parent_saga_id": None,
        "parent_step": None,
        "children": {"b": "child"},
    }
    saga_id = uuid4()
    saga = Saga.start(id=saga_id, **payload)
    (event,) = saga.pending_events
    created = Saga._create(
        Saga.SagaStarted, id=saga_id, to_state="pending", timestamp=event.timestamp, **payload
    )
    assert vars(saga) == vars(created)
    assert list(vars(event).items()) == list(vars(created.pending_events[0]).items())


def test_move_keeps_the_saga_s_own_id_and_version() -> None:
    with SagaApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"}) as app:
        saga = app._start(STORIES[0], {}, None)
        fields = {"step": "a", "attempt": 1, "changes": {}, "removed": [], "result": None}
        saga._move(Saga.StepCompleted, originator_id=uuid4(), originator_version=9, **fields)
        event = saga.pending_events[-1]
        assert (event.originator_id, event.originator_version) == (saga.id, saga.version)
        assert saga.version == 3


def test_move_fills_in_defaults_as_init_does() -> None:
    with SagaApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"}) as app:
        saga = app._start(STORIES[0], {}, None, begin=False)
        saga._move(Saga.StepStarted, step="a", attempt=1)  # no fallback, no child_saga_id
        event = saga.pending_events[-1]
        by_init = Saga.StepStarted(**{k: v for k, v in vars(event).items() if k in _GIVEN})
        assert list(vars(by_init).items()) == list(vars(event).items())
        assert app.mapper.to_stored_event(event) == app.mapper.to_stored_event(by_init)


_GIVEN = {"originator_id", "originator_version", "timestamp", "to_state", "step", "attempt"}


_DONE: dict[str, Any] = {"step": "a", "attempt": 1, "changes": {}, "removed": []}


def test_move_refuses_what_init_refuses_and_appends_nothing() -> None:
    with SagaApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"}) as app:
        saga = app._start(STORIES[0], {}, None)
        before = (saga.version, len(saga.pending_events))
        with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
            saga._move(Saga.StepCompleted, step="a", attempt=1, bogus=1)
        with pytest.raises(TypeError, match="missing 1 required positional argument: 'result'"):
            saga._move(Saga.StepCompleted, **_DONE)
        with pytest.raises(TypeError, match="multiple values for keyword argument 'to_state'"):
            saga._move(Saga.StepCompleted, to_state="x", **{**_DONE, "result": None})
        assert (saga.version, len(saga.pending_events)) == before


def test_the_machine_check_uses_its_table() -> None:
    assert machine._MOVES, "check() lost its table: the fast path is off"
    assert set(machine._MOVES) == {
        (trigger, source)
        for trigger, event in machine.MACHINE.events.items()
        for source in event.transitions
    }


# -- the save: status rows and the POPO recorder -------------------------------------------


def test_a_status_row_is_the_one_init_builds() -> None:
    with SagaApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"}) as app:
        saga = app.run(STORIES[0], {})
        row = SagaStatus.of(saga)
        by_init = SagaStatus(
            saga_id=saga.id,
            name=saga.name,
            definition_version=saga.definition_version,
            key=saga.key,
            status=saga.status,
            step=saga.step,
            version=saga.version,
            started_at=saga.created_on,
            updated_at=saga.modified_on,
        )
        assert row == by_init
        assert hash(row) == hash(by_init)
        assert list(vars(row).items()) == list(vars(by_init).items())


def _stored(originator: Any, version: int) -> StoredEvent:
    return StoredEvent(originator, version, "tests:E", b"{}")


def test_the_popo_recorder_refuses_a_conflict_and_writes_nothing() -> None:
    recorder = POPOSagaRecorder()
    a, b = uuid4(), uuid4()
    assert recorder.insert_events([_stored(a, 1), _stored(a, 2)]) == [1, 2]
    with pytest.raises(IntegrityError, match="already recorded"):
        recorder.insert_events([_stored(a, 3), _stored(a, 2)])
    with pytest.raises(IntegrityError, match="not unique"):
        recorder.insert_events([_stored(a, 3), _stored(a, 3)])
    with pytest.raises(IntegrityError, match="already recorded"):  # two sagas: the general path
        recorder.insert_events([_stored(b, 1), _stored(a, 1)])
    with pytest.raises(IntegrityError, match="already recorded"):  # equal id, another object
        recorder.insert_events([_stored(UUID(str(a)), 2)])
    assert recorder.insert_events([_stored(b, 1), _stored(a, 3)]) == [3, 4]
    assert recorder.insert_events([_stored(UUID(str(a)), 4)]) == [5]
    assert [s.originator_version for s in recorder.select_events(a)] == [1, 2, 3, 4]
    assert [s.originator_version for s in recorder.select_events(b)] == [1]
    assert [n.id for n in recorder.select_notifications(1, limit=10)] == [1, 2, 3, 4, 5]
