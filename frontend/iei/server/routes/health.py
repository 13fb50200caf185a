"""`GET /health` and `GET /metrics`: open even when an API key is set, as in TEI."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from .. import metrics
from ..dependencies import ServicesDep
from ..errors import ErrorType, error_response

router = APIRouter(tags=["service"])


@router.get(
    "/health",
    summary="Is the model ready?",
    responses={503: {"description": "Triton is down or the model is not ready"}},
)
async def health(request: Request, services: ServicesDep) -> JSONResponse:
    if await services.triton.is_ready():
        return JSONResponse({"status": "ok"})
    return error_response(request.url.path, 503, ErrorType.UNHEALTHY, "the model is not ready")


@router.get("/metrics", summary="Prometheus metrics of the frontend", response_class=Response)
async def prometheus_metrics() -> Response:
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
