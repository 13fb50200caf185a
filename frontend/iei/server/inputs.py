"""Client inputs -> image file bytes, with a cheap header check before Triton sees them.

Nothing here decodes pixels: PIL reads the header only, so a 40000x40000 PNG is refused from its
first bytes. Decoding happens once, in the model.
"""

from __future__ import annotations

import asyncio
import binascii
import io
import re
import warnings
from dataclasses import dataclass
from typing import Any, Protocol

import pybase64
from PIL import Image, UnidentifiedImageError

from ..contract import IMAGE_FORMATS
from .errors import ErrorType, first_error

# Both are matched against a bounded head of the input only: a regex over a whole input of
# megabytes held the GIL for seconds, and a backtracking one took 88 times the input's memory.
_SCHEME = re.compile(r"\s*([A-Za-z][A-Za-z0-9+.-]*):")  # base64 never contains ':'
SCHEME_HEAD = 256  # characters of an input in which a URL's scheme must end
_DATA_URI = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[^;,]*)*),", re.I)
DATA_URI_HEAD = 1024  # characters of a data: URI in which its header (up to the comma) must end
_WHITESPACE = b" \t\n\r\v\f"


class InvalidInput(ValueError):
    """One input cannot be embedded: `reason` says why, `index` (once known) is its position
    among the request's inputs, and the message names it (`inputs[3]: reason`)."""

    error_type: ErrorType = ErrorType.VALIDATION  # what the answer says (and so its status)
    headers: dict[str, str] | None = None

    def __init__(self, reason: str, index: int | None = None) -> None:
        super().__init__(reason if index is None else f"inputs[{index}]: {reason}")
        self.reason = reason
        self.index = index

    def at(self, index: int) -> InvalidInput:
        """The same problem, at position `index`."""
        return InvalidInput(self.reason, index)

    def among(self, positions: list[int]) -> InvalidInput:
        """Found at `index` of a part of the request (its images, its texts) that sits at
        `positions` in the whole request."""
        return self.at(positions[self.index or 0])


class InputFailed(InvalidInput):
    """An input that could not be read, and not for a fault of the client's: the server of its
    URL was too slow (Timeout) or failed (Upstream), or this worker's connections were all busy
    (Overloaded). Named like an `InvalidInput`, answered with `error_type`'s status."""

    def __init__(
        self,
        error_type: ErrorType,
        reason: str,
        index: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(reason, index)
        self.error_type = error_type
        self.headers = headers

    def at(self, index: int) -> InputFailed:
        return InputFailed(self.error_type, self.reason, index, self.headers)


@dataclass(frozen=True)
class ImageInput:
    data: bytes
    format: str
    width: int
    height: int
    mode: str = ""  # PIL's mode from the header (RGB, L, I;16...): its bit depth for Cohere


# Bits per channel of PIL's modes (Cohere's `bit_depth`); any other mode is 8.
MODE_BITS = {"1": 1, "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "I": 32, "F": 32}


def bit_depth(mode: str) -> int:
    return MODE_BITS.get(mode, 8)


def url_scheme(item: str) -> str | None:
    """The scheme of a URL input (`https`, `file`, ...); None for base64 and data: URIs."""
    found = _SCHEME.match(item, 0, SCHEME_HEAD)
    if not found or found.group(1).lower() == "data":
        return None
    return found.group(1).lower()


def decode_input(item: str) -> bytes:
    """base64 (whitespace and newlines allowed) or a `data:image/...;base64,` URI -> bytes."""
    text = item.strip()
    if text[:5].lower() == "data:":
        comma = text.find(",", 0, DATA_URI_HEAD)
        match = _DATA_URI.fullmatch(text, 0, comma + 1) if comma > 0 else None
        if not match or ";base64" not in match.group("params").lower():
            raise InvalidInput("a data: URI must be of the form data:image/<type>;base64,<data>")
        mime = (match.group("mime") or "").lower()
        if mime and not mime.startswith("image/") and mime != "application/octet-stream":
            raise InvalidInput(f"data: URI of type {mime} is not an image")
        text = text[match.end() :]
    elif url_scheme(text):
        raise InvalidInput("a URL must be fetched, not decoded")
    if not text:
        raise InvalidInput("empty input")
    try:  # the common case, megabytes long: no whitespace inside (a regex over it cost 14 ms)
        return _b64decode(text)
    except (binascii.Error, ValueError):
        pass
    if not text.isascii():  # base64 is ASCII (and `isascii` costs nothing: a flag of the str)
        raise InvalidInput("not valid base64")
    # line-wrapped base64 (MIME, `base64` without -w0); not `split`: a str per piece was 28
    # times the input's memory when the pieces were short
    compact = text.encode("ascii").translate(None, _WHITESPACE).decode("ascii")
    try:
        return _b64decode(compact)
    except (binascii.Error, ValueError):
        raise InvalidInput("not valid base64") from None


def _b64decode(text: str) -> bytes:
    """Strict base64 (SIMD: about 25x the standard library); missing or surplus padding is
    tolerated, as the standard library's strict mode tolerates it."""
    text = text.rstrip("=")
    if not text:
        raise binascii.Error("padding alone")
    return pybase64.b64decode(text + "=" * (-len(text) % 4), validate=True)


# Most segments a JPEG's header may have before its first scan, as the model counts them
# (iei_runtime/images.py, which cannot import this package): real files have tens, and PIL
# takes seconds to walk millions of empty ones.
MAX_JPEG_HEADER_SEGMENTS = 4096
# A marker: 0xFF followed by neither 0x00 nor a restart marker (a second 0xFF: a fill byte).
_JPEG_MARKER = re.compile(rb"\xff([^\x00\xd0-\xd7])")


def jpeg_header_segments(data: bytes) -> int:
    """The segments before a JPEG's first scan, counted up to MAX_JPEG_HEADER_SEGMENTS + 1; 0 for
    a file that is no JPEG. Markers are found as libjpeg (and PIL) find them: junk before one is
    skipped, and so is a segment's payload, by its length."""
    if not data.startswith(b"\xff\xd8"):
        return 0
    at, count = 2, 0
    while count <= MAX_JPEG_HEADER_SEGMENTS and (found := _JPEG_MARKER.search(data, at)):
        count += 1
        marker, at = found[1][0], found.end()
        if marker in (0xDA, 0xD9):  # the first scan, or the end of the image
            break
        if marker == 0xFF:  # a fill byte: the marker is the next one
            at -= 1
        elif marker not in (0x01, 0xD8):  # markers without a length
            at += int.from_bytes(data[at : at + 2], "big")
    return count


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The chunks before a PNG's image data that say what the header check needs: its size and mode
# (IHDR; PLTE and tRNS for a palette) and its frames (acTL, fcTL of an animated PNG).
_PNG_HEADER_CHUNKS = frozenset((b"IHDR", b"PLTE", b"tRNS", b"acTL", b"fcTL"))
# Most chunks a PNG may have besides its image data, as the model counts them (in the whole file;
# here those before the image data): real files have tens, and a walk of millions of empty ones
# held the event loop for seconds.
MAX_PNG_CHUNKS = 4096


def png_header(data: bytes) -> bytes:
    """A PNG's signature, its chunks of _PNG_HEADER_CHUNKS and the header of its first image data
    chunk (where PIL's header reading stops): the other chunks before it are skipped unread. PIL
    inflates every compressed text (zTXt, iTXt) and ICC profile (iCCP) chunk it reads, up to
    64 MB each, about 1000 times what the chunk takes in the file: two PNGs of 64 such chunks,
    90 KB of base64 each, held the event loop 0.48 s, and were accepted. None says what the
    header check needs (the model reads the whole file). A chunk cut short is kept, for PIL to
    say so. An `InvalidInput` for over MAX_PNG_CHUNKS chunks before the image data."""
    kept, at, count = [data[:8]], 8, 0
    while at + 8 <= len(data):
        kind, end = data[at + 4 : at + 8], at + 12 + int.from_bytes(data[at : at + 4], "big")
        if kind in (b"IDAT", b"fdAT"):
            kept.append(data[at : at + 8])
            break
        count += 1
        if count > MAX_PNG_CHUNKS:
            raise InvalidInput(f"PNG of over {MAX_PNG_CHUNKS} chunks besides its image data")
        if kind in _PNG_HEADER_CHUNKS or end > len(data):
            kept.append(data[at:end])
        at = end
    return b"".join(kept)


def allow_pixels(max_pixels: int) -> None:
    """Raise PIL's own pixel cap (about 179 MP, refused at twice that as it reads a header) to
    IEI_MAX_IMAGE_PIXELS where that is higher: the setting is the one limit, as in the model.
    Never lowered (the frontend decodes nothing; other code in the process keeps its cap)."""
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


def inspect_image(data: bytes, max_pixels: int) -> ImageInput:
    """Format and size from the header; refuse what the model would refuse, before it runs."""
    if jpeg_header_segments(data) > MAX_JPEG_HEADER_SEGMENTS:
        raise InvalidInput(
            f"JPEG of over {MAX_JPEG_HEADER_SEGMENTS} segments before its first scan"
        )
    header = png_header(data) if data.startswith(PNG_SIGNATURE) else data
    tile = (0, 0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(header), formats=IMAGE_FORMATS) as image:
                width, height, fmt = image.width, image.height, image.format or "?"
                mode = image.mode
                tags = getattr(image, "tag_v2", None) if fmt == "TIFF" else None
                if tags is not None:  # TileWidth, TileLength
                    tile = (int(tags.get(322) or 0), int(tags.get(323) or 0))
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
    if tile[0] * tile[1] > max_pixels:  # the model's decoder holds a whole tile, however small
        raise InvalidInput(
            f"TIFF of {tile[0]}x{tile[1]} = {tile[0] * tile[1]} pixel tiles: over the limit of "
            f"{max_pixels} pixels (a tile is decoded whole)"
        )
    return ImageInput(data, fmt, width, height, mode)


class Fetcher(Protocol):
    async def fetch(self, url: str, budget: Any) -> bytes: ...


def prepare_inputs(
    items: list[str] | list[str | bytes],
    max_pixels: int,
    fetched: dict[int, bytes] | None = None,
) -> list[ImageInput]:
    """Every item of a request (URLs already `fetched`, by index; bytes are an uploaded file,
    taken as it is), or an `InvalidInput` naming the first bad one by index."""
    fetched = fetched or {}
    images = []
    for index, item in enumerate(items):
        try:
            if isinstance(item, bytes):
                data = item
                if not data:
                    raise InvalidInput("empty input")
            else:
                data = fetched[index] if index in fetched else decode_input(item)
            images.append(inspect_image(data, max_pixels))
        except InvalidInput as exc:
            raise exc.at(index) from None
    return images


async def fetch_urls(
    items: list[str] | list[str | bytes], fetcher: Fetcher, budget: Any
) -> dict[int, bytes]:
    """Fetch the URL items concurrently, their bytes taken from `budget`; only http(s) URLs are
    fetched, any other scheme is refused before anything is read. The first failure cancels the
    other fetches: none is left running when this returns or raises."""
    urls = {}
    for index, item in enumerate(items):
        scheme = None if isinstance(item, bytes) else url_scheme(item)
        if scheme is None or isinstance(item, bytes):
            continue
        if scheme not in ("http", "https"):
            raise InvalidInput(f"URL scheme {scheme!r} is not allowed (only http, https)", index)
        urls[index] = item.strip()

    async def one(index: int, url: str) -> bytes:
        try:
            return await fetcher.fetch(url, budget)
        except InvalidInput as exc:
            raise exc.at(index) from None

    tasks = {}
    try:
        async with asyncio.TaskGroup() as group:
            tasks = {i: group.create_task(one(i, u)) for i, u in urls.items()}
    except BaseExceptionGroup as failed:
        raise first_error(failed) from None
    return {index: task.result() for index, task in tasks.items()}
