"""Real photos (examples/images) and odd files made from them: every mode and shape we accept."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS_DIR = Path(__file__).resolve().parents[1] / "examples" / "images"


def photos() -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(PHOTOS_DIR.iterdir())
        if p.suffix.lower() in {".jpg", ".png"}
    }


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def odd_images() -> dict[str, bytes]:
    """Files that a careless decoder gets wrong, each named after what makes it odd."""
    coffee = Image.open(PHOTOS_DIR / "coffee.jpg").convert("RGB")  # 600x400, not square
    cat = Image.open(PHOTOS_DIR / "chelsea.jpg").convert("RGB")
    rocket = Image.open(PHOTOS_DIR / "rocket.jpg").convert("RGB")
    astronaut = Image.open(PHOTOS_DIR / "astronaut.jpg").convert("RGB")

    rgba = cat.convert("RGBA")
    alpha = np.zeros((cat.height, cat.width), dtype=np.uint8)
    alpha[:, : cat.width // 2] = 255  # right half fully transparent
    alpha[: cat.height // 3, :] = 96  # a translucent band
    rgba.putalpha(Image.fromarray(alpha))

    grey16 = (np.asarray(coffee.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)

    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: "rotate 90 degrees clockwise to display"

    palette_transparent = cat.quantize(64)
    palette_transparent.info["transparency"] = 0

    frames = [astronaut.resize((160, 160)), cat.resize((160, 160)), rocket.resize((160, 160))]
    animated = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)

    return {
        "grey_L.png": encode(coffee.convert("L"), "PNG"),
        "palette_P.png": encode(cat.quantize(64), "PNG"),
        "palette_transparent.png": encode(palette_transparent, "PNG"),
        "rgba_alpha.png": encode(rgba, "PNG"),
        "grey_alpha_LA.png": encode(rgba.convert("LA"), "PNG"),
        "cmyk.jpg": encode(coffee.convert("CMYK"), "JPEG", quality=95),
        "grey_16bit.png": encode(Image.fromarray(grey16), "PNG"),
        "exif_rotated.jpg": encode(coffee, "JPEG", quality=95, exif=exif),
        "animated.gif": animated,
        "one_pixel.png": encode(Image.new("RGB", (1, 1), (200, 30, 60)), "PNG"),
        "wide_2000x30.jpg": encode(rocket.resize((2000, 30)), "JPEG", quality=95),
        "webp.webp": encode(cat, "WEBP", quality=90),
        "bmp.bmp": encode(rocket.resize((320, 214)), "BMP"),
        "multipage.tiff": encode(
            astronaut.resize((256, 256)), "TIFF", save_all=True, append_images=[cat]
        ),
    }


# Odd files whose careful decoding differs visibly from a naive convert("RGB"): the tests
# check that the service matches the careful reference and that the naive one would fail.
HANDLING_MATTERS = ("rgba_alpha.png", "grey_16bit.png", "exif_rotated.jpg", "grey_alpha_LA.png")


def scan_bomb(scans: int, side: int = 64) -> bytes:
    """A progressive JPEG whose last scan (a refinement pass, a few bytes) is repeated until the
    file has `scans` scans: each one a pass over the whole image when it is decoded."""
    data = encode(Image.new("RGB", (side, side), (90, 100, 110)), "JPEG", progressive=True)
    last = data.rindex(b"\xff\xda")  # PIL's file: no thumbnail, every SOS marker a scan
    extra = scans - data.count(b"\xff\xda")
    return data[:-2] + data[last:-2] * extra + b"\xff\xd9"


def tiled_tiff(side: int, tile: int) -> bytes:
    """A side x side RGB TIFF (black) in deflate-compressed tiles of tile x tile pixels, written
    field by field (PIL writes no tiles): libtiff decodes a whole tile at a time."""
    import struct
    import zlib

    across = -(-side // tile)
    data = zlib.compress(bytes(tile * tile * 3), 9)  # every tile is the same one
    entries = 11
    bits_at = 8 + 2 + entries * 12 + 4
    offsets_at = bits_at + 6
    data_at = offsets_at + 8 * across * across

    def field(tag: int, kind: int, count: int, value: int) -> bytes:
        return struct.pack("<HHII", tag, kind, count, value)

    tiles = across * across
    fields = [
        field(256, 4, 1, side), field(257, 4, 1, side), field(258, 3, 3, bits_at),
        field(259, 3, 1, 8),  # deflate
        field(262, 3, 1, 2), field(277, 3, 1, 3), field(284, 3, 1, 1),  # RGB, 3 samples, chunky
        field(322, 4, 1, tile), field(323, 4, 1, tile),
        field(324, 4, tiles, data_at if tiles == 1 else offsets_at),
        field(325, 4, tiles, len(data) if tiles == 1 else offsets_at + 4 * tiles),
    ]  # fmt: skip
    tables = struct.pack(f"<{tiles}I", *[data_at] * tiles) + struct.pack(
        f"<{tiles}I", *[len(data)] * tiles
    )
    return (
        b"II*\x00" + struct.pack("<IH", 8, entries) + b"".join(fields) + struct.pack("<I", 0)
        + struct.pack("<HHH", 8, 8, 8) + tables + data
    )  # fmt: skip


def png_chunk(kind: bytes, data: bytes = b"") -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_chunks(image: Image.Image, extra: int, *, after: bool = False) -> bytes:
    """`image` as a PNG with `extra` empty private chunks before its image data (or after it)."""
    data = encode(image, "PNG")
    at = data.rindex(b"IEND") - 4 if after else data.index(b"IDAT") - 4
    return data[:at] + png_chunk(b"prVt") * extra + data[at:]


def png_in_data_chunks(image: Image.Image, size: int) -> bytes:
    """`image` as a PNG whose image data is split into chunks of `size` bytes."""
    data = encode(image, "PNG", compress_level=0)
    start = data.index(b"IDAT") - 4
    length = int.from_bytes(data[start : start + 4], "big")
    pixels = data[start + 8 : start + 8 + length]
    chunks = b"".join(png_chunk(b"IDAT", pixels[i : i + size]) for i in range(0, length, size))
    return data[:start] + chunks + data[start + 12 + length :]
