"""The model's image processor, run one decoded image at a time on its uint8 pixels.

A Hugging Face processor called on PIL images copies each one into a contiguous (3, H, W) tensor,
resizes that (the slower channels-first path of torch's antialiased resize) and converts the
whole batch to float32 before normalising. Here each image is resized as the (H, W, 3) view of
its own pixels (torch's vectorised channels-last path, no copy) by the processor's own `resize`
and `center_crop` (its sizes, rounding and crop_pct rules), then converted and normalised in one
pass into the batch: the same pixels to float rounding, for about a third of the processor's CPU
time per image (docs/benchmarks.md). At start `fused_processor` compares both on probe images
and keeps the processor's own call unless they agree to within two pixel levels.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

# np.asarray of a PIL image is read-only; torch warns once, though nothing here writes to it.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

# Processors whose own `_preprocess` is the torchvision backend's resize -> center crop ->
# rescale -> normalize with nothing else (ConvNeXt's crop_pct is in its own `resize`, which this
# calls; BEiT's extra step is for segmentation labels). Any other (SigLIP2's NaFlex patches,
# padding, ...) keeps its own call.
SAME_STEPS = ("ConvNextImageProcessor", "BeitImageProcessor")
# Sides of the probe images: larger, smaller and of another aspect than any processor's input.
PROBE_SIZES = ((640, 480), (333, 500), (224, 224), (97, 61))
MAX_LEVELS = 2.0  # the largest difference to the processor's output allowed, in pixel levels


def setting(processor: Any, options: dict[str, Any], name: str) -> Any:
    """One of the processor's settings as a call with `options` would use it."""
    return options[name] if name in options else getattr(processor, name, None)


class FusedProcessor:
    """The processor's steps on PIL RGB images: {"pixel_values": (N, 3, H, W)}, float32
    normalised or, with do_rescale and do_normalize off, uint8."""

    def __init__(self, processor: Any, options: dict[str, Any]) -> None:
        self.processor = processor
        self.size = processor.size
        self.resample = setting(processor, options, "resample")
        cropped = setting(processor, options, "do_center_crop")
        self.crop_size = processor.crop_size if cropped else None
        self.crop_pct = getattr(processor, "crop_pct", None)
        self.normalize = bool(setting(processor, options, "do_normalize"))
        self.rescale = bool(setting(processor, options, "do_rescale"))
        factor = setting(processor, options, "rescale_factor") if self.rescale else None
        factor = float(factor or 1.0)
        ones = np.ones(3, np.float32)
        mean = np.asarray(setting(processor, options, "image_mean") or 0.0, np.float32) * ones
        std = np.asarray(setting(processor, options, "image_std") or 1.0, np.float32) * ones
        if not self.normalize:
            mean, std = np.zeros(3, np.float32), np.ones(3, np.float32)
        # out = pixel * scale + offset, per channel: rescale and normalise in one step.
        self.scale = torch.from_numpy(factor / std).view(3, 1, 1)
        self.offset = torch.from_numpy(-mean / std).view(3, 1, 1)
        self.dtype = torch.float32 if self.rescale or self.normalize else torch.uint8
        # What one pixel level is worth in the output (the tolerance of `agrees`).
        self.level = float((self.scale.abs().max()).item())

    def resized(self, image: Image.Image) -> torch.Tensor:
        """One RGB image -> its processor-sized uint8 (3, H, W) tensor (a channels-last view)."""
        pixels = torch.from_numpy(np.asarray(image)).permute(2, 0, 1)
        extra = {} if self.crop_pct is None else {"crop_pct": self.crop_pct}
        pixels = self.processor.resize(pixels, self.size, self.resample, **extra)
        if self.crop_size is not None:
            pixels = self.processor.center_crop(pixels, self.crop_size)
        return pixels

    def __call__(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        first = self.resized(images[0])
        batch = torch.empty((len(images), *first.shape), dtype=self.dtype)
        for i, image in enumerate(images):
            self.write(first if i == 0 else self.resized(image), batch[i])
        return {"pixel_values": batch}

    def write(self, pixels: torch.Tensor, row: torch.Tensor) -> None:
        """Resized uint8 pixels, converted and normalised into `row` (3, H, W). A float row of
        another dtype (the model's bf16) gets the float32 result rounded once, as `.to` would."""
        if self.dtype == torch.uint8:
            row.copy_(pixels)
        else:
            torch.addcmul(self.offset, pixels, self.scale, out=row)

    def fixed_shape(self) -> tuple[int, ...] | None:
        """The (3, H, W) of every output when the processor gives one size whatever the image
        (a crop, or height and width), else None."""
        try:
            shapes = {
                tuple(self.resized(Image.new("RGB", size)).shape) for size in ((64, 48), (33, 90))
            }
        except Exception:  # a processor that refuses tiny images: each image as it comes
            return None
        return shapes.pop() if len(shapes) == 1 else None


def eligible(processor: Any, options: dict[str, Any]) -> str:
    """Why the fused path cannot stand in for this processor ("" when it may)."""
    try:
        from transformers.image_processing_backends import TorchvisionBackend
    except ImportError:
        return "transformers has no torchvision image processors"
    kind = type(processor)
    if not isinstance(processor, TorchvisionBackend):
        return f"{kind.__name__} is not a torchvision image processor"
    if kind._preprocess is not TorchvisionBackend._preprocess and kind.__name__ not in SAME_STEPS:
        return f"{kind.__name__} has steps of its own"
    if not setting(processor, options, "do_resize") or setting(processor, options, "do_pad"):
        return "the processor does not resize to one size, or pads"
    return ""


def agrees(fused: FusedProcessor, processor: Any, options: dict[str, Any]) -> str:
    """Both on the probe images: "" when the shapes match and no value differs by more than
    MAX_LEVELS pixel levels, else how they differ."""
    rng = np.random.default_rng(0)
    for width, height in PROBE_SIZES:
        # A smooth gradient with noise: edges and flat areas, as a photo has.
        ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
        noise = rng.normal(0, 24, (height, width, 3)).astype(np.float32)
        pixels = np.clip(ramp + noise, 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels, "RGB")
        mine = fused([image])["pixel_values"]
        theirs = processor(images=[image], return_tensors="pt", **options)["pixel_values"]
        if mine.shape != theirs.shape or mine.dtype != theirs.dtype:
            return f"{tuple(theirs.shape)} {theirs.dtype} expected, got {tuple(mine.shape)}"
        levels = (mine.float() - theirs.float()).abs().max().item() / fused.level
        if levels > MAX_LEVELS:
            return f"{levels:.1f} pixel levels apart on a {width}x{height} image"
    return ""


def fused_processor(processor: Any, options: dict[str, Any]) -> tuple[FusedProcessor | None, str]:
    """The fused path for this processor and options, or None and why not."""
    reason = eligible(processor, options)
    if reason:
        return None, reason
    try:
        fused = FusedProcessor(processor, options)
        reason = agrees(fused, processor, options)
    except Exception as exc:  # an attribute of another shape, a resize that refuses a view...
        return None, f"{type(exc).__name__}: {exc}"
    return (None, reason) if reason else (fused, "")
