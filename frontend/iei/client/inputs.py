"""What the client accepts as an image, and how it goes over the wire (base64 of a file)."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import TypeAlias

import numpy as np
from PIL import Image

# A file path, an encoded image file, a decoded image, or an 8-bit pixel array (HxW or HxWxC).
# A str that starts with http://, https:// or data: goes to the server as it is (it fetches URLs).
ImageInput: TypeAlias = str | os.PathLike[str] | bytes | Image.Image | np.ndarray

PASSED_THROUGH = ("http://", "https://", "data:")


def encode_image(image: ImageInput) -> str:
    """One input as the server takes it: base64 of the file's bytes (PIL and arrays as PNG)."""
    if isinstance(image, str) and image.startswith(PASSED_THROUGH):
        return image
    if isinstance(image, str | os.PathLike):
        data = Path(image).read_bytes()
    elif isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
    elif isinstance(image, Image.Image):
        data = png_bytes(image)
    elif isinstance(image, np.ndarray):
        data = png_bytes(array_to_image(image))
    else:
        raise TypeError(f"cannot embed a {type(image).__name__}: give a path, bytes, PIL or numpy")
    return base64.b64encode(data).decode("ascii")


def array_to_image(pixels: np.ndarray) -> Image.Image:
    """HxW (grey) or HxWxC (C = 1, 3 or 4) uint8 pixels as a PIL image."""
    if pixels.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8, not {pixels.dtype}")
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] in (3, 4)):
        return Image.fromarray(np.ascontiguousarray(pixels))
    raise TypeError(f"image arrays must be HxW or HxWxC with C in 1, 3, 4; got {pixels.shape}")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
