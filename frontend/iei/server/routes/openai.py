"""`POST /v1/embeddings` (and `/embeddings`): OpenAI's embeddings API, for OpenAI SDKs."""

from __future__ import annotations

import base64
import time

import numpy as np
from fastapi import APIRouter

from ..dependencies import Authorized, ServicesDep
from ..embedding import embed_inputs, normalize_rows
from ..errors import ApiError, ErrorType
from ..responses import VectorResponse
from ..routing import OffLoopJSONRoute
from ..schemas import OpenAIEmbeddingRequest, OpenAIEmbeddingResponse

router = APIRouter(tags=["embeddings"], dependencies=[Authorized], route_class=OffLoopJSONRoute)


@router.post(
    "/v1/embeddings", response_model=OpenAIEmbeddingResponse, summary="Embed images (OpenAI)"
)
@router.post("/embeddings", response_model=OpenAIEmbeddingResponse, include_in_schema=False)
async def openai_embeddings(body: OpenAIEmbeddingRequest, services: ServicesDep) -> VectorResponse:
    settings = services.settings
    if body.model is not None and body.model not in settings.model_names:
        raise ApiError(
            ErrorType.VALIDATION,
            f"model {body.model!r} is not served here; this service serves "
            f"{settings.public_model_name!r}",
        )
    result = await embed_inputs(body.input_list, services, time.perf_counter())
    vectors = result.vectors
    if body.dimensions is not None:
        if body.dimensions > vectors.shape[1]:
            raise ApiError(
                ErrorType.VALIDATION,
                f"dimensions {body.dimensions} > the model's {vectors.shape[1]} dimensions",
            )
        vectors = vectors[:, : body.dimensions]
    vectors = normalize_rows(vectors)  # OpenAI's embeddings are unit length
    if body.encoding_format == "base64":
        little_endian = vectors.astype("<f4", copy=False)
        encoded: list[str] | np.ndarray = [
            base64.b64encode(row.tobytes()).decode() for row in little_endian
        ]
    else:
        encoded = vectors
    content = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(encoded)
        ],
        "model": settings.public_model_name,
        "usage": {"prompt_tokens": 0, "total_tokens": 0},
    }
    return VectorResponse(content, headers=result.timing_headers())
