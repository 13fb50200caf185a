"""`GET /health`: 200 only while Triton reports the model ready."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ..dependencies import BackendDep
from ..errors import ErrorType, error_response

router = APIRouter(tags=["health"])


@router.get(
    "/health",
    summary="Is the model ready?",
    responses={503: {"description": "Triton is down or the model is not ready"}},
)
async def health(backend: BackendDep) -> JSONResponse:
    if await backend.is_ready():
        return JSONResponse({"status": "ok"})
    return error_response(503, ErrorType.UNHEALTHY, "the model is not ready")
