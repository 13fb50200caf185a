"""`POST /embed` (and TEI's root route, `POST /`): images or texts in, vectors out
(text-embeddings-inference's contract)."""

from __future__ import annotations

import time

from fastapi import APIRouter

from ..dependencies import Authorized, ServicesDep
from ..embedding import TEXT, Input, embed_inputs, normalize_rows
from ..errors import ApiError, ErrorType
from ..responses import VectorResponse
from ..routing import OffLoopJSONRoute
from ..schemas import EmbedRequest

router = APIRouter(tags=["embeddings"], dependencies=[Authorized], route_class=OffLoopJSONRoute)


@router.post(
    "/embed",
    response_class=VectorResponse,
    responses={200: {"content": {"application/json": {"example": [[0.01, -0.02, 0.03]]}}}},
    summary="Embed images or texts (TEI)",
)
# TEI answers its root route as /embed; huggingface_hub's InferenceClient(model=URL) posts there.
@router.post("/", response_class=VectorResponse, include_in_schema=False)
async def embed(body: EmbedRequest, services: ServicesDep) -> VectorResponse:
    """One vector per input, in input order."""
    if body.modality == TEXT and (body.truncation_direction or "right").lower() == "left":
        raise ApiError(
            ErrorType.VALIDATION,
            "truncation_direction left is not supported: texts are cut at their end (right)",
        )
    started = time.perf_counter()
    model = services.models.resolve(body.model)
    items = [Input(body.modality, value) for value in body.input_list]
    result = await embed_inputs(
        items, services, started, truncate=body.truncate is not False, model=model
    )
    vectors = normalize_rows(result.vectors) if body.normalize else result.vectors
    return VectorResponse(vectors, headers=result.timing_headers())
