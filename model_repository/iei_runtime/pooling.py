"""Model outputs -> one vector per image."""

from __future__ import annotations

from typing import Any

import torch


def pool(outputs: Any, pooling: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Model outputs -> one vector per image.

    mean: over tokens of `last_hidden_state` (B, T, C), or over the spatial grid of a
    convolutional map (B, C, H, W) such as ConvNeXt's; with a `mask` (B, T) (SigLIP2 NaFlex's
    pixel_attention_mask), over the real tokens only, not the padding. cls: the first token.
    pooler: the model's own `pooler_output`.
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
    if mask is not None:
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
    return hidden.mean(dim=1)
