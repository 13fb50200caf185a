"""`GET /` without Triton: the page is served, open, and shipped inside the package."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
from iei.app import create_app
from iei.settings import Settings
from pydantic import SecretStr

ROOT = Path(__file__).resolve().parents[1]


def test_the_page_is_served_without_the_key_that_the_api_needs():
    async def get(*paths: str) -> list[httpx.Response]:
        app = create_app(Settings(api_key=SecretStr("k"), triton_url="127.0.0.1:1"))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app)
            async with httpx.AsyncClient(transport=transport, base_url="http://iei") as client:
                return [await client.get(path) for path in paths]

    page, info = asyncio.run(get("/", "/info"))
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "<title>IEI" in page.text
    assert info.status_code == 401


def test_a_wheel_carries_the_page(tmp_path):
    """Non-editable installs get static/index.html through [tool.setuptools.package-data]."""
    pytest.importorskip("setuptools")
    source = tmp_path / "source"
    shutil.copytree(
        ROOT / "frontend",
        source / "frontend",
        ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"),
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         str(source), "-w", str(tmp_path / "dist")],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    [wheel] = (tmp_path / "dist").glob("iei-*.whl")
    assert "iei/static/index.html" in zipfile.ZipFile(wheel).namelist()
