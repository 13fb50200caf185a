"""The served models as one worker sees them: which one a request's `model` names, and loading
one that is not in Triton (IEI_MODEL_IDLE_UNLOAD) before its request goes on.

Unloading is not decided here: each worker sees only its own requests. `iei serve` decides it from
Triton's own statistics (launcher/idle.py), so every request of every worker counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import math
import os
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..contract import (
    MODEL_LOADING,
    MODEL_NAME,
    MODEL_READY,
    MODEL_UNLOADING,
    STAGE_MODEL_NAMES,
    TEXT_MODEL_NAME,
)
from ..models import ServedModel, lookup
from . import metrics
from .errors import ApiError, ErrorType
from .settings import ServerSettings
from .triton_client import TritonClient

log = logging.getLogger("iei")

# The order a model's Triton models load in: an ensemble's steps before the ensemble.
LOAD_ORDER = (*STAGE_MODEL_NAMES, MODEL_NAME, TEXT_MODEL_NAME)
MODEL_NOT_FOUND = "model_not_found"  # OpenAI's code


# A failed on-demand load is not tried again for this long (seconds: the first, doubling to the
# most): a broken checkpoint was loaded again by every request of every worker.
LOAD_BACKOFF = (5.0, 300.0)
LOAD_WAIT = 900.0  # seconds a load may take in all (a large checkpoint, an engine build)
LOAD_POLL = 0.5  # seconds between looks at a loading model's state
UNLOAD_WAIT = 120.0  # seconds an unload to make room may take (its requests finish first)


@dataclass(frozen=True)
class FailedLoad:
    not_before: float  # monotonic
    delay: float
    why: str


class NoRoom(ApiError):
    """IEI_MAX_LOADED_MODELS is reached and every model that could make room is in use: a 503
    to retry, not a failed load."""


class LockBusy(Exception):
    """host_lock waited its longest."""


def host_path(key: str, kind: str) -> str:
    """A file of this host's temporary folder for `key` (shared by the frontend's workers)."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"iei-{kind}-{digest}")


@asynccontextmanager
async def host_lock(key: str, wait: float | None = None) -> AsyncIterator[None]:
    """An exclusive lock on this host for `key` (a file lock: the frontend's workers are
    processes), waited for without blocking the event loop; LockBusy after `wait` seconds."""
    fd = os.open(host_path(key, "load") + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    deadline = None if wait is None else time.monotonic() + wait
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise LockBusy(key) from None
                await asyncio.sleep(LOAD_POLL)
        yield
    finally:
        os.close(fd)  # releases the lock


class ServedModels:
    def __init__(self, settings: ServerSettings, triton: TritonClient) -> None:
        self.models = settings.served
        self.triton = triton
        self.idle_unload = settings.model_idle_unload
        self.max_loaded = settings.max_loaded_models
        self.in_use = settings.model_in_use_seconds
        self._loads: dict[str, asyncio.Task[None]] = {}
        # name -> when an inference of it last succeeded, and Triton's `forgotten` count then
        self._used: dict[str, tuple[float, int]] = {}
        self._failed: dict[str, FailedLoad] = {}  # name -> its last load's failure

    @property
    def default(self) -> ServedModel:
        return self.models[0]

    def resolve(self, requested: str | None, *, named: bool = False) -> ServedModel:
        """The model a request names (absent: the default, unless it must be `named`); a 404
        for any other name."""
        model = lookup(self.models, requested) if requested or not named else None
        if model is None:
            served = ", ".join(repr(m.name) for m in self.models)
            raise ApiError(
                ErrorType.NOT_FOUND,
                f"model {requested!r} is not served here; served: {served}",
                code=MODEL_NOT_FOUND,
            )
        return model

    def on_demand(self, model: ServedModel) -> bool:
        """Loaded by its requests: not pinned, and IEI_MODEL_IDLE_UNLOAD is set."""
        return self.idle_unload is not None and not model.pinned

    @property
    def pinned(self) -> tuple[ServedModel, ...]:
        """The models that are always loaded: what /health vouches for."""
        return tuple(m for m in self.models if not self.on_demand(m))

    def used(self, model: ServedModel) -> None:
        self._used[model.name] = (time.monotonic(), self.triton.forgotten)

    def _lease(self, model: ServedModel) -> None:
        """IEI_MAX_LOADED_MODELS: mark `model` in use on this host from a request's start (its
        file's time): Triton's `last_inference` is stamped only once a batch ends, and a request
        that fetches its URLs first would find its model unloaded for another."""
        if self.max_loaded is not None:
            with contextlib.suppress(OSError):
                Path(host_path(f"{self.triton.endpoint}/{model.triton_image}", "use")).touch()

    def _leased_at(self, model: ServedModel) -> float:
        """When a request of this host last started for `model` (Unix seconds; 0: none)."""
        try:
            return os.stat(
                host_path(f"{self.triton.endpoint}/{model.triton_image}", "use")
            ).st_mtime
        except OSError:
            return 0.0

    def forget(self, model: ServedModel) -> None:
        """Its inference failed: look again whether it is loaded next time."""
        self._used.pop(model.name, None)

    def _loaded_lately(self, model: ServedModel) -> bool:
        """Used within half the idle time (`iei serve` unloads only after the whole of it), and
        Triton not gone meanwhile (a restart unloads every model loaded on demand)."""
        used = self._used.get(model.name)
        if used is None or used[1] != self.triton.forgotten:
            return False
        return time.monotonic() - used[0] < (self.idle_unload or 0) / 2

    async def ensure_loaded(self, model: ServedModel) -> None:
        """Return once `model` is in Triton: at once for a pinned one, or one this worker used
        lately; else ask Triton, and load what of it is not there (its text model too).
        Concurrent requests share one load; a load that failed is not tried again for a while
        (LOAD_BACKOFF), its requests answered 503 with the reason at once."""
        if not self.on_demand(model):
            return
        self._lease(model)
        if self._loaded_lately(model):
            return
        if not await self._missing(model):
            self.used(model)
            return
        load = self._loads.get(model.name)
        if load is None or load.done():
            self._refuse_while_backing_off(model)
            load = self._loads[model.name] = asyncio.create_task(self._load(model))
        # A request that gives up (its timeout) leaves the load running for the others.
        await asyncio.shield(load)

    async def _missing(self, model: ServedModel) -> dict[str, str]:
        """`model`'s Triton models that are not READY, in LOAD_ORDER (those it has), with their
        states."""
        index = await self.triton.repository_models()
        return {
            name: index[name] for name in triton_models(model, index) if index[name] != MODEL_READY
        }

    def _refuse_while_backing_off(self, model: ServedModel) -> None:
        failed = self._failed.get(model.name)
        if failed is None or time.monotonic() >= failed.not_before:
            return
        wait = math.ceil(failed.not_before - time.monotonic())
        raise ApiError(
            ErrorType.UNHEALTHY,
            f"model {model.name!r} failed to load ({failed.why}); it is tried again in {wait} s",
            headers={"Retry-After": str(wait)},
        )

    async def _load(self, model: ServedModel) -> None:
        started = time.perf_counter()
        try:
            # Another worker of this host may be loading it: one at a time, and what it loaded
            # is not loaded again (Triton 2.51 loads a model twice when asked twice at once).
            async with host_lock(f"{self.triton.endpoint}/{model.triton_image}"):
                if await self._missing(model):
                    async with self._room_for(model):
                        # asked again: the wait for room may have changed it
                        await self._load_missing(model, await self._missing(model))
        except NoRoom:
            raise
        except ApiError as exc:
            metrics.MODEL_LOADS.labels(model.name, "failed").inc()
            previous = self._failed.get(model.name)
            delay = min(LOAD_BACKOFF[1], 2 * previous.delay) if previous else LOAD_BACKOFF[0]
            self._failed[model.name] = FailedLoad(time.monotonic() + delay, delay, exc.message)
            log.error("model %r failed to load: %s (not tried again for %.0f s)", model.name,
                      exc.message, delay)  # fmt: skip
            raise
        self._failed.pop(model.name, None)
        metrics.MODEL_LOADS.labels(model.name, "loaded").inc()
        log.info("loaded model %r in %.1f s", model.name, time.perf_counter() - started)
        self.used(model)

    async def _load_missing(self, model: ServedModel, missing: dict[str, str]) -> None:
        """Load these Triton models of `model` in order; if one fails, unload those loaded
        before it: a split layout's steps, READY without their ensemble, held memory and
        processes until Triton restarted."""
        if not missing:
            return
        log.info("loading model %r on demand (Triton models %s)", model.name,
                 ", ".join(missing))  # fmt: skip
        loaded: list[str] = []
        try:
            for name, state in missing.items():
                await self._load_one(name, state)
                loaded.append(name)
        except ApiError:
            for name in reversed(loaded):
                with contextlib.suppress(ApiError):
                    await self.triton.unload_model(name)
            raise

    @asynccontextmanager
    async def _room_for(self, model: ServedModel) -> AsyncIterator[None]:
        """Within IEI_MAX_LOADED_MODELS: make room for `model`, then let it load. The loads of
        this host that need the limit's count go one at a time (one that waited `in_use` for
        the one before it is a NoRoom). Once loaded, the model runs one inference, so that it
        counts as in use before its own request reaches Triton."""
        if self.max_loaded is None:
            yield
            return
        try:
            async with host_lock(f"{self.triton.endpoint}/loaded-models", wait=self.in_use):
                await self._make_room(model)
                yield
                await self.triton.model_answers(model.triton_image)
        except LockBusy:
            raise NoRoom(
                ErrorType.UNHEALTHY,
                f"model {model.name!r} cannot load now: another load on this host has taken "
                f"{self.in_use:g} s (IEI_MAX_LOADED_MODELS: one at a time)",
                headers={"Retry-After": "5"},
            ) from None

    async def _make_room(self, model: ServedModel) -> None:
        """Unload the models loaded on demand that were used least recently, as many as
        `model` needs to fit within IEI_MAX_LOADED_MODELS, and wait until they (and any model
        unloading already) are gone: an unloading model holds its memory until its requests are
        done. A NoRoom (503) when those are in use: an inference, or a request of this host,
        within `in_use` seconds, the longest a request that used it may still run."""
        index = await self.triton.repository_models()
        occupying = (MODEL_READY, MODEL_LOADING, MODEL_UNLOADING)
        loaded = [
            m for m in self.models if m is not model and index.get(m.triton_image) in occupying
        ]
        # unloading already (another worker's room, the idle unloading): waited for below
        going = [m for m in loaded if index[m.triton_image] == MODEL_UNLOADING]
        over = len(loaded) + 1 - (self.max_loaded or 0) - len(going)
        if over <= 0 and not going:
            return
        now, free_in = time.time(), []
        idle: list[tuple[float, ServedModel]] = []
        for other in loaded if over > 0 else ():
            ready = [n for n in triton_models(other, index) if index[n] == MODEL_READY]
            if not self.on_demand(other) or index[other.triton_image] != MODEL_READY:
                continue
            last = await self.triton.last_inference(ready)
            if last is None:  # Triton did not say: taken for in use
                continue
            last = max(last, self._leased_at(other))
            if now - last >= self.in_use:
                idle.append((last, other))
            else:
                free_in.append(last + self.in_use - now)
        victims = [other for _, other in sorted(idle, key=lambda entry: entry[0])][: max(0, over)]
        if len(victims) < over:
            names = ", ".join(repr(m.name) for m in loaded)
            wait = math.ceil(min(free_in, default=self.in_use))
            raise NoRoom(
                ErrorType.UNHEALTHY,
                f"model {model.name!r} cannot load now: IEI_MAX_LOADED_MODELS={self.max_loaded} "
                f"models are loaded ({names}) and in use",
                headers={"Retry-After": str(max(1, wait))},
            )
        try:
            for victim in victims:
                await self._unload_for(victim, model, index)
            leaving = [
                n for v in going for n in triton_models(v, index) if index[n] == MODEL_UNLOADING
            ]
            await self._gone([n for v in victims for n in triton_models(v, index)] + leaving)
        except ApiError as exc:  # Triton failed the unload: this model was not tried
            raise NoRoom(
                ErrorType.UNHEALTHY, f"model {model.name!r} cannot load now: {exc.message}",
                headers={"Retry-After": "5"},
            ) from None  # fmt: skip

    async def _unload_for(
        self, victim: ServedModel, model: ServedModel, index: dict[str, str]
    ) -> None:
        names = [n for n in triton_models(victim, index) if index[n] == MODEL_READY]
        log.info("unloading model %r (Triton models %s) to load %r within "
                 "IEI_MAX_LOADED_MODELS=%d", victim.name, ", ".join(names), model.name,
                 self.max_loaded)  # fmt: skip
        self.forget(victim)
        for name in reversed(names):  # the ensemble before its steps
            await self.triton.unload_model(name)
        metrics.MODEL_EVICTIONS.labels(victim.name).inc()

    async def _gone(self, names: list[str]) -> None:
        """Return once none of these Triton models is READY or UNLOADING: Triton may answer an
        unload before the model is gone, and frees its memory only once its requests are done."""
        deadline = time.monotonic() + UNLOAD_WAIT
        while True:
            index = await self.triton.repository_models()
            left = [n for n in names if index.get(n) in (MODEL_READY, MODEL_UNLOADING)]
            if not left:
                return
            if time.monotonic() >= deadline:
                raise ApiError(
                    ErrorType.UNHEALTHY,
                    f"{', '.join(left)} still unloading after {UNLOAD_WAIT:g} s",
                )
            await asyncio.sleep(LOAD_POLL)

    async def _load_one(self, name: str, state: str) -> None:
        """Load one Triton model (in `state`); one that is LOADING already (another worker or
        frontend asked), or whose load outlasted the request timeout, is waited for by its
        state."""
        if state != MODEL_LOADING:
            try:
                await self.triton.load_model(name)
                return
            except ApiError as exc:
                if exc.error_type != ErrorType.TIMEOUT:
                    raise
        deadline = time.monotonic() + LOAD_WAIT
        while time.monotonic() < deadline:
            state, reason = (await self.triton.repository_index()).get(name, ("", ""))
            if state == MODEL_READY:
                return
            if state != MODEL_LOADING:
                raise ApiError(
                    ErrorType.UNHEALTHY, f"model {name} failed to load: {reason or state}",
                    headers={"Retry-After": "1"},
                )  # fmt: skip
            await asyncio.sleep(LOAD_POLL)
        raise ApiError(ErrorType.UNHEALTHY, f"model {name} was still loading after {LOAD_WAIT:g} s")

    async def describe(self, model: ServedModel) -> dict[str, Any]:
        """/info's entry of `model`: its facts (asked of the model once it is loaded; never
        loads it), its Triton models, and whether it is loaded now."""
        loaded = await self.triton.is_model_ready(model.triton_image)
        facts = self.triton.known_info(model.triton_image)
        if facts is None and loaded:
            try:
                facts = await self.triton.model_info(model.triton_image)
            except ApiError:
                facts = None
        facts = facts or {}
        modalities = facts.get("modalities") or (["image"] if facts else None)
        if modalities is not None:
            has_text = "text" in modalities
        else:  # not asked yet: its text model is in Triton's repository when it has one
            has_text = not model.default and await self._in_repository(model.triton_text)
        return {
            "name": model.name,
            "model_id": model.model_id,
            "default": model.default,
            "pinned": not self.on_demand(model),
            "loaded": loaded,
            "embedding_dimension": facts.get("embedding_dimension"),
            "modalities": modalities,
            "pooling": facts.get("pooling"),
            "dtype": facts.get("dtype"),
            "engine": facts.get("engine"),
            "device": facts.get("device"),
            "layout": facts.get("layout"),
            "zero_shot": facts.get("zero_shot"),
            "triton_models": {
                "image": model.triton_image,
                "text": model.triton_text if has_text else None,
            },
        }

    async def _in_repository(self, name: str) -> bool:
        try:
            return name in await self.triton.repository_models()
        except ApiError:
            return False


def triton_models(model: ServedModel, index: dict[str, str]) -> list[str]:
    """`model`'s Triton models that Triton's repository `index` has, in LOAD_ORDER."""
    return [model.triton_name(t) for t in LOAD_ORDER if model.triton_name(t) in index]
