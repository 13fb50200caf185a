"""Client inputs -> image file bytes, with a cheap header check before Triton sees them.

Nothing here decodes pixels: PIL reads the header only, so a 40000x40000 PNG is refused from its
first bytes. Decoding happens once, in the model.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from .contract import IMAGE_FORMATS

_DATA_URI = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?),", re.I)
_WHITESPACE = re.compile(r"\s+")


class InvalidInput(ValueError):
    """One input cannot become an image; the message says why (without its index)."""


@dataclass(frozen=True)
class ImageInput:
    data: bytes
    format: str
    width: int
    height: int


def decode_input(item: str) -> bytes:
    """base64 (whitespace and newlines allowed) or a `data:image/...;base64,` URI -> bytes."""
    text = item.strip()
    if text[:5].lower() == "data:":
        match = _DATA_URI.match(text)
        if not match or ";base64" not in match.group("params").lower():
            raise InvalidInput("a data: URI must be of the form data:image/<type>;base64,<data>")
        mime = (match.group("mime") or "").lower()
        if mime and not mime.startswith("image/") and mime != "application/octet-stream":
            raise InvalidInput(f"data: URI of type {mime} is not an image")
        text = text[match.end() :]
    elif text.lower().startswith(("http://", "https://")):
        raise InvalidInput("URL inputs are not supported; send the image as base64")
    compact = _WHITESPACE.sub("", text)
    if not compact:
        raise InvalidInput("empty input")
    compact += "=" * (-len(compact) % 4)  # tolerate missing padding
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("not valid base64") from None


def inspect_image(data: bytes, max_pixels: int) -> ImageInput:
    """Format and size from the header; refuse what the model would refuse, before it runs."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
                width, height, fmt = image.width, image.height, image.format or "?"
    except Image.DecompressionBombError:
        raise InvalidInput(f"image is larger than the limit of {max_pixels} pixels") from None
    except UnidentifiedImageError:
        raise InvalidInput(
            f"not an image in a supported format ({', '.join(IMAGE_FORMATS)})"
        ) from None
    except Exception as exc:  # a broken header can raise nearly anything inside PIL
        raise InvalidInput(f"unreadable image header: {exc}") from None
    if width * height > max_pixels:
        raise InvalidInput(
            f"image of {width}x{height} = {width * height} pixels is larger than the limit "
            f"of {max_pixels} pixels"
        )
    if width == 0 or height == 0:
        raise InvalidInput("image has no pixels")
    return ImageInput(data, fmt, width, height)


def prepare_inputs(items: list[str], max_pixels: int) -> list[ImageInput]:
    """Every item of a request, or an `InvalidInput` naming the first bad one by index."""
    images = []
    for index, item in enumerate(items):
        try:
            images.append(inspect_image(decode_input(item), max_pixels))
        except InvalidInput as exc:
            raise InvalidInput(f"inputs[{index}]: {exc}") from None
    return images
