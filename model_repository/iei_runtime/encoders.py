"""An encoder is the model and its pooling as one module: the processor's (or tokenizer's)
tensors in, one vector per input out. It is the unit the embedders run, and what an engine may
export or quantize: a plain `nn.Module` with tensor inputs and one tensor output."""

from __future__ import annotations

from typing import Any

import torch

from .pooling import pool


class PooledEncoder(torch.nn.Module):
    """A Hugging Face image model whose outputs are pooled (`mean`, `cls`, `pooler`)."""

    def __init__(self, model: torch.nn.Module, pooling: str) -> None:
        super().__init__()
        self.model = model
        self.pooling = pooling

    @property
    def config(self) -> Any:
        return getattr(self.model, "config", None)

    @property
    def architecture(self) -> str:
        return type(self.model).__name__

    def forward(self, pixel_values: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        """`inputs`: the processor's other tensors (SigLIP2 NaFlex: pixel_attention_mask and
        spatial_shapes; without the mask its vectors are silently wrong, and `mean` averages
        only the patches it marks)."""
        outputs = self.model(pixel_values=pixel_values, **inputs)
        return pool(outputs, self.pooling, inputs.get("pixel_attention_mask"))


class TowerEncoder(PooledEncoder):
    """One tower of a dual encoder, whose `output` (e.g. CLIP's `image_embeds` / `text_embeds`,
    SigLIP's `pooler_output`) is already the vector of the shared text-image space."""

    def __init__(self, model: torch.nn.Module, output: str) -> None:
        super().__init__(model, pooling="projected")
        self.output = output

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        vectors: torch.Tensor = getattr(self.model(**inputs), self.output)
        return vectors
