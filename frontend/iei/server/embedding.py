"""The embedding pipeline shared by the TEI and OpenAI routes: limits, inputs, Triton, timing."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np
from starlette.concurrency import run_in_threadpool

from . import metrics
from .errors import ApiError, ErrorType, overloaded
from .fetch import UrlFetcher
from .inputs import InvalidInput, fetch_urls, prepare_inputs
from .limits import Capacity
from .settings import ServerSettings
from .triton_client import TritonClient

# A request of at most INLINE_INPUTS inputs and INLINE_INPUT_SIZE characters (base64) or bytes
# (fetched) is decoded and header-checked on the event loop: under a millisecond, less than the
# hop to a worker thread and back costs the loop. Anything larger goes to a thread.
INLINE_INPUTS = 8
INLINE_INPUT_SIZE = 256 * 1024


@dataclass
class Services:
    """Everything a request needs, one per worker process (created in the app's lifespan)."""

    settings: ServerSettings
    triton: TritonClient
    fetcher: UrlFetcher
    permits: Capacity  # images in flight in this worker


@dataclass(frozen=True)
class Embedded:
    vectors: np.ndarray  # (N, D) float32, raw
    started: float  # perf_counter() when the request arrived
    queue_seconds: float  # arrival -> sent to Triton (inputs fetched, decoded, checked)
    inference_seconds: float  # Triton's round trip

    def timing_headers(self) -> dict[str, str]:
        """TEI's timing headers, in milliseconds."""
        total = time.perf_counter() - self.started
        return {
            "x-total-time": str(round(total * 1000)),
            "x-queue-time": str(round(self.queue_seconds * 1000)),
            "x-inference-time": str(round(self.inference_seconds * 1000)),
        }


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """Unit L2 norm per row; an all-zero vector stays zero instead of becoming NaN."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, np.finfo(np.float32).tiny)


async def embed_inputs(items: list[str], services: Services, started: float) -> Embedded:
    """Validate, fetch and check the inputs, then embed them with Triton; raw vectors."""
    settings = services.settings
    count = len(items)
    if count == 0:
        raise ApiError(ErrorType.EMPTY, "`inputs` cannot be empty")
    if count > settings.max_client_batch_size:
        raise ApiError(
            ErrorType.VALIDATION,
            f"batch size {count} > maximum allowed batch size {settings.max_client_batch_size}",
        )
    if not services.permits.try_take(count):
        raise overloaded(settings.max_concurrent_images, count)
    downloads = services.fetcher.request_budget(settings.url_request_max_bytes)
    try:
        async with asyncio.timeout(settings.request_timeout):
            try:
                fetched = await fetch_urls(items, services.fetcher, downloads)
                size = sum(map(len, items)) + sum(map(len, fetched.values()))
                if count <= INLINE_INPUTS and size <= INLINE_INPUT_SIZE:
                    images = prepare_inputs(items, settings.max_image_pixels, fetched)
                else:  # base64 of many megabytes is real CPU work: keep it off the event loop.
                    images = await run_in_threadpool(
                        prepare_inputs, items, settings.max_image_pixels, fetched
                    )
            except InvalidInput as exc:
                raise ApiError(ErrorType.VALIDATION, str(exc)) from None
            sent = time.perf_counter()
            vectors = await services.triton.embed([image.data for image in images])
    except TimeoutError:
        raise ApiError(
            ErrorType.TIMEOUT, f"request took longer than {settings.request_timeout:g} s"
        ) from None
    finally:  # every part of the work has ended here (task groups): nothing still holds these
        downloads.release()
        services.permits.give_back(count)
    metrics.IMAGES.inc(count)
    metrics.IMAGES_PER_REQUEST.observe(count)
    return Embedded(vectors, started, sent - started, time.perf_counter() - sent)
