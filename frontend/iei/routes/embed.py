"""`POST /embed`: images in, vectors out (text-embeddings-inference's contract)."""

from __future__ import annotations

import asyncio

import numpy as np
from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from ..dependencies import BackendDep, SettingsDep
from ..errors import ApiError, ErrorType
from ..images import InvalidInput, prepare_inputs
from ..responses import VectorResponse
from ..schemas import EmbedRequest

router = APIRouter(tags=["embeddings"])


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """Unit L2 norm per row; an all-zero vector stays zero instead of becoming NaN."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, np.finfo(np.float32).tiny)


@router.post(
    "/embed",
    response_class=VectorResponse,
    responses={200: {"content": {"application/json": {"example": [[0.01, -0.02, 0.03]]}}}},
    summary="Embed images",
)
async def embed(body: EmbedRequest, backend: BackendDep, settings: SettingsDep) -> VectorResponse:
    """One vector per input, in input order."""
    items = body.input_list
    if not items:
        raise ApiError(ErrorType.EMPTY, "`inputs` cannot be empty")
    if len(items) > settings.max_client_batch_size:
        raise ApiError(
            ErrorType.VALIDATION,
            f"batch size {len(items)} > maximum allowed batch size "
            f"{settings.max_client_batch_size}",
        )
    try:
        # base64 of many megabytes is real CPU work: keep it off the event loop.
        images = await run_in_threadpool(prepare_inputs, items, settings.max_image_pixels)
    except InvalidInput as exc:
        raise ApiError(ErrorType.VALIDATION, str(exc)) from None
    try:
        async with asyncio.timeout(settings.request_timeout):
            vectors = await backend.embed([image.data for image in images])
    except TimeoutError:
        raise ApiError(
            ErrorType.TIMEOUT, f"request took longer than {settings.request_timeout:g} s"
        ) from None
    if body.normalize:
        vectors = normalize_rows(vectors)
    return VectorResponse(vectors)
