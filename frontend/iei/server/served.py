"""The served models as one worker sees them: which one a request's `model` names, and loading
one that is not in Triton (IEI_MODEL_IDLE_UNLOAD) before its request goes on.

Unloading is not decided here: each worker sees only its own requests. `iei serve` decides it from
Triton's own statistics (launcher/idle.py), so every request of every worker counts.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

from ..contract import MODEL_NAME, STAGE_MODEL_NAMES, TEXT_MODEL_NAME
from ..models import ServedModel, lookup
from . import metrics
from .errors import ApiError, ErrorType
from .settings import ServerSettings
from .triton_client import TritonClient

log = logging.getLogger("iei")

# The order a model's Triton models load in: an ensemble's steps before the ensemble.
LOAD_ORDER = (*STAGE_MODEL_NAMES, MODEL_NAME, TEXT_MODEL_NAME)
MODEL_NOT_FOUND = "model_not_found"  # OpenAI's code


class ServedModels:
    def __init__(self, settings: ServerSettings, triton: TritonClient) -> None:
        self.models = settings.served
        self.triton = triton
        self.idle_unload = settings.model_idle_unload
        self._loads: dict[str, asyncio.Task[None]] = {}
        self._used: dict[str, float] = {}  # name -> when an inference of it last succeeded

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
        self._used[model.name] = time.monotonic()

    def forget(self, model: ServedModel) -> None:
        """Its inference failed: look again whether it is loaded next time."""
        self._used.pop(model.name, None)

    async def ensure_loaded(self, model: ServedModel) -> None:
        """Return once `model` is in Triton: at once for a pinned one, or one this worker used
        within half the idle time (`iei serve` unloads only after the whole of it); else ask
        Triton, and load it if it is not there. Concurrent requests share one load."""
        if not self.on_demand(model) or self.idle_unload is None:
            return
        since = time.monotonic() - self._used.get(model.name, -math.inf)
        if since < self.idle_unload / 2:
            return
        if await self.triton.is_model_ready(model.triton_image):
            self.used(model)
            return
        load = self._loads.get(model.name)
        if load is None or load.done():
            load = self._loads[model.name] = asyncio.create_task(self._load(model))
        # A request that gives up (its timeout) leaves the load running for the others.
        await asyncio.shield(load)

    async def _load(self, model: ServedModel) -> None:
        present = await self.triton.repository_models()
        names = [model.triton_name(t) for t in LOAD_ORDER if model.triton_name(t) in present]
        log.info("loading model %r on demand (Triton models %s)", model.name, ", ".join(names))
        started = time.perf_counter()
        try:
            for name in names:
                await self.triton.load_model(name)
        except ApiError as exc:
            metrics.MODEL_LOADS.labels(model.name, "failed").inc()
            log.error("model %r failed to load: %s", model.name, exc.message)
            raise
        metrics.MODEL_LOADS.labels(model.name, "loaded").inc()
        log.info("loaded model %r in %.1f s", model.name, time.perf_counter() - started)
        self.used(model)

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
