"""Tiny, randomly initialised models of every supported family, built locally from configs.

There is no model hub here. Each family gets a small config of its real architecture and the
real processor settings of its published checkpoint (sizes, crop, resample, mean/std), so the
service runs exactly the code path that the hub model would take.
"""

from __future__ import annotations

from pathlib import Path

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
HALF = [0.5, 0.5, 0.5]

# family -> (architecture config, preprocessor_config.json of the published checkpoint)
FAMILIES: dict[str, tuple[dict, dict]] = {
    # google/vit-base-patch16-224 (and nateraw/vit-base-beans)
    "vit": (
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=224,
            patch_size=16,
        ),
        dict(
            image_processor_type="ViTImageProcessor",
            do_resize=True,
            size={"height": 224, "width": 224},
            resample=2,
            do_rescale=True,
            rescale_factor=1 / 255,
            do_normalize=True,
            image_mean=HALF,
            image_std=HALF,
        ),
    ),
    # facebook/deit-base-patch16-224: resize 256 bicubic, centre crop 224, ImageNet statistics
    "deit": (
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=224,
            patch_size=16,
        ),
        dict(
            image_processor_type="DeiTImageProcessor",
            do_resize=True,
            size={"height": 256, "width": 256},
            resample=3,
            do_center_crop=True,
            crop_size={"height": 224, "width": 224},
            do_rescale=True,
            rescale_factor=1 / 255,
            do_normalize=True,
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
        ),
    ),
    # microsoft/beit-base-patch16-224
    "beit": (
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=224,
            patch_size=16,
            use_relative_position_bias=True,
            use_mean_pooling=True,
        ),
        dict(
            image_processor_type="BeitImageProcessor",
            do_resize=True,
            size={"height": 224, "width": 224},
            resample=2,
            do_center_crop=False,
            do_rescale=True,
            rescale_factor=1 / 255,
            do_normalize=True,
            image_mean=HALF,
            image_std=HALF,
            do_reduce_labels=False,
        ),
    ),
    # facebook/convnext-tiny-224: shortest edge 224/0.875, centre crop 224, bicubic
    "convnext": (
        dict(num_channels=3, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1]),
        dict(
            image_processor_type="ConvNextImageProcessor",
            do_resize=True,
            size={"shortest_edge": 224},
            crop_pct=0.875,
            resample=3,
            do_rescale=True,
            rescale_factor=1 / 255,
            do_normalize=True,
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
        ),
    ),
    # microsoft/swin-tiny-patch4-window7-224
    "swin": (
        dict(
            image_size=224,
            patch_size=4,
            embed_dim=8,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 2, 2],
            window_size=7,
        ),
        dict(
            image_processor_type="ViTImageProcessor",
            do_resize=True,
            size={"height": 224, "width": 224},
            resample=3,
            do_rescale=True,
            rescale_factor=1 / 255,
            do_normalize=True,
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
        ),
    ),
}


def build_tiny_model(family: str, folder: Path, seed: int = 0) -> Path:
    """Write a loadable model folder (config, weights, preprocessor_config.json)."""
    import json

    import torch
    from transformers import AutoConfig, AutoModel

    architecture, processor = FAMILIES[family]
    torch.manual_seed(seed)
    model = AutoModel.from_config(AutoConfig.for_model(family, **architecture))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return folder
