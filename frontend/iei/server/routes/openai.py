"""`POST /v1/embeddings` (and `/embeddings`): OpenAI's embeddings API, for OpenAI SDKs."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter

from ..dependencies import Authorized, ServicesDep
from ..embedding import (
    IMAGE,
    TEXT,
    Input,
    check_dimensions_early,
    embed_inputs,
    first_dimensions,
    normalize_rows,
)
from ..errors import ApiError, ErrorType
from ..quantize import as_base64
from ..responses import VectorResponse
from ..routing import OffLoopJSONRoute
from ..schemas import (
    OpenAIEmbeddingRequest,
    OpenAIEmbeddingResponse,
    OpenAIModel,
    OpenAIModelList,
)

router = APIRouter(tags=["embeddings"], dependencies=[Authorized], route_class=OffLoopJSONRoute)
STARTED = int(time.time())  # OpenAI's `created` of every model: when this worker started


def openai_items(body: OpenAIEmbeddingRequest) -> list[Input]:
    """`input`'s items: strings are of the request's `modality`; an object names its own
    (`{"text": ...}` or `{"image": ...}`), so one request can mix both."""
    return [item_of(item, body.modality, index) for index, item in enumerate(body.input_list)]


def item_of(item: Any, modality: str, index: int) -> Input:
    if isinstance(item, str):
        return Input(modality, item)
    if isinstance(item, dict) and len(item) == 1:
        [(kind, value)] = item.items()
        if kind in (TEXT, IMAGE) and isinstance(value, str):
            return Input(kind, value)
    raise ApiError(
        ErrorType.VALIDATION,
        f"inputs[{index}]: an item is a string, or an object with exactly one of `text` and "
        "`image`, a string",
    )


@router.post(
    "/v1/embeddings",
    response_model=OpenAIEmbeddingResponse,
    summary="Embed images or texts (OpenAI)",
)
@router.post("/embeddings", response_model=OpenAIEmbeddingResponse, include_in_schema=False)
async def openai_embeddings(body: OpenAIEmbeddingRequest, services: ServicesDep) -> VectorResponse:
    started = time.perf_counter()
    model = services.models.resolve(body.model)
    await check_dimensions_early(services, model, body.dimensions)
    result = await embed_inputs(openai_items(body), services, started, model=model)
    # OpenAI's embeddings are unit length
    vectors = normalize_rows(first_dimensions(result.vectors, body.dimensions))
    encoded = as_base64(vectors) if body.encoding_format == "base64" else vectors
    content = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(encoded)
        ],
        "model": model.name,
        "usage": {"prompt_tokens": 0, "total_tokens": 0},
    }
    return VectorResponse(content, headers=result.timing_headers())


@router.get("/v1/models", response_model=OpenAIModelList, summary="The served models (OpenAI)")
async def list_models(services: ServicesDep) -> OpenAIModelList:
    """Every served model, the default first; its `id` is what `model` takes."""
    return OpenAIModelList(
        data=[OpenAIModel(id=m.name, created=STARTED) for m in services.models.models]
    )


@router.get("/v1/models/{model:path}", response_model=OpenAIModel, summary="One served model")
async def retrieve_model(model: str, services: ServicesDep) -> OpenAIModel:
    """A served model by its name (or one of its other names); 404 `model_not_found` else,
    an empty name too (`/v1/models/`)."""
    return OpenAIModel(id=services.models.resolve(model, named=True).name, created=STARTED)
