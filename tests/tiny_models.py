"""Tiny, randomly initialised models of every supported family, built locally from configs.

There is no model hub here. Each family gets a small config of its real architecture and the
real processor settings of its published checkpoint (sizes, crop, resample, mean/std), so the
service runs exactly the code path that the hub model would take. The dual encoders (CLIP,
SigLIP, SigLIP2) also get the tokenizer files their hub checkpoints ship, built from small
in-memory vocabularies: CLIP's byte-level BPE, Gemma's for SigLIP2, and for SigLIP a SentencePiece
model alone (`spiece.model`, no `tokenizer.json`, as on the hub; needs `sentencepiece`).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
HALF = [0.5, 0.5, 0.5]
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
ONE_255 = 0.00392156862745098  # what the hub files write for 1/255

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


ORIGINAL_FAMILIES = tuple(FAMILIES)

# --- dual encoders and DINOv2 ------------------------------------------------------------------

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)

# preprocessor_config.json of each published checkpoint (copied by hand, not today's defaults).
PREPROCESSORS: dict[str, dict[str, Any]] = {
    # openai/clip-vit-base-patch32: the legacy feature-extractor file (ints for size and crop, no
    # do_rescale); shortest edge 224 bicubic, centre crop 224, OpenAI's mean and std.
    "clip": dict(
        crop_size=224, do_center_crop=True, do_normalize=True, do_resize=True,
        feature_extractor_type="CLIPFeatureExtractor", image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD, resample=3, size=224,
    ),
    # google/siglip-base-patch16-224: squashed to 224x224 (no crop), bicubic.
    "siglip": dict(
        do_normalize=True, do_rescale=True, do_resize=True, image_mean=HALF,
        image_processor_type="SiglipImageProcessor", image_std=HALF,
        processor_class="SiglipProcessor", resample=3, rescale_factor=ONE_255,
        size={"height": 224, "width": 224},
    ),
    # google/siglip2-base-patch16-224: as SigLIP, bilinear.
    "siglip2": dict(
        do_convert_rgb=None, do_normalize=True, do_rescale=True, do_resize=True, image_mean=HALF,
        image_processor_type="SiglipImageProcessor", image_std=HALF,
        processor_class="SiglipProcessor", resample=2, rescale_factor=ONE_255,
        size={"height": 224, "width": 224},
    ),
    # google/siglip2-base-patch16-naflex: the aspect ratio kept, at most 256 patches of 16 px,
    # padded to 256 patches (the mask and the patch grid come with the pixels).
    "siglip2_naflex": dict(
        do_convert_rgb=None, do_normalize=True, do_rescale=True, do_resize=True, image_mean=HALF,
        image_processor_type="Siglip2ImageProcessor", image_std=HALF, max_num_patches=256,
        patch_size=16, processor_class="Siglip2Processor", resample=2, rescale_factor=ONE_255,
    ),
    # facebook/dinov2-small (and -with-registers-small): shortest edge 256 bicubic, centre crop
    # 224, ImageNet's mean and std.
    "dinov2": dict(
        crop_size={"height": 224, "width": 224}, do_center_crop=True, do_convert_rgb=True,
        do_normalize=True, do_rescale=True, do_resize=True, image_mean=IMAGENET_MEAN,
        image_processor_type="BitImageProcessor", image_std=IMAGENET_STD, resample=3,
        rescale_factor=ONE_255, size={"shortest_edge": 256},
    ),
}  # fmt: skip
PREPROCESSORS["dinov2_registers"] = PREPROCESSORS["dinov2"]
RETRIEVAL_FAMILIES = tuple(PREPROCESSORS)
JOINT_FAMILIES = ("clip", "siglip", "siglip2", "siglip2_naflex")

WORDS = (
    "a", "photo", "of", "the", "cat", "dog", "bird", "car", "tree", "house", "red", "blue",
    "green", "small", "big", "picture", "image", "sky", "sea", "man", "woman", "child", "on",
    "in", "with", "and", "at", "night", "day",
)  # fmt: skip


def byte_symbols() -> list[str]:
    """GPT-2's (and CLIP's) printable stand-in for each of the 256 bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}
    return [table[b] for b in range(256)]


def clip_tokenizer() -> Any:
    """CLIP's byte-level BPE: every byte symbol (plain and word-final), merges for WORDS, and the
    two special tokens at the top ids as in the real vocabulary (the openai configs' eos id 2
    makes CLIPTextModel pool at argmax(input_ids), so the end token must have the highest id)."""
    from transformers import CLIPTokenizer

    symbols = byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            if (parts[0], parts[1]) not in merges:
                merges.append((parts[0], parts[1]))
            parts = [parts[0] + parts[1], *parts[2:]]
            vocab.setdefault(parts[0], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def gemma_tokenizer() -> Any:
    """SigLIP2's tokenizer as HF's conversion made it: Gemma's layout (<pad> 0, <eos> 1, <bos> 2,
    <unk> 3, <mask> 4, turn markers, 256 byte pieces, then characters), no BOS, EOS added,
    padded on the right, and no attention mask (the original model takes none)."""
    from transformers import GemmaTokenizer

    names = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    vocab = {t: i for i, t in enumerate(names + [f"<0x{b:02X}>" for b in range(256)])}
    for character in "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-":
        vocab.setdefault(character, len(vocab))
    return GemmaTokenizer(
        vocab=vocab, merges=[], add_bos_token=False, add_eos_token=True, padding_side="right",
        model_input_names=["input_ids"], additional_special_tokens=names[5:],
    )  # fmt: skip


def siglip_tokenizer(folder: Path) -> Any:
    """SigLIP's SentencePiece unigram model (<pad> 0, </s> 1, <unk> 2), trained on a few lines;
    saved into `folder` as the hub has it: spiece.model, no tokenizer.json."""
    import sentencepiece as spm
    from transformers import SiglipTokenizer

    lines = ["a photo of a cat", "a photo of a dog", "a red car on the road at night"]
    lines += [f"{a} {b} of {c}" for a in WORDS[:6] for b in WORDS[6:14] for c in WORDS[14:22]]
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "spiece"
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=80,
            model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>",
            eos_piece="</s>", unk_piece="<unk>", character_coverage=1.0,
            hard_vocab_limit=False, minloglevel=2,
        )  # fmt: skip
        tokenizer = SiglipTokenizer(vocab_file=f"{prefix}.model", model_max_length=64)
        tokenizer.save_pretrained(folder)  # while its spiece.model still exists
    (folder / "tokenizer.json").unlink(missing_ok=True)
    return tokenizer


def text_config(vocab_size: int, positions: int, **extra: Any) -> dict[str, Any]:
    return dict(TINY, vocab_size=vocab_size, max_position_embeddings=positions, **extra)


def build_retrieval_model(family: str, folder: Path) -> tuple[Any, Any]:
    """(model, tokenizer or None) of a dual encoder or DINOv2, the tokenizer saved already."""
    import transformers as tf

    vision = dict(TINY, image_size=224, patch_size=16)
    if family == "clip":
        tokenizer = clip_tokenizer()
        # openai/clip-vit-base-patch32: 77 positions, quick_gelu, the early token ids (bos 0,
        # eos 2, pad 1: pooling at argmax(input_ids)); a projection narrower than the towers,
        # so that a missing projection shows as a wrong dimension.
        config = tf.CLIPConfig(
            text_config=text_config(len(tokenizer), 77, hidden_act="quick_gelu", bos_token_id=0,
                                    eos_token_id=2, pad_token_id=1, projection_dim=16),
            vision_config=dict(vision, patch_size=32, hidden_act="quick_gelu", projection_dim=16),
            projection_dim=16,
        )  # fmt: skip
        model: Any = tf.CLIPModel(config)
    elif family == "siglip":
        tokenizer = siglip_tokenizer(folder)
        config = tf.SiglipConfig(
            text_config=text_config(tokenizer.vocab_size, 64), vision_config=vision
        )
        model = tf.SiglipModel(config)
    elif family == "siglip2":  # fixed resolution: a SiglipModel with Gemma's tokenizer
        tokenizer = gemma_tokenizer()
        model = tf.SiglipModel(
            tf.SiglipConfig(text_config=text_config(len(tokenizer), 64), vision_config=vision)
        )
    elif family == "siglip2_naflex":
        tokenizer = gemma_tokenizer()
        config = tf.Siglip2Config(
            text_config=text_config(len(tokenizer), 64),
            vision_config=dict(TINY, patch_size=16, num_patches=256),
        )
        model = tf.Siglip2Model(config)
    else:  # dinov2, dinov2_registers
        tokenizer = None
        options = dict(TINY, patch_size=14, image_size=518, layerscale_value=1.0)
        if family == "dinov2":
            model = tf.Dinov2Model(tf.Dinov2Config(**options))
        else:
            config = tf.Dinov2WithRegistersConfig(**options, num_register_tokens=4)
            model = tf.Dinov2WithRegistersModel(config)
    if tokenizer is not None and family != "siglip":
        tokenizer.save_pretrained(folder)
    return model, tokenizer


def write_hub_tokenizer_files(family: str, tokenizer: Any, folder: Path) -> None:
    """What the hub repositories have that transformers 5's save_pretrained no longer writes:
    special_tokens_map.json, and CLIP's vocab.json and merges.txt beside tokenizer.json."""
    names = ["bos_token", "eos_token", "unk_token", "pad_token"]
    special = {n: str(getattr(tokenizer, n)) for n in names if getattr(tokenizer, n, None)}
    if family == "siglip":
        special.pop("bos_token", None)
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    if family == "clip":
        backend = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
        (folder / "vocab.json").write_text(json.dumps(backend["vocab"], ensure_ascii=False))
        merges = [m if isinstance(m, str) else " ".join(m) for m in backend["merges"]]
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def build_tiny_model(family: str, folder: Path, seed: int = 0) -> Path:
    """Write a loadable model folder (config, weights, preprocessor_config.json, and the
    tokenizer files of a dual encoder)."""
    import torch
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    if family in FAMILIES:
        architecture, processor = FAMILIES[family]
        model = AutoModel.from_config(AutoConfig.for_model(family, **architecture))
    else:
        processor = PREPROCESSORS[family]
        model, tokenizer = build_retrieval_model(family, folder)
        if tokenizer is not None:
            write_hub_tokenizer_files(family, tokenizer, folder)
    if hasattr(model, "logit_scale"):  # a dual encoder's zero-shot scalars (/classify)
        # Not the init values (SigLIP's from_config leaves both 0): a scale or bias read wrong,
        # or left out, then changes the scores.
        with torch.no_grad():
            model.logit_scale.fill_(math.log(12.0))
            if getattr(model, "logit_bias", None) is not None:
                model.logit_bias.fill_(-1.5)
    model.eval().save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return folder


def build_openclip_style_clip(folder: Path, seed: int = 0) -> Path:
    """A tiny CLIP saved as LAION's OpenCLIP conversions are (laion/CLIP-ViT-bigG-14-laion2B-
    39B-b160k): the projection size (24) only at the top level, the towers' configs keeping
    transformers' default projection_dim (512), as transformers 5 writes them (#25622)."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = clip_tokenizer()
    config = tf.CLIPConfig(
        text_config=text_config(len(tokenizer), 77, hidden_act="quick_gelu", bos_token_id=0,
                                eos_token_id=2, pad_token_id=1),
        vision_config=dict(TINY, image_size=224, patch_size=32, hidden_act="quick_gelu"),
        projection_dim=24,
    )  # fmt: skip
    tokenizer.save_pretrained(folder)
    write_hub_tokenizer_files("clip", tokenizer, folder)
    tf.CLIPModel(config).eval().save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSORS["clip"], indent=2))
    return folder


def build_classification_checkpoint(family: str, folder: Path, seed: int = 0) -> Path:
    """A tiny classification checkpoint, as the hub's ViT and DeiT ones are
    (google/vit-base-patch16-224, IEI's default; facebook/deit-base-distilled-patch16-224): its
    base model is saved without the pooler."""
    import torch
    import transformers
    from transformers import AutoConfig

    classes = {"vit": "ViTForImageClassification", "deit": "DeiTForImageClassificationWithTeacher"}
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    architecture, processor = FAMILIES[family]
    config = AutoConfig.for_model(family, **architecture, num_labels=3)
    getattr(transformers, classes[family])(config).eval().save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return folder
