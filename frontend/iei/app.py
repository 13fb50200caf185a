"""The FastAPI application: `create_app()` is what uvicorn's workers call."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from . import __version__
from .backend import TritonBackend
from .errors import install_error_handlers
from .routes import embed, health
from .settings import Settings

log = logging.getLogger("iei")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    backend = TritonBackend(
        settings.triton_endpoint,
        concurrency_level=settings.concurrency_level,
        timeout=settings.request_timeout,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await backend.open()  # inside the running loop, as aiohttp requires
        try:
            yield
        finally:
            await backend.close()

    app = FastAPI(
        title="IEI — Image Embedding Inference",
        version=__version__,
        description="Image embeddings over HTTP, served by NVIDIA Triton Inference Server.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.backend = backend
    install_error_handlers(app)
    app.include_router(embed.router)
    app.include_router(health.router)
    return app
