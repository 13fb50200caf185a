"""An encoder is the model and its pooling as one module: the processor's tensors in, one vector
per input out. It is the unit the Embedder runs, and what an engine may export or quantize."""

from __future__ import annotations

from typing import Any

import torch

from .pooling import pool


class PooledEncoder(torch.nn.Module):
    """A Hugging Face model whose outputs are pooled (`mean`, `cls`, `pooler`)."""

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

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pool(self.model(pixel_values=pixel_values), self.pooling)
