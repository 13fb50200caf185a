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
