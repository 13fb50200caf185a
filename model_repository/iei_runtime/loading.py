"""Load the model and its processor for an instance, and describe what was loaded."""

from __future__ import annotations

import json
from inspect import signature

import torch

from .embedder import Embedder
from .encoders import PooledEncoder
from .images import draft_side
from .settings import (
    ModelSettings,
    cpu_has_native_bf16,
    resolve_dtype,
    resolve_forward_batch_size,
)


def describe(embedder: Embedder, settings: ModelSettings) -> str:
    """The MODEL_INFO output: facts a client cannot see from outside, as JSON."""
    config = embedder.encoder.config
    return json.dumps(
        {
            "model_id": settings.model_id,
            "model_type": getattr(config, "model_type", None),
            "architecture": embedder.encoder.architecture,
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
        PooledEncoder(model, settings.pooling),
        processor,
        device=device,
        dtype=dtype,
        max_image_pixels=settings.max_image_pixels,
        forward_batch_size=resolve_forward_batch_size(settings.forward_batch_size, device),
        decode_threads=threads,
        draft_side=draft_side(processor),
        jpeg_draft=settings.jpeg_draft,
        pixel_budget=settings.decode_pixel_budget,
        preprocess_device=device if device.type == "cuda" else None,
    )
