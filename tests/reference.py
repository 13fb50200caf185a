"""An independent in-process reference: what the service must return, computed without it.

It shares no code with the model repository: its own image loading (orientation table, alpha
compositing and 16-bit scaling in numpy), the PIL implementation of the model's processor (the
service runs the torchvision one), the full model (the service loads one tower of a dual
encoder), and its own pooling: `get_image_features` / `get_text_features` for dual encoders,
`pooler_output` for DINOv2, the mean of the last hidden state for the rest.

`Original` is the original IEI service's pipeline, rebuilt from its source, to measure how far
IEI's vectors are from the ones it returned.

Texts are tokenized as Hugging Face's own zero-shot pipeline does: SigLIP and SigLIP2 padded to
`max_length` 64, CLIP padded to the longest text, both truncated to the context; the mask is
whatever the tokenizer returns (SigLIP's has one, SigLIP2's files say none). SigLIP2's
fixed-resolution checkpoints name Gemma's tokenizer, which does not lower-case: the reference
takes transformers' `Siglip2Tokenizer` for them (the service folds the case itself).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

# EXIF orientation -> the PIL transposition that makes the image upright.
ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def load_rgb(data: bytes) -> Image.Image:
    """Encoded file -> the upright 8-bit RGB picture a person would see (first frame)."""
    image = Image.open(io.BytesIO(data))
    image.seek(0)
    orientation = image.getexif().get(0x0112, 1)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        grey = (np.asarray(image).astype(np.int64) // 256).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(np.stack([grey] * 3, axis=-1))
    elif image.mode in ("RGBA", "LA") or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA")).astype(np.float64)
        alpha = rgba[..., 3:] / 255.0
        rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)  # over a white background
        image = Image.fromarray(np.round(rgb).astype(np.uint8))
    else:
        image = image.convert("RGB")
    if orientation in ORIENTATION:
        image = image.transpose(ORIENTATION[orientation])
    return image


def load_naive(data: bytes) -> Image.Image:
    """What a careless server does: convert('RGB') and nothing else (tests show it differs)."""
    return Image.open(io.BytesIO(data)).convert("RGB")


def unit(vectors: object) -> np.ndarray:
    rows = np.asarray(vectors, dtype=np.float64)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


class Reference:
    """AutoImageProcessor (PIL backend) + AutoModel in float32 + the family's pooling."""

    def __init__(self, model_dir: Path, *, padding: str | None = None) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModel

        self.torch = torch
        self.processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
        self.model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
        config = self.model.config
        self.model_type = config.model_type
        self.joint = hasattr(self.model, "get_text_features")
        if self.joint:
            from transformers import AutoTokenizer, Siglip2Tokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
            if "Gemma" in type(self.tokenizer).__name__:
                self.tokenizer = Siglip2Tokenizer.from_pretrained(model_dir)
            self.context = config.text_config.max_position_embeddings
            # `padding`: a test's way to show that the padding matters (the comparison can fail)
            self.padding = padding or ("longest" if self.model_type == "clip" else "max_length")

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        """Unit-norm vectors, one per image."""
        with self.torch.no_grad():
            inputs = self.processor(images=images, return_tensors="pt")
            if self.joint:  # every tensor of the processor (NaFlex: the mask and the grid)
                return unit(self.model.get_image_features(**inputs).pooler_output)
            outputs = self.model(pixel_values=inputs["pixel_values"])
        if self.model_type.startswith("dinov2"):
            return unit(outputs.pooler_output)
        hidden = outputs.last_hidden_state
        return unit(hidden.mean(dim=(2, 3)) if hidden.dim() == 4 else hidden.mean(dim=1))

    def embed(self, files: list[bytes]) -> np.ndarray:
        return self.embed_images([load_rgb(f) for f in files])

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Unit-norm vectors of the image space, one per text (cut to the context); a special
        token's text in a text is text."""
        tokens = self.tokenizer(
            texts,
            split_special_tokens=True,
            padding=self.padding,
            truncation=True,
            max_length=self.context,
            return_tensors="pt",
        )
        with self.torch.no_grad():
            return unit(self.model.get_text_features(**tokens).pooler_output)


class Original:
    """The original IEI service's own pipeline (lloydzhou/image-embedding-inference, commit
    107b3f1, `server.py`), rebuilt from its source: what its `/embed` returned for one image.

    `np.array(Image.open(file))`: no EXIF orientation; a picture without three dimensions
    (greyscale, palette, 16-bit) is refused; a fourth channel is dropped, alpha without
    compositing (and CMYK's K, its C, M, Y read as R, G, B). Then PIL's `resize` to the
    processor's `size` (its default filter, bicubic), the processor (`use_fast=True`: the
    torchvision one), `AutoModel(add_pooling_layer=False)` in float32 and the mean of the last
    hidden state over dimension 1.
    """

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModel

        self.torch = torch
        self.processor = AutoImageProcessor.from_pretrained(model_dir, backend="torchvision")
        self.model = AutoModel.from_pretrained(
            model_dir, dtype=torch.float32, add_pooling_layer=False
        ).eval()

    def pixels(self, data: bytes) -> Image.Image:
        """The picture its processor was given; ValueError where it answered 400."""
        array = np.array(Image.open(io.BytesIO(data)))
        if array.ndim != 3:
            raise ValueError("Image must be RGB or RGBA")  # its message, its 400
        if array.shape[2] == 4:
            array = array[:, :, :3]
        size = self.processor.size
        return Image.fromarray(array).resize((size["width"], size["height"]))

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        """Raw vectors (it did not normalise), one per picture, each computed alone."""
        rows = []
        with self.torch.no_grad():
            for image in images:
                inputs = self.processor(images=image, return_tensors="pt")
                hidden = self.model(**inputs).last_hidden_state
                rows.append(hidden.mean(dim=1).numpy()[0])
        return np.stack(rows)

    def embed(self, files: list[bytes]) -> np.ndarray:
        return self.embed_images([self.pixels(f) for f in files])


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)
