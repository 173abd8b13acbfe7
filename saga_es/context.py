"""The saga's context as stored data: a flat mapping of field name to value.

A context may be a dict, a dataclass or a pydantic model. Events store only its
state (a dict) and its type's topic, so replay never runs user code and the
context at any version can be rebuilt from the stream.
"""

from __future__ import annotations

import copy
import dataclasses
import json.encoder
from collections.abc import Callable, Mapping
from typing import Any

from eventsourcing.persistence import JSONTranscoder, Transcoding
from eventsourcing.utils import TopicError, get_topic, resolve_topic

from saga_es.errors import ContextError

DICT_TOPIC = "builtins:dict"

_JSON_NATIVE = (str, int, float, list, tuple, dict)
"""What `json` encodes by itself, subclasses too, without asking the transcoder."""


class SagaTranscoder(JSONTranscoder):
    """eventsourcing's `JSONTranscoder`, that also applies transcodings of JSON's own types.

    `json` encodes a `str` or `int` enum (`StrEnum`, `IntEnum`, `class C(str, Enum)`) or a
    tuple by itself, so a transcoding registered for such a type is never asked, and the
    value would come back as a plain `str`, `int` or list. This transcoder applies the
    registered transcoding first. Until one is registered for such a type, it encodes
    exactly as `JSONTranscoder` does, at the same cost, except that it refuses NaN and
    Infinity (`ValueError`): they are not JSON, and PostgreSQL and SQLite refuse them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.encoder.allow_nan = False
        self._natives: set[type] = set()
        self._encoder_seen = self.encoder
        self._encode_fast = _one_shot_encoder(self.encoder)

    def register(self, transcoding: Transcoding) -> None:
        """Register `transcoding`; remember its type if `json` would take it natively."""
        super().register(transcoding)
        if issubclass(transcoding.type, _JSON_NATIVE):
            self._natives.add(transcoding.type)

    def encode(self, obj: Any) -> bytes:
        """Encode `obj`, applying the transcodings that `json` alone would skip."""
        if self._natives:
            try:
                obj = self._transcode_natives(obj)
            except RecursionError:  # as `json` says it, not a crash
                raise ValueError("Circular reference detected (or data nested too deep)") from None
        if self._encode_fast is None or self.encoder is not self._encoder_seen:
            return super().encode(obj)
        try:
            return "".join(self._encode_fast(obj, 0)).encode("utf8")
        except RecursionError:  # a cycle, or very deep data: let `json` say which
            return super().encode(obj)

    def _transcode_natives(self, obj: Any) -> Any:
        kind = type(obj)
        if kind in self._natives:
            transcoding = self.types[kind]
            data = self._transcode_natives(transcoding.encode(obj))
            return {"_type_": transcoding.name, "_data_": data}
        if kind is dict:
            return {k: self._transcode_natives(v) for k, v in obj.items()}
        if kind is list or kind is tuple:
            return [self._transcode_natives(v) for v in obj]
        return obj


def _one_shot_encoder(encoder: json.JSONEncoder) -> Callable[[Any, int], list[str]] | None:
    """The C encoder that `encoder.encode` builds on each call, built once: same bytes.

    `JSONEncoder.iterencode` makes a new one per call only to give it a fresh dict of the
    containers being encoded, which turns a cycle into `ValueError`. Without that dict a
    cycle recurses until `RecursionError`, which `encode` then hands to the general path.
    """
    make = getattr(json.encoder, "c_make_encoder", None)  # None without the C accelerator
    if make is None or encoder.indent is not None or encoder.ensure_ascii:
        return None
    return make(
        None,
        encoder.default,
        json.encoder.encode_basestring,
        None,
        encoder.key_separator,
        encoder.item_separator,
        encoder.sort_keys,
        encoder.skipkeys,
        encoder.allow_nan,
    )


State = dict[str, Any]


def topic_of(context: Any) -> str:
    """The topic stored in `SagaStarted`, from which the context type is resolved."""
    if isinstance(context, Mapping):
        return DICT_TOPIC
    cls = type(context)
    if dataclasses.is_dataclass(context) or _is_pydantic(cls):
        if "<locals>" in cls.__qualname__:
            raise TypeError(
                f"{cls.__qualname__} is defined inside a function, so its type cannot be "
                "found again when the saga is read back; define it at module level"
            )
        try:
            return get_topic(cls)
        except TopicError as e:  # another class was registered under the same topic
            raise TypeError(f"its type cannot be found again: {e}") from None
    raise TypeError(
        f"a saga context must be a dict, a dataclass or a pydantic model, not {cls.__name__}"
    )


def to_state(context: Any) -> State:
    """The context's fields as a new dict; values are not copied deeply."""
    if isinstance(context, Mapping):
        return dict(context)
    if _is_pydantic(type(context)):
        try:
            state: State = context.model_dump(mode="json")
        except ValueError as e:  # pydantic_core.PydanticSerializationError
            raise _field_error(context, e) from None
        return state
    if dataclasses.is_dataclass(context) and not isinstance(context, type):
        return {f.name: getattr(context, f.name) for f in dataclasses.fields(context)}
    raise TypeError(
        "a saga context must be a dict, a dataclass or a pydantic model, "
        f"not {type(context).__name__}"
    )


def from_state(topic: str, state: State) -> Any:
    """A new context object holding a private copy of `state`."""
    fresh = copy_state(state)
    if topic == DICT_TOPIC:
        return fresh
    cls = resolve_topic(topic)
    if _is_pydantic(cls):
        return cls.model_validate(fresh)
    return cls(**fresh)


LONGEST_NAME = 1000
LONGEST_KEY = 2000
"""The longest saga or step name, and business key, in UTF-8 bytes. PostgreSQL indexes the
status rows by name and by key, and an index entry holds about 2,700 bytes at most; a step's
name is part of the key of the child saga it runs (`<parent id>:<step>`)."""


def overlong_text(text: str, limit: int) -> str | None:
    """Why an indexed text (a name, a key) is too long for PostgreSQL, or None: refused alike."""
    if len(text) * 4 <= limit:  # short for sure: no need to encode it
        return None
    size = len(text.encode("utf8", "surrogatepass"))
    if size <= limit:
        return None
    return f"it is {size} bytes long in UTF-8, over the {limit} that PostgreSQL can index"


def unstorable_text(text: str) -> str | None:
    """Why some store could not keep `text`, or None: each refusal made one for all stores."""
    if text.isascii() and "\x00" not in text:
        return None
    if "\x00" in text:
        return "it holds a NUL character (\\x00), which PostgreSQL cannot store"
    try:
        text.encode("utf8")
    except UnicodeEncodeError:
        return "it is not valid Unicode (it holds lone surrogates)"
    return None


def refused_text(text: str, longest: int | None = None) -> str | None:
    """Why some store could not keep `text` (nor index it, past `longest` bytes), or None."""
    reason = unstorable_text(text)
    if reason is None and longest is not None:
        reason = overlong_text(text, longest)
    return reason


def shown_text(text: str) -> str:
    """`text` for an error message: its start, when it is too long to quote whole."""
    return repr(text) if len(text) <= 60 else f"{text[:40]!r}… ({len(text)} characters)"


def storable_text(text: str) -> str:
    """`text` with what no store can hold escaped: NUL (PostgreSQL) and lone surrogates (UTF-8).

    An error's message is user text that a saga must record however odd it is: if it
    could not be stored, the failure would never be written and the saga never end.
    """
    if text.isascii() and "\x00" not in text:
        return text
    escaped = text.replace("\x00", "\\x00")
    return escaped.encode("utf-8", "backslashreplace").decode("utf-8")


def diff(before: State, after: State) -> tuple[State, list[str]]:
    """What changed from `before` to `after`: new values, and removed field names."""
    changes = {k: v for k, v in after.items() if k not in before or before[k] != v}
    removed = [k for k in before if k not in after]
    return changes, removed


def apply_diff(state: State, changes: Mapping[str, Any], removed: list[str]) -> State:
    """`state` with `changes` and `removed` applied, as a new dict."""
    new = dict(state)
    new.update(changes)
    for name in removed:
        new.pop(name, None)
    return new


_IMMUTABLE = (str, int, float, bool, type(None), bytes)


def copy_state(value: Any) -> Any:
    """A deep copy that is cheap for JSON-like data (the common case)."""
    if isinstance(value, _IMMUTABLE):
        return value
    if type(value) is dict:
        return {k: copy_state(v) for k, v in value.items()}
    if type(value) is list:
        return [copy_state(v) for v in value]
    return copy.deepcopy(value)


def _field_error(model: Any, error: ValueError) -> ContextError:
    """Name the first field of a pydantic model that cannot be dumped as JSON."""
    for name in type(model).model_fields:
        try:
            model.model_dump(mode="json", include={name})
        except ValueError:
            return ContextError(name, getattr(model, name), str(error))
    return ContextError("(context)", model, str(error))


def _is_pydantic(cls: type) -> bool:
    return hasattr(cls, "model_dump") and hasattr(cls, "model_validate")
