"""The frontend's client of Triton: readiness, the model's batch limit, inference."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import aiohttp
import httpx
import numpy as np
import tritonclient.http as triton_http
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from ..contract import (
    EXECUTION_CORES_METRIC,
    EXECUTION_SECONDS_METRIC,
    INFO_OUTPUT_NAME,
    INPUT_NAME,
    INVALID_INPUT_PATTERN,
    MODEL_NAME,
    OUTPUT_NAME,
    PROBE_IMAGE,
    PROBE_PRIORITY,
    STAGE_MODEL_NAMES,
    TEXT_INPUT_NAME,
    TEXT_MODEL_NAME,
    TOKENS_OUTPUT_NAME,
)
from ..launcher.processes import SHM_DIR, remove_stale_regions
from . import metrics
from .errors import ApiError, ErrorType, first_error
from .inputs import InvalidInput
from .limits import WORK, outliving
from .triton_http import FilesInput, TritonHttpClient
from .triton_shm import PREFIX, SharedMemoryRegion

log = logging.getLogger("iei")

_INVALID_INPUT = re.compile(INVALID_INPUT_PATTERN, re.S)
# A probe of the model (health, or a failure to explain) gives up after this long: well under the
# probe timeouts of Kubernetes (3 s) and compose (5 s). It is sent at the head of Triton's queue
# (PROBE_PRIORITY), so a full queue does not hold it up.
PROBE_TIMEOUT = 2.0
# A successful inference vouches for the model this long; after that, /health asks it again.
VERIFIED_FOR = 10.0
# How far back a probe held or refused by a full queue looks for requests completed by the model
# (for any client): several periods of Kubernetes' and compose's probes (10 s).
PROGRESS_HORIZON = 3 * VERIFIED_FOR
# A probe held behind an execution that goes on computing (its seconds on Triton's metrics port
# grow, its process uses BUSY_CORES of a core at least: the launcher's BUSY_CPU) waits behind
# load, not a broken model: one batch of 64 large photos, or of a large model on a CPU, runs for
# tens of seconds, and the model completes nothing meanwhile.
BUSY_CORES = 0.2
# The two reads of those gauges are this far apart at least (the stubs show them every second),
# and each waits this long at most: Triton answers its metrics page in milliseconds, and /health
# must answer within the probe timeouts of Kubernetes (3 s) and compose (5 s).
READS_APART = 1.5
METRICS_TIMEOUT = 0.5
# The first read waits this long into the probe: one answered sooner, as a healthy model's is,
# reads nothing.
FIRST_READ_AFTER = 0.5
# What Triton's metrics show of a model's long executions: (when read, instance -> (seconds so
# far, cores used lately)).
Executions = tuple[float, dict[str, tuple[float, float]]]
T = TypeVar("T")
# Triton's HTTP status for an unknown or unloaded model (404) and for a model that cannot take the
# request now (503: not ready, queue full, queue timeout): the service is unavailable, retry.
_UNAVAILABLE_STATUSES = ("404", "503")
# Triton's words for a model it has not loaded (explicit model control: unloaded when idle).
UNKNOWN_MODEL = "Request for unknown model"


def joined(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


class TritonClient:
    """Sends images to the `iei` model and texts to `iei_text` in chunks, and maps Triton's
    failures to API errors.

    One client (one aiohttp connection pool, kept alive) per worker process; it must be created
    inside the running event loop, hence `open()` in the app's lifespan.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        concurrency_level: int,
        timeout: float,
        shm_bytes: int = 0,
        metrics_endpoint: str | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.metrics_endpoint = metrics_endpoint  # host:port of Triton's metrics, where known
        self._metrics: httpx.AsyncClient | None = None
        self.concurrency_level = concurrency_level
        self.timeout = timeout
        self.shm_bytes = shm_bytes  # the worker's shared memory region for Triton (0: none)
        self._client: TritonHttpClient | None = None
        self._max_batch_sizes: dict[str, int] = {}
        self._model_info: dict[str, dict[str, Any]] = {}  # Triton image model -> its facts
        self.forgotten = 0  # times facts were forgotten (forget_facts)
        # Per Triton model: when an inference last succeeded (monotonic), its running probe.
        self._verified_at: dict[str, float] = {}
        self._probes: dict[str, asyncio.Task[bool]] = {}
        # Per Triton model: (when, how many requests it had completed successfully, for anyone) at
        # each look within PROGRESS_HORIZON (see _made_progress), and when Triton last failed one
        # of our requests to it (not refused it).
        self._successes_seen: dict[str, list[tuple[float, int]]] = {}
        self._model_failed_at: dict[str, float] = {}
        self._region: SharedMemoryRegion | None = None  # the worker's, when IEI_TRITON_SHM_MB > 0

    async def open(self) -> None:
        if self.shm_bytes > 0 and SHM_DIR.is_dir():
            remove_stale_regions(PREFIX)
            self._region = SharedMemoryRegion(self.shm_bytes)
        self._client = TritonHttpClient(
            self.endpoint,
            shared_memory=self._region,
            conn_limit=max(100, self.concurrency_level),
            conn_timeout=self.timeout,
        )
        if self.metrics_endpoint is not None:
            url = f"http://{self.metrics_endpoint}"
            # trust_env=False: a proxy of the environment (HTTP_PROXY) is not a way to Triton
            self._metrics = httpx.AsyncClient(
                base_url=url, timeout=METRICS_TIMEOUT, trust_env=False
            )

    async def close(self) -> None:
        if self._metrics is not None:
            await self._metrics.aclose()
            self._metrics = None
        if self._client is not None:
            if self._region is not None:
                await self._region.close(self._client)
                self._region = None
            await self._client.close()
            self._client = None

    @property
    def server(self) -> TritonHttpClient:
        if self._client is None:
            raise RuntimeError("TritonClient.open() was not called")
        return self._client

    async def is_ready(self, models: tuple[str, ...] = (MODEL_NAME,)) -> bool:
        """True when every one of `models` (Triton image models) really answers.

        Triton keeps reporting a model ready after its Python stub died (every inference then
        fails), so readiness rests on a real inference: a recent success, or a probe.
        """
        answers = await asyncio.gather(*(self._answers(model) for model in models))
        return all(answers)

    async def _answers(self, model: str) -> bool:
        if time.monotonic() - self._verified_at.get(model, -math.inf) < VERIFIED_FOR:
            self._note(model, await self._successes(model))  # the baseline of a later full queue
            return await self.is_model_ready(model)
        return await self.model_answers(model)

    async def is_model_ready(self, model: str) -> bool:
        """Triton's readiness of `model` (metadata: answered at once, never queued); False when
        Triton does not answer."""
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                return bool(await self.server.is_model_ready(model))
        except (InferenceServerException, aiohttp.ClientError, OSError, TimeoutError):
            return False

    async def model_answers(self, model: str = MODEL_NAME) -> bool:
        """A real inference of a 1x1 image, at the head of Triton's queue, within PROBE_TIMEOUT.
        Callers at the same moment share one probe."""
        probe = self._probes.get(model)
        if probe is None or probe.done():
            probe = self._probes[model] = asyncio.create_task(self._run_probe(model))
        return await asyncio.shield(probe)

    async def _run_probe(self, model: str) -> bool:
        WORK.set(None)  # shared by every caller: no request's work (this task's own context)
        request = self._bytes_input(INPUT_NAME, [PROBE_IMAGE])
        started = await self._successes(model)
        self._note(model, started)
        started_at = time.monotonic()
        executions = asyncio.create_task(self._executions(model, after=FIRST_READ_AFTER))
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                if not await self.server.is_model_ready(model):
                    self.forget_facts(model)
                    return False
                wanted = [triton_http.InferRequestedOutput(OUTPUT_NAME, binary_data=True)]
                result = await self.server.infer(
                    model, [request], outputs=wanted, priority=PROBE_PRIORITY
                )
            if result.as_numpy(OUTPUT_NAME) is None:
                return False
            self._verified_at[model] = time.monotonic()
            return True
        except TimeoutError:  # held in the queue, or Triton hangs
            return await self._busy(model, started, started_at, executions)
        except InferenceServerException as exc:
            if exc.status() == "503":  # refused: the queue is full
                return await self._busy(model, started, started_at, executions)
            return False  # the model failed it (a dead stub): no excuse
        except (aiohttp.ClientError, OSError):  # Triton is down: it may come back another
            self.forget_facts()
            return False
        finally:
            executions.cancel()  # unused: the probe answered, or another excuse held

    async def _busy(
        self,
        model: str,
        started: int | None,
        started_at: float,
        executions: asyncio.Task[Executions | None],
    ) -> bool:
        """After a probe that a full queue refused or held past PROBE_TIMEOUT: whether the model
        is busy rather than broken, answering others (_made_progress) or in an execution that
        computes (_computing)."""
        if await self._made_progress(model, started, started_at):
            return True
        return await self._computing(model, await executions)

    async def _successes(self, model: str) -> int | None:
        """How many requests the model has completed successfully (Triton's statistics, for every
        client), or None when Triton does not say."""
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                stats = await self.server.get_inference_statistics(model)
            return int(stats["model_stats"][0]["inference_stats"]["success"]["count"])
        except Exception:  # Triton down, or statistics of another shape: no evidence
            return None

    def _note(self, model: str, count: int | None) -> None:
        """Keep `count` (`model`'s successes now) and the looks within PROGRESS_HORIZON."""
        now = time.monotonic()
        seen = [
            (t, c) for t, c in self._successes_seen.get(model, []) if now - t <= PROGRESS_HORIZON
        ]
        self._successes_seen[model] = [*seen, *([(now, count)] if count is not None else [])]

    async def _made_progress(self, model: str, started: int | None, started_at: float) -> bool:
        """After a probe that a full queue refused or held past PROBE_TIMEOUT (even at its
        priority it waits for the execution in front of it, and the split layout's preprocessing
        of 64 large photos takes seconds on one core): whether the model completed others'
        requests within PROGRESS_HORIZON (since the earliest look kept, or the probe's start),
        counting only looks taken after the model last failed a request of ours: a dead stub
        (whose probe may hang rather than fail) completes nothing after its first failure. A
        probe that the model failed never gets here."""
        count = await self._successes(model)
        failed = self._model_failed_at.get(model, -math.inf)
        earlier = [c for t, c in self._successes_seen.get(model, []) if t > failed]
        self._note(model, count)
        if started is not None and started_at > failed:
            earlier.append(started)
        return count is not None and bool(earlier) and count > min(earlier)

    async def _computing(self, model: str, before: Executions | None) -> bool:
        """Whether an instance of `model` (or of its steps) is in an execution that went on
        computing since `before` (read as the probe began; read again READS_APART later at
        least): its seconds grew by half the time between the reads at least (a stub whose
        watching thread stopped, in a deadlock that holds the GIL or dead, leaves its last
        values) and its process used BUSY_CORES. One instance at work vouches for the model even
        beside a dead one: the launcher restarts Triton for that."""
        if before is None:
            return False
        await asyncio.sleep(max(0.0, before[0] + READS_APART - time.monotonic()))
        after = await self._executions(model)
        if after is None:
            return False
        (then, earlier), (now, later) = before, after
        for instance, (seconds, cores) in later.items():
            grew = seconds - earlier.get(instance, (0.0, 0.0))[0]
            if seconds > 0 and grew >= (now - then) / 2 and cores >= BUSY_CORES:
                log.info(
                    "%s is busy: a health probe waits behind an execution of %.0f s so far that "
                    "computes (%s, %.1f cores)", model, seconds, instance, cores,
                )  # fmt: skip
                return True
        return False

    async def _executions(self, model: str, after: float = 0.0) -> Executions | None:
        """The long executions of `model` and of its steps (the split layout), as Triton's
        metrics show them `after` seconds from now (iei_runtime/executions.py); None where they
        cannot be read."""
        if self._metrics is None:
            return None
        await asyncio.sleep(after)
        steps = (model + step.removeprefix(MODEL_NAME) for step in STAGE_MODEL_NAMES)
        names = {model, *steps}
        wanted = (EXECUTION_SECONDS_METRIC, EXECUTION_CORES_METRIC)
        values: dict[str, dict[str, float]] = {}
        try:
            response = await self._metrics.get("/metrics")
            response.raise_for_status()
            read_at = time.monotonic()
            # Only the two gauges' lines go through the parser: Triton's page has hundreds.
            lines = [line for line in response.text.splitlines() if any(w in line for w in wanted)]
            for family in text_string_to_metric_families("\n".join(lines) + "\n"):
                for sample in family.samples:
                    if family.name in wanted and sample.labels.get("model") in names:
                        instance = sample.labels.get("instance", "")
                        values.setdefault(instance, {})[family.name] = sample.value
        except Exception:  # down, or a page the parser refuses: no evidence
            return None
        return read_at, {
            instance: (found.get(wanted[0], 0.0), found.get(wanted[1], 0.0))
            for instance, found in values.items()
        }

    async def max_batch_size(self, model: str = MODEL_NAME) -> int:
        """A model's `max_batch_size`, read from Triton once (it may start after us)."""
        if model not in self._max_batch_sizes:
            config = await self._call(self.server.get_model_config(model), model=model)
            self._max_batch_sizes[model] = max(1, int(config.get("max_batch_size", 1)))
        return self._max_batch_sizes[model]

    def forget_facts(self, model: str | None = None) -> None:
        """Ask `model`'s facts (every model's: None) again next time: it went away (Triton down,
        the model unloaded or not ready), and what comes back may be another checkpoint or
        config under the same name (an external Triton), whose vectors the content cache, keyed
        by those facts, must not take for the old ones. `forgotten` counts these moments: what
        a worker knew of the models before one (served.py: loaded lately) is stale."""
        self.forgotten += 1
        for facts in (self._model_info, self._max_batch_sizes):
            if model is None:
                facts.clear()
            else:
                facts.pop(model, None)

    def known_info(self, model: str = MODEL_NAME) -> dict[str, Any] | None:
        """The facts of `model` (a Triton image model) if this worker asked them already."""
        return self._model_info.get(model)

    async def model_info(self, model: str = MODEL_NAME) -> dict[str, Any]:
        """What the model says about itself (MODEL_INFO) plus the embedding dimension, asked
        once with a probe image."""
        if model not in self._model_info:
            request = self._bytes_input(INPUT_NAME, [PROBE_IMAGE])
            outputs = [
                triton_http.InferRequestedOutput(OUTPUT_NAME, binary_data=True),
                triton_http.InferRequestedOutput(INFO_OUTPUT_NAME, binary_data=True),
            ]
            call = self.server.infer(model, [request], outputs=outputs)
            result = await self._call(call, model=model)
            info = json.loads(result.as_numpy(INFO_OUTPUT_NAME).reshape(-1)[0])
            info["embedding_dimension"] = int(result.as_numpy(OUTPUT_NAME).shape[1])
            self._model_info[model] = info
        return self._model_info[model]

    async def repository_models(self) -> dict[str, str]:
        """Triton's repository index: every model folder -> its state (READY, LOADING,
        UNAVAILABLE...; empty when never loaded)."""
        return {name: state for name, (state, _) in (await self.repository_index()).items()}

    async def repository_index(self) -> dict[str, tuple[str, str]]:
        """Every model folder -> (its state, the reason Triton gives for it: a failed load's)."""
        index = await self._call(self.server.get_model_repository_index())
        return {e["name"]: (e.get("state", ""), e.get("reason", "")) for e in index}

    async def load_model(self, model: str) -> None:
        """Load `model` (explicit model control); Triton answers once it is ready. A load that
        outlasts IEI_REQUEST_TIMEOUT (a large checkpoint) is an ApiError of type TIMEOUT: the
        load goes on in Triton, and the caller waits for its state."""
        try:
            await self.server.load_model(model)
        except InferenceServerException as exc:
            raise ApiError(
                ErrorType.UNHEALTHY,
                f"model {model} failed to load: {exc.message() or exc}",
                headers={"Retry-After": "1"},
            ) from None
        except TimeoutError:
            raise ApiError(ErrorType.TIMEOUT, f"model {model} is still loading") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise ApiError(
                ErrorType.UNHEALTHY, f"the inference server is unreachable ({type(exc).__name__})"
            ) from None

    async def unload_model(self, model: str) -> None:
        """Ask Triton to unload `model` (explicit model control). Triton may answer before it is
        gone: it is UNLOADING until its requests in flight are done."""
        await self._call(self.server.unload_model(model), explain=False, model=model)
        self._verified_at.pop(model, None)
        self.forget_facts(model)

    async def last_inference(self, models: list[str]) -> float | None:
        """When any of `models` last ran an inference (Unix seconds; 0 if never), from Triton's
        statistics; None when Triton does not say."""
        last = 0.0
        try:
            for model in models:
                async with asyncio.timeout(PROBE_TIMEOUT):
                    stats = await self.server.get_inference_statistics(model)
                for entry in stats.get("model_stats") or ():
                    last = max(last, float(entry.get("last_inference") or 0) / 1000.0)
        except (InferenceServerException, aiohttp.ClientError, OSError, TimeoutError, ValueError):
            return None
        return last

    async def embed(self, images: list[bytes], model: str = MODEL_NAME) -> np.ndarray:
        """Vectors for `images` by `model` (a Triton image model), in order: chunks of at most
        max_batch_size, and at most `concurrency_level` images in flight at once."""
        parts = await self._chunked(model, INPUT_NAME, images, (OUTPUT_NAME,))
        return joined([part[0] for part in parts])

    async def embed_texts(
        self, texts: list[str], model: str = TEXT_MODEL_NAME
    ) -> tuple[np.ndarray, np.ndarray]:
        """Vectors for `texts` (by `model`, a text model: `iei_text`), in order, and each text's
        tokens before truncation; chunked as images are."""
        items = [text.encode() for text in texts]
        parts = await self._chunked(
            model, TEXT_INPUT_NAME, items, (OUTPUT_NAME, TOKENS_OUTPUT_NAME)
        )
        vectors = joined([part[0] for part in parts])
        return vectors, joined([part[1] for part in parts]).reshape(-1)

    async def count_tokens(self, texts: list[str], model: str = TEXT_MODEL_NAME) -> np.ndarray:
        """Each text's tokens before truncation, from `model` (a text model: `iei_text`) without
        its text tower (a request for TOKENS alone): what a refusal of an over-long text needs,
        no inference."""
        items = [text.encode() for text in texts]
        parts = await self._chunked(model, TEXT_INPUT_NAME, items, (TOKENS_OUTPUT_NAME,))
        return joined([part[0] for part in parts]).reshape(-1)

    async def _chunked(
        self, model: str, input_name: str, items: list[bytes], outputs: tuple[str, ...]
    ) -> list[list[np.ndarray]]:
        """`items` in chunks of at most the model's max_batch_size, at most `concurrency_level`
        items in flight at once; each chunk's `outputs`, in order."""
        chunk = min(await self.max_batch_size(model), self.concurrency_level)
        parallel = asyncio.Semaphore(max(1, self.concurrency_level // chunk))

        async def run(start: int) -> list[np.ndarray]:
            async with parallel:  # serialized once its turn comes: a copy only while in flight
                request = self._bytes_input(input_name, items[start : start + chunk])
                return await self._infer(model, request, outputs, start)

        # The first chunk that fails cancels the others: nothing of the request is left running
        # when this returns or raises.
        tasks = []
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(run(s)) for s in range(0, len(items), chunk)]
        except BaseExceptionGroup as failed:
            raise first_error(failed) from None
        return [task.result() for task in tasks]

    @staticmethod
    def _bytes_input(name: str, items: list[bytes]) -> FilesInput:
        """The items as a BYTES input, written to Triton one by one (triton_http.py)."""
        return FilesInput(name, items)

    async def _infer(
        self,
        model: str,
        request: triton_http.InferInput,
        outputs: tuple[str, ...],
        offset: int,
        *,
        priority: int = 0,
        explain: bool = True,
    ) -> list[np.ndarray]:
        wanted = [triton_http.InferRequestedOutput(name, binary_data=True) for name in outputs]
        # Once sent, Triton computes it whoever waits: it runs to its end, counted in the request's
        # work (a timeout does not give the request's permits back before Triton does).
        call = outliving(self.server.infer(model, [request], outputs=wanted, priority=priority))
        with metrics.TRITON_SECONDS.time():
            result = await self._call(call, offset, explain=explain, model=model)
        arrays = [result.as_numpy(name) for name in outputs]
        count = request.shape()[0]
        if any(array is None or array.shape[0] != count for array in arrays):
            raise ApiError(ErrorType.BACKEND, "Triton returned no embedding for some inputs")
        return arrays

    async def _call(
        self, call: Awaitable[T], offset: int = 0, *, explain: bool = True, model: str = MODEL_NAME
    ) -> T:
        """Await a Triton call; its failures become API errors, by Triton's status, and a bad
        input an `InvalidInput`. `offset`: the position of the call's first item among those of
        the embed call. `explain`: on a failure of the model itself (Triton's 500), probe the
        model to tell a broken request (424) from a broken model (503)."""
        try:
            result = await call
        except InferenceServerException as exc:
            status, message = exc.status(), exc.message() or str(exc)
            if UNKNOWN_MODEL in message:  # not loaded (an unloaded model is unknown to Triton)
                status = "404"
            if status == "400":  # the model refused the input (INVALID_ARG): the client's fault
                found = _INVALID_INPUT.search(message)
                if found:  # name the client's own index
                    raise InvalidInput(found.group(2), offset + int(found.group(1))) from None
                raise ApiError(ErrorType.VALIDATION, message) from None
            self._verified_at.pop(model, None)
            if status == "404":  # not loaded: what loads next may be another checkpoint
                self.forget_facts(model)
            elif status not in _UNAVAILABLE_STATUSES:  # the model failed it: older progress void
                self._model_failed_at[model] = time.monotonic()
            if status in _UNAVAILABLE_STATUSES or not (explain and await self.model_answers(model)):
                raise ApiError(
                    ErrorType.UNHEALTHY,
                    f"the model is unavailable: {message}",
                    headers={"Retry-After": "1"},
                ) from None
            raise ApiError(ErrorType.BACKEND, f"inference failed: {message}") from None
        except TimeoutError:
            self._verified_at.pop(model, None)
            raise ApiError(
                ErrorType.TIMEOUT, f"Triton did not answer within {self.timeout:g} s"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            self._verified_at.pop(model, None)
            self.forget_facts()
            log.warning("Triton unreachable at %s: %s", self.endpoint, exc)
            raise ApiError(
                ErrorType.UNHEALTHY, f"the inference server is unreachable ({type(exc).__name__})"
            ) from None
        self._verified_at[model] = time.monotonic()
        return result
