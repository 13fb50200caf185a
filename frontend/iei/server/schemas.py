"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, WithJsonSchema

# A 1x1 PNG, for the examples in the OpenAPI document.
EXAMPLE_IMAGE = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
)
INPUT_DESCRIPTION = (
    "An image (base64 of the file, a data:image/...;base64, URI, or an http(s) URL), or with "
    "`modality: text` a text."
)
MODALITY_DESCRIPTION = (
    "What the inputs are: `image` (the default) or `text` (models with a text tower: CLIP, "
    "SigLIP, SigLIP2; texts and images then share one space)."
)
Modality = Literal["image", "text"]
MODEL_DESCRIPTION = (
    "Which served model embeds the inputs (`GET /v1/models` lists them); absent: the default. "
    "An unknown name is a 404."
)


class EmbedRequest(BaseModel):
    """`POST /embed` (and `POST /`), as in text-embeddings-inference: images, or texts."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {"inputs": [EXAMPLE_IMAGE], "normalize": True},
                {"inputs": ["a cat on a sofa"], "modality": "text"},
            ]
        },
    )

    inputs: StrictStr | list[StrictStr] = Field(description=f"One or a list. {INPUT_DESCRIPTION}")
    modality: Modality = Field("image", description=MODALITY_DESCRIPTION)
    normalize: StrictBool = Field(True, description="Scale each vector to unit L2 norm.")
    truncate: StrictBool | None = Field(
        None,
        description="Texts: cut one longer than the model's context to it (the default), or "
        "`false`: refuse it with a 422. Images are never truncated.",
    )
    truncation_direction: Literal["left", "right", "Left", "Right"] | None = Field(
        None, description="Accepted for TEI clients; texts are cut at their end (right)."
    )
    model: StrictStr | None = Field(None, description=MODEL_DESCRIPTION)
    dimensions: StrictInt | None = Field(
        None,
        ge=1,
        description="Keep the first N components (then normalised, if `normalize`): for "
        "models trained to nest their vectors (Matryoshka).",
    )

    @property
    def input_list(self) -> list[str]:
        return [self.inputs] if isinstance(self.inputs, str) else self.inputs


_FILE = {"type": "string", "format": "binary"}
_ONE_FILE = "One image: the body is the encoded file (JPEG, PNG, WebP, ...)."
_RAW_ONLY = " Raw uploads only (a JSON body has its own field)."


# The raw forms of `POST /embed` (beside TEI's JSON body, which FastAPI documents itself): the body
# is the image file, or a form whose file parts are the images. Read by `uploads.py`.
def upload_body(fields: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI's request bodies of a raw upload: one image file, or a form of several with
    `fields` as its text fields."""
    return {
        "content": {
            "image/*": {"schema": {**_FILE, "description": _ONE_FILE}},
            "application/octet-stream": {"schema": {**_FILE, "description": _ONE_FILE}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {
                            "type": "array",
                            "items": _FILE,
                            "description": "The images, in order: every part with a filename "
                            "is one, whatever its field name.",
                        },
                        **fields,
                    },
                    "required": ["file"],
                },
                "encoding": {"file": {"contentType": "image/*, application/octet-stream"}},
            },
        }
    }


UPLOAD_OPENAPI: dict[str, Any] = {
    "parameters": [
        {
            "name": "normalize",
            "in": "query",
            "required": False,
            "schema": {"type": "boolean", "default": True},
            "description": "Scale each vector to unit L2 norm: exactly `true` or `false`."
            + _RAW_ONLY,
        },
        {
            "name": "dimensions",
            "in": "query",
            "required": False,
            "schema": {"type": "integer", "minimum": 1},
            "description": "Keep the first N components of each vector." + _RAW_ONLY,
        },
    ],
    "requestBody": upload_body(
        {
            "normalize": {"type": "string", "enum": ["true", "false"]},
            "model": {"type": "string"},
            "dimensions": {"type": "string", "pattern": "^[0-9]{1,9}$"},
        }
    ),
}


# An item of OpenAI's `input`: a string (an image, or a text with `modality: text`) or an object
# naming what it is (Jina's shape), so that one request can mix texts and images. Items are
# checked by the route, which names a bad one by its index.
OpenAIItem = Annotated[
    Any,
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string"},
                {
                    "type": "object",
                    "properties": {"text": {"type": "string"}, "image": {"type": "string"}},
                    "description": "Exactly one of `text` and `image` (base64, data: URI, URL).",
                },
            ]
        }
    ),
]


class OpenAIEmbeddingRequest(BaseModel):
    """`POST /v1/embeddings`, OpenAI's shape (`modality` as in Infinity, item objects as in
    Jina's API)."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {"input": [EXAMPLE_IMAGE], "encoding_format": "float"},
                {"input": [{"text": "a cat on a sofa"}, {"image": EXAMPLE_IMAGE}]},
            ]
        },
    )

    input: StrictStr | list[OpenAIItem] = Field(
        description=f"One or a list. {INPUT_DESCRIPTION} A list may also hold objects "
        '`{"text": "..."}` and `{"image": "..."}`, mixed.'
    )
    modality: Modality = Field(
        "image", description=f"{MODALITY_DESCRIPTION} Plain strings of `input` are these."
    )
    model: StrictStr | None = Field(None, description=MODEL_DESCRIPTION)
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: the little-endian float32 bytes, as OpenAI sends them."
    )
    dimensions: StrictInt | None = Field(
        None, ge=1, description="Keep the first N components and re-normalise."
    )
    user: StrictStr | None = Field(None, description="Ignored.")

    @property
    def input_list(self) -> list[Any]:
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


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="When this server started (Unix seconds).")
    owned_by: str = "iei"


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


class TritonModels(BaseModel):
    image: str = Field(description="Its Triton model for images (inputs IMAGE, output EMBEDDING).")
    text: str | None = Field(None, description="Its Triton model for texts (dual encoders).")


class ModelInfo(BaseModel):
    """One served model in `GET /info`'s `models`. Facts come from the model once it has been
    loaded; null before."""

    name: str = Field(description="What a request's `model` says.")
    model_id: str
    default: bool
    pinned: bool = Field(description="Loaded at start and never unloaded.")
    loaded: bool = Field(description="In Triton now (IEI_MODEL_IDLE_UNLOAD unloads idle ones).")
    embedding_dimension: int | None
    modalities: list[str] | None
    pooling: str | None
    dtype: str | None
    engine: str | None
    device: str | None = None
    layout: str | None = None
    zero_shot: Literal["softmax", "sigmoid"] | None = Field(
        None,
        description="`POST /classify`'s scores: `softmax` over the labels (CLIP) or `sigmoid` per "
        "label (SigLIP, SigLIP2); null: the model cannot classify (no text tower).",
    )
    triton_models: TritonModels


class TritonInfo(BaseModel):
    endpoint: str
    ready: bool


class Limits(BaseModel):
    max_client_batch_size: int
    max_text_chars: int
    max_concurrent_images: int
    max_concurrent_requests: int = Field(
        description="The earlier name of max_concurrent_images (it counts images)."
    )
    max_image_pixels: int
    payload_limit: int
    body_worker_max_bytes: int
    body_read_timeout: float
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
    engine: str | None = Field(None, description="What runs it: torch, onnxruntime, openvino.")
    dtype: str | None = Field(None, description="Its precision: float32, bfloat16, float16, int8.")
    layout: str | None = Field(
        None, description="Triton's layout (IEI_TRITON_LAYOUT): single, or split (an ensemble)."
    )
    jpeg_decoder: str | None = Field(
        None, description="What decodes plain JPEGs: pil, torchvision or nvimagecodec."
    )
    device: str | None
    pooling: str | None
    modalities: list[str] | None = Field(
        description='`["image"]`, or `["image", "text"]` for a model with a text tower'
    )
    text_context_length: int | None = Field(
        description="Tokens of a text the model reads; longer texts are cut (null: no texts)"
    )
    zero_shot: Literal["softmax", "sigmoid"] | None = Field(
        None,
        description="`POST /classify`'s scores: `softmax` over the labels (CLIP) or `sigmoid` per "
        "label (SigLIP, SigLIP2); null: the model cannot classify (no text tower).",
    )
    max_batch_size: int | None
    max_client_batch_size: int
    limits: Limits
    raw_uploads: bool = Field(
        True,
        description="`/embed` takes the image file as the body (`image/*`, "
        "`application/octet-stream`) and `multipart/form-data` forms of files.",
    )
    version: str
    triton: TritonInfo
    models: list[ModelInfo] = Field(
        default_factory=list, description="Every served model, the default first."
    )


DEFAULT_HYPOTHESIS_TEMPLATE = "This is a photo of {}."  # Hugging Face's zero-shot pipeline's


class ClassifyParameters(BaseModel):
    """Hugging Face's `parameters` of zero-shot image classification."""

    model_config = ConfigDict(extra="forbid")  # a misspelt option is refused, not ignored

    candidate_labels: list[StrictStr] = Field(
        description="The labels to score each image against: distinct, not empty, at most "
        "IEI_MAX_CLIENT_BATCH_SIZE of them, each at most IEI_MAX_TEXT_CHARS characters."
    )
    hypothesis_template: StrictStr = Field(
        DEFAULT_HYPOTHESIS_TEMPLATE,
        description="The text each label is put into, where `{}` is (the text embedded).",
    )


class ClassifyRequest(BaseModel):
    """`POST /classify`: Hugging Face's zero-shot-image-classification request."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {
                    "inputs": EXAMPLE_IMAGE,
                    "parameters": {"candidate_labels": ["cat", "dog", "car"]},
                },
            ]
        },
    )

    inputs: StrictStr | list[StrictStr] = Field(
        description="One image or a list (base64 of the file, a data:image/...;base64, URI, or "
        "an http(s) URL). One image: one list of labels back; a list: a list of such lists."
    )
    parameters: ClassifyParameters
    model: StrictStr | None = Field(
        None, description=MODEL_DESCRIPTION + " It needs a text tower (CLIP, SigLIP, SigLIP2)."
    )

    @property
    def input_list(self) -> list[str]:
        return [self.inputs] if isinstance(self.inputs, str) else self.inputs


class ClassifyUploadOptions(BaseModel):
    """The options of `POST /classify` with a raw upload (query parameters, form fields):
    `candidate_labels` comma-separated, or the parameter repeated (joined here)."""

    candidate_labels: StrictStr | None = None
    hypothesis_template: StrictStr = DEFAULT_HYPOTHESIS_TEMPLATE
    model: StrictStr | None = None


class LabelScore(BaseModel):
    label: str
    score: float = Field(
        description="The model's own probability: CLIP a softmax over the labels of "
        "logit_scale · cosine, SigLIP a sigmoid of logit_scale · cosine + logit_bias."
    )


_LABELS_PARAMETER = {
    "name": "candidate_labels",
    "in": "query",
    "required": False,
    "schema": {"type": "array", "items": {"type": "string"}},
    "style": "form",
    "explode": True,
    "description": "Raw uploads: the labels, comma-separated or the parameter repeated "
    "(`?candidate_labels=cat,dog` or `?candidate_labels=cat&candidate_labels=dog`; a label with "
    "a comma needs the JSON body).",
}
# The raw forms of `POST /classify`: the image file as the body, or a form of image files; the
# labels and options as query parameters or (in a form) text fields.
CLASSIFY_UPLOAD_OPENAPI: dict[str, Any] = {
    "parameters": [
        _LABELS_PARAMETER,
        {
            "name": "hypothesis_template",
            "in": "query",
            "required": False,
            "schema": {"type": "string", "default": DEFAULT_HYPOTHESIS_TEMPLATE},
            "description": "Raw uploads: the text each label is put into, at `{}`.",
        },
    ],
    "requestBody": upload_body(
        {
            "candidate_labels": {"type": "string"},
            "hypothesis_template": {"type": "string"},
            "model": {"type": "string"},
        }
    ),
}


# Cohere's v2 embed API (`POST /v2/embed`), for Cohere's SDKs (`cohere.ClientV2(base_url=...)`).
EmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]
CohereInputType = Literal[
    "search_document", "search_query", "classification", "clustering", "image"
]


class CohereImageUrl(BaseModel):
    url: StrictStr = Field(description="A data:image/...;base64, URI (an http(s) URL works too).")


class CohereContent(BaseModel):
    """One part of an input: `{"type": "text", "text": ...}` or
    `{"type": "image_url", "image_url": {"url": ...}}`."""

    type: Literal["text", "image_url"]
    text: StrictStr | None = None
    image_url: CohereImageUrl | StrictStr | None = None


class CohereInput(BaseModel):
    content: list[CohereContent] = Field(
        description="Exactly one part here: a dual encoder embeds a text and an image apart, "
        "into one space, and does not fuse them into one vector."
    )


class CohereEmbedRequest(BaseModel):
    """`POST /v2/embed`, Cohere's shape; exactly one of `texts`, `images`, `inputs`."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {
                    "model": "iei",
                    "input_type": "image",
                    "images": [f"data:image/png;base64,{EXAMPLE_IMAGE}"],
                    "embedding_types": ["float", "int8"],
                }
            ]
        },
    )

    model: StrictStr = Field(description=MODEL_DESCRIPTION.replace(" absent: the default.", ""))
    input_type: CohereInputType | None = Field(
        None,
        description="Accepted, and changes no vector: these models embed queries, documents "
        "and labels alike (no instruction prefix). `image` with `texts` is a 422.",
    )
    texts: list[StrictStr] | None = Field(None, description="Texts (models with a text tower).")
    images: list[StrictStr] | None = Field(None, description="Images as data URIs.")
    inputs: list[CohereInput] | None = Field(None, description="Content lists of one part each.")
    max_tokens: StrictInt | None = Field(None, description="Not supported: a 422 when set.")
    output_dimension: StrictInt | None = Field(
        None, ge=1, description="Keep the first N components and re-normalise."
    )
    embedding_types: list[EmbeddingType] | None = Field(
        None, min_length=1, description="The types to answer (absent: float)."
    )
    truncate: Literal["NONE", "START", "END"] | None = Field(
        None,
        description="END (the default) cuts a text at the model's context; NONE refuses it "
        "(422); START is refused (422).",
    )
    priority: StrictInt | None = Field(None, description="Ignored.")


class CohereImage(BaseModel):
    width: int
    height: int
    format: str
    bit_depth: int


class CohereEmbedResponse(BaseModel):
    id: str
    embeddings: dict[str, list[list[float]] | list[list[int]] | list[str]]
    texts: list[str] | None = None
    images: list[CohereImage] | None = None
    meta: dict[str, Any] | None = None
    response_type: Literal["embeddings_by_type"] = "embeddings_by_type"
