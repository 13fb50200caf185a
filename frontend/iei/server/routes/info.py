"""`GET /info`: what is served, how, and within which limits."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from ... import __version__
from ..dependencies import Authorized, ServicesDep
from ..errors import ApiError
from ..schemas import Info, Limits, ModelInfo, TritonInfo

router = APIRouter(tags=["service"], dependencies=[Authorized])


@router.get("/info", response_model=Info, summary="The served model and the service's limits")
async def info(services: ServicesDep) -> Info:
    settings, triton = services.settings, services.triton
    default = services.models.default
    ready = await triton.is_ready()
    model: dict[str, object] = {}
    max_batch_size = None
    if ready:
        try:
            model = await triton.model_info()
            max_batch_size = await triton.max_batch_size()
        except ApiError:
            ready = False
    return Info(
        model_id=default.model_id,
        served_model_name=settings.public_model_name,
        model_type=model.get("model_type"),  # type: ignore[arg-type]
        architecture=model.get("architecture"),  # type: ignore[arg-type]
        embedding_dimension=model.get("embedding_dimension"),  # type: ignore[arg-type]
        engine=model.get("engine"),  # type: ignore[arg-type]
        dtype=model.get("dtype"),  # type: ignore[arg-type]
        layout=model.get("layout"),  # type: ignore[arg-type]
        jpeg_decoder=model.get("jpeg_decoder"),  # type: ignore[arg-type]
        device=model.get("device"),  # type: ignore[arg-type]
        pooling=model.get("pooling"),  # type: ignore[arg-type]
        modalities=model.get("modalities", ["image"] if model else None),  # type: ignore[arg-type]
        text_context_length=model.get("text_context_length"),  # type: ignore[arg-type]
        zero_shot=model.get("zero_shot"),  # type: ignore[arg-type]
        max_batch_size=max_batch_size,
        max_client_batch_size=settings.max_client_batch_size,
        limits=Limits(
            max_client_batch_size=settings.max_client_batch_size,
            max_text_chars=settings.max_text_chars,
            max_concurrent_images=settings.max_concurrent_images,
            max_concurrent_requests=settings.max_concurrent_images,
            max_image_pixels=settings.max_image_pixels,
            payload_limit=settings.payload_limit,
            body_worker_max_bytes=settings.body_worker_max_bytes,
            body_read_timeout=settings.body_read_timeout,
            request_timeout=settings.request_timeout,
            url_max_bytes=settings.url_max_bytes,
            url_timeout=settings.url_timeout,
            allow_private_urls=settings.allow_private_urls,
        ),
        version=__version__,
        triton=TritonInfo(endpoint=settings.triton_endpoint, ready=ready),
        models=[
            ModelInfo.model_validate(entry)
            for entry in await asyncio.gather(
                *map(services.models.describe, services.models.models)
            )
        ],
    )
