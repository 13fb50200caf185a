"""Images whose aspect ratio the processor's resize would blow up: a processor that resizes the
short side to a length (DINOv2, CLIP, ConvNeXt) keeps the aspect ratio, so a 1x6000 PNG of 111
bytes became 256 x 1,536,000 pixels before the centre crop (GBs, or a raw allocator error). Such
an image is refused alone, by the same rule on every path (fused, the processor's own call, the
split layout's two steps), before anything is resized; a panorama still embeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fake_pb_utils import load_model_module
from PIL import Image
from sample_images import encode

load_model_module()  # the stand-in for Triton's utils, and iei_runtime on sys.path

from iei_runtime import loading  # noqa: E402
from iei_runtime.images import InvalidImage, ResizeRule, decode_image  # noqa: E402
from iei_runtime.settings import read_settings  # noqa: E402

CPU = torch.device("cpu")
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
