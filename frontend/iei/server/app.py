"""The FastAPI application: `create_app()` is what uvicorn's workers call."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from .. import __version__
from ..launcher.processes import stop_with_supervisor
from ..settings import load
from . import metrics
from .cache import VectorCache
from .embedding import Services
from .errors import install_error_handlers
from .fetch import UrlFetcher
from .inputs import allow_pixels
from .limits import Capacity
from .logs import configure_logging
from .middleware import Admission, BodyLimit, RequestContext, RequestMetrics
from .routes import classify, cohere, demo, embed, health, info, openai
from .served import ServedModels
from .settings import ServerSettings
from .triton_client import TritonClient

log = logging.getLogger("iei")


def create_app(settings: ServerSettings | None = None) -> FastAPI:
    configure_logging()
    stop_with_supervisor()
    # From the environment: one line per invalid variable and exit status 2, not pydantic's
    # traceback (the frontend's container checks them before uvicorn: server/preflight.py).
    settings = settings or load(ServerSettings)
    allow_pixels(settings.max_image_pixels)
    triton = TritonClient(
        settings.triton_endpoint,
        concurrency_level=settings.concurrency_level,
        timeout=settings.request_timeout,
        shm_bytes=settings.triton_shm_mb * 2**20,
        metrics_endpoint=settings.triton_metrics_url,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Clients are created inside the running loop, as aiohttp and httpx require.
        await triton.open()
        fetcher = UrlFetcher(
            allow_private=settings.allow_private_urls,
            timeout=settings.url_timeout,
            max_bytes=settings.url_max_bytes,
            max_redirects=settings.url_max_redirects,
            worker_max_bytes=settings.url_worker_max_bytes,
        )
        app.state.services = Services(
            settings, triton, fetcher, Capacity(settings.max_concurrent_images),
            ServedModels(settings, triton), cache=VectorCache(settings.cache_mb * 2**20),
        )  # fmt: skip
        try:
            yield
        finally:
            await fetcher.close()
            await triton.close()
            metrics.worker_exited(os.getpid())

    app = FastAPI(
        title="IEI — Image Embedding Inference",
        version=__version__,
        description="Image embeddings over HTTP, served by NVIDIA Triton Inference Server. "
        "TEI-compatible `/embed`, OpenAI-compatible `/v1/embeddings`, Cohere-compatible "
        "`/v2/embed`.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.state.bodies = Capacity(settings.body_worker_max_bytes)  # bytes of bodies held
    app.add_middleware(
        BodyLimit,
        limit=settings.payload_limit,
        bodies=app.state.bodies,
        read_timeout=settings.body_read_timeout,
    )  # before anything is read
    app.add_middleware(Admission)  # the key and a full worker, before the body's size
    app.add_middleware(RequestMetrics)  # every answer counted, the refusals above included
    app.add_middleware(RequestContext)  # outermost: every answer carries the request id
    modules = (embed, openai, cohere, classify, info, health, demo)
    for module in modules:
        app.include_router(module.router)
    # Every route with its template: ours, and FastAPI's own (/docs, /openapi.json; the app
    # keeps ours inside the routers it includes): the metrics label answers by them, those given
    # before routing included.
    own = [route for route in app.routes if hasattr(route, "path_regex")]
    app.state.routes = [*own, *(route for module in modules for route in module.router.routes)]
    return app
