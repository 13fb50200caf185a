"""`AsyncIEIClient`: the client's plans (`core.py`) carried out on asyncio. Reading files and
encoding PIL/numpy images runs in a worker thread, off the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, Self

import httpx
import numpy as np

from .core import DEFAULT_TEMPLATE, ClientCore, Encode, LabelScores, Plan, RetryPolicy, Send, T
from .inputs import ImageInput


class AsyncIEIClient:
    """The asyncio twin of `IEIClient`: `await client.embed(images)`."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        *,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        batch_size: int | None = None,
        model: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        # `model`: which served model embeds (GET /v1/models lists them); None: the default.
        self._core = ClientCore(
            url, api_key, timeout, retry or RetryPolicy(), batch_size, model=model
        )
        self._http = httpx.AsyncClient(
            base_url=self._core.url,
            headers=self._core.headers,
            timeout=self._core.answer_timeout(),  # before /info: its default
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
            return await self._run(self._core.info())

    async def embed(self, images: Iterable[ImageInput], *, normalize: bool = True) -> np.ndarray:
        """Vectors of `images` (unit length unless normalize=False), float32 (N, D). Each
        request's images are read and encoded just before it is sent (bounded memory)."""
        await self.info()
        return await self._run(self._core.embed(images, normalize))

    async def classify(
        self,
        images: Iterable[ImageInput],
        labels: Sequence[str],
        *,
        template: str = DEFAULT_TEMPLATE,
        model: str | None = None,
    ) -> list[LabelScores]:
        """Zero-shot classification (a dual encoder: CLIP, SigLIP, SigLIP2): per image, in
        order, `[{"label", "score"}]` highest score first. Scores are the model's own: CLIP's
        softmax over `labels`, SigLIP's sigmoid per label. `model`: this call's served model
        (default: the client's)."""
        await self.info()
        return await self._run(self._core.for_model(model).classify(images, labels, template))

    async def embed_texts(
        self, texts: Sequence[str], *, normalize: bool = True, truncate: bool = True
    ) -> np.ndarray:
        """Vectors of `texts` in the model's image space (a dual encoder: CLIP, SigLIP,
        SigLIP2), float32 (N, D); texts over the model's context are cut unless truncate=False."""
        await self.info()
        return await self._run(self._core.embed_texts(texts, normalize, truncate))

    async def _run(self, plan: Plan[T]) -> T:
        result: Any = None
        while True:
            try:
                step = plan.send(result)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            if isinstance(step, Send):
                try:
                    result = await self._http.request(
                        step.method, step.path, content=step.body,
                        headers=step.headers, timeout=step.timeout or httpx.USE_CLIENT_DEFAULT,
                    )  # fmt: skip
                except httpx.TransportError as exc:
                    result = exc
            elif isinstance(step, Encode):
                result = await asyncio.to_thread(step.run)
            else:
                result = await self._sleep(step.seconds)
