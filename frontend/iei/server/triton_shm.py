"""Image files handed to a Triton on the same host through system shared memory.

Over HTTP every file of a request crosses the loopback socket twice (written by the frontend,
read by Triton, whose HTTP server then gathers it out of its buffers): Triton's CPU per 12 MP
photo was 2.6 ms that way, 0.1 ms when the files lay in a shared memory region that the request
only names (docs/benchmarks.md). Each frontend worker keeps one region in /dev/shm
(`IEI_TRITON_SHM_MB`), registered with Triton (KServe's system shared memory extension), and
copies a call's files into a free block of it. Triton proves that it sees the region by
registering it; only then are its pages reserved (a memory-backed file that ran out of room would
kill the worker with SIGBUS on a write). A Triton elsewhere (compose, Kubernetes: another /dev/shm)
refuses the registration and the files go in the HTTP body, as they do when the region is full.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import mmap
import os
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from ..contract import FRONTEND_REGIONS
from ..launcher.processes import SHM_DIR

log = logging.getLogger("iei")

# A region's file is created in SHM_DIR with O_EXCL and mode 0600 under a random name.
PREFIX = FRONTEND_REGIONS
ALIGN = 64  # blocks start on cache lines
# A refused registration (Triton not up yet, or on another host) is tried again after this long.
RETRY_AFTER = 30.0
# Reserve the region only while /dev/shm keeps this share of its free room for Triton's stubs.
MAX_SHARE_OF_FREE = 0.5


class Registrar(Protocol):
    """The Triton calls a region needs (tritonclient's async HTTP client has them)."""

    async def register_system_shared_memory(self, name: str, key: str, byte_size: int) -> None:
        pass

    async def unregister_system_shared_memory(self, name: str = "") -> None:
        pass


class SharedMemoryRegion:
    """One worker's region: registered with Triton on first use, then cut into blocks, one per
    Triton call in flight. Used from the worker's event loop only (no locks around blocks)."""

    def __init__(self, size: int, folder: Path = SHM_DIR) -> None:
        self.size = size
        self.name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self.path = folder / self.name
        self.key = f"/{self.name}"
        self.registered = False
        self.disabled = size <= 0
        self._refused_at = -RETRY_AFTER
        self._told = False
        self._lock = asyncio.Lock()
        self._map: mmap.mmap | None = None
        self._taken: list[tuple[int, int]] = []  # (offset, length) of blocks in use, sorted

    async def ready(self, triton: Registrar) -> bool:
        """Whether calls may use the region now: registered, or registered by this call."""
        if self.registered or self.disabled:
            return self.registered
        if time.monotonic() - self._refused_at < RETRY_AFTER:
            return False
        async with self._lock:
            if not (self.registered or self.disabled):
                await self._register(triton)
        return self.registered

    async def _register(self, triton: Registrar) -> None:
        if self._map is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, self.size)  # sparse: no memory until Triton has said yes
                self._map = mmap.mmap(fd, self.size)
            finally:
                os.close(fd)
        try:
            # A registration whose answer was lost may be there already (usually nothing is).
            with contextlib.suppress(Exception):
                await triton.unregister_system_shared_memory(self.name)
            await triton.register_system_shared_memory(self.name, self.key, self.size)
        except Exception as exc:
            self._refused_at = time.monotonic()
            if not self._told:  # once: a Triton in another container refuses every retry
                self._told = True
                log.info("Triton did not take shared memory region %s (%s): files go over HTTP "
                         "until it does", self.name, str(exc).splitlines()[0][:200])  # fmt: skip
            return
        reason = self._reserve_pages()
        if reason:
            self.disabled = True
            log.warning("shared memory for Triton off (%s): files go over HTTP", reason)
            with contextlib.suppress(Exception):  # Triton unmaps it when it goes
                await triton.unregister_system_shared_memory(self.name)
            self._drop()
            return
        self.registered = True
        log.info("files go to Triton through shared memory region %s (%d MiB)",
                 self.name, self.size >> 20)  # fmt: skip

    def _reserve_pages(self) -> str:
        """Reserve the region's pages in /dev/shm now; why not, if it cannot."""
        free = os.statvfs(self.path.parent)
        room = free.f_bavail * free.f_frsize
        if self.size > MAX_SHARE_OF_FREE * room:
            return f"{self.size >> 20} MiB asked, {room >> 20} MiB free in {self.path.parent}"
        try:
            fd = os.open(self.path, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, self.size)
            finally:
                os.close(fd)
        except OSError as exc:
            return f"reserving {self.size >> 20} MiB in {self.path.parent}: {exc.strerror}"
        return ""

    def forget(self) -> None:
        """Triton no longer knows the region (it restarted): register it again before use."""
        self.registered = False
        self._refused_at = -RETRY_AFTER

    def write(self, parts: Sequence[bytes | memoryview]) -> int | None:
        """`parts` copied one after the other into a free block; its offset, or None when no
        block that large is free (the caller sends them in the body)."""
        length = sum(len(p) for p in parts)
        offset = self._reserve(length)
        if offset is None or self._map is None:
            return None
        view = memoryview(self._map)
        try:
            at = offset
            for part in parts:
                view[at : at + len(part)] = part
                at += len(part)
        finally:
            view.release()
        return offset

    def _reserve(self, length: int) -> int | None:
        start = 0
        for offset, taken in self._taken:
            if offset - start >= length:
                break
            start = -(-(offset + taken) // ALIGN) * ALIGN
        else:
            if self.size - start < length:
                return None
        bisect.insort(self._taken, (start, length))
        return start

    def release(self, offset: int, later: float = 0.0) -> None:
        """The block at `offset` free again (after `later` seconds: Triton may still read it)."""
        if later > 0:
            asyncio.get_running_loop().call_later(later, self.release, offset)
            return
        self._taken = [block for block in self._taken if block[0] != offset]

    @property
    def blocks_in_use(self) -> int:
        return len(self._taken)

    async def close(self, triton: Registrar | None) -> None:
        if self.registered and triton is not None:
            self.registered = False
            try:
                async with asyncio.timeout(2.0):
                    await triton.unregister_system_shared_memory(self.name)
            except Exception:  # noqa: S110 (Triton is gone or going: it unmaps on exit)
                pass
        self._drop()

    def _drop(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        self.path.unlink(missing_ok=True)
