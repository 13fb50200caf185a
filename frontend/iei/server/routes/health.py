"""`GET /health` and `GET /metrics`: open even when an API key is set, as in TEI."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from .. import metrics
from ..dependencies import ServicesDep
from ..errors import ErrorType, error_response

router = APIRouter(tags=["service"])


@router.get("/live", summary="Is the frontend process alive? (liveness)")
async def live() -> JSONResponse:
    """200 while this worker's event loop runs, whatever Triton does: a liveness probe that
    restarts the frontend only when the frontend itself is stuck."""
    return JSONResponse({"status": "alive"})


@router.get(
    "/health",
    summary="Does the model answer? (readiness)",
    responses={503: {"description": "Triton is down or the model does not answer"}},
)
async def health(request: Request, services: ServicesDep) -> JSONResponse:
    """200 when the model answers a real inference (a recent one, or a probe at the head of
    Triton's queue, shared by concurrent callers and bounded to 2 s): every pinned model, with
    several (the ones loaded on demand need not be loaded)."""
    pinned = tuple(model.triton_image for model in services.models.pinned)
    if await services.triton.is_ready(pinned):
        return JSONResponse({"status": "ok"})
    return error_response(request.url.path, 503, ErrorType.UNHEALTHY, "the model is not ready")


# The probes answer HEAD as GET (a load balancer's health check may send it); not in the OpenAPI
# schema, where one operation would have two ids.
for path, probe in (("/live", live), ("/health", health)):
    router.add_api_route(path, probe, methods=["HEAD"], include_in_schema=False)


@router.get("/metrics", summary="Prometheus metrics of the frontend", response_class=Response)
async def prometheus_metrics() -> Response:
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
