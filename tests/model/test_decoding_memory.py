"""Bounded decoding: each image shrinks right after it is decoded, full-size decodes share a
pixel budget, decode threads stay single-threaded for torch, and cores are counted as the
process may use them."""

from __future__ import annotations

import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_pb_utils import REPOSITORY, install
from PIL import Image
from sample_images import (
    PHOTOS_DIR,
    encode,
    png_chunk,
    png_in_data_chunks,
    png_with_chunks,
    tiled_tiff,
)

install()
from iei_runtime import images, resources  # noqa: E402
from iei_runtime.embedder import Embedder  # noqa: E402


def big(fmt: str, size: tuple[int, int], mode: str = "RGB", **options: object) -> bytes:
    cat = (
        Image.open(PHOTOS_DIR / "chelsea.jpg").convert("RGB").resize(size, Image.Resampling.BICUBIC)
    )
    return encode(cat.convert(mode), fmt, **options)


@pytest.mark.parametrize(
    ("fmt", "mode"), [("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "L"), ("WEBP", "RGB"),
                      ("TIFF", "RGB"), ("PNG", "P")],
)  # fmt: skip
def test_every_format_shrinks_right_after_decoding_never_below_the_minimum(fmt, mode):
    image = images.decode_image(big(fmt, (3000, 2000), mode), 50_000_000, min_side=448)
    assert image.mode == "RGB"
    assert image.size == (3000 // 4, 2000 // 4)  # the largest factor keeping both sides >= 448
    assert images.decode_image(big(fmt, (800, 600), mode), 50_000_000, 448).size == (800, 600)


def test_a_shrunk_image_gives_the_processor_what_a_full_decode_gives(model_dirs):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(model_dirs["vit"])
    data = big("PNG", (3000, 2000))
    full = processor(images=[images.decode_image(data, 50_000_000)], return_tensors="pt")
    side = images.draft_side(processor)
    shrunk = processor(images=[images.decode_image(data, 50_000_000, side)], return_tensors="pt")
    a, b = (x["pixel_values"].flatten().double() for x in (full, shrunk))
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.9999


def test_orientation_survives_the_shrink_whatever_the_format():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    for fmt in ("TIFF", "PNG", "WEBP"):
        image = images.decode_image(big(fmt, (3000, 2000), exif=exif), 50_000_000, 448)
        assert image.size == (500, 750), fmt


def test_a_pixel_budget_bounds_what_is_decoded_at_once():
    budget = images.PixelBudget(100)
    held, peak, lock = [0], [0], threading.Lock()

    def hold(pixels: int) -> None:
        with budget.hold(pixels):
            with lock:
                held[0] += min(pixels, 100)
                peak[0] = max(peak[0], held[0])
            time.sleep(0.02)
            with lock:
                held[0] -= min(pixels, 100)

    threads = [threading.Thread(target=hold, args=(p,)) for p in [60, 60, 40, 30, 500, 10] * 3]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert peak[0] <= 100  # never more than the budget (an image over it ran alone)
    assert budget.held == 0


def thread_count() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Threads")).split()[1])


def test_decode_threads_do_not_start_a_torch_thread_team_each(model_dirs):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(model_dirs["vit"])
    torch.set_num_threads(4)
    before = thread_count()
    embedder = Embedder(
        torch.nn.Identity(), processor, device=torch.device("cpu"), dtype=torch.float32,
        max_image_pixels=50_000_000, forward_batch_size=8, decode_threads=4, draft_side=448,
    )  # fmt: skip
    try:
        assert torch.get_num_threads() == 4  # the forward pass keeps its threads
        files = [big("PNG", (1200, 900)) for _ in range(8)]
        embedder.prepare(files)
        torch.ones(256, 256) @ torch.ones(256, 256)  # the forward pass's own team
        # 4 decode threads and one team of 4 for the forward pass; each decode thread running
        # a team of its own would add 4 x 3 more.
        assert thread_count() - before <= 4 + 4
    finally:
        embedder.close()


def write(folder: Path, name: str, text: str) -> None:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_cores_are_counted_from_affinity_and_the_cgroup_quota(tmp_path, files, quota):
    for name, text in files.items():
        write(tmp_path, name, text)
    assert resources.cgroup_cpu_quota(tmp_path) == quota
    cores = resources.available_cores(tmp_path)
    affinity = len(__import__("os").sched_getaffinity(0))
    assert cores == (min(affinity, int(np.ceil(quota))) if quota else affinity)


def test_the_budget_must_hold_the_largest_image():
    from iei_runtime.settings import read_settings

    with pytest.raises(ValueError, match="IEI_DECODE_PIXEL_BUDGET=10 is less than"):
        read_settings({}, {"IEI_DECODE_PIXEL_BUDGET": "10", "IEI_MAX_IMAGE_PIXELS": "20"})


def test_no_pixel_array_of_an_image_is_widened_to_eight_bytes():
    """A 16-bit grey image converts in its own width (an int64 copy was 8 bytes a pixel)."""
    grey16 = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    image = images.decode_image(encode(Image.fromarray(grey16), "PNG"), 50_000_000)
    assert np.array_equal(np.asarray(image)[:, :, 0], (grey16 >> 8).astype(np.uint8))


# Decodes one file in a fresh process and prints how far its peak resident size grew (MiB): the
# peak is reset just before (clear_refs 5), so imports and reading the file do not count.
PEAK = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from iei_runtime.images import decode_image
def kib(field):
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith(field)).split()[1])
data = Path(sys.argv[2]).read_bytes()
Path("/proc/self/clear_refs").write_text("5")
before = kib("VmRSS:")
image = decode_image(data, 50_000_000, 448)
assert image.mode == "RGB" and image.size == (500, 500), (image.mode, image.size)
print((kib("VmHWM:") - before) / 1024)
"""


def gradient(side: int) -> Image.Image:
    """A smooth RGBA picture (fast to encode at 16 MP), half transparent at the top."""
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    red = ((ramp[None, :] + ramp[:, None]) / 2).astype(np.uint8)
    alpha = np.broadcast_to(ramp[:, None].astype(np.uint8), red.shape)
    return Image.fromarray(np.stack([red, 255 - red, np.full_like(red, 90), alpha], axis=-1))


def paletted_with_transparency(picture: Image.Image) -> Image.Image:
    paletted = picture.convert("RGB").quantize(64)
    paletted.info["transparency"] = 0
    return paletted


@pytest.mark.parametrize(
    ("fmt", "make"),
    [
        ("PNG", lambda picture: picture.convert("RGB")),  # the yardstick
        ("PNG", lambda picture: picture),  # RGBA
        ("PNG", lambda picture: picture.convert("LA")),
        ("PNG", paletted_with_transparency),
        (
            "PNG",
            lambda picture: Image.fromarray(np.asarray(picture)[..., 0].astype(np.uint16) * 257),
        ),
        ("TIFF", lambda picture: picture.convert("CMYK")),
    ],
    ids=["RGB", "RGBA", "LA", "P-transparency", "I;16", "CMYK"],
)
def test_decoding_any_mode_holds_at_most_8_bytes_a_pixel(tmp_path, fmt, make):
    """docs/reliability.md's bound for every mode: a 16 MP RGBA PNG composited over white at
    full size grew the peak by 308 MiB (19 bytes a pixel), the RGB one by 64 MiB; now 70 MiB."""
    side = 4000
    path = tmp_path / f"image.{fmt.lower()}"
    make(gradient(side)).save(path, fmt)
    done = subprocess.run(
        [sys.executable, "-c", PEAK, str(REPOSITORY), str(path)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    grew_mib = float(done.stdout)
    assert grew_mib * 2**20 <= 8 * side * side, f"{grew_mib:.0f} MiB for {side}x{side}"


# --- files whose cost is not their pixels ---------------------------------------------------


class CountedBudget(images.PixelBudget):
    def __init__(self) -> None:
        super().__init__(1 << 40)
        self.asked: list[int] = []

    def hold(self, pixels: int):  # type: ignore[override]
        self.asked.append(pixels)
        return super().hold(pixels)


def test_a_tiff_whose_tiles_are_over_the_limit_is_refused_before_decoding():
    """A 16x16 image in one 2048x2048 tile: libtiff decodes the whole tile (12 MiB here; a
    16384x16384 tile of a 783 KB file took 805 MiB)."""
    data = tiled_tiff(16, 2048)
    assert len(data) < 16 * 1024
    with pytest.raises(images.InvalidImage, match=r"TIFF of 2048x2048 = 4194304 pixel tiles"):
        images.decode_image(data, 1_000_000, 224)
    budget = CountedBudget()
    decoded = images.decode_image(data, 5_000_000, 224, budget)
    assert decoded.size == (16, 16)
    assert budget.asked == [16 * 16 + 2048 * 2048 + 32]  # the tile is held from the budget too
    budget.asked.clear()
    images.decode_image(tiled_tiff(100, 32), 5_000_000, 224, budget)  # an ordinary tiled file
    assert budget.asked == [100 * 100 + 32 * 32 + 200]


@pytest.mark.parametrize(("fmt", "weight"), [("WEBP", 2.5), ("PNG", 1), ("GIF", 1), ("BMP", 1)])
def test_a_format_s_decoder_holds_the_budget_for_what_it_takes(tmp_path, fmt, weight):
    """Pillow decodes a WebP through libwebp's animation decoder (a canvas, the frame handed
    over, the image: 16 bytes a pixel): it was held from the budget as a PNG (4), so 100 MP of
    WebPs took the budget's 0.8 GB twice over. Held 2.5 times, its peak is within the 8 bytes
    per budgeted pixel that docs/reliability.md gives."""
    side = 2000
    path = tmp_path / f"image.{fmt.lower()}"
    gradient(side).convert("RGB").save(path, fmt)
    budget = CountedBudget()
    images.decode_image(path.read_bytes(), 50_000_000, 448, budget)
    assert budget.asked == [side * side * weight + 2 * side]  # and a pixel a row and a column
    done = subprocess.run(
        [sys.executable, "-c", PEAK, str(REPOSITORY), str(path)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    grew_mib = float(done.stdout)
    assert grew_mib * 2**20 <= 8 * side * side * weight, f"{grew_mib:.0f} MiB for {fmt}"


@pytest.mark.parametrize(
    ("mode", "size"), [("RGB", (1, 4_000_000)), ("RGBA", (1, 4_000_000)),
                       ("RGB", (4_000_000, 1)), ("RGBA", (4_000_000, 1))],
)  # fmt: skip
def test_a_one_pixel_strip_holds_the_budget_for_what_it_takes(tmp_path, mode, size):
    """PIL keeps an 8-byte pointer per row, and a decoder two rows: a 1 x N strip took 12-13
    bytes a pixel, an N x 1 one 10-12 (and an RGBA one, converted whole, 23), held from the
    budget as N pixels. Held now as its pixels plus one a row and one a column (for a processor
    that resizes each axis to a fixed length, which reduces it to 448 at once)."""
    path = tmp_path / "strip.png"
    Image.new(mode, size, (1, 2, 3, 4)[: len(mode)]).save(path)
    budget, rule = CountedBudget(), images.ResizeRule(0, each_axis=True)
    decoded = images.decode_image(path.read_bytes(), 50_000_000, 448, budget, resize_rule=rule)
    assert decoded.size == tuple(448 if side > 1 else 1 for side in size)
    held = size[0] * size[1] + size[0] + size[1]
    assert budget.asked == [held]
    peak = PEAK.replace(
        "from iei_runtime.images import decode_image",
        "from iei_runtime.images import decode_image, ResizeRule",
    )
    peak = peak.replace(
        "decode_image(data, 50_000_000, 448)",
        "decode_image(data, 50_000_000, 448, resize_rule=ResizeRule(0, each_axis=True))",
    )
    peak = peak.replace("(500, 500)", str(decoded.size))
    done = subprocess.run(
        [sys.executable, "-c", peak, str(REPOSITORY), str(path)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert float(done.stdout) * 2**20 <= 8 * held, f"{float(done.stdout):.0f} MiB"


@pytest.mark.parametrize("after", [False, True], ids=["before the image data", "after it"])
def test_a_png_of_thousands_of_chunks_is_refused_before_pil_walks_them(after):
    picture = Image.new("RGB", (8, 8), (10, 20, 30))
    refused = png_with_chunks(picture, images.MAX_PNG_CHUNKS + 1, after=after)
    with pytest.raises(images.InvalidImage, match=r"PNG of over 4096 chunks besides its image"):
        images.decode_image(refused, 1_000_000, 0)
    accepted = png_with_chunks(picture, 100, after=after)
    assert images.decode_image(accepted, 1_000_000, 0).getpixel((0, 0)) == (10, 20, 30)


def test_a_png_of_too_many_image_data_chunks_is_refused():
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (160, 160, 3), np.uint8))
    refused = png_in_data_chunks(noise, 1)  # 77,000 chunks of one byte
    assert refused.count(b"IDAT") > images.MAX_PNG_DATA_CHUNKS
    with pytest.raises(images.InvalidImage, match="PNG of over 65536 image data chunks"):
        images.decode_image(refused, 1_000_000, 0)
    accepted = images.decode_image(png_in_data_chunks(noise, 8192), 1_000_000, 0)
    assert np.array_equal(np.asarray(accepted), np.asarray(noise))


def test_an_image_over_pils_own_cap_is_refused_naming_the_setting():
    """PIL refuses a header of over twice its cap (about 358 MP) before the pixel check: the
    answer named PIL's figure, not IEI_MAX_IMAGE_PIXELS."""
    size = struct.pack(">IIBBBBB", 20_000, 20_000, 8, 2, 0, 0, 0)  # 400 MP, RGB
    header = images.PNG_SIGNATURE + png_chunk(b"IHDR", size) + png_chunk(b"IEND")
    with pytest.raises(images.InvalidImage, match=r"^image is over the limit of 1000000 pixels$"):
        images.decode_image(header, 1_000_000, 0)
