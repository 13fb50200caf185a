"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

# A 1x1 PNG, for the examples in the OpenAPI document.
EXAMPLE_IMAGE = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
)
INPUT_DESCRIPTION = "An image: base64 of the file, a data:image/...;base64, URI, or an http(s) URL."


class EmbedRequest(BaseModel):
    """`POST /embed`, as in text-embeddings-inference, with images instead of text."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"examples": [{"inputs": [EXAMPLE_IMAGE], "normalize": True}]},
    )

    inputs: StrictStr | list[StrictStr] = Field(description=f"One or a list. {INPUT_DESCRIPTION}")
    normalize: StrictBool = Field(True, description="Scale each vector to unit L2 norm.")
    truncate: StrictBool | None = Field(
        None, description="Accepted for TEI clients; images are never truncated."
    )
    truncation_direction: Literal["left", "right", "Left", "Right"] | None = Field(
        None, description="Accepted for TEI clients; ignored."
    )

    @property
    def input_list(self) -> list[str]:
        return [self.inputs] if isinstance(self.inputs, str) else self.inputs


class OpenAIEmbeddingRequest(BaseModel):
    """`POST /v1/embeddings`, OpenAI's shape."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"examples": [{"input": [EXAMPLE_IMAGE], "encoding_format": "float"}]},
    )

    input: StrictStr | list[StrictStr] = Field(description=f"One or a list. {INPUT_DESCRIPTION}")
    model: StrictStr | None = Field(None, description="Checked against the served model.")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: the little-endian float32 bytes, as OpenAI sends them."
    )
    dimensions: StrictInt | None = Field(
        None, ge=1, description="Keep the first N components and re-normalise."
    )
    user: StrictStr | None = Field(None, description="Ignored.")

    @property
    def input_list(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else self.input


class OpenAIEmbedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class OpenAIUsage(BaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0


class OpenAIEmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIUsage


class TritonInfo(BaseModel):
    endpoint: str
    ready: bool


class Limits(BaseModel):
    max_client_batch_size: int
    max_concurrent_images: int
    max_concurrent_requests: int = Field(
        description="The earlier name of max_concurrent_images (it counts images)."
    )
    max_image_pixels: int
    payload_limit: int
    request_timeout: float
    url_max_bytes: int
    url_timeout: float
    allow_private_urls: bool


class Info(BaseModel):
    """`GET /info`. Model facts come from the model itself; null while Triton is unreachable."""

    model_id: str
    served_model_name: str
    model_type: str | None
    architecture: str | None
    embedding_dimension: int | None
    dtype: str | None
    device: str | None
    pooling: str | None
    max_batch_size: int | None
    max_client_batch_size: int
    limits: Limits
    version: str
    triton: TritonInfo
