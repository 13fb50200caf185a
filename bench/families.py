"""Each model family's base-size throughput on this machine, in-process.

The service's own modules (`iei_runtime`: the encoders, the Embedder's processor call and forward
pass, the TextEmbedder's) around random weights of the real sizes, built from each family's
default configuration: random weights have the real cost, and there is no model hub here. What
it measures is what the README's model guide shows per family (`report.model_guide`).
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import measure

HALF = [0.5, 0.5, 0.5]
IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
CLIP_STATS = {
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}
RESCALE = {"do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True}
TEXT_BATCH = 8  # texts per forward pass, as images (IEI_FORWARD_BATCH_SIZE=auto on a CPU)


@dataclass(frozen=True)
class Family:
    key: str
    name: str  # as the tables show it
    checkpoint: str  # the published checkpoint it stands for (same architecture and sizes)
    job: str  # what to use it for (the README's model guide)
    dimension: int  # of its vectors (a fact of the architecture; the bench confirms it)
    processor: dict[str, Any]  # preprocessor_config.json of the checkpoint
    image: Callable[[], Any]  # -> the image encoder (an iei_runtime encoder module)
    text: Callable[[], Any] | None = None  # -> the text encoder, for dual encoders
    text_tokens: int = 0  # tokens of a text as the service sends them to the text tower
    text_mask: bool = False  # the tokenizer returns an attention mask
    text_like: str = ""  # the family whose text tower this one has (measured once, there)


def vit() -> Any:
    from iei_runtime.encoders import PooledEncoder
    from transformers import ViTConfig, ViTModel

    return PooledEncoder(ViTModel(ViTConfig(), add_pooling_layer=False), "mean")


def clip_image() -> Any:
    from iei_runtime.encoders import TowerEncoder
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection(CLIPVisionConfig(patch_size=16))
    return TowerEncoder(model, "image_embeds")


def clip_text() -> Any:
    from iei_runtime.encoders import TowerEncoder
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return TowerEncoder(CLIPTextModelWithProjection(CLIPTextConfig()), "text_embeds")


def siglip_image() -> Any:
    from iei_runtime.encoders import TowerEncoder
    from transformers import SiglipVisionConfig, SiglipVisionModel

    return TowerEncoder(SiglipVisionModel(SiglipVisionConfig()), "pooler_output")


def siglip2_naflex_image() -> Any:
    from iei_runtime.encoders import TowerEncoder
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    return TowerEncoder(Siglip2VisionModel(Siglip2VisionConfig()), "pooler_output")


def siglip_text() -> Any:
    """SigLIP2's text tower at its real sizes but 32000 tokens of vocabulary (Gemma's 256000
    only enlarge the embedding table, a lookup: the same compute, 600 MB less to build)."""
    from iei_runtime.encoders import TowerEncoder
    from transformers import SiglipTextConfig, SiglipTextModel

    return TowerEncoder(SiglipTextModel(SiglipTextConfig()), "pooler_output")


def dinov2(**sizes: int) -> Callable[[], Any]:
    def build() -> Any:
        from iei_runtime.encoders import PooledEncoder
        from transformers import Dinov2Config, Dinov2Model

        return PooledEncoder(Dinov2Model(Dinov2Config(**sizes)), "pooler")

    return build


SIGLIP_PROCESSOR = {
    "image_processor_type": "SiglipImageProcessor", "do_resize": True,
    "size": {"height": 224, "width": 224}, "resample": 2, **RESCALE,
    "image_mean": HALF, "image_std": HALF,
}  # fmt: skip
DINOV2_PROCESSOR = {
    "image_processor_type": "BitImageProcessor", "do_resize": True,
    "size": {"shortest_edge": 256}, "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224}, "resample": 3, **RESCALE, **IMAGENET,
}  # fmt: skip

FAMILIES = (
    Family(
        "siglip2", "SigLIP2 B/16", "google/siglip2-base-patch16-224",
        "search images by text, and by image", 768,
        SIGLIP_PROCESSOR, siglip_image, siglip_text, text_tokens=64,
    ),
    Family(
        "siglip2_naflex", "SigLIP2 B/16 NaFlex", "google/siglip2-base-patch16-naflex",
        "the same, each image at its own aspect ratio (up to 256 patches)", 768,
        {
            "image_processor_type": "Siglip2ImageProcessor", "do_resize": True,
            "patch_size": 16, "max_num_patches": 256, "resample": 2, **RESCALE,
            "image_mean": HALF, "image_std": HALF,
        },
        siglip2_naflex_image, text_like="siglip2",
    ),
    Family(
        "clip", "CLIP ViT-B/16", "openai/clip-vit-base-patch16",
        "search images by text, and by image (the most widely used)", 512,
        {
            "image_processor_type": "CLIPImageProcessor", "do_resize": True,
            "size": {"shortest_edge": 224}, "do_center_crop": True,
            "crop_size": {"height": 224, "width": 224}, "resample": 3, **RESCALE, **CLIP_STATS,
        },
        clip_image, clip_text, text_tokens=16, text_mask=True,
    ),
    Family(
        "dinov2_small", "DINOv2-S/14", "facebook/dinov2-small",
        "near-duplicates and image-to-image similarity", 384,
        DINOV2_PROCESSOR, dinov2(hidden_size=384, num_attention_heads=6),
    ),
    Family(
        "dinov2_base", "DINOv2-B/14", "facebook/dinov2-base",
        "the same, more accurate", 768, DINOV2_PROCESSOR, dinov2(),
    ),
    Family(
        "vit", "ViT-B/16", "google/vit-base-patch16-224",
        "the vectors of the original IEI service (compatibility)", 768,
        {
            "image_processor_type": "ViTImageProcessor", "do_resize": True,
            "size": {"height": 224, "width": 224}, "resample": 2, **RESCALE,
            "image_mean": HALF, "image_std": HALF,
        },
        vit,
    ),
)  # fmt: skip


def processor_for(family: Family) -> Any:
    """The checkpoint's image processor, as the service loads it (AutoImageProcessor)."""
    from transformers import AutoImageProcessor

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "preprocessor_config.json").write_text(json.dumps(family.processor))
        return AutoImageProcessor.from_pretrained(folder)


def measure_family(mm: Any, family: Family, files: list[bytes], n: int) -> dict[str, Any]:
    """Images/s of the forward pass alone (batch 8, the dtype IEI_DTYPE=auto picks), images/s of
    the model's whole work (decode, processor, forward), and texts/s for a dual encoder."""
    import torch
    from iei_runtime.embedder import Embedder
    from iei_runtime.texts import TextEmbedder

    device = torch.device("cpu")
    dtype = mm.resolve_dtype("auto", device, mm.cpu_has_native_bf16())
    threads = os.cpu_count() or 1
    torch.manual_seed(0)
    embedder = Embedder(
        family.image().eval().to(dtype),
        processor_for(family),
        device=device,
        dtype=dtype,
        max_image_pixels=10**9,
        forward_batch_size=8,
        decode_threads=threads,
    )
    try:
        inputs = mm.stack(embedder.prepare(files))
        dimension = int(embedder.forward(inputs).shape[1])
        row = {
            "key": family.key,
            "dimension": dimension,
            "dtype": str(dtype).removeprefix("torch."),
            "img_s": measure.forward_limit(embedder, inputs, 8, n),
            "inputs": sorted(inputs),
        }
        batch = (files * 8)[:8]
        row["whole_img_s"] = len(batch) / measure.per_call(
            lambda: embedder.embed(batch), max(1, n // 16)
        )
    finally:
        embedder.close()
    row.update(measure_int8(family, inputs, n))
    if family.text is not None:
        encoder = family.text().eval().to(dtype)
        texts = TextEmbedder(
            encoder, None, device=device, dtype=dtype, context=family.text_tokens,
            pad_to_context=True, lower_case=False, max_chars=4096,
            forward_batch_size=TEXT_BATCH,
        )  # fmt: skip
        vocabulary = encoder.model.config.vocab_size
        tokens = {"input_ids": torch.randint(3, vocabulary - 1, (TEXT_BATCH, family.text_tokens))}
        if family.text_mask:
            tokens["attention_mask"] = torch.ones_like(tokens["input_ids"])
        row["text_s"] = measure.forward_limit(texts, tokens, TEXT_BATCH, n)
        row["text_tokens"] = family.text_tokens
    return row


def measure_int8(family: Family, inputs: dict[str, Any], n: int) -> dict[str, Any]:
    """The image encoder with IEI_DTYPE=int8 (ONNX Runtime, as the service exports it): images/s
    of its forward pass, and the cosine of its vectors to float32's."""
    import torch
    from iei_runtime import engines
    from iei_runtime.embedder import Embedder

    torch.manual_seed(0)  # the same random weights as the measurement above
    encoder = family.image().eval()
    device, float32 = torch.device("cpu"), torch.float32
    embedder = Embedder(encoder, processor_for(family), device=device, dtype=float32,
                        max_image_pixels=10**9, forward_batch_size=8, decode_threads=1)  # fmt: skip
    try:
        exact = embedder.forward(inputs)
        example = {name: tensor[:2] for name, tensor in inputs.items()}
        with tempfile.TemporaryDirectory() as cache:
            embedder.run = engines.exported_runner(
                encoder, engines.Signature.of(example, {}), engines.Choice("onnxruntime", "int8"),
                threads=os.cpu_count() or 1, cache=Path(cache), model_id=f"bench-{family.key}",
                role="image", describe=family.key,
            )  # fmt: skip
            quantized = embedder.forward(inputs)
            rate = measure.forward_limit(embedder, inputs, 8, n)
    finally:
        embedder.close()
    return {"int8_img_s": rate, "int8_cosine_min": float(measure.cosine(quantized, exact).min())}


def run_families(mm: Any, files: list[bytes], n: int, log: Callable[[str], None]) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    for family in FAMILIES:
        rows.append(measure_family(mm, family, files, n))
        gc.collect()  # one base-size model in memory at a time
        log(f"family {family.name}: { {k: v for k, v in rows[-1].items() if k != 'inputs'} }")
    return {"rows": rows}
