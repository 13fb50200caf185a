"""A worker's capacity for something that requests hold while they run (images in flight, bytes
of downloaded files, bytes of request bodies): taken all at once or refused at once, never queued
for; and the work of a request that may outlive its answer, which holds them until it ends."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")


class Capacity:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0

    @property
    def full(self) -> bool:
        return self.used >= self.capacity

    def could_take(self, count: int) -> bool:
        return self.used + count <= self.capacity

    def try_take(self, count: int) -> bool:
        if not self.could_take(count):
            return False
        self.used += count
        return True

    def give_back(self, count: int) -> None:
        self.used -= count


class Work:
    """The pieces of one request's work that can outlive its answer: a thread cannot be stopped,
    and a request sent to Triton is computed whether or not anyone still waits for it (a
    timeout, a failed neighbour). `then(release)` calls `release` once none is left running."""

    def __init__(self) -> None:
        self.running = 0
        self._waiting: list[Callable[[], None]] = []

    def track(self, piece: asyncio.Future[Any]) -> None:
        self.running += 1
        piece.add_done_callback(self._ended)

    def then(self, release: Callable[[], None]) -> None:
        self._waiting.append(release)
        self._settle()

    def _ended(self, piece: asyncio.Future[Any]) -> None:
        if not piece.cancelled():
            piece.exception()  # retrieved: nobody may be left to await it
        self.running -= 1
        self._settle()

    def _settle(self) -> None:
        while self.running == 0 and self._waiting:
            self._waiting.pop(0)()


# The work of the request being answered (set by the embedding pipeline, inherited by its tasks).
WORK: contextvars.ContextVar[Work | None] = contextvars.ContextVar("iei_work", default=None)


@contextmanager
def request_work() -> Iterator[Work]:
    """The Work of the request being answered: the one the body limit started for it (which
    holds the body until the work ends), else a new one for this block."""
    work = WORK.get()
    if work is not None:
        yield work
        return
    work = Work()
    token = WORK.set(work)
    try:
        yield work
    finally:
        WORK.reset(token)


async def outliving(awaitable: Awaitable[T]) -> T:
    """Await `awaitable`, which runs to its end even when the caller is cancelled: counted in
    the request's Work, so the request's permits stay taken until it has really ended."""
    piece = asyncio.ensure_future(awaitable)
    work = WORK.get()
    if work is not None:
        work.track(piece)
    return await asyncio.shield(piece)
