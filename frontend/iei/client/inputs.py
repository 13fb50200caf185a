"""What the client accepts as an image, and how it goes over the wire: the file itself in a
multipart form (a server with raw uploads), else base64 of the file in JSON."""

from __future__ import annotations

import base64
import io
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import numpy as np
from PIL import Image

# A file path, an encoded image file, a decoded image, or an 8-bit pixel array (HxW or HxWxC).
# A str that starts with http://, https:// or data: goes to the server as it is (it fetches URLs).
ImageInput: TypeAlias = str | os.PathLike[str] | bytes | Image.Image | np.ndarray

PASSED_THROUGH = ("http://", "https://", "data:")


@dataclass(frozen=True)
class ImageFile:
    """An image file as it is uploaded: its bytes and (for a path) its name."""

    data: bytes
    name: str = ""

    def __len__(self) -> int:  # what a request's size counts
        return len(self.data)


def printable(path: str) -> str:
    """A path as iei records and prints it: as it is, or, for a name that is not valid UTF-8
    (os.walk gives `caf\\udce9.jpg` for the bytes `caf\\xe9.jpg`), its bytes with backslash
    escapes (`caf\\xe9.jpg`): JSON, Parquet, an HTTP header and a terminal take that, and it is
    the same in every run, so `--resume` knows the file again."""
    try:
        path.encode()
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")
    return path


def encode_image(image: ImageInput) -> str:
    """One input as the server takes it in JSON: base64 of the file's bytes (PIL and arrays as
    PNG); URLs and data: URIs as they are."""
    file = image_file(image)
    return file if isinstance(file, str) else base64.b64encode(file.data).decode("ascii")


def image_file(image: ImageInput) -> ImageFile | str:
    """One input as a file to upload (PIL and arrays as PNG); URLs and data: URIs stay str."""
    if isinstance(image, str) and image.startswith(PASSED_THROUGH):
        return image
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        return ImageFile(path.read_bytes(), path.name)
    if isinstance(image, bytes | bytearray | memoryview):
        return ImageFile(bytes(image))
    if isinstance(image, Image.Image):
        return ImageFile(png_bytes(image))
    if isinstance(image, np.ndarray):
        return ImageFile(png_bytes(array_to_image(image)))
    raise TypeError(f"cannot embed a {type(image).__name__}: give a path, bytes, PIL or numpy")


def multipart_form(files: list[ImageFile], fields: dict[str, str]) -> tuple[bytes, str]:
    """A `multipart/form-data` body of `fields` (text) and `files` (one part each, in order),
    and its Content-Type."""
    boundary = secrets.token_hex(16)
    while any(boundary.encode() in file.data for file in files):  # all but impossible
        boundary = secrets.token_hex(16)
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    for file in files:
        filename = printable(file.name).replace("\\", "\\\\").replace('"', "%22")
        filename = filename.replace("\r", "%0D").replace("\n", "%0A")
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        )
        parts += [head.encode(), file.data, b"\r\n"]
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


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
