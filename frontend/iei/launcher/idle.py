"""Unloading idle models (IEI_MODEL_IDLE_UNLOAD): decided here, in `iei serve` / `iei triton`,
from Triton's own statistics, never by the frontend's workers (each sees only its own requests).

A model that is not pinned and whose Triton models have had no inference for the idle time is
unloaded; its next request loads it again (server/served.py). The stubs of an unloaded model exit,
which the stub watch must not take for a crash: they are forgotten first, and the stubs are looked
at again whenever the set of loaded models changes (a request loaded one).

IEI_MAX_LOADED_MODELS is kept by the frontend, which unloads a model to load another; frontends
on several hosts may each make room at once, so here, too, the models past it that are not in use
are unloaded, the least recently used first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import httpx

from ..contract import IN_USE_SECONDS, MODEL_READY
from .repository import ModelPlan
from .triton_process import TritonServer

log = logging.getLogger("iei")


class IdleUnloader:
    TIMEOUT = 10.0  # seconds for one call to Triton's API (an unload waits for its requests)

    def __init__(
        self,
        triton: TritonServer,
        idle_seconds: float,
        counted: Callable[[str], None] | None = None,
        *,
        max_loaded: int | None = None,
        in_use: float = IN_USE_SECONDS,
    ) -> None:
        self.triton = triton
        self.idle = idle_seconds
        self.max_loaded = max_loaded  # IEI_MAX_LOADED_MODELS
        self.in_use = in_use  # seconds since its last inference while a model is in use
        self.counted = counted  # called with a model's name on each unload (metrics)
        self.interval = min(5.0, max(0.5, idle_seconds / 4))
        self.next_check = 0.0
        self.ready: set[str] = set()  # Triton models READY at the last look
        self.ready_since: dict[str, float] = {}  # served model -> when it was seen loaded

    def check(self) -> None:
        """Every `interval`: unload what has been idle for IEI_MODEL_IDLE_UNLOAD; re-watch the
        stubs when other models are loaded than at the last look. Never raises: Triton being
        down is the supervisor's business."""
        if time.monotonic() < self.next_check:
            return
        self.next_check = time.monotonic() + self.interval
        try:
            # never through a proxy of the environment (HTTP_PROXY): Triton is ours, here
            with httpx.Client(
                base_url=self.triton.url, timeout=self.TIMEOUT, trust_env=False
            ) as client:
                self._check(client)
        except httpx.HTTPError as exc:
            log.debug("idle check skipped: %s", exc)
        except Exception as exc:  # an answer that is not Triton's: the stack goes on regardless
            log.warning("idle check skipped: Triton's answer could not be read (%s: %s)",
                        type(exc).__name__, exc)  # fmt: skip

    def _check(self, client: httpx.Client) -> None:
        index = client.post("/v2/repository/index").raise_for_status().json()
        ready = {entry["name"] for entry in index if entry.get("state") == MODEL_READY}
        if ready != self.ready:
            self.triton.watch_stubs(ready)  # not a loading model's: a failed load's stubs exit
            self.ready = ready
        now = time.time()
        pinned = 0
        on_demand: list[tuple[float, ModelPlan, list[str]]] = []  # loaded, not idle
        for plan in self.triton.plans:
            if plan.model.triton_image not in ready:
                self.ready_since.pop(plan.model.name, None)
                continue
            if plan.model.pinned:
                pinned += 1
                continue
            names = [name for name in plan.triton_models if name in ready]
            since = self.ready_since.setdefault(plan.model.name, now)
            last = max([since, *(last_inference(client, name) for name in names)])
            if now - last >= self.idle:
                self.unload(client, plan, names, f"no request for {now - last:.0f} s "
                            "(IEI_MODEL_IDLE_UNLOAD)")  # fmt: skip
            else:
                on_demand.append((last, plan, names))
        over = pinned + len(on_demand) - (self.max_loaded or len(self.triton.plans))
        for last, plan, names in sorted(on_demand, key=lambda entry: entry[0])[: max(0, over)]:
            if now - last >= self.in_use:
                why = f"more than IEI_MAX_LOADED_MODELS={self.max_loaded} models are loaded"
                self.unload(client, plan, names, why, idle=False)

    def unload(
        self,
        client: httpx.Client,
        plan: ModelPlan,
        names: list[str],
        why: str,
        *,
        idle: bool = True,
    ) -> None:
        log.info("unloading model %r (Triton models %s): %s", plan.model.name, ", ".join(names),
                 why)  # fmt: skip
        self.triton.forget_stubs(names)
        for name in reversed(names):  # the ensemble before its steps
            response = client.post(f"/v2/repository/models/{name}/unload")
            if response.status_code != 200:
                log.warning("unloading %s failed: %s", name, response.text[:200])
        self.ready_since.pop(plan.model.name, None)
        self.ready -= set(names)
        if idle and self.counted is not None:  # iei_model_unloads_total counts the idle ones
            self.counted(plan.model.name)


def last_inference(client: httpx.Client, model: str) -> float:
    """When `model` last ran an inference (Unix seconds; 0 if never), from Triton's statistics."""
    response = client.get(f"/v2/models/{model}/stats")
    if response.status_code != 200:
        return 0.0
    stats = response.json().get("model_stats") or [{}]
    return max(float(s.get("last_inference") or 0) for s in stats) / 1000.0
