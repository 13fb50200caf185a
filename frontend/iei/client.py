"""Python client for an IEI service: images in, a float32 matrix out.

    with IEIClient("http://127.0.0.1:8000") as client:
        vectors = client.embed(["cat.jpg", Path("dog.png"), pil_image, numpy_array])

`AsyncIEIClient` is the same on asyncio. Both split a call into requests of at most the server's
`max_client_batch_size` images (read once from `GET /info`), retry 429 and 503 answers and lost
connections with exponential back-off (honouring `Retry-After`), and raise `IEIError` subclasses
that carry the server's `error_type`. No torch here: the client needs httpx, numpy and Pillow.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeAlias

import httpx
import numpy as np
import orjson
from PIL import Image

__all__ = [
    "AsyncIEIClient",
    "AuthenticationError",
    "BackendError",
    "IEIClient",
    "IEIError",
    "ImageInput",
    "OverloadedError",
    "RetryPolicy",
    "UnavailableError",
    "ValidationError",
]

# A file path, an encoded image file, a decoded image, or an 8-bit pixel array (HxW or HxWxC).
# A str that starts with http://, https:// or data: goes to the server as it is (it fetches URLs).
ImageInput: TypeAlias = str | os.PathLike[str] | bytes | Image.Image | np.ndarray

PASSED_THROUGH = ("http://", "https://", "data:")
# Share of the server's payload limit one request may fill (JSON framing is the rest).
PAYLOAD_SHARE = 0.9


class IEIError(Exception):
    """An error answer of the service (`status`, `error_type`, `message` as the server sent
    them), or a service that could not be reached (`status` None)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error_type: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {error_type}: {message}" if status else message)
        self.message = message
        self.status = status
        self.error_type = error_type
        self.retry_after = retry_after


class ValidationError(IEIError):
    """400/413/422: the request or one of its images was refused; retrying cannot help."""


class AuthenticationError(IEIError):
    """401: the API key is missing or wrong."""


class OverloadedError(IEIError):
    """429: the service refused the request for now (after the client's retries ran out)."""


class UnavailableError(IEIError):
    """503, or no connection: the model is not ready or the service is down."""


class BackendError(IEIError):
    """424/500/504: Triton failed the inference, or the request timed out on the server."""


ERRORS_BY_STATUS: dict[int, type[IEIError]] = {
    400: ValidationError,
    401: AuthenticationError,
    413: ValidationError,
    422: ValidationError,
    429: OverloadedError,
    503: UnavailableError,
}
RETRIED_STATUSES = frozenset({429, 503})


def error_from_response(response: httpx.Response) -> IEIError:
    """The typed error for a non-2xx answer, from either of the server's envelopes."""
    message, error_type = response.text or response.reason_phrase, None
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):  # OpenAI's envelope
            message, error_type = str(error.get("message")), error.get("code")
        elif error is not None:  # TEI's envelope
            message, error_type = str(error), body.get("error_type")
    kind = ERRORS_BY_STATUS.get(response.status_code)
    if kind is None:
        kind = (
            BackendError if response.status_code >= 500 or response.status_code == 424 else IEIError
        )
    return kind(
        message,
        status=response.status_code,
        error_type=error_type,
        retry_after=parse_retry_after(response.headers.get("retry-after")),
    )


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header (the HTTP-date form is not used by IEI)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to wait before retrying 429, 503 and lost connections.

    The wait before retry n (1, 2, …) is the server's `Retry-After` when it sends one, else
    `backoff * 2**(n-1)` with ±25 % jitter (so that many clients do not retry in step); never
    more than `max_backoff`. `attempts` counts every try, the first included.
    """

    attempts: int = 5
    backoff: float = 0.5
    max_backoff: float = 30.0

    def delay(self, retry: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_backoff)
        wait = self.backoff * 2 ** (retry - 1) * random.uniform(0.75, 1.25)  # noqa: S311 (back-off jitter)
        return min(wait, self.max_backoff)


def encode_image(image: ImageInput) -> str:
    """One input as the server takes it: base64 of the file's bytes (PIL and arrays as PNG)."""
    if isinstance(image, str) and image.startswith(PASSED_THROUGH):
        return image
    if isinstance(image, str | os.PathLike):
        data = Path(image).read_bytes()
    elif isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
    elif isinstance(image, Image.Image):
        data = png_bytes(image)
    elif isinstance(image, np.ndarray):
        data = png_bytes(array_to_image(image))
    else:
        raise TypeError(f"cannot embed a {type(image).__name__}: give a path, bytes, PIL or numpy")
    return base64.b64encode(data).decode("ascii")


def array_to_image(pixels: np.ndarray) -> Image.Image:
    """HxW (grey) or HxWxC (C = 1, 3 or 4) uint8 pixels as a PIL image."""
    if pixels.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8, not {pixels.dtype}")
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] in (3, 4)):
        return Image.fromarray(np.ascontiguousarray(pixels))
    raise TypeError(f"image arrays must be HxW or HxWxC with C in 1, 3, 4; got {pixels.shape}")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def chunks(encoded: Sequence[str], max_items: int, max_chars: int | None) -> Iterator[range]:
    """Index ranges of at most `max_items` inputs and (where possible) `max_chars` characters."""
    start, size = 0, 0
    for index, item in enumerate(encoded):
        full = index - start >= max_items
        too_large = max_chars is not None and index > start and size + len(item) > max_chars
        if full or too_large:
            yield range(start, index)
            start, size = index, 0
        size += len(item)
    if start < len(encoded):
        yield range(start, len(encoded))


def as_matrix(vectors: list[np.ndarray], dimension: int | None) -> np.ndarray:
    if not vectors:
        return np.zeros((0, dimension or 0), dtype=np.float32)
    return np.concatenate(vectors, axis=0)


def vectors_from(response: httpx.Response) -> np.ndarray:
    return np.asarray(orjson.loads(response.content), dtype=np.float32)


class _Settings:
    """What both clients share: the HTTP settings and the server's limits once known."""

    def __init__(
        self,
        url: str,
        api_key: str | None,
        timeout: float,
        retry: RetryPolicy,
        batch_size: int | None,
    ) -> None:
        if retry.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be at least 1")
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self.retry = retry
        self.batch_size = batch_size
        self.info: dict[str, Any] | None = None

    def limits(self) -> tuple[int, int | None, int | None]:
        """(images per request, characters per request, embedding dimension) from /info."""
        info = self.info or {}
        limits = info.get("limits") or {}
        per_request = int(
            info.get("max_client_batch_size") or limits.get("max_client_batch_size") or 32
        )
        if self.batch_size is not None:
            per_request = max(1, min(per_request, self.batch_size))
        payload = limits.get("payload_limit")
        max_chars = int(payload * PAYLOAD_SHARE) if payload else None
        return per_request, max_chars, info.get("embedding_dimension")


class IEIClient:
    """Blocking client. `embed(images)` → float32 array (N, D), one row per image, in order."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        *,
        timeout: float = 120.0,
        retry: RetryPolicy | None = None,
        batch_size: int | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._settings = _Settings(url, api_key, timeout, retry or RetryPolicy(), batch_size)
        self._http = httpx.Client(
            base_url=self._settings.url,
            headers=self._settings.headers,
            timeout=timeout,
            transport=transport,
        )
        self._sleep = sleep

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def info(self) -> dict[str, Any]:
        """`GET /info`, fetched once and kept."""
        if self._settings.info is None:
            self._settings.info = orjson.loads(self._request("GET", "/info").content)
        return self._settings.info

    def embed(self, images: Sequence[ImageInput], *, normalize: bool = True) -> np.ndarray:
        """Vectors of `images` (unit length unless normalize=False), float32 (N, D)."""
        encoded = [encode_image(image) for image in images]
        self.info()
        per_request, max_chars, dimension = self._settings.limits()
        parts = []
        for span in chunks(encoded, per_request, max_chars):
            body = {"inputs": [encoded[i] for i in span], "normalize": normalize}
            parts.append(vectors_from(self._request("POST", "/embed", body)))
        return as_matrix(parts, dimension)

    def _request(self, method: str, path: str, body: object = None) -> httpx.Response:
        retry = self._settings.retry
        for attempt in range(1, retry.attempts + 1):
            error: IEIError
            try:
                response = self._http.request(
                    method, path, content=None if body is None else orjson.dumps(body),
                    headers={"Content-Type": "application/json"} if body is not None else None,
                )  # fmt: skip
            except httpx.TransportError as exc:
                error = UnavailableError(f"cannot reach {self._settings.url}: {exc!r}")
            else:
                if response.is_success:
                    return response
                error = error_from_response(response)
                if response.status_code not in RETRIED_STATUSES:
                    raise error
            if attempt == retry.attempts:
                raise error
            self._sleep(retry.delay(attempt, error.retry_after))
        raise AssertionError("unreachable")


class AsyncIEIClient:
    """The asyncio twin of `IEIClient`: `await client.embed(images)`.

    Reading files and encoding PIL/numpy images runs in a worker thread, off the event loop.
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        *,
        timeout: float = 120.0,
        retry: RetryPolicy | None = None,
        batch_size: int | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self._settings = _Settings(url, api_key, timeout, retry or RetryPolicy(), batch_size)
        self._http = httpx.AsyncClient(
            base_url=self._settings.url,
            headers=self._settings.headers,
            timeout=timeout,
            transport=transport,
        )
        self._sleep = sleep
        self._info_lock = asyncio.Lock()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def info(self) -> dict[str, Any]:
        """`GET /info`, fetched once and kept (concurrent first calls share one request)."""
        async with self._info_lock:
            if self._settings.info is None:
                response = await self._request("GET", "/info")
                self._settings.info = orjson.loads(response.content)
        return self._settings.info

    async def embed(self, images: Sequence[ImageInput], *, normalize: bool = True) -> np.ndarray:
        """Vectors of `images` (unit length unless normalize=False), float32 (N, D)."""
        encoded = await asyncio.to_thread(lambda: [encode_image(image) for image in images])
        await self.info()
        per_request, max_chars, dimension = self._settings.limits()
        parts = []
        for span in chunks(encoded, per_request, max_chars):
            body = {"inputs": [encoded[i] for i in span], "normalize": normalize}
            parts.append(vectors_from(await self._request("POST", "/embed", body)))
        return as_matrix(parts, dimension)

    async def _request(self, method: str, path: str, body: object = None) -> httpx.Response:
        retry = self._settings.retry
        for attempt in range(1, retry.attempts + 1):
            error: IEIError
            try:
                response = await self._http.request(
                    method, path, content=None if body is None else orjson.dumps(body),
                    headers={"Content-Type": "application/json"} if body is not None else None,
                )  # fmt: skip
            except httpx.TransportError as exc:
                error = UnavailableError(f"cannot reach {self._settings.url}: {exc!r}")
            else:
                if response.is_success:
                    return response
                error = error_from_response(response)
                if response.status_code not in RETRIED_STATUSES:
                    raise error
            if attempt == retry.attempts:
                raise error
            await self._sleep(retry.delay(attempt, error.retry_after))
        raise AssertionError("unreachable")
