"""Settings: defaults, environment names, and nonsense refused with the variable's name."""

from __future__ import annotations

import pytest
from iei.settings import Settings
from pydantic import ValidationError


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in list(__import__("os").environ):
        if name.startswith("IEI_") or name == "IMAGE_EMBEDDING_MODEL":
            monkeypatch.delenv(name)


def test_defaults():
    settings = Settings()
    assert settings.embedding_model == "google/vit-base-patch16-224"
    assert (settings.host, settings.port) == ("0.0.0.0", 8000)
    assert settings.triton_endpoint == "127.0.0.1:8100"
    assert settings.dtype == "auto"
    assert settings.pooling == "mean"
    assert settings.max_client_batch_size == 64
    assert settings.max_image_pixels == 50_000_000


def test_environment(monkeypatch):
    monkeypatch.setenv("IMAGE_EMBEDDING_MODEL", "/models/vit")
    monkeypatch.setenv("IEI_BIND", "[::]:9000")
    monkeypatch.setenv("IEI_WORKERS", "4")
    monkeypatch.setenv("IEI_CONCURRENCY_LEVEL", "8")
    monkeypatch.setenv("IEI_TRITON_URL", "http://triton:8000/")
    monkeypatch.setenv("IEI_DTYPE", "bfloat16")
    settings = Settings()
    assert settings.embedding_model == "/models/vit"
    assert (settings.host, settings.port) == ("::", 9000)
    assert settings.workers == 4
    assert settings.concurrency_level == 8
    assert settings.triton_endpoint == "triton:8000"
    assert settings.dtype == "bfloat16"


def test_empty_variables_mean_default(monkeypatch):
    monkeypatch.setenv("IEI_WORKERS", "")
    assert Settings().workers == 2


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("IEI_BIND", "8000"),
        ("IEI_BIND", "host:http"),
        ("IEI_BIND", "0.0.0.0:70000"),
        ("IEI_WORKERS", "0"),
        ("IEI_WORKERS", "two"),
        ("IEI_CONCURRENCY_LEVEL", "-1"),
        ("IEI_DTYPE", "float8"),
        ("IEI_POOLING", "max"),
        ("IEI_TRITON_URL", "grpc://triton:8001"),
        ("IEI_TRITON_URL", "triton"),
        ("IEI_REQUEST_TIMEOUT", "0"),
        ("IEI_MAX_IMAGE_PIXELS", "0"),
    ],
)
def test_nonsense_is_refused(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()
