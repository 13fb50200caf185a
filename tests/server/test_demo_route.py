"""`GET /` without Triton: the page is served, open, and shipped inside the package."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from iei.server.app import create_app
from iei.server.settings import ServerSettings
from pydantic import SecretStr

ROOT = Path(__file__).resolve().parents[1]


def test_the_page_is_served_without_the_key_that_the_api_needs():
    async def get(*paths: str) -> list[httpx.Response]:
        app = create_app(ServerSettings(api_key=SecretStr("k"), triton_url="127.0.0.1:1"))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app)
            async with httpx.AsyncClient(transport=transport, base_url="http://iei") as client:
                return [await client.get(path) for path in paths]

    page, info = asyncio.run(get("/", "/info"))
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "<title>IEI" in page.text
    assert info.status_code == 401
