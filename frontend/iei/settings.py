"""Every setting of IEI, declared once: its variable, default, type, which part reads it, meaning.

The parts' pydantic-settings classes (`iei.server.settings`, `iei.launcher.settings`) take their
defaults, variable names and descriptions from `SETTINGS`; the model (`model_repository/`, which
cannot import this package), the README's table, compose and the Kubernetes manifests are checked
against it by tests. `python -m iei.settings` prints the README's table.

Runs on the Triton image's Python 3.10 (`iei triton` imports it).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from pydantic import AliasChoices, Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

log = logging.getLogger("iei")

# Who reads a setting: the HTTP frontend, `iei serve` / `iei triton`, the Triton model.
SERVER, LAUNCHER, MODEL = "server", "launcher", "model"
SETTINGS_READERS = (SERVER, LAUNCHER, MODEL)


@dataclass(frozen=True)
class Setting:
    env: str  # the environment variable
    default: Any  # None: unset
    type: str  # "str", "int", "float", "bool", "path", "secret", or "a|b|c" (one of these words)
    readers: tuple[str, ...]
    description: str  # one README table cell (Markdown)
    shown_default: str | None = None  # how the README shows the default, when not just the value
    aliases: tuple[str, ...] = ()  # older variable names that still work


_SETTINGS = [
    ("embedding_model", Setting(
        "IMAGE_EMBEDDING_MODEL", "google/vit-base-patch16-224", "str", (SERVER, LAUNCHER, MODEL),
        "hub id or local folder of the model",
    )),
    ("models", Setting(
        "IEI_MODELS", None, "str", (SERVER, LAUNCHER),
        "several models in one server: `[name=]model[?option=value&...],...` (the first is the "
        "default; options `pooling`, `dtype`, `engine`, `instances`, `pinned`; README's "
        "\"Several models\"); not together with `IMAGE_EMBEDDING_MODEL`",
        shown_default="unset (one model: `IMAGE_EMBEDDING_MODEL`)",
    )),
    ("model_idle_unload", Setting(
        "IEI_MODEL_IDLE_UNLOAD", None, "float", (SERVER, LAUNCHER),
        "seconds without requests after which a model that is not pinned is unloaded from "
        "Triton (then loaded again by its next request, which waits for it); unset: every model "
        "is loaded at start and stays", shown_default="unset (never)",
    )),
    ("max_loaded_models", Setting(
        "IEI_MAX_LOADED_MODELS", None, "int", (SERVER, LAUNCHER),
        "most models of `IEI_MODELS` in Triton at once, the pinned ones included: loading "
        "another on demand first unloads the one least recently used (none used within "
        "`IEI_REQUEST_TIMEOUT`: a 503 with `Retry-After`); unset: no limit",
        shown_default="unset (no limit)",
    )),
    ("bind", Setting(
        "IEI_BIND", "0.0.0.0:8000", "str", (LAUNCHER,),
        "`host:port` of the HTTP frontend (an IPv6 host in brackets: `[::1]:8000`)",
    )),
    ("workers", Setting(
        "IEI_WORKERS", "auto", "str", (LAUNCHER,),
        "uvicorn worker processes of the frontend; `auto`: 2, or on a GPU host one per 2 cores "
        "(2 to 16: there the frontend's CPU, not the model, bounds single-image requests)",
    )),
    ("concurrency_level", Setting(
        "IEI_CONCURRENCY_LEVEL", 32, "int", (SERVER,),
        "at most this many images (or texts) of one request in flight to Triton at once; also the "
        "size of its chunks (capped at the model's `max_batch_size`, 64)",
    )),
    ("dtype", Setting(
        "IEI_DTYPE", "auto", "auto|float32|bfloat16|float16|int8", (LAUNCHER, MODEL),
        "`auto` (fp16 on a GPU, bf16 on CPUs with native bf16, else float32), `float32`, "
        "`bfloat16`, `float16`, or `int8` on a CPU (int8 weights, activations quantized per "
        "call: 2.6 to 3.1x float32 in-process in our runs, cosine >= 0.99; only when asked for)",
    )),
    ("engine", Setting(
        "IEI_ENGINE", "auto", "auto|torch|onnxruntime|openvino", (LAUNCHER, MODEL),
        "what runs the model: `torch`, or on a CPU `onnxruntime` / `openvino` (exported once, "
        "cached); `auto`: torch on a GPU and for bf16, OpenVINO for float32 on a CPU (the fastest "
        "exact engine measured), ONNX Runtime for int8",
    )),
    ("engine_cache", Setting(
        "IEI_ENGINE_CACHE", None, "path", (LAUNCHER, MODEL),
        "folder of exported models, kept across restarts (keyed by the model's files, precision "
        "and engine version)", shown_default="`$HF_HOME/iei-engines`, else `~/.cache/iei/engines`",
    )),
    ("pooling", Setting(
        "IEI_POOLING", "auto", "auto|mean|cls|pooler", (LAUNCHER, MODEL),
        "`auto`: a dual encoder's projected image embedding (the space its texts share), "
        "DINOv2's `pooler_output`, else the mean of the last hidden state; `mean`, `cls` or "
        "`pooler` force one (one the model cannot do stops start-up; one outside a dual "
        "encoder's text space serves images only)",
    )),
    ("max_client_batch_size", Setting(
        "IEI_MAX_CLIENT_BATCH_SIZE", 64, "int", (SERVER,), "most inputs in one request",
    )),
    ("max_image_pixels", Setting(
        "IEI_MAX_IMAGE_PIXELS", 50_000_000, "int", (SERVER, MODEL),
        "largest image (width x height), checked from the header",
    )),
    ("max_text_chars", Setting(
        "IEI_MAX_TEXT_CHARS", 4096, "int", (SERVER, MODEL),
        "longest text in characters (`modality: text`), checked before tokenizing",
    )),
    ("request_timeout", Setting(
        "IEI_REQUEST_TIMEOUT", 60.0, "float", (SERVER, LAUNCHER),
        "seconds a request may take before a 504; a request still in Triton's queue after it "
        "is dropped",
    )),
    ("payload_limit", Setting(
        "IEI_PAYLOAD_LIMIT", 64 * 1024 * 1024, "int", (SERVER,), "largest request body in bytes",
        shown_default="`67108864` (64 MiB)",
    )),
    ("body_worker_max_bytes", Setting(
        "IEI_BODY_WORKER_MAX_BYTES", 64 * 1024 * 1024, "int", (SERVER,),
        "most bytes of request bodies a frontend worker holds at once (counted as they arrive, "
        "held until their request's work ends); beyond it a 429, at once where `Content-Length` "
        "says the body cannot fit. Memory: docs/reliability.md",
        shown_default="`67108864` (64 MiB)",
    )),
    ("body_read_timeout", Setting(
        "IEI_BODY_READ_TIMEOUT", 30.0, "float", (SERVER,),
        "seconds a client has to send the whole request body (from the request's start); "
        "slower is a 408",
    )),
    ("max_concurrent_images", Setting(
        "IEI_MAX_CONCURRENT_IMAGES", 512, "int", (SERVER,),
        "images in flight per frontend worker before 429 (`IEI_MAX_CONCURRENT_REQUESTS`, its "
        "earlier name, still works)",
        aliases=("IEI_MAX_CONCURRENT_REQUESTS",),
    )),
    ("api_key", Setting(
        "IEI_API_KEY", None, "secret", (SERVER,),
        "Bearer key required by every route except `/health`, `/live`, `/metrics`, the API "
        "docs (`/docs` and below, `/redoc`, `/openapi.json`) and the demo page (`GET /`)",
    )),
    ("served_model_name", Setting(
        "IEI_SERVED_MODEL_NAME", None, "str", (SERVER,),
        "name the answers report and requests may send as `model` (with `IEI_MODELS`: one more "
        "name the default model answers to; answers report its own name)",
    )),
    ("allow_private_urls", Setting(
        "IEI_ALLOW_PRIVATE_URLS", False, "bool", (SERVER,),
        "fetch URLs on loopback, private and link-local addresses too",
    )),
    ("url_timeout", Setting(
        "IEI_URL_TIMEOUT", 10.0, "float", (SERVER,), "seconds to fetch one image URL",
    )),
    ("url_max_bytes", Setting(
        "IEI_URL_MAX_BYTES", 32 * 1024 * 1024, "int", (SERVER,),
        "largest image file fetched from a URL", shown_default="`33554432` (32 MiB)",
    )),
    ("url_request_max_bytes", Setting(
        "IEI_URL_REQUEST_MAX_BYTES", 64 * 1024 * 1024, "int", (SERVER,),
        "most bytes the URL inputs of one request may download together",
        shown_default="`67108864` (64 MiB)",
    )),
    ("url_worker_max_bytes", Setting(
        "IEI_URL_WORKER_MAX_BYTES", 64 * 1024 * 1024, "int", (SERVER,),
        "most bytes of URL downloads a frontend worker holds at once; beyond it a 429",
        shown_default="`67108864` (64 MiB)",
    )),
    ("cache_mb", Setting(
        "IEI_CACHE_MB", 64, "int", (SERVER,),
        "MiB of raw vectors each frontend worker keeps, by model and SHA-256 of the image bytes or "
        "text: a repeated input never reaches Triton (least recently used out first); `0` turns "
        "the cache off (README's \"The content cache\")",
    )),
    ("url_max_redirects", Setting(
        "IEI_URL_MAX_REDIRECTS", 5, "int", (SERVER,), "redirects followed per URL",
    )),
    ("triton_url", Setting(
        "IEI_TRITON_URL", None, "str", (SERVER, LAUNCHER),
        "`host:port` of a Triton HTTP endpoint that something else runs (compose, Kubernetes); "
        "when set, `iei serve` starts only the frontend",
    )),
    ("triton_metrics_url", Setting(
        "IEI_TRITON_METRICS_URL", None, "str", (SERVER,),
        "`host:port` of that Triton's metrics endpoint: where /health sees that a probe held in "
        "the queue waits behind a long execution that computes (a busy model, not a broken one)",
        shown_default="unset (`iei serve` sets its own Triton's)",
    )),
    ("triton_shm_mb", Setting(
        "IEI_TRITON_SHM_MB", 128, "int", (SERVER,),
        "MiB of /dev/shm each frontend worker hands image files to Triton through (system shared "
        "memory), reserved once Triton shows it sees the same /dev/shm (`iei serve` on one host; "
        "never across containers); the files go in the HTTP body when it is full or refused; `0` "
        "turns it off",
    )),
    ("decode_pixel_budget", Setting(
        "IEI_DECODE_PIXEL_BUDGET", 100_000_000, "int", (LAUNCHER, MODEL),
        "pixels of full-size decoded images a model instance holds at once (each image is shrunk "
        "right after decoding); bounds the model's memory for decoding at about 8 bytes a pixel",
    )),
    ("triton_host", Setting(
        "IEI_TRITON_HOST", "127.0.0.1", "str", (LAUNCHER,),
        "address the Triton of `iei serve` binds (IPv4 or IPv6, e.g. `::1`; not a name); `0.0.0.0` "
        "or `::` exposes it to other machines (the frontend then dials loopback)",
    )),
    ("triton_http_port", Setting(
        "IEI_TRITON_HTTP_PORT", 8100, "int", (SERVER, LAUNCHER), "Triton's HTTP port",
    )),
    ("triton_grpc_port", Setting(
        "IEI_TRITON_GRPC_PORT", 8101, "int", (LAUNCHER,), "Triton's gRPC port",
    )),
    ("triton_metrics_port", Setting(
        "IEI_TRITON_METRICS_PORT", 8102, "int", (LAUNCHER,),
        "Triton's Prometheus metrics (`/metrics`)",
    )),
    ("triton_instances", Setting(
        "IEI_TRITON_INSTANCES", None, "int", (LAUNCHER,),
        "model instances per GPU, or on the CPU (CPU threads are shared between them); by "
        "default 1, and 2 per GPU for the split layout's encoder (one's CPU work overlaps the "
        "other's forward pass)",
        shown_default="`1` (split encoder: `2`)",
    )),
    ("triton_max_queue_size", Setting(
        "IEI_TRITON_MAX_QUEUE_SIZE", 256, "int", (LAUNCHER,),
        "Triton requests (up to 64 images each; the frontend's chunks hold at most "
        "`IEI_CONCURRENCY_LEVEL`) that may wait for a model; more are refused "
        "(503, retry), and one that waited `IEI_REQUEST_TIMEOUT` is dropped, not computed",
    )),
    ("triton_layout", Setting(
        "IEI_TRITON_LAYOUT", "auto", "auto|single|split", (LAUNCHER,),
        "`single`: one model decodes, preprocesses and encodes; `split`: an ensemble of "
        "`iei_preprocess` (many CPU processes) and `iei_encoder` (the device, its own batcher); "
        "`auto`: split where there is a GPU, single on a CPU (faster there, docs/benchmarks.md)",
    )),
    ("preprocess_instances", Setting(
        "IEI_PREPROCESS_INSTANCES", None, "int", (LAUNCHER,),
        "CPU processes of `iei_preprocess` in the split layout, one thread each",
        shown_default="the cores less the encoders (2 per GPU), at most 16 per GPU",
    )),
    ("model_repository", Setting(
        "IEI_MODEL_REPOSITORY", None, "path", (LAUNCHER,),
        "the folder Triton loads", shown_default="the one IEI ships",
    )),
    ("startup_timeout", Setting(
        "IEI_STARTUP_TIMEOUT", 840.0, "float", (LAUNCHER,),
        "seconds `iei serve` waits for the model to load (downloads included); under the 15 "
        "minutes the container probes allow, so that its own error comes first",
    )),
    ("forward_batch_size", Setting(
        "IEI_FORWARD_BATCH_SIZE", "auto", "str", (LAUNCHER, MODEL),
        "images (or texts) per forward pass inside one Triton execution, at most the model's "
        "`max_batch_size` (64); `auto`: 8 on a CPU, "
        "where an image model times each pass size at load and runs a size slower than smaller "
        "ones as those (4 as 2+2), 64 on a GPU",
    )),
    ("forward_threads", Setting(
        "IEI_FORWARD_THREADS", "auto", "str", (LAUNCHER, MODEL),
        "CPU threads of a forward pass (images or texts), per instance, at most the cores "
        "available; `auto`: the "
        "instance's share of the cores, fewer where timing a pass at load shows the extra "
        "threads add little (parallel efficiency below 0.75: a small model)",
    )),
    ("jpeg_draft", Setting(
        "IEI_JPEG_DRAFT", True, "bool", (LAUNCHER, MODEL),
        "decode a JPEG at least twice the model's input size on both sides at 1/2, 1/4 or 1/8 "
        "scale (never below 2x the input side); `false` always decodes in full",
    )),
    ("fused_preprocess", Setting(
        "IEI_FUSED_PREPROCESS", True, "bool", (LAUNCHER, MODEL),
        "run the model's image processor one image at a time on its uint8 pixels right after "
        "decoding (its own resize and crop, then normalised in one pass), where that agrees "
        "with the processor's batch call to two pixel levels on probe images at start; `false` "
        "always calls the processor",
    )),
    ("jpeg_decoder", Setting(
        "IEI_JPEG_DECODER", "auto", "auto|pil|torchvision|nvimagecodec", (LAUNCHER, MODEL),
        "who decodes plain JPEGs in the split layout: `nvimagecodec` or `torchvision` (nvJPEG "
        "on a GPU, batched; libjpeg-turbo on a CPU), or `pil`; `auto`: nvImageCodec on a GPU "
        "where installed, else torchvision there, PIL on a CPU. Other files always go to PIL",
    )),
    ("cuda_graphs", Setting(
        "IEI_CUDA_GRAPHS", False, "bool", (MODEL,),
        "replay the image encoder's forward pass from CUDA graphs captured at start (batch sizes "
        "1, 2, 4 ... up to the forward batch size; a batch padded to the next). GPU only: `true` "
        "on a CPU host stops start-up with one line. Off until `make bench-gpu` shows it pays",
    )),
]  # fmt: skip
SETTINGS: dict[str, Setting] = dict(_SETTINGS)


def read_by(part: str) -> dict[str, Setting]:
    """The settings that `part` (SERVER, LAUNCHER or MODEL) reads."""
    return {name: s for name, s in SETTINGS.items() if part in s.readers}


def as_env_value(value: Any) -> str:
    """A setting's value as an environment variable carries it (None: empty, the default)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def by_env(variable: str) -> Setting | None:
    """The setting of an environment variable (its current or an older name)."""
    for entry in SETTINGS.values():
        if variable == entry.env or variable in entry.aliases:
            return entry
    return None


# uvicorn worker processes at most (IEI_WORKERS).
MAX_WORKERS = 64


def auto_or_count(value: str, most: int | None = None) -> str:
    """`auto` or a count from 1 (to `most`), in lower case; else a ValueError of one line. Here,
    not in the launcher: the frontend image's preflight checks IEI_WORKERS too, and has none of
    the launcher's packages (protobuf, grpc)."""
    value = value.strip().lower()
    count = int(value) if value.isdigit() else 0
    if value == "auto" or (count >= 1 and (most is None or count <= most)):
        return value
    counts = f"a count from 1 to {most}" if most else "a positive integer"
    raise ValueError(f"expected auto or {counts}, got {value!r}")


def setting(name: str, **constraints: Any) -> Any:
    """The pydantic field of `name`, from the table: default, variable (and older names),
    description; `constraints` (ge, le, min_length...) validate the value. Code may also pass
    the field's own name (`ServerSettings(api_key=...)`); the environment may not."""
    entry = SETTINGS[name]
    return Field(
        entry.default,
        validation_alias=AliasChoices(entry.env, *entry.aliases),
        description=entry.description,
        **constraints,
    )


class DocumentedVariables(PydanticBaseSettingsSource):
    """The environment, read by the table's variables and older names only, spelled exactly.

    pydantic-settings' own source also takes a field's name in any case (`API_KEY`, `workers`)
    as its variable: a stray `API_KEY` in a container would switch authentication on."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads everything at once

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name in self.settings_cls.model_fields:
            entry = SETTINGS[name]
            for variable in (entry.env, *entry.aliases):  # the current name wins
                # Whitespace around a value is a mistake, never meant: an API key from a file
                # that ends in a newline locked every route; a model id with a trailing space
                # was half accepted. Only whitespace means the default, as empty does.
                value = os.environ.get(variable, "").strip()
                if value:
                    values[entry.env] = value  # the key init arguments are normalised to
                    break
        return values


class SettingsBase(BaseSettings):
    """Read from the environment once (only the documented variables, their values stripped);
    an empty variable means the default."""

    model_config = SettingsConfigDict(
        env_ignore_empty=True, extra="ignore", frozen=True, populate_by_name=True
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, DocumentedVariables(settings_cls)

    def shown(self) -> dict[str, Any]:
        """The settings as they may be logged: a secret only says whether it is set."""
        values = self.model_dump(mode="json")
        for name in values:
            if SETTINGS[name].type == "secret":
                values[name] = "set (hidden)" if values[name] else None
        return values


def load(cls: type[SettingsBase]) -> Any:
    """`cls()`, or one log line per invalid variable (by its name) and exit status 2."""
    try:
        return cls()
    except ValidationError as exc:
        for error in exc.errors():
            message = str(error["msg"]).removeprefix("Value error, ")
            if not error["loc"]:  # settings that contradict each other
                log.error("invalid settings: %s", message)
                continue
            name = str(error["loc"][0])
            env = SETTINGS[name].env if name in SETTINGS else name
            log.error("invalid setting %s: %s", env, message)
        raise SystemExit(2) from None


def _default_cell(entry: Setting) -> str:
    if entry.shown_default is not None:
        return entry.shown_default
    if entry.default is None:
        return "unset"
    if isinstance(entry.default, bool):
        return f"`{str(entry.default).lower()}`"
    if isinstance(entry.default, float) and entry.default.is_integer():
        return f"`{int(entry.default)}`"
    return f"`{entry.default}`"


def markdown_table() -> str:
    """The README's settings table."""
    rows = ["| variable | default | read by | meaning |", "| --- | --- | --- | --- |"]
    for entry in SETTINGS.values():
        rows.append(
            f"| `{entry.env}` | {_default_cell(entry)} | {', '.join(entry.readers)} | "
            f"{entry.description} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())  # noqa: T201 (the command's output)
