"""What a model is, from its configuration alone: whether it has a text tower whose vectors share
the image space, what `IEI_POOLING=auto` means for it, and how its texts are tokenized.

The configuration is a plain dict (config.json as it is, or a transformers config's `to_dict()`),
and this file imports nothing: the launcher reads it by path to decide whether Triton loads the
text model too (`iei_text`), so both sides follow one rule. Runs on Python 3.10.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Towers(NamedTuple):
    """How a dual encoder is served: each tower loaded alone from the full checkpoint."""

    vision: str  # the vision tower with its projection into the shared space (transformers class)
    vision_plain: str  # the vision tower alone, for a forced IEI_POOLING (mean, cls, pooler)
    text: str  # the text tower with its projection
    image_output: str  # the output of `vision` that is the shared-space vector
    text_output: str  # the output of `text` that is the shared-space vector
    context: int  # text tokens, when config.json leaves `max_position_embeddings` out
    pad_to_context: bool  # the text tower pools the last position: pad every text to `context`
    lower_case: bool  # trained on lower-cased text (folded here when the tokenizer does not)
    # How its zero-shot scores are made of `logit_scale · cosine (+ logit_bias)`, as trained:
    # CLIP a softmax over the labels (contrastive loss), SigLIP a sigmoid per label.
    zero_shot: str = "sigmoid"


# Dual encoders whose text and image embeddings share one space, by `model_type`. Other configs
# with a text and a vision part (LLaVA, BLIP-2, PaliGemma, ...) are generative models, not
# embedders: they get no text model.
JOINT = {
    "clip": Towers(
        "CLIPVisionModelWithProjection", "CLIPVisionModel", "CLIPTextModelWithProjection",
        "image_embeds", "text_embeds", 77, pad_to_context=False, lower_case=False,
        zero_shot="softmax",
    ),
    # SigLIP and SigLIP2 at a fixed resolution (SigLIP2's fixed-resolution checkpoints are
    # model_type "siglip" with Gemma's tokenizer, which does not lower-case by itself).
    "siglip": Towers(
        "SiglipVisionModel", "SiglipVisionModel", "SiglipTextModel",
        "pooler_output", "pooler_output", 64, pad_to_context=True, lower_case=True,
    ),
    # SigLIP2 NaFlex: the image processor also returns pixel_attention_mask and spatial_shapes.
    "siglip2": Towers(
        "Siglip2VisionModel", "Siglip2VisionModel", "Siglip2TextModel",
        "pooler_output", "pooler_output", 64, pad_to_context=True, lower_case=True,
    ),
}  # fmt: skip
# Models whose own `pooler_output` is their image embedding (DINOv2: the CLS token after the final
# layer norm, as its model card uses it).
POOLER_MODELS = ("dinov2", "dinov2_with_registers")
# IEI_POOLING values; `projected` is what `auto` means for a dual encoder, not a setting.
POOLINGS = ("auto", "mean", "cls", "pooler")
PROJECTED = "projected"
# Models whose tokens are all patches, without a CLS token: `cls` would pool the first patch
# (Swin; SigLIP and SigLIP2 pool with an attention head). ConvNeXt's map is refused at the
# first forward pass (pooling.py).
NO_CLS_TOKEN = (
    "swin", "swinv2", "siglip", "siglip_vision_model", "siglip2", "siglip2_vision_model",
)  # fmt: skip


# Models whose image processor returns more than pixel_values (SigLIP2 NaFlex: the patches' mask
# and grid); the split layout carries pixel_values alone (stages.py).
MORE_THAN_PIXELS = ("siglip2",)


def pixels_only(config: dict[str, Any]) -> bool:
    """Whether the model's image input is pixel_values alone (the split layout can serve it)."""
    return config.get("model_type") not in MORE_THAN_PIXELS


def sub_config(config: dict[str, Any], name: str) -> dict[str, Any] | None:
    """`text_config` / `vision_config` (old CLIP files spell them `*_config_dict`)."""
    for key in (name, name + "_dict"):
        value = config.get(key)
        if isinstance(value, dict):
            return value
    return None


def towers(config: dict[str, Any]) -> Towers | None:
    """The towers of a dual encoder with a text and a vision part; None for anything else."""
    found = JOINT.get(str(config.get("model_type", "")))
    if found is None or sub_config(config, "text_config") is None:
        return None
    return found if sub_config(config, "vision_config") is not None else None


def has_text_tower(config: dict[str, Any]) -> bool:
    """Whether texts can be embedded into this model's image space."""
    return towers(config) is not None


def in_joint_space(config: dict[str, Any], pooling: str) -> bool:
    """Whether image vectors pooled so (IEI_POOLING, or its resolved value) lie in the space a
    dual encoder's texts share: its projected embedding, or SigLIP's `pooler_output` (which is
    that embedding). `mean`, `cls` and CLIP's `pooler` pool the vision tower before its
    projection: texts would come from another space."""
    joint = towers(config)
    if joint is None:
        return False
    if pooling in ("auto", PROJECTED):
        return True
    same_model = joint.vision == joint.vision_plain and joint.image_output == "pooler_output"
    return pooling == "pooler" and same_model


def serves_texts(config: dict[str, Any], pooling: str = "auto") -> bool:
    """Whether the model serves texts too (the text model `iei_text` is loaded): a dual encoder
    whose image vectors, with this IEI_POOLING, share its text space."""
    return in_joint_space(config, pooling)


def text_context(config: dict[str, Any], pooling: str = "auto") -> int | None:
    """Tokens a text may have (the text tower's positions); None when no texts are served."""
    joint = towers(config)
    if joint is None or not serves_texts(config, pooling):
        return None
    text = sub_config(config, "text_config") or {}
    return int(text.get("max_position_embeddings") or joint.context)


def resolve_pooling(requested: str, config: dict[str, Any]) -> str:
    """`auto`: a dual encoder's projected image embedding, DINOv2's `pooler_output`, else the mean
    of the last hidden state (the original service's definition). Anything else is kept, except
    `cls` on a model without a CLS token (a ValueError naming the setting)."""
    if requested == "cls" and config.get("model_type") in NO_CLS_TOKEN:
        raise ValueError(
            f"IEI_POOLING=cls: a {config.get('model_type')} model has no CLS token (its tokens "
            "are all patches); use IEI_POOLING=mean or auto"
        )
    if requested != "auto":
        return requested
    if towers(config) is not None:
        return PROJECTED
    return "pooler" if config.get("model_type") in POOLER_MODELS else "mean"
