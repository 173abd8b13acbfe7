"""`SagaApplication`: sagas over an `eventsourcing` event store (POPO, SQLite or PostgreSQL).

It is a plain `eventsourcing.application.Application`, configured by the same
settings (`PERSISTENCE_MODULE`, `SQLITE_DBNAME`, `POSTGRES_*`, ...), with SQLite
in `saga_es.db` as the default store. Running a saga starts it, hands it to the
runner and saves each boundary; reading one replays its stream.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid4, uuid5

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.persistence import IntegrityError, Transcoder
from eventsourcing.utils import Environment, EnvType, TopicError, resolve_topic

from saga_es import runner
from saga_es.aggregate import Saga, SagaStarted, replay
from saga_es.context import State, to_state, topic_of
from saga_es.definition import SagaDefinition
from saga_es.errors import (
    ConfigurationError,
    ContextError,
    SagaNotFound,
    VersionNotFound,
)

SAGA_KEY_NAMESPACE = uuid5(NAMESPACE_URL, "https://saga-es/keys")
"""Saga ids derived from a business key are uuid5 in this namespace."""


@dataclass(frozen=True)
class SagaUpdate:
    """One recorded event of a running saga, as `stream()` yields it."""

    saga_id: UUID
    version: int
    event: str
    status: str
    timestamp: datetime
    step: str | None = None
    attempt: int | None = None
    error: dict[str, str] | None = None
    changes: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_event(cls, event: Saga.Event) -> SagaUpdate:
        """The update that reports `event`."""
        data = vars(event)
        error = None
        if "error_type" in data:
            error = {"type": data["error_type"], "message": data["error_message"]}
        return cls(
            saga_id=event.originator_id,
            version=event.originator_version,
            event=type(event).__name__,
            status=event.to_state,
            timestamp=event.timestamp,
            step=data.get("step"),
            attempt=data.get("attempt"),
            error=error,
            changes=dict(data.get("changes") or {}),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, for server-sent events or logs."""
        return json.loads(self.to_json())  # type: ignore[no-any-return]

    def to_json(self) -> str:
        """One line of JSON; values JSON cannot hold are written as strings."""
        return json.dumps(
            {
                "saga_id": str(self.saga_id),
                "version": self.version,
                "event": self.event,
                "status": self.status,
                "timestamp": self.timestamp.isoformat(),
                "step": self.step,
                "attempt": self.attempt,
                "error": self.error,
                "changes": self.changes,
            },
            default=str,
        )


class SagaApplication(Application[UUID]):
    """Runs sagas and reads them back, over any `eventsourcing` persistence module."""

    name = "SagaApplication"
    env = {  # noqa: RUF012 (eventsourcing reads it as a class attribute)
        "PERSISTENCE_MODULE": "eventsourcing.sqlite",
        "SQLITE_DBNAME": "saga_es.db",
    }

    def __init__(self, env: EnvType | None = None) -> None:
        settings = self.construct_env(self.name, env)
        try:
            if "postgres" in settings.get("PERSISTENCE_MODULE", ""):
                _check_postgres(settings)
            super().__init__(env)
        except ConfigurationError:
            raise
        except Exception as e:
            raise _configuration_error(e, settings) from None

    # -- running -----------------------------------------------------------------------

    def run(self, definition: SagaDefinition, context: Any, *, key: str | None = None) -> Saga:
        """Run a saga to its end and return it; with a known `key`, return that saga."""
        saga = self._start(definition, context, key)
        if saga.pending_events:
            if not self._save_start(saga):
                return self.get(saga.id)
            runner.run(saga, definition, self._save, self._check_encodable)
        return saga

    async def arun(
        self, definition: SagaDefinition, context: Any, *, key: str | None = None
    ) -> Saga:
        """`run`, awaiting async steps and running sync ones in threads."""
        saga = self._start(definition, context, key)
        async for _ in self._drive(saga, definition):
            pass
        return saga

    async def stream(
        self, definition: SagaDefinition, context: Any, *, key: str | None = None
    ) -> AsyncIterator[SagaUpdate]:
        """Run a saga, yielding an update for each event once it is durable.

        With a known `key`, the first saga's history is yielded and nothing runs.
        """
        saga = await asyncio.to_thread(self._start, definition, context, key)
        async for events in self._drive(saga, definition):
            for event in events:
                yield SagaUpdate.from_event(event)

    async def _drive(
        self, saga: Saga, definition: SagaDefinition
    ) -> AsyncIterator[Sequence[Saga.Event]]:
        if not saga.pending_events:  # started before, under the same key
            yield await asyncio.to_thread(self.history, saga.id)
            return
        events: Sequence[Saga.Event] = list(saga.pending_events)  # type: ignore[arg-type]
        if not await asyncio.to_thread(self._save_start, saga):
            yield await asyncio.to_thread(self.history, saga.id)
            return
        yield events
        async for events in runner.arun(saga, definition, self._asave, self._check_encodable):
            yield events

    def _start(self, definition: SagaDefinition, context: Any, key: str | None) -> Saga:
        """A new saga with its first step written ahead, or the one already under `key`."""
        if not isinstance(definition, SagaDefinition):
            raise TypeError(f"expected a SagaDefinition, got {type(definition).__name__}")
        try:
            context_type = topic_of(context)
            state = to_state(context)
        except TypeError as e:
            raise ContextError("(context)", context, str(e)) from None
        self._check_context(context_type, state)
        if key is not None:
            saga_id = self.saga_id(definition.name, key)
            try:
                return self.get(saga_id)
            except SagaNotFound:
                pass
        else:
            saga_id = uuid4()
        saga = Saga.start(
            id=saga_id,
            name=definition.name,
            definition_version=definition.version,
            steps=definition.step_names,
            key=None if key is None else str(key),
            context_type=context_type,
            context=state,
        )
        runner.begin(saga)
        return saga

    def _save_start(self, saga: Saga) -> bool:
        """Save a new saga; False if another process started it under the same key first."""
        try:
            self._save(saga)
        except IntegrityError:
            if saga.key is None:
                raise
            return False
        return True

    def _save(self, saga: Saga) -> Sequence[Saga.Event]:
        events: list[Saga.Event] = list(saga.pending_events)  # type: ignore[arg-type]
        self.save(saga)
        return events

    async def _asave(self, saga: Saga) -> Sequence[Saga.Event]:
        return await asyncio.to_thread(self._save, saga)

    def _check_context(self, context_type: str, state: State) -> None:
        try:
            resolve_topic(context_type)
        except TopicError as e:
            raise ContextError("(context)", state, f"its type cannot be found again: {e}") from None
        self._check_encodable(state, None)

    def _check_encodable(self, state: State, result: Any) -> None:
        transcoder = self.mapper.transcoder
        try:
            transcoder.encode(state)
            transcoder.encode(result)
        except (TypeError, ValueError):
            for name, value in [*state.items(), ("(result)", result)]:
                _check_value(transcoder, name, value)
            raise

    @staticmethod
    def saga_id(name: str, key: str) -> UUID:
        """The id of the saga of definition `name` started under business `key`."""
        return uuid5(SAGA_KEY_NAMESPACE, f"{name}\x00{key}")

    # -- reading -----------------------------------------------------------------------

    def get(self, saga_id: UUID | str, version: int | None = None) -> Saga:
        """The saga as it is now, or as it was right after event number `version`."""
        saga_id = _as_uuid(saga_id)
        if version is not None and (isinstance(version, bool) or version < 1):
            raise VersionNotFound(saga_id, version, self._last_version(saga_id))
        try:
            saga: Saga = self.repository.get(saga_id, version=version, projector_func=replay)
        except AggregateNotFoundError:
            raise SagaNotFound(saga_id) from None
        if version is not None and saga.version < version:
            raise VersionNotFound(saga_id, version, saga.version)
        return saga

    def history(self, saga_id: UUID | str) -> list[Saga.Event]:
        """Every event of the saga, in order."""
        saga_id = _as_uuid(saga_id)
        events: list[Saga.Event] = list(self.events.get(saga_id))  # type: ignore[arg-type]
        if not events:
            raise SagaNotFound(saga_id)
        return events

    def sagas(self) -> Iterator[Saga]:
        """Every saga in the store, in the order they were started."""
        start: int | None = None
        while True:
            page = self.recorder.select_notifications(
                start, limit=100, topics=[SagaStarted.TOPIC], inclusive_of_start=False
            )
            for notification in page:
                yield self.get(notification.originator_id)
            if len(page) < 100:
                return
            start = page[-1].id

    def _last_version(self, saga_id: UUID) -> int:
        last = list(self.events.get(saga_id, desc=True, limit=1))
        if not last:
            raise SagaNotFound(saga_id)
        return last[0].originator_version


def _as_uuid(saga_id: UUID | str) -> UUID:
    """Accept ids as typed on a command line, too."""
    if isinstance(saga_id, UUID):
        return saga_id
    try:
        return UUID(str(saga_id))
    except ValueError:
        raise SagaNotFound(saga_id) from None  # type: ignore[arg-type]


def _check_value(transcoder: Transcoder, name: str, value: Any) -> None:
    try:
        transcoder.encode(value)
    except (TypeError, ValueError) as e:
        raise ContextError(name, value, str(e).split(". Please")[0]) from None


_SETTING_IN_MESSAGE = re.compile(r"'([A-Z][A-Z0-9_]+)'")
_PG_HINTS = (
    ("password", "POSTGRES_PASSWORD"),
    ("role", "POSTGRES_USER"),
    ("database", "POSTGRES_DBNAME"),
    ("translate host name", "POSTGRES_HOST"),
    ("connection refused", "POSTGRES_PORT"),
    ("timeout", "POSTGRES_HOST"),
)


def _check_postgres(env: Environment) -> None:
    """Fail fast, naming the setting, where the pool would only time out."""
    import psycopg

    for name in ("POSTGRES_DBNAME", "POSTGRES_HOST", "POSTGRES_USER"):
        if env.get(name) == "":
            raise ConfigurationError(name, "is set but empty")
        if env.get(name) is None:
            return  # eventsourcing names a missing setting itself
    if env.get("POSTGRES_GET_PASSWORD_TOPIC"):
        return
    try:
        timeout = max(1, min(int(env.get("POSTGRES_CONNECT_TIMEOUT") or 5), 5))
    except ValueError:
        return
    try:
        psycopg.connect(
            dbname=env.get("POSTGRES_DBNAME"),
            host=env.get("POSTGRES_HOST"),
            port=env.get("POSTGRES_PORT") or "5432",
            user=env.get("POSTGRES_USER"),
            password=env.get("POSTGRES_PASSWORD") or "",
            connect_timeout=timeout,
        ).close()
    except psycopg.OperationalError as e:
        where = f"{env.get('POSTGRES_HOST')}:{env.get('POSTGRES_PORT') or '5432'}"
        reason = " ".join(str(e).split()) or type(e).__name__
        message = f"cannot connect to PostgreSQL at {where}: {reason}"
        raise _configuration_error(RuntimeError(message), env) from None


def _configuration_error(error: Exception, env: Environment) -> ConfigurationError:
    """Name the setting behind a construction failure, never echoing a password."""
    message = str(error) or type(error).__name__
    password = env.get("POSTGRES_PASSWORD")
    if password:
        message = message.replace(password, "***")
    match = _SETTING_IN_MESSAGE.search(message)
    if match:
        return ConfigurationError(match.group(1), message)
    module = env.get("PERSISTENCE_MODULE", "")
    lowered = message.lower()
    if "postgres" in module:
        for needle, setting in _PG_HINTS:
            if needle in lowered:
                return ConfigurationError(setting, message)
        return ConfigurationError("POSTGRES_HOST", message)
    if "sqlite" in module:
        return ConfigurationError("SQLITE_DBNAME", message)
    return ConfigurationError("PERSISTENCE_MODULE", message)
