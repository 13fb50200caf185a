"""The embedding pipeline shared by the TEI and OpenAI routes: limits, inputs, Triton, timing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np
from starlette.concurrency import run_in_threadpool

from ..models import ServedModel
from . import metrics
from .cache import Key, ModelKey, VectorCache, digest
from .errors import ApiError, ErrorType, first_error, overloaded
from .fetch import RequestBytes, UrlFetcher
from .inputs import ImageInput, InvalidInput, fetch_urls, prepare_inputs
from .label_vectors import LabelVectors
from .limits import Capacity, outliving, request_work
from .served import ServedModels
from .settings import ServerSettings
from .triton_client import TritonClient

IMAGE, TEXT = "image", "text"  # the modalities
T = TypeVar("T")

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
    permits: Capacity  # inputs in flight in this worker
    models: ServedModels  # which model a request names; loading on demand
    labels: LabelVectors = field(default_factory=LabelVectors)  # /classify's hypotheses
    cache: VectorCache = field(default_factory=lambda: VectorCache(0))  # raw vectors by content


@dataclass(frozen=True)
class Embedded:
    vectors: np.ndarray  # (N, D) float32, raw
    started: float  # perf_counter() when the request arrived
    queue_seconds: float  # arrival -> sent to Triton (inputs fetched, decoded, checked)
    inference_seconds: float  # Triton's round trip
    images: tuple[ImageInput, ...] = ()  # the image inputs' headers (format, size), in order

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


@dataclass(frozen=True)
class Input:
    """One input of a request: an image (base64, data: URI or URL; or the file itself, bytes,
    from a raw upload) or a text. `name` (a form part's filename) joins `inputs[i]` in errors."""

    modality: str  # IMAGE or TEXT
    value: str | bytes
    name: str | None = None


async def embed_inputs(
    items: list[Input],
    services: Services,
    started: float,
    *,
    truncate: bool = True,
    model: ServedModel | None = None,
) -> Embedded:
    """Validate, fetch and check the inputs, then embed them with Triton (images with the
    model's image model, `iei` for the default; texts with its text model, `iei_text`; both at
    once); raw vectors in input order. A model that is not loaded is loaded first, within the
    request's timeout. A text longer than the model's context is cut to it, or refused when
    `truncate` is false: then before anything is embedded (the model counts the tokens of each
    text first, without its text tower). With the content cache on (IEI_CACHE_MB), an input
    whose vector is cached, or that came earlier in the same request, is not sent to Triton."""
    settings = services.settings
    model = model or services.models.default
    deadline = asyncio.get_running_loop().time() + settings.request_timeout
    count = len(items)
    if count == 0:
        raise ApiError(ErrorType.EMPTY, "`inputs` cannot be empty")
    if count > settings.max_client_batch_size:
        raise ApiError(
            ErrorType.VALIDATION,
            f"batch size {count} > maximum allowed batch size {settings.max_client_batch_size}",
        )
    images = [i for i, item in enumerate(items) if item.modality == IMAGE]
    texts = [i for i, item in enumerate(items) if item.modality == TEXT]
    await load_within(services, model, deadline)
    context = await text_context(services, model) if texts else 0
    if not services.permits.try_take(count):
        raise overloaded(settings.max_concurrent_images, count)
    downloads = services.fetcher.request_budget(settings.url_request_max_bytes)

    def release() -> None:
        downloads.release()
        services.permits.give_back(count)

    with request_work() as work:
        try:
            async with asyncio.timeout_at(deadline):
                try:
                    values = [str(items[i].value) for i in texts]
                    for value, position in zip(values, texts, strict=True):
                        check_text(value, settings.max_text_chars, position)
                    if values and not truncate:
                        tokens = await named(
                            services.triton.count_tokens(values, model.triton_text), texts
                        )
                        refuse_overlong(tokens, texts, context)
                    checked = await image_files(
                        [items[i].value for i in images], images, services, downloads
                    )
                    files = [image.data for image in checked]
                    image_part = await cached_part(services, model, IMAGE, files)
                    text_part = await cached_part(services, model, TEXT, values)
                    # Only what is not cached (once each) goes to Triton.
                    send = (
                        [files[i] for i in image_part.todo],
                        [images[i] for i in image_part.todo],
                        [values[i] for i in text_part.todo],
                        [texts[i] for i in text_part.todo],
                    )
                    sent = time.perf_counter()
                    try:
                        done = await infer(services, model, *send)
                    except ApiError as exc:
                        if exc.error_type != ErrorType.UNHEALTHY:
                            raise
                        services.models.forget(model)  # unloaded meanwhile? ask Triton again
                        if not services.models.on_demand(model):
                            raise
                        await services.models.ensure_loaded(model)  # once more, loaded
                        done = await infer(services, model, *send)
                except InvalidInput as exc:  # a 422, or what an `InputFailed` says it is
                    raise ApiError(
                        exc.error_type, named_error(exc, items), headers=exc.headers
                    ) from None
        except TimeoutError:
            raise ApiError(
                ErrorType.TIMEOUT, f"request took longer than {settings.request_timeout:g} s"
            ) from None
        finally:
            # What can be stopped was (task groups); a decoding thread or a call already in
            # Triton runs on after a timeout, and keeps the request's inputs counted until it
            # has ended.
            work.then(release)
    parts = [
        (images, image_part.complete(done.get(IMAGE), services.cache)),
        (texts, text_part.complete(done[TEXT][0] if TEXT in done else None, services.cache)),
    ]
    vectors = in_order(count, parts)
    if image_part.todo or text_part.todo:
        services.models.used(model)
    metrics.IMAGES.labels(model.name).inc(len(images))
    metrics.TEXTS.labels(model.name).inc(len(texts))
    if images:
        metrics.IMAGES_PER_REQUEST.labels(model.name).observe(len(images))
    facts = tuple(replace(image, data=b"") for image in checked)  # not the files themselves
    return Embedded(vectors, started, sent - started, time.perf_counter() - sent, facts)


@dataclass
class CachedPart:
    """The inputs of one modality against the content cache: what it had (`cached`, by index
    among them), and the inputs still to embed (`todo`: the first of each distinct content)."""

    modality: str
    model: str
    keys: list[Key] | None  # None: the cache is off
    cached: dict[int, np.ndarray]
    todo: list[int]

    def complete(self, computed: np.ndarray | None, cache: VectorCache) -> np.ndarray | None:
        """Every input's raw vector, the computed ones cached; counts hits and misses."""
        if self.keys is None:
            return computed
        count = len(self.keys)
        if count == 0:
            return None
        metrics.CACHE_HITS.labels(self.model, self.modality).inc(count - len(self.todo))
        metrics.CACHE_MISSES.labels(self.model, self.modality).inc(len(self.todo))
        fresh: dict[Key, np.ndarray] = {}
        if computed is not None:
            for index, vector in zip(self.todo, computed, strict=True):
                fresh[self.keys[index]] = vector
                cache.put(self.keys[index], vector)
        rows = [self.cached.get(i) for i in range(count)]
        return np.stack(
            [row if row is not None else fresh[self.keys[i]] for i, row in enumerate(rows)]
        ).astype(np.float32, copy=False)


async def cached_part(
    services: Services, model: ServedModel, modality: str, contents: list[bytes] | list[str]
) -> CachedPart:
    """Look `contents` (image files, or texts) up in the content cache."""
    cache = services.cache
    if not cache.enabled or not contents:
        return CachedPart(modality, model.name, None, {}, list(range(len(contents))))
    model_key = await cache_model_key(services, model)
    if sum(map(len, contents)) <= INLINE_INPUT_SIZE:
        digests = [digest(content) for content in contents]
    else:  # megabytes of files: hash them in a thread (hashlib releases the GIL)
        digests = await run_in_threadpool(lambda: [digest(content) for content in contents])
    keys: list[Key] = [(model_key, modality, d) for d in digests]
    cached: dict[int, np.ndarray] = {}
    first: dict[Key, int] = {}
    for index, key in enumerate(keys):
        vector = cache.get(key)
        if vector is not None:
            cached[index] = vector
        elif key not in first:
            first[key] = index
    return CachedPart(modality, model.name, keys, cached, list(first.values()))


async def cache_model_key(services: Services, model: ServedModel) -> ModelKey:
    """What decides a model's vectors besides the input: its served name, and the checkpoint,
    pooling, dtype and engine it reports (asked again after the model went away: another
    checkpoint may come back under its name)."""
    info = await services.triton.model_info(model.triton_image)
    return (
        model.name,
        str(info.get("model_id")),
        str(info.get("pooling")),
        str(info.get("dtype")),
        str(info.get("engine")),
    )


def check_dimensions(asked: int, dimension: int) -> None:
    if asked > dimension:
        raise ApiError(
            ErrorType.VALIDATION, f"dimensions {asked} > the model's {dimension} dimensions"
        )


async def check_dimensions_early(services: Services, model: ServedModel, asked: int | None) -> None:
    """`dimensions` (OpenAI; Cohere's `output_dimension`; TEI) over the model's own: refused
    before anything is embedded, a model loaded on demand loaded first to ask it."""
    if asked is None:
        return
    deadline = asyncio.get_running_loop().time() + services.settings.request_timeout
    await load_within(services, model, deadline)
    info = await services.triton.model_info(model.triton_image)
    check_dimensions(asked, int(info["embedding_dimension"]))


def first_dimensions(vectors: np.ndarray, asked: int | None) -> np.ndarray:
    """The first `asked` components of each vector (all of them for None); checked again on
    the vectors, where a text tower's dimension differs from the image model's."""
    if asked is None:
        return vectors
    check_dimensions(asked, vectors.shape[1])
    return vectors[:, :asked]


async def load_within(services: Services, model: ServedModel, deadline: float) -> None:
    """Return once `model` is in Triton (loaded on demand), or a 504 at `deadline`."""
    try:
        async with asyncio.timeout_at(deadline):
            await services.models.ensure_loaded(model)
    except TimeoutError:
        raise ApiError(
            ErrorType.TIMEOUT,
            f"model {model.name!r} did not load within {services.settings.request_timeout:g} s "
            "(IEI_REQUEST_TIMEOUT); it goes on loading",
            headers={"Retry-After": "5"},
        ) from None


async def infer(
    services: Services,
    model: ServedModel,
    files: list[bytes],
    images: list[int],
    texts: list[str],
    positions: list[int],
) -> dict[str, Any]:
    """Images by the model's image model and texts by its text model, at once; by modality."""
    calls: dict[str, Awaitable[Any]] = {}
    if files:
        calls[IMAGE] = named(services.triton.embed(files, model.triton_image), images)
    if texts:
        calls[TEXT] = named(services.triton.embed_texts(texts, model.triton_text), positions)
    return dict(zip(calls, await together(list(calls.values())), strict=True))


async def text_context(services: Services, model: ServedModel) -> int:
    """The model's text context in tokens; a 422 when it has no text tower."""
    info = await services.triton.model_info(model.triton_image)
    if TEXT not in (info.get("modalities") or [IMAGE]):
        raise ApiError(
            ErrorType.VALIDATION,
            f"the model {model.name!r} embeds images only: it has no "
            "text tower (`modality: text` needs a CLIP, SigLIP or SigLIP2 model)",
        )
    return int(info.get("text_context_length") or 0)


def named_error(error: InvalidInput, items: list[Input]) -> str:
    """`inputs[i]: reason`, with the input's name when it has one: `inputs[i] (a.jpg): reason`."""
    index = error.index
    if index is None or not 0 <= index < len(items) or not items[index].name:
        return str(error)
    return f"inputs[{index}] ({items[index].name}): {error.reason}"


def check_text(text: str, max_chars: int, position: int) -> None:
    """What the frontend can see of a bad text without a tokenizer: empty, or too long."""
    if not text.strip():
        raise InvalidInput("empty text", position)
    if len(text) > max_chars:
        raise InvalidInput(
            f"text of {len(text)} characters is longer than the limit of {max_chars} characters",
            position,
        )


async def image_files(
    values: list[str | bytes], positions: list[int], services: Services, downloads: RequestBytes
) -> list[ImageInput]:
    """The image inputs (at `positions` in the request) fetched (their bytes held by
    `downloads`), decoded from base64 (uploaded files are already bytes) and header-checked:
    the files to send to Triton, with what their headers say."""
    if not values:
        return []
    max_pixels = services.settings.max_image_pixels
    try:
        fetched = await fetch_urls(values, services.fetcher, downloads)
        size = sum(map(len, values)) + sum(map(len, fetched.values()))
        if len(values) <= INLINE_INPUTS and size <= INLINE_INPUT_SIZE:
            images = prepare_inputs(values, max_pixels, fetched)
        else:  # base64 of many megabytes is real CPU work: keep it off the event loop.
            images = await outliving(run_in_threadpool(prepare_inputs, values, max_pixels, fetched))
    except InvalidInput as exc:
        raise exc.among(positions) from None
    return images


async def named(call: Awaitable[T], positions: list[int]) -> T:
    """`call`, whose bad input is named by its position in the request (`positions`)."""
    try:
        return await call
    except InvalidInput as exc:
        raise exc.among(positions) from None


async def together(calls: list[Awaitable[Any]]) -> list[Any]:
    """Await `calls` at once (images and texts); the first failure cancels the others, and is
    raised once none is left running."""
    if len(calls) == 1:
        return [await calls[0]]
    tasks: list[asyncio.Task[Any]] = []
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(call) for call in calls]  # type: ignore[arg-type]
    except BaseExceptionGroup as failed:
        raise first_error(failed) from None
    return [task.result() for task in tasks]


def refuse_overlong(tokens: np.ndarray, positions: list[int], context: int) -> None:
    for count, position in zip(tokens.tolist(), positions, strict=True):
        if count > context:
            raise ApiError(
                ErrorType.VALIDATION,
                f"inputs[{position}]: text of {count} tokens is longer than the model's context "
                f"of {context} tokens (and truncate is false)",
            )


def in_order(count: int, parts: list[tuple[list[int], np.ndarray | None]]) -> np.ndarray:
    """The vectors of each part (images, texts) at their positions in the request."""
    present = [(positions, vectors) for positions, vectors in parts if vectors is not None]
    if len(present) == 1:
        return present[0][1]  # type: ignore[return-value]
    dimensions = {vectors.shape[1] for _, vectors in present}  # type: ignore[union-attr]
    if len(dimensions) > 1:
        raise ApiError(
            ErrorType.VALIDATION,
            f"this model's image and text vectors differ in dimension {sorted(dimensions)} "
            "(IEI_POOLING is not auto): one request cannot mix images and texts",
        )
    result = np.empty((count, dimensions.pop()), dtype=np.float32)
    for positions, vectors in present:
        result[positions] = vectors
    return result
