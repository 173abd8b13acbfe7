"""Group commit: the boundaries of sagas running together share one transaction.

A store commits only so many transactions a second; sagas running concurrently on
one event loop each wait at a boundary for their events to be durable. Rather than
one commit each, the boundaries that arrive while a commit is under way are written
together by the next one (one `insert_events` of several sagas). Write-ahead is
unchanged: each saga waits for the commit that holds its events before it runs
anything. A lone saga finds no commit under way and is written at once, so it pays
no extra latency; `max_wait` can hold a batch open a little longer when many sagas
are known to be coming.

One version conflict aborts a whole transaction, so a failed batch is written again
saga by saga: the sagas that did not conflict are committed, and only the one that
lost its race gets the `IntegrityError`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from eventsourcing.persistence import IntegrityError

from saga_es.aggregate import Saga

Write = Callable[[Sequence[tuple[Saga, Sequence[Saga.Event]]]], None]
"""Writes several sagas' events in one transaction (all or none)."""


@dataclass
class _Boundary:
    saga: Saga
    events: Sequence[Saga.Event]
    done: asyncio.Future[Sequence[Saga.Event]] = field(repr=False)


class GroupCommit:
    """One event loop's commit queue: `await save(saga)` returns once its events are durable."""

    def __init__(self, write: Write, *, max_batch: int = 100, max_wait: float = 0.0) -> None:
        self.write = write
        self.max_batch = max_batch
        self.max_wait = max_wait
        self._queue: list[_Boundary] = []
        self._flushing: asyncio.Task[None] | None = None
        self.commits = 0
        """Transactions written so far (a batch that had to be split counts each part)."""

    async def save(self, saga: Saga) -> Sequence[Saga.Event]:
        """Queue the saga's pending events; return them once they are committed."""
        events: list[Saga.Event] = saga.collect_events()  # type: ignore[assignment]
        if not events:
            return events
        done: asyncio.Future[Sequence[Saga.Event]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Boundary(saga, events, done))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush())
        return await done

    async def _flush(self) -> None:
        """Write batches until the queue is empty; boundaries queued meanwhile join the next."""
        while self._queue:
            if self.max_wait and len(self._queue) < self.max_batch:
                await asyncio.sleep(self.max_wait)
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            await asyncio.to_thread(self._commit, batch)

    def _commit(self, batch: list[_Boundary]) -> None:
        """Write the batch in one transaction; after a conflict, each saga alone."""
        try:
            self.commits += 1
            self.write([(b.saga, b.events) for b in batch])
        except IntegrityError as conflict:
            if len(batch) == 1:
                _settle(batch[0], conflict)
                return
            for boundary in batch:
                try:
                    self.commits += 1
                    self.write([(boundary.saga, boundary.events)])
                except Exception as e:
                    _settle(boundary, e)
                else:
                    _settle(boundary, None)
            return
        except Exception as e:
            for boundary in batch:
                _settle(boundary, e)
            return
        for boundary in batch:
            _settle(boundary, None)


def _settle(boundary: _Boundary, error: Exception | None) -> None:
    """Resolve the boundary's future from the writer thread, on its own loop."""
    done = boundary.done

    def resolve() -> None:
        if done.cancelled():
            return
        if error is None:
            done.set_result(boundary.events)
        else:
            done.set_exception(error)

    done.get_loop().call_soon_threadsafe(resolve)
