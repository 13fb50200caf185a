"""Encoded image files -> upright 8-bit RGB PIL images, or the reason why not."""

from __future__ import annotations

import functools
import io
import math
import re
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

# Formats we decode. Restricting PIL's plugins keeps it away from EPS (Ghostscript), PDF, PSD & co.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG covers MPO
# A large JPEG is decoded at 1/2, 1/4 or 1/8 scale (DCT scaling, much cheaper than a full decode
# and resize) while its short side stays at least this many times the processor's input side:
# 2x keeps the processor's own downscaling in charge of the final quality.
DRAFT_FACTOR = 2
# The factor from which an axis is reduced alone (ResizeRule.each_axis): below it the reduction
# costs about what it saves the resize (a phone photo drafted to 1008x756, its long axis halved
# for ViT: 13.9 ms of decode and preprocessing instead of 12.9).
ALONE_FACTOR = 4


# Most scans a progressive JPEG may have. Each scan is a pass over the whole image's coefficients,
# so a small file that repeats a refinement scan thousands of times takes minutes of CPU for one
# image (a 580 KB file of 7000x7000 px and 2000 scans: 75 s): libjpeg-turbo's advice for untrusted
# files is such a limit (`djpeg -maxscans`, TJPARAM_SCANLIMIT). Encoders write about 10 scans
# (libjpeg's progression for colour) and never near 100.
MAX_JPEG_SCANS = 100
# Most segments (tables, comments, metadata, scans) a JPEG's frame may have: real files have tens,
# an ICC profile split in 64 KB chunks included; a file of millions of empty segments costs
# seconds to walk.
MAX_JPEG_SEGMENTS = 4096
_PROGRESSIVE_FRAMES = frozenset((0xC2, 0xC6, 0xCA, 0xCE))  # SOF2/6/10/14: Huffman, arithmetic
_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # SOF0-15 (not DHT, JPG, DAC)
# A marker as libjpeg's next_marker finds one: 0xFF followed by neither 0x00 (a 0xFF of coded
# data) nor a restart marker (inside coded data); a second 0xFF is a fill byte. (No `\xff+`:
# it makes the search 14 times slower, 18 ms for a 12 MP photo.)
_JPEG_MARKER = re.compile(rb"\xff([^\x00\xd0-\xd7])")


# PNG text chunks (tEXt, and zTXt/iTXt inflated as PIL reads the header) that PIL keeps per
# image: by default 1 MB a chunk and 64 MB in all, so a 90 KB file of compressed text chunks made
# the model's process inflate 64 MB before one pixel. Real files' metadata (XMP, ICC profiles,
# captions) is far smaller; a file over it is refused ("Too much memory used in text chunks").
PngImagePlugin.MAX_TEXT_CHUNK = 1 << 20
PngImagePlugin.MAX_TEXT_MEMORY = 4 << 20
# ICC profile chunks (iCCP) are not counted in that memory: PIL inflates each (up to
# MAX_TEXT_CHUNK) and keeps the last, so a 2 MB PNG of 2000 of them cost 4 s of CPU. A valid PNG
# has at most one; the chunk's name found more often than this (a C-speed count of the bytes, an
# upper bound on the chunks) refuses the file.
PNG_ICC_CHUNKS = 4
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PIL reads each chunk of a PNG in Python, before its image data and after it: 16 MiB of empty
# chunks cost 5 s of CPU. Real files have tens besides their image data (IDAT, an animation's
# fdAT), which libpng writes 8 KiB a chunk (8192 for 64 MiB).
MAX_PNG_CHUNKS = 4096
MAX_PNG_DATA_CHUNKS = 65536
_PNG_DATA = (b"IDAT", b"fdAT")


class InvalidImage(ValueError):
    """The bytes of one image cannot be turned into model input. Fails only its own request."""


def allow_pixels(max_pixels: int) -> None:
    """Make IEI_MAX_IMAGE_PIXELS the one pixel limit: PIL refuses an image of over twice its own
    Image.MAX_IMAGE_PIXELS (about 179 MP) as it opens it, with its own message naming a limit
    nobody set. Its cap is raised to ours where ours is higher, and stays a backstop above it
    (ours is checked from the header as soon as the file is open)."""
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


# PIL warns of an image over its cap (now at least ours) as it opens it: ours refuses it next.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def draft_side(processor: Any, factor: int = DRAFT_FACTOR) -> int:
    """The smallest side a JPEG may be decoded at for this processor: `factor` times the largest
    side it resizes to (ConvNeXt's shortest edge / crop_pct included); 0 when it is unknown."""
    sides = []
    crop_pct = getattr(processor, "crop_pct", None)
    for attribute in ("size", "crop_size"):
        size = getattr(processor, attribute, None)
        if size is None:
            continue
        for key in ("height", "width", "shortest_edge", "longest_edge", "max_height", "max_width"):
            value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
            if not isinstance(value, int | float) or value <= 0:
                continue
            if key == "shortest_edge" and crop_pct:
                value = value / crop_pct  # resized to shortest_edge / crop_pct, then cropped
            sides.append(value)
    return math.ceil(max(sides) * factor) if sides else 0


def _size_value(size: Any, key: str) -> float | None:
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return value if isinstance(value, int | float) and value > 0 else None


class ResizeRule:
    """What a processor's resize makes of an image of a given size.

    A processor that resizes the short side to a length (CLIP, DINOv2, ConvNeXt below 384:
    `size.shortest_edge`, no `longest_edge`) keeps the aspect ratio, so a 1x6000 PNG of 111 bytes
    would become 224 x 1,344,000 pixels before its centre crop (GBs, outside the decode budget):
    `check` refuses such an image before anything is resized.

    A processor that resizes each axis to a fixed length whatever the other's (ViT, DeiT, BEiT,
    Swin, SigLIP: `size.height` x `size.width`; ConvNeXt from 384 up warps) is `each_axis`: an
    image may be reduced along one axis alone before it. Reduced only by its short side, a
    4 x 12,000,000 PNG went whole to the resize, whose first pass widened it to 224 x 12,000,000
    (8 GB and 20-36 s of one instance; 1 x 50,000,000 failed to allocate).

    A processor with a patch budget (SigLIP2 NaFlex: `max_num_patches` of `patch_size`) resizes
    each image to a grid of patches it picks from the image's size: 1 x 50,000,000 went whole to
    a resize to 16 x 4096 (4.5 GB, 9 s). Its images are reduced along each axis to no less than
    twice that grid, where the processor picks the same grid for the reduced image (`factors`).
    transformers' search for the grid is coarse at small scales, so some shapes find no such
    reduction (one in five at random, one photo size in 100): they go whole, the resize's
    pixels held from the decode budget (`resized`), and over the pixel limit refused (`check`)."""

    def __init__(
        self, short_side: int, *, each_axis: bool = False, patches: tuple[int, int] | None = None
    ) -> None:
        self.short_side = short_side  # the short side it resizes to (0: none that grows)
        self.each_axis = each_axis  # each axis resized to a fixed length, whatever the other's
        self.patches = patches  # (patch_size, max_num_patches) of a patch budget

    @classmethod
    def of(cls, processor: Any, options: dict[str, Any] | None = None) -> ResizeRule:
        """The rule of this processor as a call with `options` resizes (transformers'
        get_resize_output_image_size; ConvNeXt's crop_pct below 384: shortest_edge / crop_pct,
        from 384 up: a square warp)."""
        options = options or {}
        do_resize = options.get("do_resize", getattr(processor, "do_resize", True))
        size = options.get("size", getattr(processor, "size", None))
        if not do_resize:
            return cls(0)
        patch_size = options.get("patch_size", getattr(processor, "patch_size", None))
        max_patches = options.get("max_num_patches", getattr(processor, "max_num_patches", None))
        if size is None and isinstance(patch_size, int) and isinstance(max_patches, int):
            return cls(0, patches=(patch_size, max_patches))
        if size is None:
            return cls(0)
        short = _size_value(size, "shortest_edge")
        if short is None:  # a fixed height x width, unless it keeps the aspect ratio within it
            sides = (_size_value(size, "height"), _size_value(size, "width"))
            kept = any(options.get(name, getattr(processor, name, False))
                       for name in ("keep_aspect_ratio", "do_thumbnail"))  # fmt: skip
            return cls(0, each_axis=None not in sides and not kept)
        if _size_value(size, "longest_edge") is not None:
            return cls(0)  # the long side bounded: nothing grows
        crop_pct = options.get("crop_pct", getattr(processor, "crop_pct", None))
        if crop_pct and short >= 384 and type(processor).__name__.startswith("ConvNext"):
            return cls(0, each_axis=True)  # its own resize warps to a square from 384 up
        if crop_pct and short < 384:
            short = short / crop_pct
        return cls(int(short))

    def factors(self, width: int, height: int, min_side: int) -> tuple[int, int]:
        """The box reduction (across, down) of a decoded image of this size: the largest that
        keeps both sides >= `min_side` (0: none); where the processor resizes each axis to a
        fixed length, an axis whose own factor reaches ALONE_FACTOR by that; for a patch
        budget, see `patch_factors`."""
        if self.patches:
            return self.patch_factors(width, height)
        if min_side <= 0:
            return 1, 1
        factor = max(1, min(width, height) // min_side)
        if not self.each_axis:
            return factor, factor
        own = (max(1, width // min_side), max(1, height // min_side))
        across, down = (f if f >= ALONE_FACTOR else factor for f in own)
        return across, down

    def shrinks_to(self, min_side: int) -> str:
        """What `factors` keeps, for a log line."""
        if self.patches:
            return f"to >= {DRAFT_FACTOR}x the patch grid the processor picks"
        if min_side <= 0:
            return "not at all"
        return f"to >= {min_side} px" + (
            f", each axis alone from {ALONE_FACTOR}x that" if self.each_axis else ""
        )

    def draft_request(self, width: int, height: int, min_side: int) -> tuple[int, int] | None:
        """The size to ask a JPEG's draft for (PIL decodes at the largest DCT scale, 1/2, 1/4 or
        1/8, whose sides are all at least that), or None: decoded whole. `min_side` on both
        sides (0: none); for a patch budget, the smallest scaled size whose sides stay at least
        DRAFT_FACTOR times the grid's and for which the processor picks the same grid (libjpeg
        rounds a scaled side up)."""
        if not self.patches:
            return (min_side, min_side) if min_side > 0 else None
        grid = self.patch_grid(width, height)
        if grid is None:
            return None
        for scale in (8, 4, 2):
            size = (-(-width // scale), -(-height // scale))
            wide_enough = size[0] >= DRAFT_FACTOR * grid[1] and size[1] >= DRAFT_FACTOR * grid[0]
            if wide_enough and self.patch_grid(*size) == grid:
                return size
        return None

    def patch_grid(self, width: int, height: int) -> tuple[int, int] | None:
        """The (height, width) a patch-budget processor resizes this image to (None without
        a patch budget, or where transformers has no such rule)."""
        return patch_grid(width, height, *self.patches) if self.patches else None

    def patch_factors(self, width: int, height: int) -> tuple[int, int]:
        """Each axis reduced to no less than DRAFT_FACTOR times the side of the grid the
        processor picks, or both by the smaller factor, whichever leaves it picking the same grid
        for the reduced image (shrink's sides: floored); else none."""
        grid = self.patch_grid(width, height)
        if grid is None:
            return 1, 1
        across = max(1, width // (DRAFT_FACTOR * grid[1]))
        down = max(1, height // (DRAFT_FACTOR * grid[0]))
        for a, d in ((across, down), (min(across, down),) * 2):
            if (a, d) == (1, 1) or self.patch_grid(width // a, height // d) == grid:
                return a, d
        return 1, 1

    def resized(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize (the image's own where the rule does not grow).
        For a patch budget, the image once reduced (`patch_factors`) with each side stretched
        to the grid's where that is longer: a bound on what the resize's passes hold."""
        grid = self.patch_grid(width, height) if width and height else None
        if grid is not None:
            across, down = self.patch_factors(width, height)
            return max(width // across, grid[1]), max(height // down, grid[0])
        if not self.short_side or not width or not height:
            return width, height
        short, long = sorted((width, height))
        new_long = int(self.short_side * long / short)
        if width <= height:
            return self.short_side, new_long
        return new_long, self.short_side

    def check(self, width: int, height: int, max_pixels: int) -> None:
        """An `InvalidImage` when the resized image would be over `max_pixels` (never for a
        rule that does not grow: the image's own pixels are checked from its header)."""
        if not self.short_side and not self.patches:
            return
        new_width, new_height = self.resized(width, height)
        if new_width * new_height > max_pixels:
            how = f"short side to {self.short_side}" if self.short_side else "to a grid of patches"
            raise InvalidImage(
                f"image of {width}x{height}: its aspect ratio would be resized to "
                f"{new_width}x{new_height} = {new_width * new_height} pixels by the model's "
                f"processor ({how}), over the limit of {max_pixels} pixels (IEI_MAX_IMAGE_PIXELS)"
            )


@functools.lru_cache(maxsize=4096)
def patch_grid(
    width: int, height: int, patch_size: int, max_patches: int
) -> tuple[int, int] | None:
    """(height, width) that SigLIP2's NaFlex processor resizes an image of this size to, by
    transformers' own rule (a binary search: cached, an image asks a few times); None where the
    installed transformers has none."""
    try:
        from transformers.models.siglip2.image_processing_siglip2 import (
            get_image_size_for_max_num_patches,
        )
    except ImportError:
        return None
    return tuple(get_image_size_for_max_num_patches(height, width, patch_size, max_patches))


NO_RESIZE_RULE = ResizeRule(0)


# Budgeted pixels a decoder holds per pixel of an image, where that is over one (a budgeted pixel
# is about 8 bytes: the decoded image at up to 4 bytes a pixel and its shrunk copy). Pillow
# decodes every WebP, still or animated, through libwebp's animation decoder: its canvas, the
# frame it hands over and the image are 4 bytes a pixel each (16-17.3 bytes a pixel measured with
# the shrunk copy, against 4 for PNG, TIFF and BMP): counted once, 100 MP of WebPs took the
# budget's 0.8 GB twice over.
DECODE_WEIGHT = {"WEBP": 2.5}


class PixelBudget:
    """Pixels of full-size decoded images that an instance's decode threads hold at once. An
    image waits for its share before it is decoded and gives it back once it is shrunk, so the
    peak memory of decoding is bounded by the budget, not by what a request carries."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held = 0
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        pixels = min(pixels, self.capacity)  # an image over the whole budget runs alone
        with self._changed:
            self._changed.wait_for(lambda: self.held + pixels <= self.capacity)
            self.held += pixels
        try:
            yield
        finally:
            with self._changed:
                self.held -= pixels
                self._changed.notify_all()


# EXIF orientation -> the transposition that makes the image upright (as ImageOps.exif_transpose)
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def progressive_scans(data: bytes) -> int:
    """The scans of a progressive JPEG's first frame (counted up to MAX_JPEG_SCANS + 1), 0 for
    any other file (a baseline JPEG's components allow at most 4). An `InvalidImage` for a frame
    of over MAX_JPEG_SEGMENTS segments (see `jpeg_frame`)."""
    return jpeg_frame(data)[2]


def jpeg_frame(data: bytes) -> tuple[int, int, int]:
    """A JPEG's first frame as its markers say, without decoding: (width, height, scans), the
    scans counted as `progressive_scans` counts them; (0, 0, 0) for any other file. Markers are
    found as libjpeg finds them: junk before one is skipped, and so is a segment's payload (by
    its length) and a scan's coded data (at C speed: there a 0xFF is followed by 0x00 or a
    restart marker), up to the end of the image (an MPO's next frame or a trailer are not its
    scans). An `InvalidImage` for a frame of over MAX_JPEG_SEGMENTS segments."""
    if not data.startswith(b"\xff\xd8"):
        return 0, 0, 0
    at, scans, segments, progressive = 2, 0, 0, False
    width = height = 0
    while scans <= MAX_JPEG_SCANS and (found := _JPEG_MARKER.search(data, at)):
        marker, at = found[1][0], found.end()
        if marker == 0xD9:  # the end of the image
            break
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise InvalidImage(f"JPEG of over {MAX_JPEG_SEGMENTS} segments")
        if marker == 0xFF:  # a fill byte: the marker is the next one
            at -= 1
            continue
        if marker in (0x01, 0xD8):  # markers without a length
            continue
        if marker in _FRAMES and not width and not height:
            # length (2), precision (1), height (2), width (2)
            height = int.from_bytes(data[at + 3 : at + 5], "big")
            width = int.from_bytes(data[at + 5 : at + 7], "big")
        at += int.from_bytes(data[at : at + 2], "big")
        if marker == 0xDA:
            if not progressive:
                return width, height, 0
            scans += 1
        progressive = progressive or marker in _PROGRESSIVE_FRAMES
    return width, height, scans


def png_chunks(data: bytes) -> tuple[int, int]:
    """A PNG's chunks besides its image data and its image data chunks, counted up to
    MAX_PNG_CHUNKS + 1 and MAX_PNG_DATA_CHUNKS + 1 (by their lengths, unread); (0, 0) for any
    other file."""
    if not data.startswith(PNG_SIGNATURE):
        return 0, 0
    at, other, image_data = 8, 0, 0
    while at + 8 <= len(data) and other <= MAX_PNG_CHUNKS and image_data <= MAX_PNG_DATA_CHUNKS:
        kind = data[at + 4 : at + 8]
        if kind == b"IEND":
            break
        if kind in _PNG_DATA:
            image_data += 1
        else:
            other += 1
        at += 12 + int.from_bytes(data[at : at + 4], "big")
    return other, image_data


def tile_pixels(image: Image.Image) -> tuple[int, int]:
    """(width, height) of a tiled TIFF's tiles; (0, 0) for any other image. libtiff decodes a
    whole tile at a time, whatever the image's size: a 16x16 image of 16384x16384 tiles, a
    783 KB file, took 805 MiB, and the image's own pixels count nothing of it."""
    tags = getattr(image, "tag_v2", None) if image.format == "TIFF" else None
    if tags is None:
        return 0, 0
    return int(tags.get(322) or 0), int(tags.get(323) or 0)  # TileWidth, TileLength


def decode_image(
    data: bytes,
    max_pixels: int,
    min_side: int = 0,
    budget: PixelBudget | None = None,
    *,
    jpeg_draft: bool = True,
    resize_rule: ResizeRule = NO_RESIZE_RULE,
) -> Image.Image:
    """Encoded file -> upright RGB image (first frame), shrunk right after decoding to no less
    than `min_side` on both sides (a patch budget's `resize_rule`: twice its grid, whatever
    `min_side`). Any failure is an `InvalidImage`.

    A JPEG decodes at a reduced DCT scale (1/2, 1/4, 1/8) whose sides both stay >= `min_side`
    (`resize_rule.draft_request`; unless not `jpeg_draft`); any other image (and a JPEG still
    more than twice that) is box-reduced by integer factors at once, as `resize_rule.factors`
    says (each axis by its own where the processor resizes each to a fixed length or to a grid
    of patches). The full-size decode holds `budget` until it is shrunk. An image that
    `resize_rule` would resize to over `max_pixels` is refused.
    """
    if not data:
        raise InvalidImage("empty image file")
    if progressive_scans(data) > MAX_JPEG_SCANS:  # before PIL reads anything
        raise InvalidImage(
            f"progressive JPEG of over {MAX_JPEG_SCANS} scans, the limit (each one a pass over "
            "the whole image)"
        )
    if data.startswith(PNG_SIGNATURE) and data.count(b"iCCP") > PNG_ICC_CHUNKS:
        raise InvalidImage(
            f"PNG of over {PNG_ICC_CHUNKS} ICC profile chunks (a valid one has at most one; each "
            "is inflated as it is read)"
        )
    other_chunks, data_chunks = png_chunks(data)
    if other_chunks > MAX_PNG_CHUNKS:
        raise InvalidImage(f"PNG of over {MAX_PNG_CHUNKS} chunks besides its image data")
    if data_chunks > MAX_PNG_DATA_CHUNKS:
        raise InvalidImage(f"PNG of over {MAX_PNG_DATA_CHUNKS} image data chunks")
    allow_pixels(max_pixels)
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            pixels = image.width * image.height
            if pixels > max_pixels:
                raise InvalidImage(
                    f"image of {image.width}x{image.height} = {pixels} pixels is over the limit "
                    f"of {max_pixels} pixels"
                )
            if pixels == 0:
                raise InvalidImage("image has no pixels")
            tile_width, tile_height = tile_pixels(image)
            tile = tile_width * tile_height
            if tile > max_pixels:
                raise InvalidImage(
                    f"TIFF of {tile_width}x{tile_height} = {tile} pixel tiles: over the limit of "
                    f"{max_pixels} pixels (a tile is decoded whole)"
                )
            resize_rule.check(image.width, image.height, max_pixels)  # before any decoding
            image.seek(0)  # first frame of animated GIF/WebP and multi-page TIFF
            if jpeg_draft and image.format in ("JPEG", "MPO"):
                request = resize_rule.draft_request(image.width, image.height, min_side)
                if request:  # PIL picks the largest scale 1/2^k with both sides still >= it
                    image.draft(image.mode, request)
            held = math.ceil((pixels + tile) * DECODE_WEIGHT.get(image.format or "", 1))
            # A budgeted pixel a row and a column: PIL keeps a pointer per row (8 bytes; 1 x
            # 20,000,000: 12.7 bytes a pixel) and a decoder two rows (20,000,000 x 1: 12).
            held += image.height + image.width
            with budget.hold(held) if budget else nullcontext():
                image.load()
                # Read once loaded (Pillow turns a TIFF upright as it loads it, and says so
                # there), and before the shrunk copy, which carries no EXIF.
                orientation = image.getexif().get(0x0112, 1)
                small = shrink(image, *resize_rule.factors(image.width, image.height, min_side))
            # Again on what is resized: shrinking rounds its sides.
            resize_rule.check(small.width, small.height, max_pixels)
            if orientation in UPRIGHT:
                small = small.transpose(UPRIGHT[orientation])
            return small
    except InvalidImage:
        raise
    except Image.DecompressionBombError as exc:  # PIL's own cap, read before ours (its figure)
        raise InvalidImage(f"image is over the limit of {max_pixels} pixels") from exc
    except Image.UnidentifiedImageError as exc:  # its text names a BytesIO's address
        raise InvalidImage("cannot decode image: not a format the server reads") from exc
    except Exception as exc:  # PIL raises many types on hostile input; none may escape
        raise InvalidImage(f"cannot decode image: {type(exc).__name__}: {exc}") from exc


# Pixels of a mode other than RGB or grey converted at a time: the RGB copy (and a composite's
# temporaries) of one strip, not of the whole full-size image.
STRIP_PIXELS = 1 << 18


def shrink(image: Image.Image, across: int = 1, down: int = 1) -> Image.Image:
    """A decoded image -> 8-bit RGB, box-reduced by `across` x `down` (ResizeRule.factors).

    The boxes are whole: the pixels a factor leaves over (fewer than it) are cut off, half on
    each edge. A last box of those few pixels would stand for a whole one and stretch the image
    by up to a reduced pixel (a 4000x3001 PNG reduced by 6 came out of ViT's processor at a
    cosine of 0.9982 to the full image's, cut 0.9999).

    RGB and grey are reduced before the conversion (less to convert). Other modes (RGBA, LA, P
    or a colour key, I;16, CMYK ...) are converted first, so that transparency is composited over
    white and high bit depths are scaled before any averaging, but a strip of rows at a time: a
    full-size RGBA image composited at once took four more full-size copies (+244 MiB for 16 MP),
    over the decode budget's bound."""
    width, height = image.width // across, image.height // down  # the reduced image's size
    left, top = image.width % across // 2, image.height % down // 2
    box = (left, top, left + width * across, top + height * down)
    if image.mode in ("RGB", "L") and not has_transparency(image):
        return to_rgb(image.reduce((across, down), box) if (across, down) != (1, 1) else image)
    # Blocks of whole boxes: reducing them one by one is reducing the whole image. Strips of
    # rows (a row's pointer counted as two pixels: a 1-pixel-wide strip is mostly pointers), cut
    # across too where one row of boxes is over STRIP_PIXELS (a 20,000,000 x 1 RGBA strip was
    # converted whole: 23 bytes a pixel).
    rows = down * max(1, STRIP_PIXELS // ((image.width + 2) * down))
    columns = across * max(1, STRIP_PIXELS // (rows * across))
    small = Image.new("RGB", (width, height))
    for y in range(top, box[3], rows):
        for x in range(left, box[2], columns):
            block = image.crop((x, y, min(x + columns, box[2]), min(y + rows, box[3])))
            small.paste(
                to_rgb(block).reduce((across, down)), ((x - left) // across, (y - top) // down)
            )
    return small


def has_transparency(image: Image.Image) -> bool:
    """A palette or a colour key (PNG's tRNS chunk for P, L and RGB images) marks transparent
    pixels: as transformers' convert_to_rgb, they are composited over white."""
    return image.mode in ("P", "L", "RGB") and image.info.get("transparency") is not None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparent areas become white, high bit depths are scaled."""
    if image.mode == "RGB" and not has_transparency(image):
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit samples (PIL opens 16-bit grey PNG/TIFF as I;16 or I): keep the top 8 bits.
        # PIL's own convert() would clip everything above 255 to white. In the samples' own
        # width: no 8-byte copy of a large image.
        values = np.asarray(image)
        if values.dtype != np.uint16:  # mode I: 32-bit samples, only 16 of them meaningful
            values = np.clip(values, 0, 0xFFFF)
        grey = (values >> 8).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "F":
        grey = np.clip(np.asarray(image, dtype=np.float32), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if has_transparency(image):  # P, and L or RGB with a PNG tRNS colour key
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV
