"""Waiting in tests: ask until a condition holds or its deadline passes, never a fixed sleep.

A machine shared with other work (CI's 2 cores) runs anything from a few milliseconds to seconds
late; a test states what it waits for and the most it will wait, and fails saying which.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


def wait_for(
    condition: Callable[[], object],
    what: str,
    seconds: float,
    every: float = 0.1,
    log: Callable[[], str] | None = None,
) -> float:
    """Seconds until `condition()` held; after `seconds`, an AssertionError naming `what` (and
    showing `log()` as it is then: a server's output at the moment it failed)."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started >= seconds:
            raise AssertionError(f"not {what} after {seconds} s" + (f":\n{log()}" if log else ""))
        time.sleep(every)
    return time.monotonic() - started


async def eventually(
    condition: Callable[[], object], what: str, seconds: float = 5.0, *, blocking: bool = False
) -> None:
    """`wait_for` on an event loop: the loop runs on between the checks. `blocking`: a condition
    that does I/O (an HTTP scrape) runs in a thread, so that the test's own requests on this loop
    go on meanwhile."""
    deadline = time.monotonic() + seconds
    while not (await asyncio.to_thread(condition) if blocking else condition()):
        assert time.monotonic() < deadline, f"not {what} after {seconds} s"
        await asyncio.sleep(0.02)


def count_reaching(count: Callable[[], int], least: int, seconds: float = 5.0) -> int:
    """`count()` once it is at least `least`, or its value after `seconds`: Triton updates its
    statistics just after it answers, so a count read at once may lag the last response."""
    deadline = time.monotonic() + seconds
    while (value := count()) < least and time.monotonic() < deadline:
        time.sleep(0.05)
    return value
