"""Recovery and verification: bring interrupted sagas to an end; audit every stream.

Recovery reads the status projection for the sagas in flight (never every event),
rebuilds each from its stream, and resumes it through the runner. Fencing comes
from the stream: resuming first appends (an attempt's start, say) under the
saga's version, and a worker that loses that race runs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

from eventsourcing.persistence import IntegrityError, InterfaceError, OperationalError

from saga_es import machine, runner, tracing
from saga_es.aggregate import Saga, StreamProblem, replay_checked, verify_events
from saga_es.definition import SagaDefinition
from saga_es.errors import SagaError, SagaNotFound
from saga_es.status import IN_FLIGHT_STATES, SagaStatus, saga_log_fields

if TYPE_CHECKING:
    from saga_es.application import SagaApplication

log = logging.getLogger("saga_es")

PAGE = 500
STORE_RETRY_FIRST = 0.5
"""Seconds a worker waits before listing again once the store cannot be reached; doubled
each time, up to `STORE_RETRY_MAX`."""
STORE_RETRY_MAX = 30.0


@dataclass
class RecoveryReport:
    """What one recovery pass did with each saga it found in flight."""

    resumed: list[UUID] = field(default_factory=list)
    """Resumed and driven as far as they go (normally to a terminal state)."""
    waiting: list[UUID] = field(default_factory=list)
    """Left alone: their current step is still within its timeout (a worker may own it)."""
    taken_over: list[UUID] = field(default_factory=list)
    """Another worker appended first; this one ran nothing for them."""
    ended: list[UUID] = field(default_factory=list)
    """Already terminal when read: another worker finished them after the listing."""
    failed: dict[UUID, str] = field(default_factory=dict)
    """Could not be resumed (no definition, unreadable stream, reconcile error): why."""

    @property
    def found(self) -> int:
        """Sagas in flight when recovery started."""
        lists = (self.resumed, self.waiting, self.taken_over, self.ended)
        return sum(len(ids) for ids in lists) + len(self.failed)


def in_flight(app: SagaApplication) -> Iterator[SagaStatus]:
    """Status rows of every saga neither terminal nor stuck, page by page."""
    after: UUID | None = None
    while True:
        page = app.statuses(status=IN_FLIGHT_STATES, after=after, limit=PAGE)
        yield from page
        if len(page) < PAGE:
            return
        after = page[-1].saga_id


def recover(
    app: SagaApplication, *, progress: Callable[[int, int], None] | None = None
) -> RecoveryReport:
    """Resume every saga in flight whose current step has outlived its timeout."""
    report = RecoveryReport()
    rows = list(in_flight(app))
    now = datetime.now(UTC)
    for done, row in enumerate(rows, 1):
        _recover_one(app, row, now, report)
        if progress is not None:
            progress(done, len(rows))
    return report


def _prepare(
    app: SagaApplication, row: SagaStatus, now: datetime, report: RecoveryReport
) -> tuple[Saga, SagaDefinition] | None:
    """The saga to resume, rebuilt and checked, or None (and why, in the report)."""
    saga_id = row.saga_id
    try:
        definition = app.definition(row.name, row.definition_version)
        if _held(app, definition, row, now):
            report.waiting.append(saga_id)
            return None
        saga = rebuild(app, saga_id)
    except Exception as e:  # one saga's problem never stops the others
        _failed(report, saga_id, e)
        return None
    if saga.status not in IN_FLIGHT_STATES:
        report.ended.append(saga_id)  # another worker finished it after the listing
        return None
    if saga.version != row.version and saga.status != machine.PENDING:
        # Another worker moved it after the listing: judge it by its own latest event.
        moved = replace(row, status=saga.status, step=saga.step, updated_at=saga.modified_on)
        if datetime.now(UTC) - saga.modified_on < _timeout(app, definition, moved):
            report.waiting.append(saga_id)
            return None
    return saga, definition


def _recover_one(
    app: SagaApplication, row: SagaStatus, now: datetime, report: RecoveryReport
) -> None:
    prepared = _prepare(app, row, now, report)
    if prepared is None:
        return
    saga, definition = prepared
    try:
        with tracing.saga_span(saga, "recover"):
            app._resume(saga, definition)  # its first append must win the version check
    except IntegrityError:
        _lost(report, saga)
        return
    except Exception as e:
        _failed(report, saga.id, e)
        return
    report.resumed.append(saga.id)


async def recover_one_async(
    app: SagaApplication, row: SagaStatus, now: datetime, report: RecoveryReport
) -> None:
    """`_recover_one` on an event loop: its saves join the group commit."""
    if row.status == machine.PENDING:  # workers race for submitted sagas: look before rebuilding
        try:
            latest = await asyncio.to_thread(app._last_version, row.saga_id)
        except Exception as e:  # reported here: the task's own exceptions are never read
            _failed(report, row.saga_id, e)
            return
        if latest != row.version:
            report.taken_over.append(row.saga_id)
            return
    prepared = await asyncio.to_thread(_prepare, app, row, now, report)
    if prepared is None:
        return
    saga, definition = prepared
    try:
        with tracing.saga_span(saga, "work"):
            first = runner.resume(saga, definition, app.max_resumptions)
            await app._asave(saga)  # the fencing point, as above
            check, clock = app._check_encodable, app.clock
            async for _ in runner.arun(
                saga, definition, app._asave, check, first, clock, reload=app.get
            ):
                pass
    except IntegrityError:
        _lost(report, saga)
        return
    except (OperationalError, InterfaceError) as e:  # the store went away: a later pass resumes it
        log.warning(
            "saga %s: the store went away mid-run (%s); left in flight for a later pass",
            saga.id,
            e,
            extra=saga_log_fields(saga),
        )
        report.waiting.append(saga.id)
        return
    except Exception as e:
        _failed(report, saga.id, e)
        return
    report.resumed.append(saga.id)


def _lost(report: RecoveryReport, saga: Saga) -> None:
    log.warning(
        "saga %s: another worker appended first (version %s); leaving it to that worker",
        saga.id,
        saga.version,
        extra=saga_log_fields(saga),
    )
    report.taken_over.append(saga.id)


async def work(
    app: SagaApplication,
    *,
    concurrency: int,
    poll_interval: float,
    stop: threading.Event,
    until_idle: bool,
) -> RecoveryReport:
    """Run pending and recoverable sagas, `concurrency` at a time, until `stop` is set.

    Every worker lists the same projection; each takes its candidates in a random
    order, and the version check on each saga's first append decides who runs it.
    """
    report = RecoveryReport()
    running: dict[UUID, asyncio.Task[None]] = {}
    slots = asyncio.Semaphore(concurrency)

    def finished(task: asyncio.Task[None]) -> None:
        running.pop(owners.pop(task), None)
        slots.release()

    owners: dict[asyncio.Task[None], UUID] = {}

    delay = STORE_RETRY_FIRST
    while not stop.is_set():
        try:
            rows = await asyncio.to_thread(
                app.statuses, status=IN_FLIGHT_STATES, limit=max(PAGE, 4 * concurrency)
            )
        except (OperationalError, InterfaceError) as e:  # the store went away: wait, look again
            following = store_unreachable(e, delay)
            await _pause(stop, delay, running)
            delay = following
            continue
        delay = STORE_RETRY_FIRST
        now = datetime.now(UTC)
        candidates = [row for row in rows if row.saga_id not in running and _due(app, row, now)]
        random.shuffle(candidates)  # workers sharing a store start on different sagas
        resumed = len(report.resumed)
        lost = len(report.taken_over)
        for row in candidates:
            if stop.is_set():
                break
            await slots.acquire()
            if stop.is_set():
                slots.release()  # told to stop while waiting for a slot: take nothing new
                break
            if len(report.taken_over) - lost >= concurrency:
                slots.release()  # others took what this listing offered: list afresh
                break
            task = asyncio.create_task(recover_one_async(app, row, now, report))
            running[row.saga_id] = task
            owners[task] = row.saga_id
            task.add_done_callback(finished)
        if until_idle:
            await asyncio.gather(*running.values(), return_exceptions=True)
            if len(report.resumed) == resumed:
                break  # a whole pass found nothing it could run
            continue
        await _pause(stop, poll_interval, running)
    if running:
        await asyncio.gather(*running.values(), return_exceptions=True)
    return report


async def _pause(stop: threading.Event, seconds: float, running: dict[UUID, Any]) -> None:
    """Wait for the next listing: `seconds`, or less once a saga finishes or `stop` is set."""
    waited = 0.0
    count = len(running)
    while waited < seconds and not stop.is_set():
        await asyncio.sleep(0.02)
        waited += 0.02
        if len(running) < count:
            return


class StreamRejected(SagaError):
    """Raised when a saga's stored stream is not one the state machine would have written."""

    def __init__(self, problem: StreamProblem) -> None:
        super().__init__(f"the state machine rejects its stream: {problem}")
        self.problem = problem


def rebuild(app: SagaApplication, saga_id: UUID) -> Saga:
    """The saga from its latest snapshot and the events after it, each checked by the machine.

    Recovery resumes only what the machine would have written: a tampered or buggy
    stream raises `StreamRejected`, an undecodable one `UnreadableEvent`.
    """
    start: Saga | None = None
    if app.snapshots is not None:
        for snapshot in app.snapshots.get(saga_id, desc=True, limit=1):
            start = snapshot.mutate(None)  # type: ignore[attr-defined]
    try:
        events = list(app.events.get(saga_id, gt=None if start is None else start.version))
    except Exception as e:
        raise app.unreadable(saga_id, e) from e
    saga, problem = replay_checked(start, events)
    if problem is not None:
        raise StreamRejected(problem)
    if saga is None:
        raise SagaNotFound(saga_id)
    return saga


def _due(app: SagaApplication, row: SagaStatus, now: datetime) -> bool:
    """Whether a worker may take the row now, judged without a query or a thread.

    A saga whose step is within its timeout is someone's: a worker that walked to it
    would only leave it. A row whose definition is missing goes on, to be reported.
    """
    try:
        definition = app.definition(row.name, row.definition_version)
    except SagaError:
        return True
    return not _held(app, definition, row, now)


def _held(app: SagaApplication, definition: SagaDefinition, row: SagaStatus, now: datetime) -> bool:
    """Whether the row's saga is under way within its step's timeout: a worker may own it."""
    return row.status != machine.PENDING and now - row.updated_at < _timeout(app, definition, row)


def store_unreachable(error: Exception, delay: float) -> float:
    """Say, in one line, that the store cannot be reached; the wait after `delay`."""
    log.warning("cannot reach the store (%s); retrying in %.1fs", error, delay)
    return min(delay * 2, STORE_RETRY_MAX)


def _timeout(app: SagaApplication, definition: SagaDefinition, row: SagaStatus) -> timedelta:
    """The step's timeout; one beyond what `timedelta` holds is the longest wait there is."""
    seconds = app.default_step_timeout
    if row.step is not None:
        with contextlib.suppress(SagaError):  # an unknown step fails when resumed
            seconds = definition.step(row.step).timeout or seconds
    if seconds >= _LONGEST_WAIT:  # a step may allow centuries: a wait still, not an error
        return timedelta.max
    return timedelta(seconds=seconds)


_LONGEST_WAIT = timedelta.max.total_seconds()


def _failed(report: RecoveryReport, saga_id: UUID, error: Exception) -> None:
    reason = str(error) if isinstance(error, SagaError) else f"{type(error).__name__}: {error}"
    log.error("saga %s cannot be recovered: %s", saga_id, reason, extra={"saga_id": str(saga_id)})
    report.failed[saga_id] = reason


def verify(app: SagaApplication) -> list[StreamProblem]:
    """Every stored saga stream the state machine would refuse, or cannot read, with why."""
    problems = []
    for saga_id in app.stream_ids():
        problem = verify_stream(app, saga_id)
        if problem is not None:
            problems.append(problem)
    return problems


def verify_stream(app: SagaApplication, saga_id: UUID) -> StreamProblem | None:
    """The first problem in one saga's stored stream, if any."""
    events = []
    for record in app.recorder.select_events(saga_id):
        try:
            events.append(app.mapper.to_domain_event(record))
        except Exception as e:
            reason = f"cannot be read ({app._cipher_hint(f'{type(e).__name__}: {e}')})"
            return StreamProblem(saga_id, record.originator_version, record.topic, reason)
    if not events:
        return StreamProblem(saga_id, 0, "(stream)", "no events stored")
    return verify_events(events)
