"""The frontend's client of Triton: readiness, the model's batch limit, inference."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable
from typing import Any, TypeVar

import aiohttp
import numpy as np
import tritonclient.http as triton_http
from tritonclient.http.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from ..contract import (
    INFO_OUTPUT_NAME,
    INPUT_NAME,
    INVALID_INPUT_PATTERN,
    MODEL_NAME,
    OUTPUT_NAME,
    TEXT_INPUT_NAME,
    TEXT_MODEL_NAME,
    TOKENS_OUTPUT_NAME,
)
from . import metrics
from .errors import ApiError, ErrorType
from .inputs import InvalidInput

log = logging.getLogger("iei")

_INVALID_INPUT = re.compile(INVALID_INPUT_PATTERN, re.S)
_HEALTH_TIMEOUT = 2.0
# A 1x1 PNG: the cheapest image to ask the model about itself.
PROBE_IMAGE = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de"
    "0000000c4944415478da63f8cfc000000301010018dd8db00000000049454e44ae426082"
)
T = TypeVar("T")
# Triton's words when the model cannot run at all (dead stub, model unloading, restarting):
# a 503 for the client, who may retry, rather than the 424 of a failed inference.
_UNAVAILABLE = ("is not healthy", "unknown model", "is not ready", "not found", "unavailable")


def joined(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


class TritonClient:
    """Sends images to the `iei` model and texts to `iei_text` in chunks, and maps Triton's
    failures to API errors.

    One client (one aiohttp connection pool, kept alive) per worker process; it must be created
    inside the running event loop, hence `open()` in the app's lifespan.
    """

    def __init__(self, endpoint: str, *, concurrency_level: int, timeout: float) -> None:
        self.endpoint = endpoint
        self.concurrency_level = concurrency_level
        self.timeout = timeout
        self._client: InferenceServerClient | None = None
        self._max_batch_sizes: dict[str, int] = {}
        self._model_info: dict[str, Any] | None = None
        self._verified = False  # the last inference succeeded

    async def open(self) -> None:
        self._client = InferenceServerClient(
            self.endpoint, conn_limit=max(100, self.concurrency_level), conn_timeout=self.timeout
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    @property
    def server(self) -> InferenceServerClient:
        if self._client is None:
            raise RuntimeError("TritonClient.open() was not called")
        return self._client

    async def is_ready(self) -> bool:
        """True when the model really answers.

        Triton keeps reporting a model ready after its Python stub died (every inference then
        fails), so readiness is confirmed with a real inference of a 1x1 image whenever the last
        known state is not a success: at start, and after any failed inference.
        """
        try:
            ready = await asyncio.wait_for(self.server.is_model_ready(MODEL_NAME), _HEALTH_TIMEOUT)
        except (InferenceServerException, aiohttp.ClientError, OSError, TimeoutError):
            ready = False
        if not ready:
            self._verified = False
            return False
        if not self._verified:
            try:
                await asyncio.wait_for(self.embed([PROBE_IMAGE]), _HEALTH_TIMEOUT * 5)
            except (ApiError, InvalidInput, TimeoutError):
                return False
        return True

    async def max_batch_size(self, model: str = MODEL_NAME) -> int:
        """A model's `max_batch_size`, read from Triton once (it may start after us)."""
        if model not in self._max_batch_sizes:
            config = await self._call(self.server.get_model_config(model))
            self._max_batch_sizes[model] = max(1, int(config.get("max_batch_size", 1)))
        return self._max_batch_sizes[model]

    async def model_info(self) -> dict[str, Any]:
        """What the model says about itself (MODEL_INFO) plus the embedding dimension, asked
        once with a probe image."""
        if self._model_info is None:
            request = self._bytes_input(INPUT_NAME, [PROBE_IMAGE])
            outputs = [
                triton_http.InferRequestedOutput(OUTPUT_NAME, binary_data=True),
                triton_http.InferRequestedOutput(INFO_OUTPUT_NAME, binary_data=True),
            ]
            result = await self._call(self.server.infer(MODEL_NAME, [request], outputs=outputs))
            info = json.loads(result.as_numpy(INFO_OUTPUT_NAME).reshape(-1)[0])
            info["embedding_dimension"] = int(result.as_numpy(OUTPUT_NAME).shape[1])
            self._model_info = info
        return self._model_info

    async def embed(self, images: list[bytes]) -> np.ndarray:
        """Vectors for `images`, in order: chunks of at most max_batch_size, and at most
        `concurrency_level` images in flight at once."""
        parts = await self._chunked(MODEL_NAME, INPUT_NAME, images, (OUTPUT_NAME,))
        return joined([part[0] for part in parts])

    async def embed_texts(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Vectors for `texts` (by `iei_text`), in order, and each text's tokens before
        truncation; chunked as images are."""
        items = [text.encode() for text in texts]
        parts = await self._chunked(
            TEXT_MODEL_NAME, TEXT_INPUT_NAME, items, (OUTPUT_NAME, TOKENS_OUTPUT_NAME)
        )
        vectors = joined([part[0] for part in parts])
        return vectors, joined([part[1] for part in parts]).reshape(-1)

    async def _chunked(
        self, model: str, input_name: str, items: list[bytes], outputs: tuple[str, ...]
    ) -> list[list[np.ndarray]]:
        """`items` in chunks of at most the model's max_batch_size, at most `concurrency_level`
        items in flight at once; each chunk's `outputs`, in order."""
        chunk = min(await self.max_batch_size(model), self.concurrency_level)
        parallel = asyncio.Semaphore(max(1, self.concurrency_level // chunk))

        async def run(start: int) -> list[np.ndarray]:
            request = self._bytes_input(input_name, items[start : start + chunk])
            async with parallel:
                return await self._infer(model, request, outputs, start)

        return await asyncio.gather(*(run(s) for s in range(0, len(items), chunk)))

    @staticmethod
    def _bytes_input(name: str, items: list[bytes]) -> triton_http.InferInput:
        tensor = np.empty((len(items), 1), dtype=np.object_)
        tensor[:, 0] = items
        request = triton_http.InferInput(name, list(tensor.shape), "BYTES")
        request.set_data_from_numpy(tensor, binary_data=True)  # raw bytes, not JSON
        return request

    async def _infer(
        self,
        model: str,
        request: triton_http.InferInput,
        outputs: tuple[str, ...],
        offset: int,
    ) -> list[np.ndarray]:
        wanted = [triton_http.InferRequestedOutput(name, binary_data=True) for name in outputs]
        with metrics.TRITON_SECONDS.time():
            result = await self._call(self.server.infer(model, [request], outputs=wanted), offset)
        arrays = [result.as_numpy(name) for name in outputs]
        count = request.shape()[0]
        if any(array is None or array.shape[0] != count for array in arrays):
            raise ApiError(ErrorType.BACKEND, "Triton returned no embedding for some inputs")
        return arrays

    async def _call(self, call: Awaitable[T], offset: int = 0) -> T:
        """Await a Triton call; its failures become API errors, a bad input an `InvalidInput`.
        `offset`: the position of the call's first item among those of the embed call."""
        try:
            result = await call
        except InferenceServerException as exc:
            message = exc.message() or str(exc)
            found = _INVALID_INPUT.search(message)
            if found:  # the client's fault (the model is fine): name the client's own index
                raise InvalidInput(found.group(2), offset + int(found.group(1))) from None
            self._verified = False
            if any(sign in message for sign in _UNAVAILABLE):
                raise ApiError(
                    ErrorType.UNHEALTHY, f"the model is unavailable: {message}"
                ) from None
            raise ApiError(ErrorType.BACKEND, f"inference failed: {message}") from None
        except TimeoutError:
            self._verified = False
            raise ApiError(
                ErrorType.TIMEOUT, f"Triton did not answer within {self.timeout:g} s"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            self._verified = False
            log.warning("Triton unreachable at %s: %s", self.endpoint, exc)
            raise ApiError(
                ErrorType.UNHEALTHY, f"the inference server is unreachable ({type(exc).__name__})"
            ) from None
        self._verified = True
        return result
