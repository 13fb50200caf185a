"""`POST /embed`: images in, vectors out (text-embeddings-inference's contract)."""

from __future__ import annotations

import time

from fastapi import APIRouter

from ..dependencies import Authorized, ServicesDep
from ..embedding import embed_inputs, normalize_rows
from ..responses import VectorResponse
from ..routing import OffLoopJSONRoute
from ..schemas import EmbedRequest

router = APIRouter(tags=["embeddings"], dependencies=[Authorized], route_class=OffLoopJSONRoute)


@router.post(
    "/embed",
    response_class=VectorResponse,
    responses={200: {"content": {"application/json": {"example": [[0.01, -0.02, 0.03]]}}}},
    summary="Embed images (TEI)",
)
async def embed(body: EmbedRequest, services: ServicesDep) -> VectorResponse:
    """One vector per input, in input order."""
    result = await embed_inputs(body.input_list, services, time.perf_counter())
    vectors = normalize_rows(result.vectors) if body.normalize else result.vectors
    return VectorResponse(vectors, headers=result.timing_headers())
