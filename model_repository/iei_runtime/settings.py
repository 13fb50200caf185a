"""The model's settings: environment of the Triton process first, then config.pbtxt
`parameters` (the other way round in a config the launcher rendered for one of several models:
PARAMETERS_FIRST), then the defaults here (the same as the frontend's table, `iei/settings.py`,
which a test checks: this folder cannot import the frontend)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .families import POOLINGS
from .jpeg_decoders import JPEG_DECODERS
from .resources import available_cores

SETTINGS = {
    # name in config.pbtxt: (environment variable, default)
    "model_id": ("IMAGE_EMBEDDING_MODEL", "google/vit-base-patch16-224"),
    "dtype": ("IEI_DTYPE", "auto"),
    "engine": ("IEI_ENGINE", "auto"),
    "engine_cache": ("IEI_ENGINE_CACHE", ""),
    "pooling": ("IEI_POOLING", "auto"),
    "max_image_pixels": ("IEI_MAX_IMAGE_PIXELS", "50000000"),
    "forward_batch_size": ("IEI_FORWARD_BATCH_SIZE", "auto"),
    "forward_threads": ("IEI_FORWARD_THREADS", "auto"),
    "jpeg_draft": ("IEI_JPEG_DRAFT", "true"),
    "fused_preprocess": ("IEI_FUSED_PREPROCESS", "true"),
    "jpeg_decoder": ("IEI_JPEG_DECODER", "auto"),
    "decode_pixel_budget": ("IEI_DECODE_PIXEL_BUDGET", "100000000"),
    "max_text_chars": ("IEI_MAX_TEXT_CHARS", "4096"),
    "cuda_graphs": ("IEI_CUDA_GRAPHS", "false"),
}
# config.pbtxt parameter: "true" when its parameters override the environment (rendered configs).
PARAMETERS_FIRST = "parameters_first"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRECISIONS = (*DTYPES, "int8")  # int8: weights, and activations quantized per call (engines.py)
ENGINES = ("auto", "torch", "onnxruntime", "openvino")
# The words pydantic takes for a bool, so that `iei serve`'s check and this one agree.
BOOLEANS = {
    **dict.fromkeys(("true", "1", "yes", "y", "on", "t"), True),
    **dict.fromkeys(("false", "0", "no", "n", "off", "f"), False),
}

# Images per forward pass when IEI_FORWARD_BATCH_SIZE=auto. On the CPU a ViT-B/16 in bf16 (AMX) ran
# 35 img/s at 8 and 25 img/s at 32 (activations outgrow the caches; docs/benchmarks.md); a GPU
# wants large passes (64: config.pbtxt's max_batch_size, so one pass per execution).
FORWARD_BATCH_AUTO = {"cpu": 8, "cuda": 64}
# The most images of one execution (config.pbtxt's max_batch_size) where a config does not say:
# a forward pass never holds more, so IEI_FORWARD_BATCH_SIZE may not ask for more.
MAX_BATCH_SIZE = 64


@dataclass(frozen=True)
class ModelSettings:
    model_id: str
    dtype: str
    pooling: str
    max_image_pixels: int
    forward_batch_size: int  # 0: auto, by device (resolve_forward_batch_size)
    forward_threads: int = 0  # CPU threads of a forward pass; 0: auto, measured at load
    engine: str = "auto"
    engine_cache: str = ""  # "": $HF_HOME/iei-engines, else ~/.cache/iei/engines
    jpeg_draft: bool = True
    fused_preprocess: bool = True  # fused.py: the processor's steps per image, uint8 resize
    jpeg_decoder: str = "auto"  # jpeg_decoders.py: auto, pil, torchvision, nvimagecodec
    decode_pixel_budget: int = 100_000_000
    max_text_chars: int = 4096
    cuda_graphs: bool = False  # cuda_graphs.py: the image encoder replayed from CUDA graphs


def read_settings(
    model_config: dict[str, Any], environ: dict[str, str], cores: int | None = None
) -> ModelSettings:
    """Resolve every setting (environment > config parameter > default) and validate it.
    IEI_FORWARD_BATCH_SIZE is at most the config's max_batch_size, IEI_FORWARD_THREADS at most
    `cores` (the cores this process may use, when not given)."""
    params = model_config.get("parameters", {})
    # A config that `iei serve` rendered for one of several models carries that model's own
    # settings: they come before the environment, which holds the default model's.
    params_first = params.get(PARAMETERS_FIRST, {}).get("string_value") == "true"
    raw = {}
    for name, (env_name, default) in SETTINGS.items():
        param, env = params.get(name, {}).get("string_value"), environ.get(env_name)
        value = (param or env if params_first else env or param) or default
        raw[name] = value.strip()
    if raw["dtype"] not in ("auto", *PRECISIONS):
        raise ValueError(f"IEI_DTYPE={raw['dtype']!r}: expected auto, {', '.join(PRECISIONS)}")
    if raw["engine"] not in ENGINES:
        raise ValueError(f"IEI_ENGINE={raw['engine']!r}: expected {', '.join(ENGINES)}")
    if raw["pooling"] not in POOLINGS:
        raise ValueError(f"IEI_POOLING={raw['pooling']!r}: expected one of {', '.join(POOLINGS)}")
    if raw["jpeg_decoder"] not in JPEG_DECODERS:
        raise ValueError(
            f"IEI_JPEG_DECODER={raw['jpeg_decoder']!r}: expected {', '.join(JPEG_DECODERS)}"
        )
    for name in ("jpeg_draft", "fused_preprocess", "cuda_graphs"):
        if raw[name].lower() not in BOOLEANS:
            raise ValueError(f"{SETTINGS[name][0]}={raw[name]!r}: expected true or false")
    numbers = {}
    for name in ("max_image_pixels", "forward_batch_size", "forward_threads",
                 "decode_pixel_budget", "max_text_chars"):  # fmt: skip
        may_be_auto = name in ("forward_batch_size", "forward_threads")
        if may_be_auto and raw[name].lower() == "auto":
            numbers[name] = 0
            continue
        try:
            numbers[name] = int(raw[name])
        except ValueError:
            numbers[name] = 0
        if numbers[name] < 1:
            expected = "auto or a positive integer" if may_be_auto else "a positive integer"
            raise ValueError(f"{SETTINGS[name][0]}={raw[name]!r}: expected {expected}")
    most = {
        "forward_batch_size": int(model_config.get("max_batch_size") or MAX_BATCH_SIZE),
        "forward_threads": cores or available_cores(),
    }
    for name, limit in most.items():
        if numbers[name] > limit:
            why = "the model's max_batch_size" if name == "forward_batch_size" else "the cores here"
            raise ValueError(
                f"{SETTINGS[name][0]}={raw[name]!r}: expected auto or a count from 1 to {limit} "
                f"({why})"
            )
    if numbers["decode_pixel_budget"] < numbers["max_image_pixels"]:
        raise ValueError(
            f"IEI_DECODE_PIXEL_BUDGET={numbers['decode_pixel_budget']} is less than "
            f"IEI_MAX_IMAGE_PIXELS={numbers['max_image_pixels']}: the largest image would not fit"
        )
    return ModelSettings(
        model_id=raw["model_id"],
        dtype=raw["dtype"],
        engine=raw["engine"],
        engine_cache=raw["engine_cache"],
        pooling=raw["pooling"],
        jpeg_draft=BOOLEANS[raw["jpeg_draft"].lower()],
        fused_preprocess=BOOLEANS[raw["fused_preprocess"].lower()],
        cuda_graphs=BOOLEANS[raw["cuda_graphs"].lower()],
        jpeg_decoder=raw["jpeg_decoder"],
        **numbers,
    )


def cpu_has_native_bf16(cpuinfo_path: str = "/proc/cpuinfo") -> bool:
    """AVX-512 BF16 or AMX: bf16 matrix work runs natively, so it is faster than fp32."""
    try:
        with open(cpuinfo_path) as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def resolve_dtype(requested: str, device: torch.device, native_bf16: bool) -> torch.dtype:
    """`auto`: fp16 on CUDA, bf16 on CPUs that compute it natively, float32 otherwise."""
    if requested != "auto":
        return DTYPES[requested]
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if native_bf16 else torch.float32


def resolve_forward_batch_size(requested: int, device: torch.device) -> int:
    """0 (auto): what this kind of device runs fastest (FORWARD_BATCH_AUTO)."""
    return requested or FORWARD_BATCH_AUTO.get(device.type, FORWARD_BATCH_AUTO["cuda"])


def engine_cache(setting: str, environ: dict[str, str]) -> Path:
    """Where exported encoders are kept: IEI_ENGINE_CACHE, else beside the Hugging Face cache
    (a volume in compose and Kubernetes, so a restart finds them), else the user's cache."""
    if setting:
        return Path(setting).expanduser()
    if environ.get("HF_HOME"):
        return Path(environ["HF_HOME"]) / "iei-engines"
    return Path("~/.cache/iei/engines").expanduser()
