"""The split layout's stages and the tensor JPEG decoder, in process: the same vectors as the single
layout, JPEGs decoded as tensors (torchvision on the CPU stands in for the GPU's decoders: the same
code after the decode) within cosine 0.999 of PIL's path, EXIF honoured, bad files per image."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
import torch
from fake_pb_utils import InferenceRequest, Tensor, load_model_module
from PIL import Image
from reference import cosine_rows
from sample_images import encode, photos, scan_bomb

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
        ("too many scans", lambda img: scan_bomb(101)),  # PIL refuses it
        (
            "too many segments",
            lambda img: b"\xff\xd8" + b"\xff\xfe\x00\x02" * 5000 + encode(img, "JPEG")[2:],
        ),
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
        vectors = iter(encode_stage.embed([pixels], [bytes(j) for j in jpegs[:, 0]], headers))
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
        results = stage.embed([np.zeros((3, 3, 1, 1), np.uint8)], files, headers)
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


# --- the encoder's hot path: what crosses, what is copied, what falls back --------------------


def test_pixels_cross_only_where_the_encoder_reads_them(vit):
    preprocess = loading.load_preprocess_stage(settings(vit, IEI_JPEG_DECODER="torchvision"), 1)
    try:
        jpeg, png = photos()["chelsea.jpg"], encode(corner_image(), "PNG")
        only_jpegs = preprocess.outputs(preprocess.run([jpeg, jpeg]))
        mixed = preprocess.outputs(preprocess.run([jpeg, png]))
        no_jpegs = preprocess.outputs(preprocess.run([png]))
    finally:
        preprocess.preprocessor.close()
    # Every image a file: 3-byte placeholders, not 150 KB of zeros each.
    assert only_jpegs[0].shape == (2, 3, 1, 1)
    assert mixed[0].shape == (2, 3, 224, 224) and list(mixed[1][:, 0] != b"") == [True, False]
    assert no_jpegs[0].shape == (1, 3, 224, 224) and no_jpegs[0].any()


def test_a_row_whose_jpeg_crosses_holds_no_earlier_pixels(vit, monkeypatch):
    """The rows of PIXELS the encoder does not read were left uninitialised: a caller of
    `iei_preprocess` got pixels of other requests there (memory numpy handed out again)."""
    from iei_runtime import stages

    def reused(shape, dtype):  # what np.empty may hand out: a freed buffer's old contents
        return np.full(shape, 0xAB, dtype=dtype)

    monkeypatch.setattr(stages.np, "empty", reused)
    preprocess = loading.load_preprocess_stage(settings(vit, IEI_JPEG_DECODER="torchvision"), 1)
    try:
        jpeg, png = photos()["chelsea.jpg"], encode(corner_image(), "PNG")
        pixels, files, _ = preprocess.outputs(preprocess.run([png, jpeg, png]))
    finally:
        preprocess.preprocessor.close()
    assert [bool(f) for f in files[:, 0]] == [False, True, False]
    assert not pixels[1].any()
    assert pixels[0].any() and np.array_equal(pixels[0], pixels[2])


def test_the_encoder_batches_requests_of_either_shape_and_copies_each_row_once(vit, single):
    jpeg, png = photos()["chelsea.jpg"], encode(corner_image().resize((300, 200)), "PNG")
    requests = [[jpeg, jpeg], [png], [jpeg, png, jpeg]]  # all files, all pixels, mixed
    preprocess = loading.load_preprocess_stage(settings(vit, IEI_JPEG_DECODER="torchvision"), 1)
    stage = loading.load_encode_stage(settings(vit, IEI_JPEG_DECODER="torchvision"), CPU, 2)
    try:
        outputs = [preprocess.outputs(preprocess.run(files)) for files in requests]
        pixels = [o[0] for o in outputs]
        files = [bytes(f) for o in outputs for f in o[1][:, 0]]
        headers = np.concatenate([o[2] for o in outputs])
        vectors = np.stack(stage.embed(pixels, files, headers))
        buffer = stage._staging
        assert buffer is not None and not buffer.is_pinned()  # pinned only for a GPU's upload
        own = [not f for f in files]
        gathered = stage.gather(pixels, own)
        assert gathered.data_ptr() == buffer.data_ptr()  # reused, not reallocated
        assert torch.equal(gathered[0], torch.from_numpy(pixels[1][0]))
        assert torch.equal(gathered[1], torch.from_numpy(pixels[2][1]))
    finally:
        preprocess.preprocessor.close()
        stage.embedder.close()
    expected = np.stack(single.embed([f for r in requests for f in r]))
    assert cosine_rows(vectors, expected).min() >= 0.999


def test_every_fallback_to_pil_is_counted_by_reason(vit):
    import fake_pb_utils
    from iei_runtime.triton import FALLBACK_METRIC, FallbackCounter

    fake_pb_utils.MetricFamily.families.clear()
    environ = settings(vit, IEI_JPEG_DECODER="torchvision")
    preprocess = loading.load_preprocess_stage(environ, 1, FallbackCounter("iei_preprocess"))
    stage = loading.load_encode_stage(environ, CPU, 2, FallbackCounter("iei_encoder"))
    stage.decoder = Refusing()
    good = photos()["chelsea.jpg"]
    try:
        cmyk = encode(corner_image().convert("CMYK"), "JPEG")
        preprocess.run([good, encode(corner_image(), "PNG"), cmyk, encode(corner_image(), "GIF")])
        stage.embed([np.zeros((2, 3, 1, 1), np.uint8)], [good, good], np.array([[451, 300, 1]] * 2))
    finally:
        preprocess.preprocessor.close()
        stage.embedder.close()
    metrics = fake_pb_utils.MetricFamily
    assert {f.kind for f in metrics.families} == {metrics.COUNTER}
    assert metrics.total(FALLBACK_METRIC, model="iei_preprocess", reason="other_format") == 2
    assert metrics.total(FALLBACK_METRIC, model="iei_preprocess", reason="unsupported_jpeg") == 1
    assert metrics.total(FALLBACK_METRIC, model="iei_encoder", reason="decoder_refused") == 2
    # Every series exists from 0, so that a rate can be taken.
    assert metrics.total(FALLBACK_METRIC, model="iei_encoder", reason="other_format") == 0
    assert len(metrics.families[0].metrics) == 3


def test_a_tensor_decoder_that_cannot_decode_is_refused_at_start_in_one_line(vit, monkeypatch):
    def missing_library(self, data):
        raise RuntimeError("libnvjpeg.so.13: cannot open shared object file\nmore")

    monkeypatch.setattr(decoders.TorchvisionDecoder, "_call", missing_library)
    with pytest.raises(loading.ModelLoadError) as refused:
        loading.load_encode_stage(settings(vit, IEI_JPEG_DECODER="torchvision"), CPU, threads=1)
    message = str(refused.value)
    assert "\n" not in message
    assert "IEI_JPEG_DECODER=torchvision: torchvision's warm-up decode failed" in message
    assert "libnvjpeg.so.13: cannot open shared object file" in message


def test_a_decoder_that_returns_nothing_is_refused_too():
    with pytest.raises(ValueError, match="refusing's warm-up decode failed: it refused"):
        decoders.warm_up(Refusing(), "nvimagecodec")


# --- what a client of Triton may send iei_encoder directly ------------------------------------


@pytest.fixture(scope="module")
def encoder_model(vit):
    from fake_pb_utils import REPOSITORY

    module = load_model_module(REPOSITORY / "iei_encoder" / "1" / "model.py")
    parameters = {
        "model_id": str(vit),
        "dtype": "float32",
        "engine": "torch",
        "jpeg_decoder": "torchvision",
        "forward_threads": "1",
    }
    model_config = {
        "parameters": {name: {"string_value": value} for name, value in parameters.items()},
        "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
    }
    instance = module.TritonPythonModel()
    args = {"model_instance_kind": "CPU", "model_instance_device_id": "0"}
    instance.initialize({"model_config": json.dumps(model_config), **args})
    yield instance
    instance.finalize()


def encoder_request(pixels: np.ndarray, files: list[bytes], headers: list) -> InferenceRequest:
    jpegs = np.empty((len(files), 1), dtype=np.object_)
    jpegs[:, 0] = files
    return InferenceRequest(
        [
            Tensor(stages.PIXELS_NAME, pixels),
            Tensor(stages.JPEG_NAME, jpegs),
            Tensor(stages.JPEG_HEADER_NAME, np.array(headers, dtype=np.int32).reshape(-1, 3)),
        ]
    )


def placeholders(count: int) -> np.ndarray:
    return np.zeros((count, 3, 1, 1), np.uint8)


def test_the_encoder_checks_each_header_against_its_file(encoder_model, single):
    jpeg = encode(corner_image(), "JPEG")  # 80x48
    bomb = scan_bomb(2000, side=256)
    requests = [
        encoder_request(placeholders(1), [jpeg], [[80, 48, 1]]),
        encoder_request(placeholders(1), [jpeg], [[80, 48, 9]]),  # no such orientation
        encoder_request(placeholders(1), [jpeg], [[80, 48, 0]]),
        encoder_request(placeholders(1), [jpeg], [[1, 1, 1]]),  # a size the file does not have
        encoder_request(placeholders(1), [bomb], [[256, 256, 1]]),  # 2000 scans
        encoder_request(placeholders(1), [b"\xff\xd8 no"], [[80, 48, 1]]),
    ]
    started = time.monotonic()
    responses = encoder_model.execute(requests)
    assert time.monotonic() - started < 10  # the bomb is refused, not decoded
    assert len(responses) == 6
    expected = single.embed([jpeg])[0]
    for response in responses[:4]:  # a lying header: the file decoded by PIL, as it is
        assert not response.has_error()
        vector = response.output_tensors[0].as_numpy()[0]
        assert cosine_rows(vector[None], expected[None]).min() >= 0.999
    assert responses[4].error.code == "INVALID_ARG"
    assert "progressive JPEG of over 100 scans" in responses[4].error.message()
    assert responses[5].error.message().startswith("IMAGE[0]: cannot decode image")


def test_a_header_over_the_pixel_limit_is_not_trusted(vit):
    stage = loading.load_encode_stage(
        settings(vit, IEI_JPEG_DECODER="torchvision", IEI_MAX_IMAGE_PIXELS="1000"), CPU, 1
    )
    try:
        large = encode(corner_image().resize((400, 300)), "JPEG")
        # A header that claims a small image: the file's own frame says 400x300.
        [refused] = stage.embed([placeholders(1)], [large], np.array([[20, 20, 1]], np.int32))
    finally:
        stage.embedder.close()
    assert isinstance(refused, InvalidImage)
    assert "over the limit of 1000 pixels" in str(refused)


def test_pixels_of_another_shape_fail_only_their_own_request(vit, encoder_model, single):
    png = encode(corner_image().resize((300, 200)), "PNG")
    preprocess = loading.load_preprocess_stage(settings(vit), 1)
    try:
        [pixels] = preprocess.run([png])
    finally:
        preprocess.preprocessor.close()
    good = pixels[None]
    zeros = [[0, 0, 0]]
    requests = [
        encoder_request(good, [b""], zeros),
        encoder_request(np.zeros((1, 3, 100, 100), np.uint8), [b""], zeros),
        encoder_request(placeholders(1), [b""], zeros),  # a placeholder with no file
        encoder_request(np.concatenate([good, good]), [b""], zeros),  # rows != files
        encoder_request(good, [b""], [[0, 0, 0], [0, 0, 0]]),  # headers != files
        encoder_request(good.astype(np.float32), [b""], zeros),
        encoder_request(good, [b""], zeros),
    ]
    responses = encoder_model.execute(requests)
    assert len(responses) == 7
    expected = single.embed([png])[0]
    for response in (responses[0], responses[6]):
        assert not response.has_error()
        assert cosine_rows(response.output_tensors[0].as_numpy(), expected[None]).min() >= 0.999
    for response in responses[1:6]:
        assert response.has_error() and response.error.code == "INVALID_ARG"
    assert "PIXELS of shape (1, 3, 100, 100)" in responses[1].error.message()
    assert "expected uint8 (1, 3, 224, 224)" in responses[1].error.message()
    assert "JPEG_HEADER of shape (2, 3): expected (1, 3)" in responses[4].error.message()
