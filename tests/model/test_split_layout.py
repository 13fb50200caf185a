"""The split layout's stages and the tensor JPEG decoder, in process: the same vectors as the single
layout, JPEGs decoded as tensors (torchvision on the CPU stands in for the GPU's decoders: the same
code after the decode) within cosine 0.999 of PIL's path, EXIF honoured, bad files per image."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from fake_pb_utils import load_model_module
from PIL import Image
from reference import cosine_rows
from sample_images import encode, photos

load_model_module()  # the stand-in for Triton's utils, and iei_runtime on sys.path

from iei_runtime import jpeg_decoders as decoders  # noqa: E402
from iei_runtime import loading, stages  # noqa: E402
from iei_runtime.images import UPRIGHT, InvalidImage, decode_image  # noqa: E402
from iei_runtime.settings import read_settings  # noqa: E402

CPU = torch.device("cpu")


def settings(model_dir, **environ: str):
    return read_settings(
        {},
        {
            "IMAGE_EMBEDDING_MODEL": str(model_dir),
            "IEI_DTYPE": "float32",
            "IEI_ENGINE": "torch",
            **environ,
        },
    )


def with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


def corner_image() -> Image.Image:
    """A small picture whose every orientation looks different (a bright corner, a bar)."""
    pixels = np.zeros((48, 80, 3), dtype=np.uint8)
    pixels[:12, :20] = (250, 30, 30)
    pixels[30:, :, 1] = 200
    return Image.fromarray(pixels)


# --- the tensor decoder ----------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_tensor_decoding_turns_each_exif_orientation_upright_as_pil_does(orientation):
    data = with_orientation(corner_image(), orientation)
    header = decoders.batchable_jpeg(data, 10**8)
    assert header is not None and header.orientation == orientation
    [tensor] = decoders.TorchvisionDecoder(CPU).decode([data], [header])
    expected = np.asarray(decode_image(data, 10**8))  # PIL's upright RGB
    assert tuple(tensor.shape) == (3, *expected.shape[:2])
    difference = np.abs(tensor.permute(1, 2, 0).numpy().astype(int) - expected.astype(int))
    assert difference.mean() < 2  # the same libjpeg output, up to rounding


def test_the_tensor_orientation_table_covers_pil_s():
    assert set(decoders.UPRIGHT) == {1, *UPRIGHT}


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("png", lambda img: encode(img, "PNG")),
        ("truncated jpeg", lambda img: encode(img, "JPEG")[:-200]),
        ("cmyk jpeg", lambda img: encode(img.convert("CMYK"), "JPEG")),
        ("over the pixel limit", lambda img: encode(img.resize((200, 200)), "JPEG")),
        ("not an image", lambda img: b"\xff\xd8 hello \xff\xd9"),
    ],
)
def test_only_plain_complete_jpegs_within_the_limit_go_to_the_tensor_decoder(name, make):
    assert decoders.batchable_jpeg(make(corner_image()), max_pixels=10_000) is None
    assert decoders.batchable_jpeg(encode(corner_image(), "JPEG"), max_pixels=10_000) is not None


def test_a_file_the_tensor_decoder_refuses_is_none_and_the_others_still_decode():
    good = encode(corner_image(), "JPEG")
    broken = good[:300] + bytes(len(good) - 302) + b"\xff\xd9"  # header intact, data zeroed
    headers = [decoders.JpegHeader(80, 48, 1)] * 3
    images = decoders.TorchvisionDecoder(CPU).decode([good, broken, good], headers)
    assert images[0] is not None and images[2] is not None
    assert tuple(images[0].shape) == (3, 48, 80)


def test_choosing_a_jpeg_decoder():
    assert decoders.choose_jpeg_decoder("pil", CPU) is None
    assert decoders.choose_jpeg_decoder("auto", CPU) is None  # PIL's draft decode on a CPU
    assert isinstance(decoders.choose_jpeg_decoder("torchvision", CPU), decoders.TorchvisionDecoder)
    with pytest.raises(ValueError, match="IEI_JPEG_DECODER=nvimagecodec"):
        decoders.choose_jpeg_decoder("nvimagecodec", CPU)
    with pytest.raises(ValueError, match="IEI_JPEG_DECODER"):
        read_settings({}, {"IEI_JPEG_DECODER": "libjpeg"})


def test_budget_groups_keep_each_decode_within_the_pixel_budget():
    headers = [decoders.JpegHeader(100, 100, 1)] * 5 + [decoders.JpegHeader(1000, 1000, 1)]
    groups = stages.budget_groups(range(6), headers, capacity=25_000)
    assert groups == [[0, 1], [2, 3], [4], [5]]  # an image over the budget goes alone


# --- the two stages against the single layout ------------------------------------------------


@pytest.fixture(scope="module")
def vit(model_dirs):
    return model_dirs["vit"]


@pytest.fixture(scope="module")
def single(vit):
    embedder = loading.load_embedder(settings(vit), CPU, threads=2)
    yield embedder
    embedder.close()


def split_embed(model_dir, files: list[bytes], decoder: str) -> list:
    preprocess = loading.load_preprocess_stage(settings(model_dir, IEI_JPEG_DECODER=decoder), 2)
    encode_stage = loading.load_encode_stage(
        settings(model_dir, IEI_JPEG_DECODER=decoder), CPU, threads=2
    )
    try:
        results = preprocess.run(files)
        bad = {i: r for i, r in enumerate(results) if isinstance(r, InvalidImage)}
        outputs = preprocess.outputs([r for r in results if not isinstance(r, InvalidImage)])
        pixels, jpegs, headers = outputs
        assert pixels.dtype == np.uint8
        deferred = jpegs[:, 0] != b""
        # A file that crosses carries its header (read once, here); the others carry zeros.
        assert (headers[deferred, :2] > 0).all() and not headers[~deferred].any()
        vectors = iter(encode_stage.embed(pixels, [bytes(j) for j in jpegs[:, 0]], headers))
        return [bad[i] if i in bad else next(vectors) for i in range(len(files))]
    finally:
        preprocess.preprocessor.close()
        encode_stage.embedder.close()


def test_the_split_stages_give_the_single_layout_s_vectors(vit, single):
    files = list(photos().values())
    expected = np.stack(single.embed(files))
    vectors = np.stack(split_embed(vit, files, "pil"))
    assert cosine_rows(vectors, expected).min() >= 0.99999


def test_jpegs_decoded_as_tensors_stay_within_0_999_of_the_pil_path(vit, single):
    upright = corner_image().resize((640, 384))
    files = [
        *photos().values(),
        encode(Image.open(io.BytesIO(photos()["chelsea.jpg"])).resize((3000, 2000)), "JPEG"),
        *(with_orientation(upright, o) for o in (3, 6, 8)),
        encode(corner_image(), "PNG"),  # PIL's, in the same batch
    ]
    expected = np.stack(single.embed(files))
    vectors = np.stack(split_embed(vit, files, "torchvision"))
    assert cosine_rows(vectors, expected).min() >= 0.999


def test_a_bad_image_fails_alone_in_the_preprocessing_stage(vit):
    good = photos()["chelsea.jpg"]
    results = split_embed(vit, [good, b"not an image", good], "torchvision")
    assert isinstance(results[1], InvalidImage) and "cannot decode" in str(results[1])
    assert isinstance(results[0], np.ndarray) and isinstance(results[2], np.ndarray)


class Refusing:
    """A tensor decoder that refuses every file (as nvImageCodec returns None for one)."""

    name = "refusing"

    def decode(self, files, headers):
        return [None] * len(files)


def test_files_the_tensor_decoder_refuses_go_through_pil_and_fail_alone(vit, single):
    stage = loading.load_encode_stage(settings(vit, IEI_JPEG_DECODER="torchvision"), CPU, 2)
    stage.decoder = Refusing()
    good = photos()["chelsea.jpg"]
    try:
        headers = np.array([[451, 300, 1]] * 3, dtype=np.int32)
        files = [good, b"\xff\xd8 no", good]
        results = stage.embed(np.zeros((3, 3, 224, 224), np.uint8), files, headers)
    finally:
        stage.embedder.close()
    assert isinstance(results[1], InvalidImage) and "cannot decode" in str(results[1])
    expected = np.stack(single.embed([good, good]))
    assert cosine_rows(np.stack([results[0], results[2]]), expected).min() >= 0.99999


def test_a_model_whose_input_is_more_than_pixels_is_refused_in_the_split_layout(model_dirs):
    with pytest.raises(loading.ModelLoadError, match=r"IEI_TRITON_LAYOUT=split.*pixel_values"):
        loading.load_preprocess_stage(settings(model_dirs["siglip2_naflex"]), 1)


def test_a_gpu_decoder_on_a_cpu_instance_stops_start_up_with_one_line(vit):
    message = "IEI_JPEG_DECODER=nvimagecodec decodes on a GPU"
    with pytest.raises(loading.ModelLoadError, match=message):
        loading.load_encode_stage(settings(vit, IEI_JPEG_DECODER="nvimagecodec"), CPU, threads=1)
