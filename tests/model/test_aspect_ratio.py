"""Images whose aspect ratio the processor's resize would blow up: a processor that resizes the
short side to a length (DINOv2, CLIP, ConvNeXt) keeps the aspect ratio, so a 1x6000 PNG of 111
bytes became 256 x 1,536,000 pixels before the centre crop (GBs, or a raw allocator error). Such
an image is refused alone, by the same rule on every path (fused, the processor's own call, the
split layout's two steps), before anything is resized; a panorama still embeds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_pb_utils import load_model_module
from PIL import Image
from sample_images import encode

load_model_module()  # the stand-in for Triton's utils, and iei_runtime on sys.path

from iei_runtime import images, loading  # noqa: E402
from iei_runtime.images import InvalidImage, ResizeRule, decode_image  # noqa: E402
from iei_runtime.settings import read_settings  # noqa: E402

CPU = torch.device("cpu")
TESTS = Path(__file__).resolve().parents[1]
REFUSED = r"image of \d+x\d+: its aspect ratio would be resized to \d+x\d+ = \d+ pixels"


def settings(model_dir, **environ: str):
    return read_settings(
        {},
        {
            "IMAGE_EMBEDDING_MODEL": str(model_dir),
            "IEI_DTYPE": "float32",
            "IEI_ENGINE": "torch",
            "IEI_FORWARD_THREADS": "1",
            **environ,
        },
    )


def strip_png() -> bytes:
    return encode(Image.new("RGB", (1, 6000), (10, 200, 30)), "PNG")


def strip_jpeg() -> bytes:
    return encode(Image.new("RGB", (65000, 4), (30, 60, 90)), "JPEG")


def good() -> bytes:
    return encode(Image.new("RGB", (640, 480), (120, 30, 200)), "JPEG")


def panorama() -> bytes:
    return encode(Image.new("RGB", (10000, 1000), (90, 90, 20)), "JPEG")


def assert_refused_alone(results: list, refused: tuple[int, ...] = (0, 2)) -> None:
    for i, result in enumerate(results):
        if i in refused:
            assert isinstance(result, InvalidImage), result
            assert "over the limit of 50000000 pixels (IEI_MAX_IMAGE_PIXELS)" in str(result)
        else:
            assert isinstance(result, np.ndarray) and result.shape == (32,), result


def test_the_rule_follows_the_processor_s_resize(model_dirs):
    from transformers import AutoImageProcessor

    dinov2 = ResizeRule.of(AutoImageProcessor.from_pretrained(model_dirs["dinov2"]))
    assert dinov2.resized(1, 6000) == (256, 1_536_000)
    assert dinov2.resized(65000, 4) == (4_160_000, 256)
    assert dinov2.resized(10000, 1000) == (2560, 256)
    convnext = ResizeRule.of(AutoImageProcessor.from_pretrained(model_dirs["convnext"]))
    assert convnext.short_side == 256  # 224 / crop_pct, then cropped
    vit = ResizeRule.of(AutoImageProcessor.from_pretrained(model_dirs["vit"]))
    assert vit.resized(1, 6000) == (1, 6000)  # 224x224 whatever the image: nothing grows
    vit.check(1, 60000, 100)
    with pytest.raises(InvalidImage, match=REFUSED):
        dinov2.check(1, 6000, 50_000_000)
    dinov2.check(10000, 1000, 50_000_000)


def test_which_processors_resize_each_axis_alone(model_dirs):
    from transformers import AutoImageProcessor

    def rule(family: str, **options: object) -> ResizeRule:
        return ResizeRule.of(AutoImageProcessor.from_pretrained(model_dirs[family]), options)

    for family in ("vit", "deit", "beit", "swin", "siglip", "siglip2"):
        assert rule(family).each_axis, family  # size.height x size.width
    for family in ("clip", "dinov2", "convnext", "siglip2_naflex"):
        assert not rule(family).each_axis, family  # the aspect ratio kept
    warp = rule("convnext", size={"shortest_edge": 384})  # ConvNeXt warps from 384 up
    assert warp.each_axis and warp.short_side == 0
    assert not rule("vit", do_resize=False).each_axis
    # height x width as a bound, the aspect ratio kept within it (DPT, Donut): not each axis
    assert not rule("vit", keep_aspect_ratio=True).each_axis
    assert not rule("vit", do_thumbnail=True).each_axis
    assert rule("siglip2_naflex").patches == (16, 256)  # a grid of at most 256 patches of 16 px
    assert rule("siglip2_naflex", max_num_patches=1024).patches == (16, 1024)
    assert rule("vit").patches is None and rule("siglip2_naflex", do_resize=False).patches is None


def test_refused_from_the_header_before_decoding():
    rule = ResizeRule(224)
    with pytest.raises(InvalidImage, match=r"image of 1x6000: .* resized to 224x1344000"):
        decode_image(strip_png(), 50_000_000, resize_rule=rule)
    assert decode_image(panorama(), 50_000_000, 448, resize_rule=rule).size[1] >= 448


@pytest.mark.parametrize("fused", ["true", "false"])
def test_an_extreme_aspect_ratio_fails_alone_and_a_panorama_embeds(model_dirs, fused):
    embedder = loading.load_embedder(
        settings(model_dirs["dinov2"], IEI_FUSED_PREPROCESS=fused), CPU, threads=2
    )
    try:
        assert (embedder.fused is not None) == (fused == "true")
        results = embedder.embed([strip_png(), good(), strip_jpeg(), panorama()])
    finally:
        embedder.close()
    assert_refused_alone(results)
    assert "1x6000" in str(results[0]) and "65000x4" in str(results[2])


def test_the_split_layout_refuses_them_in_either_step(model_dirs):
    environ = settings(model_dirs["dinov2"], IEI_JPEG_DECODER="torchvision")
    preprocess = loading.load_preprocess_stage(environ, 1)
    stage = loading.load_encode_stage(environ, CPU, 2)
    try:
        # The CPU step: the PNG through PIL, the JPEG from the header it would pass on.
        results = preprocess.run([strip_png(), good(), strip_jpeg()])
        assert_refused_alone([*results[:1], np.zeros(32), *results[2:]])
        assert not isinstance(results[1], InvalidImage)
        # The encoder, sent the JPEG by a client of Triton with its true header.
        files = [strip_jpeg(), good(), strip_jpeg()]
        headers = np.array([[65000, 4, 1], [640, 480, 1], [65000, 4, 1]], np.int32)
        placeholders = np.zeros((3, 3, 1, 1), np.uint8)
        assert_refused_alone(stage.embed([placeholders], files, headers))
    finally:
        preprocess.preprocessor.close()
        stage.embedder.close()


# --- processors that resize each axis to a fixed length: an axis is reduced alone -------------


def striped(width: int, height: int) -> Image.Image:
    """Waves along both axes, each some 6 to 12 times across the image, as in a picture (a flat
    image would come out the same however it was filtered)."""
    x = np.arange(width, dtype=np.float32)[None, :] / width
    y = np.arange(height, dtype=np.float32)[:, None] / height
    red = 127 + 120 * np.sin(40 * x + 60 * y)
    green = 127 + 120 * np.cos(70 * y) * np.cos(35 * x)
    blue = 255 * (x + y) / 2
    return Image.fromarray(np.stack([red, green, blue], axis=-1).clip(0, 255).astype(np.uint8))


@pytest.mark.parametrize("size", [(8, 30000), (30000, 8), (3000, 2000)])
def test_a_fixed_size_processor_s_image_is_reduced_along_each_axis(model_dirs, size):
    """Each side kept >= the draft side on its own: a long strip no longer goes whole to the
    resize, and the processor's output stays that of the full decode."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(model_dirs["vit"])
    rule, side = ResizeRule.of(processor), images.draft_side(processor)
    data = encode(striped(*size), "PNG")
    shrunk = decode_image(data, 50_000_000, side, resize_rule=rule)
    expected = {(8, 30000): (8, 454), (30000, 8): (454, 8), (3000, 2000): (500, 500)}
    assert shrunk.size == expected[size]
    # The box filter's own blur on these waves (the short-side reduction's too): 0.9998 for the
    # strips, 0.99997 for the photo-sized one.
    assert cosine_to_full_decode(processor, data, shrunk) > 0.9995


def test_an_axis_is_reduced_alone_once_its_own_factor_reaches_four():
    """Below that a reduction costs about what it saves the resize: a phone photo drafted to
    1008x756 keeps its size (as with a rule that keeps the aspect ratio)."""
    fixed, keeping = ResizeRule(0, each_axis=True), ResizeRule(224)
    assert fixed.factors(1008, 756, 448) == keeping.factors(1008, 756, 448) == (1, 1)
    assert fixed.factors(2000, 900, 448) == (4, 2)  # the long axis by its own, the short by 2
    assert keeping.factors(2000, 900, 448) == (2, 2)
    assert fixed.factors(3000, 2000, 448) == (6, 4)
    assert fixed.factors(4, 12_000_000, 448) == (1, 26785)
    assert fixed.factors(4, 12_000_000, 0) == (1, 1)  # 0: not reduced at all


def cosine_to_full_decode(processor, data: bytes, shrunk: Image.Image) -> float:
    full = processor(images=[decode_image(data, 50_000_000)], return_tensors="pt")
    small = processor(images=[shrunk], return_tensors="pt")
    a, b = (x["pixel_values"].flatten().double() for x in (full, small))
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


@pytest.mark.parametrize("each_axis", [True, False])
def test_the_pixels_a_factor_leaves_over_are_cut_not_stretched(model_dirs, each_axis):
    """4000x3001 reduced by 6 (or 8 and 6): a last row of one pixel counted as a whole box
    stretched the image (0.9982, 0.9985); cut, half on each edge: 0.9999."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(model_dirs["vit"])
    data = encode(striped(4000, 3001), "PNG")
    shrunk = decode_image(data, 50_000_000, 448, resize_rule=ResizeRule(0, each_axis=each_axis))
    assert shrunk.size == ((500, 500) if each_axis else (666, 500))
    assert cosine_to_full_decode(processor, data, shrunk) > 0.9995


@pytest.mark.parametrize("size", [(8, 30000), (30000, 8), (4000, 3001)])
def test_a_patch_budget_processor_s_image_is_reduced_to_the_same_grid(model_dirs, size):
    """SigLIP2 NaFlex resizes each image to a grid of patches it picks from the image's size:
    reduced along each axis to no less than twice that grid, the image gets the same grid and,
    but for the box filter's blur, the same patches."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(model_dirs["siglip2_naflex"])
    rule = ResizeRule.of(processor)
    data = encode(striped(*size), "PNG")
    full = processor(images=[decode_image(data, 50_000_000)], return_tensors="pt")
    shrunk = decode_image(data, 50_000_000, images.draft_side(processor), resize_rule=rule)
    grid = rule.patch_grid(*size)
    assert grid is not None
    for full_side, small_side, grid_side in zip(size, shrunk.size, grid[::-1], strict=True):
        if full_side >= 4 * grid_side:
            assert 2 * grid_side <= small_side < 4 * grid_side
        else:
            assert small_side == full_side
    small = processor(images=[shrunk], return_tensors="pt")
    assert torch.equal(small["spatial_shapes"], full["spatial_shapes"])
    a, b = (x["pixel_values"].flatten().double() for x in (full, small))
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.9995


@pytest.mark.parametrize(
    ("size", "drafted"), [((4032, 3024), (1008, 756)), ((3000, 4000), (750, 1000)),
                          ((1200, 900), (600, 450)), ((640, 480), (640, 480))],
)  # fmt: skip
def test_a_patch_budget_processor_s_jpeg_decodes_at_a_scale_that_keeps_its_grid(
    model_dirs, size, drafted
):
    """NaFlex's JPEGs were decoded whole (a 12 MP phone photo: 153 ms of decoding and
    preprocessing, 37 ms reduced after decoding, 13 ms drafted); now at the smallest DCT scale
    whose sides stay at least twice the grid's and that keeps the grid."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(model_dirs["siglip2_naflex"])
    rule = ResizeRule.of(processor)
    data = encode(striped(*size), "JPEG")
    assert rule.draft_request(*size, 0) == (None if drafted == size else drafted)
    shrunk = decode_image(data, 50_000_000, images.draft_side(processor), resize_rule=rule)
    assert shrunk.size == drafted
    full = processor(images=[decode_image(data, 50_000_000)], return_tensors="pt")
    small = processor(images=[shrunk], return_tensors="pt")
    assert torch.equal(small["spatial_shapes"], full["spatial_shapes"])
    a, b = (x["pixel_values"].flatten().double() for x in (full, small))
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.9995
    # Off with IEI_JPEG_DRAFT=false: decoded whole, then reduced by box.
    whole = decode_image(data, 50_000_000, 0, jpeg_draft=False, resize_rule=rule)
    assert whole.size == tuple(s // f for s, f in zip(size, rule.factors(*size, 0), strict=True))


def test_the_draft_request_of_each_rule():
    assert ResizeRule(0, each_axis=True).draft_request(4032, 3024, 448) == (448, 448)
    assert ResizeRule(224).draft_request(4032, 3024, 448) == (448, 448)
    assert ResizeRule(224).draft_request(4032, 3024, 0) is None  # 0: not drafted
    assert ResizeRule(0, patches=(16, 256)).draft_request(4032, 3024, 448) == (1008, 756)
    # and the instance's log line says what it keeps
    assert ResizeRule(224).shrinks_to(0) == "not at all"
    assert ResizeRule(224).shrinks_to(448) == "to >= 448 px"
    assert (
        ResizeRule(0, each_axis=True).shrinks_to(448)
        == "to >= 448 px, each axis alone from 4x that"
    )
    assert (
        ResizeRule(0, patches=(16, 256)).shrinks_to(0)
        == "to >= 2x the patch grid the processor picks"
    )


def test_a_patch_budget_processor_s_strip_it_cannot_reduce_is_refused(model_dirs):
    """1 x 50,000,000: transformers' search for the grid is coarse at such a scale (3936 rows,
    not 4096), so no reduced image gets the same grid; the processor's first pass would widen the
    whole strip to 16 x 50,000,000 (4.5 GB and 9 s measured). Refused from its size, as an
    extreme aspect ratio is for CLIP; a strip it can reduce is not."""
    from transformers import AutoImageProcessor

    rule = ResizeRule.of(AutoImageProcessor.from_pretrained(model_dirs["siglip2_naflex"]))
    with pytest.raises(InvalidImage, match=REFUSED + r" by the model's processor \(to a grid"):
        rule.check(1, 50_000_000, 50_000_000)
    rule.check(4, 12_000_000, 50_000_000)
    rule.check(4000, 3000, 50_000_000)
    assert rule.resized(4000, 3000) == (666, 500)


# Embeds one PNG in a fresh process and prints how far its peak resident size grew per pixel
# (the peak reset just before, after a first image has warmed the embedder up).
EMBED_PEAK = """
import io, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from fake_pb_utils import load_model_module
load_model_module()
import torch
from PIL import Image
from iei_runtime import loading
from iei_runtime.settings import read_settings
width, height = int(sys.argv[3]), int(sys.argv[4])
settings = read_settings({}, {"IMAGE_EMBEDDING_MODEL": sys.argv[2], "IEI_DTYPE": "float32",
                              "IEI_ENGINE": "torch", "IEI_FORWARD_THREADS": "1"})
embedder = loading.load_embedder(settings, torch.device("cpu"), threads=1)
png = io.BytesIO()
Image.new("RGB", (width, height), (10, 200, 30)).save(png, "PNG")
embedder.embed([png.getvalue()])
def kib(field):
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith(field)).split()[1])
Path("/proc/self/clear_refs").write_text("5")
before = kib("VmRSS:")
result = embedder.embed([png.getvalue()])[0]
assert result.shape == (32,), result
print((kib("VmHWM:") - before) * 1024 / (width * height))
"""


@pytest.mark.parametrize("family", ["vit", "siglip2_naflex"])
@pytest.mark.parametrize("size", [(4, 2_000_000), (2_000_000, 4)])
def test_a_long_strip_costs_the_model_no_more_than_its_decoding(model_dirs, family, size):
    """docs/reliability.md's 8 bytes a pixel, through the processor too: a 4 x 2,000,000 PNG
    took ViT's resize 1.4 GB (177 bytes a pixel: its first pass widened the strip to 224 x
    2,000,000), SigLIP2 NaFlex's 29 bytes a pixel, the wide one 15 bytes a pixel."""
    model = str(model_dirs[family])
    done = subprocess.run(
        [sys.executable, "-c", EMBED_PEAK, str(TESTS), model, *map(str, size)],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    assert float(done.stdout) <= 8, f"{float(done.stdout):.1f} bytes a pixel for {size}"
