"""All settings of the frontend and of `iei serve`, read once from the environment."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "google/vit-base-patch16-224"
# The checkout's model_repository/ (frontend/iei/settings.py -> repository root).
DEFAULT_MODEL_REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


class Settings(BaseSettings):
    """Environment variables `IEI_*` (and `IMAGE_EMBEDDING_MODEL`); see the README's table."""

    model_config = SettingsConfigDict(
        env_prefix="IEI_", env_ignore_empty=True, extra="ignore", frozen=True
    )

    embedding_model: str = Field(
        DEFAULT_MODEL,
        validation_alias=AliasChoices("IMAGE_EMBEDDING_MODEL"),
        description="Hugging Face hub id or local folder of the model Triton serves.",
        min_length=1,
    )
    bind: str = Field("0.0.0.0:8000", description="host:port the HTTP frontend listens on.")
    workers: int = Field(2, ge=1, le=64, description="uvicorn worker processes of the frontend.")
    concurrency_level: int = Field(
        32, ge=1, le=4096, description="Images of one request in flight to Triton at once."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights and activations: auto = fp16 on GPU, bf16 on CPUs with it."
    )
    pooling: Literal["mean", "cls", "pooler"] = Field(
        "mean", description="How token vectors become one embedding."
    )
    max_client_batch_size: int = Field(
        64, ge=1, le=4096, description="Most inputs one /embed request may carry."
    )
    max_image_pixels: int = Field(
        50_000_000, ge=1, description="Largest image (width x height) accepted, from its header."
    )
    request_timeout: float = Field(
        60.0, gt=0, le=3600, description="Seconds a request may take before a 504."
    )
    payload_limit: int = Field(
        64 * 1024 * 1024, ge=1024, description="Largest request body in bytes (413 above)."
    )
    max_concurrent_requests: int = Field(
        512,
        ge=1,
        description="Images in flight per frontend worker; beyond it requests get a 429 at once.",
    )
    api_key: SecretStr | None = Field(
        None, description="When set, every route but /health and /metrics needs this Bearer key."
    )
    served_model_name: str | None = Field(
        None, description="Name the OpenAI route answers to besides IMAGE_EMBEDDING_MODEL."
    )
    allow_private_urls: bool = Field(
        False, description="Fetch image URLs on loopback, private and link-local addresses too."
    )
    url_timeout: float = Field(10.0, gt=0, le=600, description="Seconds to fetch one image URL.")
    url_max_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, description="Largest image file fetched from a URL."
    )
    url_max_redirects: int = Field(5, ge=0, le=20, description="Redirects followed per URL.")
    triton_url: str | None = Field(
        None,
        description="host:port of a Triton HTTP endpoint run by something else (compose, k8s). "
        "Unset: the one `iei serve` starts on 127.0.0.1:IEI_TRITON_HTTP_PORT.",
    )
    triton_host: str = Field(
        "127.0.0.1",
        description="Interface the Triton that `iei serve` starts listens on; 0.0.0.0 exposes "
        "it to direct HTTP/gRPC clients on other machines.",
    )
    triton_http_port: int = Field(8100, ge=1, le=65535)
    triton_grpc_port: int = Field(8101, ge=1, le=65535)
    triton_metrics_port: int = Field(8102, ge=1, le=65535)
    triton_instances: int | None = Field(
        None, ge=1, le=64, description="Model instances per GPU (or on the CPU). Unset: 1."
    )
    model_repository: Path = Field(
        DEFAULT_MODEL_REPOSITORY, description="Folder Triton loads; this checkout's by default."
    )
    startup_timeout: float = Field(
        600.0, gt=0, description="Seconds `iei serve` waits for the model to load."
    )

    @field_validator("bind")
    @classmethod
    def _check_bind(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected host:port, e.g. 0.0.0.0:8000, got {value!r}")
        return value

    @field_validator("triton_url")
    @classmethod
    def _check_triton_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        bare = value.removeprefix("http://").rstrip("/")
        if "://" in bare or ":" not in bare or not bare.rpartition(":")[2].isdigit():
            raise ValueError(f"expected host:port (or http://host:port), got {value!r}")
        return bare

    @cached_property
    def model_names(self) -> frozenset[str]:
        """Names a client may give as `model`: the id, its last part, the served name."""
        names = {self.embedding_model, self.embedding_model.rstrip("/").rsplit("/", 1)[-1]}
        if self.served_model_name:
            names.add(self.served_model_name)
        return frozenset(names)

    @cached_property
    def public_model_name(self) -> str:
        return self.served_model_name or self.embedding_model

    @cached_property
    def host(self) -> str:
        return self.bind.rpartition(":")[0].strip("[]")

    @cached_property
    def port(self) -> int:
        return int(self.bind.rpartition(":")[2])

    @cached_property
    def triton_endpoint(self) -> str:
        """host:port of Triton's HTTP endpoint, as tritonclient wants it."""
        return self.triton_url or f"127.0.0.1:{self.triton_http_port}"
