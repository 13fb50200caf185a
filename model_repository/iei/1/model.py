"""Triton Python model `iei`: encoded image files in, embedding vectors out.

Triton loads this file alone (in its own container under compose), so it imports nothing from the
frontend. The pure helpers at module level carry the logic and are unit-tested without Triton;
`TritonPythonModel` only wires them to Triton's request/response objects.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from inspect import signature
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from PIL import Image, ImageOps

INPUT_NAME = "IMAGE"
OUTPUT_NAME = "EMBEDDING"
INFO_OUTPUT_NAME = "MODEL_INFO"

# Formats we decode. Restricting PIL's plugins keeps it away from EPS (Ghostscript), PDF, PSD & co.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG covers MPO

# Settings: environment of the Triton process first, then config.pbtxt `parameters`, then these.
SETTINGS = {
    # name in config.pbtxt: (environment variable, default)
    "model_id": ("IMAGE_EMBEDDING_MODEL", "google/vit-base-patch16-224"),
    "dtype": ("IEI_DTYPE", "auto"),
    "pooling": ("IEI_POOLING", "mean"),
    "max_image_pixels": ("IEI_MAX_IMAGE_PIXELS", "50000000"),
    "forward_batch_size": ("IEI_FORWARD_BATCH_SIZE", "auto"),
    "jpeg_draft": ("IEI_JPEG_DRAFT", "true"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
POOLINGS = ("mean", "cls", "pooler")
# The words pydantic takes for a bool, so that `iei serve`'s check and this one agree.
BOOLEANS = {
    **dict.fromkeys(("true", "1", "yes", "y", "on", "t"), True),
    **dict.fromkeys(("false", "0", "no", "n", "off", "f"), False),
}
# A large JPEG is decoded at 1/2, 1/4 or 1/8 scale (DCT scaling, much cheaper than a full decode
# and resize) while its short side stays at least this many times the processor's input side:
# 2x keeps the processor's own downscaling in charge of the final quality.
DRAFT_FACTOR = 2
# Images per forward pass when IEI_FORWARD_BATCH_SIZE=auto. On the CPU a ViT-B/16 in bf16 (AMX) ran
# 35 img/s at 8 and 25 img/s at 32 (activations outgrow the caches; docs/benchmarks.md); a GPU
# wants large passes (64: config.pbtxt's max_batch_size, so one pass per execution).
FORWARD_BATCH_AUTO = {"cpu": 8, "cuda": 64}


class InvalidImage(ValueError):
    """The bytes of one image cannot be turned into model input. Fails only its own request."""


@dataclass(frozen=True)
class ModelSettings:
    model_id: str
    dtype: str
    pooling: str
    max_image_pixels: int
    forward_batch_size: int  # 0: auto, by device (resolve_forward_batch_size)
    jpeg_draft: bool = True


def read_settings(model_config: dict[str, Any], environ: dict[str, str]) -> ModelSettings:
    """Resolve every setting (environment > config parameter > default) and validate it."""
    params = model_config.get("parameters", {})
    raw = {}
    for name, (env_name, default) in SETTINGS.items():
        value = environ.get(env_name) or params.get(name, {}).get("string_value") or default
        raw[name] = value.strip()
    if raw["dtype"] not in ("auto", *DTYPES):
        raise ValueError(f"IEI_DTYPE={raw['dtype']!r}: expected auto, {', '.join(DTYPES)}")
    if raw["pooling"] not in POOLINGS:
        raise ValueError(f"IEI_POOLING={raw['pooling']!r}: expected one of {', '.join(POOLINGS)}")
    if raw["jpeg_draft"].lower() not in BOOLEANS:
        raise ValueError(f"IEI_JPEG_DRAFT={raw['jpeg_draft']!r}: expected true or false")
    numbers = {}
    for name in ("max_image_pixels", "forward_batch_size"):
        is_batch = name == "forward_batch_size"
        if is_batch and raw[name].lower() == "auto":
            numbers[name] = 0
            continue
        try:
            numbers[name] = int(raw[name])
        except ValueError:
            numbers[name] = 0
        if numbers[name] < 1:
            expected = "auto or a positive integer" if is_batch else "a positive integer"
            raise ValueError(f"{SETTINGS[name][0]}={raw[name]!r}: expected {expected}")
    return ModelSettings(
        model_id=raw["model_id"],
        dtype=raw["dtype"],
        pooling=raw["pooling"],
        jpeg_draft=BOOLEANS[raw["jpeg_draft"].lower()],
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


# --- images -----------------------------------------------------------------------------------


def draft_side(processor: Any, factor: int = DRAFT_FACTOR) -> int:
    """The smallest side a JPEG may be decoded at for this processor: `factor` times the largest
    side it resizes to (ConvNeXt's shortest edge / crop_pct included); 0 when it is unknown."""
    sides = []
    crop_pct = getattr(processor, "crop_pct", None)
    for attribute in ("size", "crop_size"):
        size = getattr(processor, attribute, None)
        if size is None:
            continue
        for key in ("height", "width", "shortest_edge", "longest_edge", "max_height", "max_width"):
            value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
            if not isinstance(value, int | float) or value <= 0:
                continue
            if key == "shortest_edge" and crop_pct:
                value = value / crop_pct  # resized to shortest_edge / crop_pct, then cropped
            sides.append(value)
    return math.ceil(max(sides) * factor) if sides else 0


def decode_image(data: bytes, max_pixels: int, min_side: int = 0) -> Image.Image:
    """Encoded file -> upright RGB image (first frame). Any failure is an `InvalidImage`.

    `min_side` > 0 lets a JPEG at least twice that large on both sides decode at a reduced scale
    whose sides both stay >= `min_side`; smaller files decode in full.
    """
    if not data:
        raise InvalidImage("empty image file")
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            pixels = image.width * image.height
            if pixels > max_pixels:
                raise InvalidImage(
                    f"image of {image.width}x{image.height} = {pixels} pixels is over the limit "
                    f"of {max_pixels} pixels"
                )
            if pixels == 0:
                raise InvalidImage("image has no pixels")
            image.seek(0)  # first frame of animated GIF/WebP and multi-page TIFF
            if min_side > 0 and image.format in ("JPEG", "MPO"):
                # PIL picks the largest scale 1/2^k with both sides still >= min_side.
                image.draft(image.mode, (min_side, min_side))
            image.load()
            upright = ImageOps.exif_transpose(image)
            return to_rgb(upright)
    except InvalidImage:
        raise
    except Image.DecompressionBombError as exc:
        raise InvalidImage(f"image is over the pixel limit: {exc}") from exc
    except Exception as exc:  # PIL raises many types on hostile input; none may escape
        raise InvalidImage(f"cannot decode image: {type(exc).__name__}: {exc}") from exc


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparent areas become white, high bit depths are scaled."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit samples (PIL opens 16-bit grey PNG/TIFF as I;16 or I): keep the top 8 bits.
        # PIL's own convert() would clip everything above 255 to white.
        values = np.asarray(image, dtype=np.int64)
        grey = np.clip(values >> 8, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "F":
        grey = np.clip(np.asarray(image, dtype=np.float32), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def is_device_failure(exc: BaseException) -> bool:
    """Out of memory, or an error of the CUDA runtime: a server fault whatever the image."""
    if isinstance(exc, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    return isinstance(exc, RuntimeError) and ("CUDA" in str(exc) or "cuda" in str(exc))


# --- pooling ----------------------------------------------------------------------------------


def pool(outputs: Any, pooling: str) -> torch.Tensor:
    """Model outputs -> one vector per image.

    mean: over tokens of `last_hidden_state` (B, T, C), or over the spatial grid of a
    convolutional map (B, C, H, W) such as ConvNeXt's. cls: the first token. pooler: the model's
    own `pooler_output`.
    """
    if pooling == "pooler":
        pooled = getattr(outputs, "pooler_output", None)
        if pooled is None:
            raise ValueError("this model has no pooler_output; use IEI_POOLING=mean or cls")
        return pooled.flatten(1)
    hidden = outputs.last_hidden_state
    if hidden.dim() == 4:  # (B, C, H, W)
        if pooling == "cls":
            raise ValueError("a convolutional model has no CLS token; use IEI_POOLING=mean")
        return hidden.mean(dim=(2, 3))
    if pooling == "cls":
        return hidden[:, 0]
    return hidden.mean(dim=1)


# --- batching ---------------------------------------------------------------------------------


class Embedder:
    """Decoding, preprocessing and the forward pass for one batch of images; no Triton here."""

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Callable[..., Any],
        *,
        device: torch.device,
        dtype: torch.dtype,
        pooling: str,
        max_image_pixels: int,
        forward_batch_size: int,
        decode_threads: int,
        draft_side: int = 0,
        preprocess_device: torch.device | None = None,
    ) -> None:
        self.model = model
        self.processor = processor
        self.device = device
        self.dtype = dtype
        self.pooling = pooling
        self.max_image_pixels = max_image_pixels
        self.forward_batch_size = forward_batch_size
        self.draft_side = draft_side
        self.preprocess_device = preprocess_device
        self.threads = decode_threads
        # torch's current GPU is per thread: the pool's threads work on the instance's one.
        on_gpu = device.type == "cuda"
        self.pool = ThreadPoolExecutor(
            max_workers=decode_threads,
            thread_name_prefix="decode",
            initializer=torch.cuda.set_device if on_gpu else None,
            initargs=(device,) if on_gpu else (),
        )

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def decode_all(self, blobs: Sequence[bytes]) -> list[Image.Image | InvalidImage]:
        """Decode in parallel (PIL releases the GIL); a failure is returned, not raised."""
        return list(self.pool.map(self._decode, blobs))

    def _decode(self, blob: bytes) -> Image.Image | InvalidImage:
        try:
            return decode_image(blob, self.max_image_pixels, self.draft_side)
        except InvalidImage as exc:
            return exc

    def preprocess(self, images: list[Image.Image]) -> list[torch.Tensor | InvalidImage]:
        """The model's own processor over the batch; per image only if the batch fails.

        On a GPU instance the processor resizes and normalises there (its `device` argument):
        the uint8 image goes over, and the float tensor never crosses the bus.
        """
        if not images:
            return []
        try:
            pixels = self._process(images)
            return list(pixels)
        except Exception as exc:
            if is_device_failure(exc):
                raise  # the GPU's trouble, not the images': the whole execution fails (5xx)
            results: list[torch.Tensor | InvalidImage] = []
            for image in images:
                try:
                    results.append(self._process([image])[0])
                except Exception as exc:
                    if is_device_failure(exc):
                        raise
                    results.append(InvalidImage(f"preprocessing failed: {exc}"))
            return results

    def _process(self, images: list[Image.Image]) -> torch.Tensor:
        options: dict[str, Any] = {"return_tensors": "pt"}
        if self.preprocess_device is not None:
            options["device"] = self.preprocess_device
        return self.processor(images=images, **options)["pixel_values"]

    def prepare(self, blobs: Sequence[bytes]) -> list[torch.Tensor | InvalidImage]:
        """Encoded files -> model input, decode and processor together in the thread pool.

        The batch is cut into one contiguous chunk per thread: the processor's per-image work
        (resize, to tensor) then runs in parallel too instead of on one core after the decode.
        """
        chunk = max(1, math.ceil(len(blobs) / self.threads))
        chunks = [blobs[i : i + chunk] for i in range(0, len(blobs), chunk)]
        return [r for part in self.pool.map(self._prepare_chunk, chunks) for r in part]

    def _prepare_chunk(self, blobs: Sequence[bytes]) -> list[torch.Tensor | InvalidImage]:
        results: list[Any] = [self._decode(blob) for blob in blobs]
        good = [i for i, r in enumerate(results) if isinstance(r, Image.Image)]
        for i, tensor in zip(good, self.preprocess([results[i] for i in good]), strict=True):
            results[i] = tensor
        return results

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor) -> np.ndarray:
        """(N, 3, H, W) -> (N, D) float32, in sub-batches of `forward_batch_size`."""
        chunks = []
        for start in range(0, len(pixel_values), self.forward_batch_size):
            batch = pixel_values[start : start + self.forward_batch_size]
            batch = batch.to(self.device, dtype=self.dtype, non_blocking=True)
            outputs = self.model(pixel_values=batch)
            chunks.append(pool(outputs, self.pooling).float())
        return torch.cat(chunks).cpu().numpy()

    def embed(self, blobs: Sequence[bytes]) -> list[np.ndarray | InvalidImage]:
        """Every image of a whole dynamic batch -> its vector, or the reason it has none."""
        results: list[Any] = self.prepare(blobs)
        ready = [(i, t) for i, t in enumerate(results) if isinstance(t, torch.Tensor)]
        if ready:
            vectors = self.forward(torch.stack([t for _, t in ready]))
            for (i, _), vector in zip(ready, vectors, strict=True):
                results[i] = vector
        return results


def describe(embedder: Embedder, settings: ModelSettings) -> str:
    """The MODEL_INFO output: facts a client cannot see from outside, as JSON."""
    config = getattr(embedder.model, "config", None)
    return json.dumps(
        {
            "model_id": settings.model_id,
            "model_type": getattr(config, "model_type", None),
            "architecture": type(embedder.model).__name__,
            "dtype": str(embedder.dtype).removeprefix("torch."),
            "device": str(embedder.device),
            "pooling": settings.pooling,
            "forward_batch_size": embedder.forward_batch_size,
        }
    )


def load_embedder(settings: ModelSettings, device: torch.device, threads: int) -> Embedder:
    """Load the model and its processor; one clear error when that is impossible."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    dtype = resolve_dtype(settings.dtype, device, cpu_has_native_bf16())
    try:
        config = AutoConfig.from_pretrained(settings.model_id)
        processor = AutoImageProcessor.from_pretrained(settings.model_id)
        kwargs = {}
        accepted = signature(AutoModel._model_mapping[type(config)]).parameters
        if settings.pooling != "pooler" and "add_pooling_layer" in accepted:
            # A classification checkpoint has no pooler weights; don't build a random one.
            kwargs["add_pooling_layer"] = False
        model = AutoModel.from_pretrained(settings.model_id, config=config, dtype=dtype, **kwargs)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RuntimeError(
            f"IEI cannot load model {settings.model_id!r} (IMAGE_EMBEDDING_MODEL): {reason}"
        ) from None
    model.eval().to(device)
    return Embedder(
        model,
        processor,
        device=device,
        dtype=dtype,
        pooling=settings.pooling,
        max_image_pixels=settings.max_image_pixels,
        forward_batch_size=resolve_forward_batch_size(settings.forward_batch_size, device),
        decode_threads=threads,
        draft_side=draft_side(processor) if settings.jpeg_draft else 0,
        preprocess_device=device if device.type == "cuda" else None,
    )


def instance_count(model_config: dict[str, Any]) -> int:
    """Instances of this model on this machine (the CPU threads are shared between them)."""
    groups = model_config.get("instance_group") or [{"count": 1}]
    return max(1, sum(int(g.get("count", 1)) for g in groups))


# --- Triton -----------------------------------------------------------------------------------


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        model_config = json.loads(args["model_config"])
        settings = read_settings(model_config, dict(os.environ))
        if args["model_instance_kind"] == "GPU":
            device = torch.device("cuda", int(args["model_instance_device_id"]))
            torch.cuda.set_device(device)
            threads = max(1, os.cpu_count() or 1)
        else:
            device = torch.device("cpu")
            # instances x threads <= cores, so instances don't fight over the same cores.
            threads = max(1, (os.cpu_count() or 1) // instance_count(model_config))
            torch.set_num_threads(threads)
        self.logger = pb_utils.Logger
        self.embedder = load_embedder(settings, device, threads)
        self.info = describe(self.embedder, settings)
        # Warm up: the first forward pass allocates and picks kernels.
        self.embedder.forward(self._blank_batch(1))
        self.logger.log_info(
            f"iei: {settings.model_id} on {device} ({self.embedder.dtype}), "
            f"pooling={settings.pooling}, {threads} threads, "
            f"JPEG draft decoding to >= {self.embedder.draft_side} px (0: off)"
        )

    def _blank_batch(self, n: int) -> torch.Tensor:
        """n grey images through the same processor call as requests (on the GPU there)."""
        image = Image.new("RGB", (32, 32), (127, 127, 127))
        return self.embedder._process([image] * n)

    def execute(self, requests: list[Any]) -> list[Any]:
        blobs, counts = [], []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, INPUT_NAME).as_numpy()
            flat = [bytes(b) for b in images.reshape(-1)]
            blobs.extend(flat)
            counts.append(len(flat))
        results = self.embedder.embed(blobs)
        responses = []
        offset = 0
        for request, count in zip(requests, counts, strict=True):
            own = results[offset : offset + count]
            offset += count
            wants_info = INFO_OUTPUT_NAME in request.requested_output_names()
            responses.append(make_response(own, self.info if wants_info else None))
        return responses

    def finalize(self) -> None:
        self.embedder.close()


def make_response(results: Sequence[np.ndarray | InvalidImage], info: str | None = None) -> Any:
    """One request's results -> its response: vectors, or an error naming the first bad image.

    The message format `IMAGE[i]: reason` (i = position inside this request) is parsed by the
    frontend to name the failing input of a client's request.
    """
    for i, result in enumerate(results):
        if isinstance(result, InvalidImage):
            return pb_utils.InferenceResponse(
                error=pb_utils.TritonError(
                    f"{INPUT_NAME}[{i}]: {result}", pb_utils.TritonError.INVALID_ARG
                )
            )
    vectors = np.stack(results).astype(np.float32, copy=False)  # type: ignore[arg-type]
    tensors = [pb_utils.Tensor(OUTPUT_NAME, vectors)]
    if info is not None:
        rows = np.full((len(results), 1), info.encode(), dtype=np.object_)
        tensors.append(pb_utils.Tensor(INFO_OUTPUT_NAME, rows))
    return pb_utils.InferenceResponse(output_tensors=tensors)
