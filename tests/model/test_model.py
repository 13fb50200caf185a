"""model.py without Triton: settings, decoding, colour modes, pooling, per-request errors."""

from __future__ import annotations

import io
import json
import struct
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fake_pb_utils import InferenceRequest, Tensor, load_model_module
from PIL import Image, PngImagePlugin
from sample_images import encode, odd_images, photos, scan_bomb

model = load_model_module()  # installs the stand-in for Triton's utils first

from iei_runtime import embedder as embedding  # noqa: E402
from iei_runtime import images, pooling  # noqa: E402
from iei_runtime import settings as model_settings  # noqa: E402

# --- settings --------------------------------------------------------------------------------


def config(**parameters: str) -> dict:
    return {"parameters": {k: {"string_value": v} for k, v in parameters.items()}}


def test_settings_environment_beats_config_beats_defaults():
    settings = model_settings.read_settings(
        config(model_id="from-config", pooling="cls"), {"IMAGE_EMBEDDING_MODEL": "from-env"}
    )
    assert settings.model_id == "from-env"
    assert settings.pooling == "cls"
    assert settings.dtype == "auto"
    assert settings.max_image_pixels == 50_000_000


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"IEI_DTYPE": "float8"}, "IEI_DTYPE"),
        ({"IEI_POOLING": "max"}, "IEI_POOLING"),
        ({"IEI_MAX_IMAGE_PIXELS": "lots"}, "IEI_MAX_IMAGE_PIXELS"),
        ({"IEI_FORWARD_BATCH_SIZE": "0"}, "IEI_FORWARD_BATCH_SIZE"),
        ({"IEI_FORWARD_THREADS": "0"}, "IEI_FORWARD_THREADS"),
        ({"IEI_FORWARD_THREADS": "all"}, "IEI_FORWARD_THREADS"),
    ],
)
def test_bad_settings_are_refused_by_name(environ, message):
    with pytest.raises(ValueError, match=message):
        model_settings.read_settings({}, environ)


def test_forward_threads_are_auto_or_a_count():
    assert model_settings.read_settings({}, {}).forward_threads == 0  # auto: measured at load
    assert model_settings.read_settings({}, {"IEI_FORWARD_THREADS": "Auto"}).forward_threads == 0
    threads = model_settings.read_settings({}, {"IEI_FORWARD_THREADS": "3"}, cores=4)
    assert threads.forward_threads == 3


def test_forward_counts_are_bounded_by_the_batch_and_the_cores():
    """IEI_FORWARD_BATCH_SIZE=20000 was accepted, and the load failed in torch's allocator."""
    read = model_settings.read_settings
    assert read({}, {"IEI_FORWARD_BATCH_SIZE": "64"}).forward_batch_size == 64
    with pytest.raises(ValueError, match=r"IEI_FORWARD_BATCH_SIZE='20000': .* 1 to 64 \(the mo"):
        read({}, {"IEI_FORWARD_BATCH_SIZE": "20000"})
    with pytest.raises(ValueError, match=r"IEI_FORWARD_BATCH_SIZE='32': .* from 1 to 16"):
        read({"max_batch_size": 16}, {"IEI_FORWARD_BATCH_SIZE": "32"})  # the config's own
    assert read({}, {"IEI_FORWARD_THREADS": "4"}, cores=4).forward_threads == 4
    with pytest.raises(ValueError, match=r"IEI_FORWARD_THREADS='5': .* 1 to 4 \(the cores here"):
        read({}, {"IEI_FORWARD_THREADS": "5"}, cores=4)


def test_dtype_auto_follows_the_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert model_settings.resolve_dtype("auto", cuda, native_bf16=False) is torch.float16
    assert model_settings.resolve_dtype("auto", cpu, native_bf16=True) is torch.bfloat16
    assert model_settings.resolve_dtype("auto", cpu, native_bf16=False) is torch.float32
    assert model_settings.resolve_dtype("float32", cuda, native_bf16=True) is torch.float32


def test_forward_batch_size_auto_follows_the_device():
    assert model_settings.read_settings({}, {}).forward_batch_size == 0  # auto
    assert (
        model_settings.read_settings(config(forward_batch_size="12"), {}).forward_batch_size == 12
    )
    assert (
        model_settings.read_settings({}, {"IEI_FORWARD_BATCH_SIZE": "AUTO"}).forward_batch_size == 0
    )
    with pytest.raises(ValueError, match="expected auto or a positive integer"):
        model_settings.read_settings({}, {"IEI_FORWARD_BATCH_SIZE": "big"})
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert model_settings.resolve_forward_batch_size(0, cpu) == 8
    assert model_settings.resolve_forward_batch_size(0, cuda) == 64
    assert model_settings.resolve_forward_batch_size(12, cpu) == 12


def test_native_bf16_is_read_from_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16\n")
    assert model_settings.cpu_has_native_bf16(str(info))
    info.write_text("processor: 0\nflags\t\t: fpu sse2 avx2\n")
    assert not model_settings.cpu_has_native_bf16(str(info))
    assert not model_settings.cpu_has_native_bf16(str(tmp_path / "missing"))


# --- decoding --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(odd_images()))
def test_every_odd_image_decodes_to_rgb(name):
    image = images.decode_image(odd_images()[name], 50_000_000)
    assert image.mode == "RGB"
    assert image.width >= 1 and image.height >= 1


def test_exif_orientation_is_applied():
    image = images.decode_image(odd_images()["exif_rotated.jpg"], 50_000_000)
    assert image.size == (400, 600)  # stored 600x400, orientation 6 turns it upright


def test_16_bit_samples_are_scaled_not_clipped():
    grey = np.full((4, 4), 40000, dtype=np.uint16)
    image = images.decode_image(encode(Image.fromarray(grey), "PNG"), 100)
    assert image.getpixel((0, 0)) == (156, 156, 156)  # 40000 >> 8; clipping would give 255


def test_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    image = images.decode_image(encode(rgba, "PNG"), 100)
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((1, 0)) == (10, 20, 30)


@pytest.mark.parametrize(("mode", "key"), [("L", 0), ("RGB", (0, 0, 0)), ("P", 0)])
@pytest.mark.parametrize("min_side", [0, 8])
def test_a_png_colour_key_is_transparent_as_transformers_converts_it(mode, key, min_side):
    from transformers.image_transforms import convert_to_rgb

    # Half the pixels of the colour key (PNG's tRNS chunk), half of another colour.
    pixels = np.zeros((32, 48), np.uint8)
    pixels[:, 24:] = 128
    image = Image.fromarray(pixels, "L")
    image = image.convert(mode) if mode != "P" else image.convert("P")
    data = encode(image, "PNG", transparency=key)
    opened = Image.open(io.BytesIO(data))
    opened.load()
    assert opened.mode == mode and opened.info["transparency"] == key
    expected = Image.fromarray(convert_to_rgb(opened, return_numpy=True))
    if min_side:  # the strip path of a large image: composited, then reduced
        expected = expected.reduce(32 // min_side)
    ours = images.decode_image(data, 10_000, min_side)
    assert ours.getpixel((0, 0)) == (255, 255, 255)
    assert np.array_equal(np.asarray(ours), np.asarray(expected))


def test_first_frame_of_an_animation():
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert images.decode_image(gif, 100).getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty image file"),
        (b"garbage bytes", "cannot decode image"),
        (photos()["chelsea.jpg"][:2000], "cannot decode image"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n", "cannot decode image"),  # never hand EPS to Ghostscript
    ],
)
def test_undecodable_files_raise_invalid_image(data, message):
    with pytest.raises(images.InvalidImage, match=message):
        images.decode_image(data, 50_000_000)


def test_pixel_limit():
    with pytest.raises(images.InvalidImage, match="over the limit of 99 pixels"):
        images.decode_image(encode(Image.new("RGB", (10, 10)), "PNG"), 99)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int) -> bytes:
    """A grey PNG's header of that size (its pixel data missing)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")


def test_the_pixel_limit_is_ours_above_pil_s_own():
    # 196 MP, over PIL's own cap (2 x 89,478,485): refused by IEI_MAX_IMAGE_PIXELS, in its words.
    with pytest.raises(images.InvalidImage) as refused:
        images.decode_image(png_header(14_000, 14_000), 190_000_000)
    assert "196000000 pixels is over the limit of 190000000 pixels" in str(refused.value)
    assert Image.MAX_IMAGE_PIXELS >= 190_000_000  # PIL's stays a backstop above ours
    with Image.open(io.BytesIO(png_header(14_000, 13_000))) as image:  # 182 MP: PIL opens it
        assert image.size == (14_000, 13_000)


def with_text_chunks(png: bytes, chunks: list[bytes]) -> bytes:
    """The chunks right after IHDR (8 + 25 bytes), where PIL reads them as it opens the file."""
    return png[:33] + b"".join(chunks) + png[33:]


def test_compressed_png_text_is_inflated_only_up_to_a_few_mib():
    png = encode(Image.new("RGB", (8, 8), (1, 2, 3)), "PNG")
    megabyte = zlib.compress(bytes((1 << 20) - 64), 9)
    bomb = with_text_chunks(png, [png_chunk(b"zTXt", b"k%d\0\0" % i + megabyte) for i in range(64)])
    assert len(bomb) < 100_000  # 64 MB of text once inflated, PIL's own limit
    with pytest.raises(images.InvalidImage, match="Too much memory used in text chunks"):
        images.decode_image(bomb, 100)
    # Metadata as real files carry it: an iTXt (compressed) and a tEXt still decode.
    info = PngImagePlugin.PngInfo()
    info.add_itxt("Description", "a cat on a mat " * 200, zip=True)
    info.add_text("Software", "IEI")
    small = encode(Image.new("RGB", (8, 8), (1, 2, 3)), "PNG", pnginfo=info)
    assert images.decode_image(small, 100).getpixel((0, 0)) == (1, 2, 3)


def test_a_png_of_many_icc_profiles_is_refused_before_pil_inflates_them(monkeypatch):
    """iCCP is not counted in PIL's text memory: 2000 chunks of 1 MiB each (2 MB of file) cost
    4 s of CPU. One profile, as real files carry it, still decodes."""
    png = encode(Image.new("RGB", (8, 8), (1, 2, 3)), "PNG")
    megabyte = zlib.compress(bytes(1 << 20), 9)
    profiles = [png_chunk(b"iCCP", b"p%d\0\0" % i + megabyte) for i in range(2000)]
    with monkeypatch.context() as patched:
        patched.setattr(images.Image, "open", lambda *args, **kwargs: pytest.fail("PIL read it"))
        with pytest.raises(images.InvalidImage, match="PNG of over 4 ICC profile chunks"):
            images.decode_image(with_text_chunks(png, profiles), 100)
    with_profile = encode(Image.new("RGB", (8, 8), (1, 2, 3)), "PNG", icc_profile=bytes(600))
    assert images.decode_image(with_profile, 100).getpixel((0, 0)) == (1, 2, 3)


def test_the_scans_of_a_progressive_jpeg_are_counted():
    picture = Image.open(io.BytesIO(photos()["coffee.jpg"])).convert("RGB")
    assert images.progressive_scans(photos()["coffee.jpg"]) == 0  # baseline
    assert 5 <= images.progressive_scans(encode(picture, "JPEG", progressive=True)) <= 12
    assert images.progressive_scans(encode(picture.convert("L"), "JPEG", progressive=True)) >= 2
    assert images.progressive_scans(scan_bomb(60)) == 60
    assert images.progressive_scans(scan_bomb(500)) == images.MAX_JPEG_SCANS + 1  # enough said
    assert images.progressive_scans(encode(picture, "PNG")) == 0
    assert images.progressive_scans(b"\xff\xd8\xff") == 0  # cut short: PIL says why


def test_junk_between_a_jpeg_s_segments_hides_none_of_its_scans():
    """libjpeg skips bytes before a marker, so the count must too: one byte once hid 3000."""
    bomb = scan_bomb(300)
    first_scan, frame = bomb.index(b"\xff\xda"), bomb.index(b"\xff\xc2")
    for hostile in (
        bomb[:first_scan] + b"\x00" + bomb[first_scan:],
        bomb[:frame] + b"\xff\x00" + bomb[frame:],
    ):
        assert images.progressive_scans(hostile) > images.MAX_JPEG_SCANS
        with pytest.raises(images.InvalidImage, match="of over 100 scans, the limit"):
            images.decode_image(hostile, 50_000_000)


def test_what_follows_a_jpeg_s_end_is_none_of_its_scans():
    """A motion photo's video or any trailer after the end of the image, or an MPO's next frame,
    are not the first frame's scans (random bytes hold 0xFFDA about every 64 KB)."""
    picture = Image.open(io.BytesIO(photos()["coffee.jpg"])).convert("RGB")
    progressive = encode(picture, "JPEG", progressive=True)
    scans = images.progressive_scans(progressive)
    trailer = np.random.default_rng(0).integers(0, 256, 8 << 20, dtype=np.uint8).tobytes()
    assert b"\xff\xda" in trailer
    assert images.progressive_scans(progressive + trailer) == scans
    assert images.progressive_scans(progressive + progressive) == scans
    tables = progressive.index(b"\xff\xc4")
    filled = progressive[:tables] + b"\xff\xff\xff" + progressive[tables:]  # fill bytes
    assert images.progressive_scans(filled) == scans
    assert images.decode_image(progressive + trailer, 50_000_000).size == picture.size


def test_a_jpeg_of_too_many_header_segments_is_refused_before_pil_reads_it():
    """Millions of empty segments took PIL seconds to walk; real headers have tens."""
    data = encode(Image.new("RGB", (8, 8)), "JPEG")
    padded = data[:2] + b"\xff\xfe\x00\x02" * images.MAX_JPEG_SEGMENTS + data[2:]
    with pytest.raises(images.InvalidImage, match="JPEG of over 4096 segments"):
        images.decode_image(padded, 50_000_000)
    fewer = data[:2] + b"\xff\xfe\x00\x02" * 1000 + data[2:]  # empty comments, but a JPEG
    assert images.decode_image(fewer, 50_000_000).size == (8, 8)


def test_a_progressive_jpeg_of_too_many_scans_is_refused_before_it_is_decoded():
    limit = images.MAX_JPEG_SCANS
    assert images.decode_image(scan_bomb(limit), 50_000_000).size == (64, 64)
    with pytest.raises(images.InvalidImage, match=f"of over {limit} scans, the limit"):
        images.decode_image(scan_bomb(limit + 1), 50_000_000)


# --- reduced-scale JPEG decoding (draft) -------------------------------------------------------


def large_jpeg(width: int, height: int, **options: object) -> bytes:
    coffee = Image.open(io.BytesIO(photos()["coffee.jpg"])).convert("RGB")
    return encode(coffee.resize((width, height), Image.Resampling.BICUBIC), "JPEG", quality=90,
                  **options)  # fmt: skip


def test_jpeg_draft_setting():
    assert model_settings.read_settings({}, {}).jpeg_draft is True
    assert model_settings.read_settings({}, {"IEI_JPEG_DRAFT": "False"}).jpeg_draft is False
    with pytest.raises(ValueError, match="IEI_JPEG_DRAFT"):
        model_settings.read_settings({}, {"IEI_JPEG_DRAFT": "maybe"})


def test_draft_side_is_twice_what_the_processor_resizes_to(model_dirs):
    from transformers import AutoImageProcessor

    def side(family: str) -> int:
        return images.draft_side(AutoImageProcessor.from_pretrained(model_dirs[family]))

    assert side("vit") == 448  # 224 x 224
    assert side("deit") == 512  # resize to 256, crop 224
    assert side("convnext") == 512  # shortest edge 224 / crop_pct 0.875 = 256
    assert images.draft_side(SimpleNamespace(size=None)) == 0  # unknown: never draft


@pytest.mark.parametrize(
    ("size", "decoded"),
    [
        ((4000, 3000), (1000, 750)),  # 1/4: 1/8 would make the short side 375 < 448
        ((2400, 1800), (600, 450)),
        ((1000, 900), (500, 450)),  # both sides >= 2 x 448: 1/2
        ((1000, 800), (1000, 800)),  # 800 < 2 x 448: a half would be under 448, full decode
        ((4000, 600), (4000, 600)),  # the short side decides
    ],
)
def test_large_jpegs_decode_at_a_reduced_scale_never_below_the_minimum(size, decoded):
    image = images.decode_image(large_jpeg(*size), 50_000_000, min_side=448)
    assert image.size == decoded
    assert min(image.size) >= 448 or image.size == size
    assert images.decode_image(large_jpeg(*size), 50_000_000).size == size  # off by default


def test_draft_keeps_exif_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6
    image = images.decode_image(large_jpeg(2400, 1800, exif=exif), 50_000_000, min_side=448)
    assert image.size == (450, 600)


@pytest.mark.parametrize("name", sorted({**photos(), **odd_images()}))
def test_sample_images_are_never_drafted(name):
    """The integration tests compare these with full decodes at cosine 0.9999."""
    data = {**photos(), **odd_images()}[name]
    full = images.decode_image(data, 50_000_000)
    drafted = images.decode_image(data, 50_000_000, min_side=448)
    assert drafted.size == full.size
    assert np.array_equal(np.asarray(drafted), np.asarray(full))


def centred_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.ravel() - a.mean()
    b = b.ravel() - b.mean()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# --- pooling ---------------------------------------------------------------------------------


def test_mean_pooling_over_tokens_and_over_the_grid():
    tokens = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    grid = torch.arange(32, dtype=torch.float32).reshape(2, 4, 2, 2)
    out = pooling.pool(SimpleNamespace(last_hidden_state=tokens), "mean")
    assert torch.equal(out, tokens.mean(1))
    out = pooling.pool(SimpleNamespace(last_hidden_state=grid), "mean")
    assert out.shape == (2, 4)
    assert torch.equal(out, grid.mean((2, 3)))
    assert torch.equal(pooling.pool(SimpleNamespace(last_hidden_state=tokens), "cls"), tokens[:, 0])


def test_pooling_that_a_model_cannot_do_is_an_error():
    grid = SimpleNamespace(last_hidden_state=torch.zeros(1, 4, 2, 2), pooler_output=None)
    with pytest.raises(ValueError, match="no CLS token"):
        pooling.pool(grid, "cls")
    with pytest.raises(ValueError, match="no pooler_output"):
        pooling.pool(grid, "pooler")


# --- the Triton model, with a tiny ViT -------------------------------------------------------


@pytest.fixture(scope="module")
def triton_model(model_dirs):
    instance = model.TritonPythonModel()
    model_config = {**config(model_id=str(model_dirs["vit"]), dtype="float32")}
    model_config["instance_group"] = [{"count": 1, "kind": "KIND_CPU"}]
    instance.initialize(
        {
            "model_config": json.dumps(model_config),
            "model_name": "iei",
            "model_instance_name": "iei_0_0",
            "model_instance_kind": "CPU",
            "model_instance_device_id": "0",
        }
    )
    yield instance
    instance.finalize()


def request(*files: bytes) -> InferenceRequest:
    tensor = np.empty((len(files), 1), dtype=np.object_)
    tensor[:, 0] = files
    return InferenceRequest([Tensor("IMAGE", tensor)])


def test_one_response_per_request_in_order_and_errors_stay_alone(triton_model):
    good = list(photos().values())
    responses = triton_model.execute(
        [request(good[0]), request(good[1], b"broken", good[2]), request(good[3], good[4])]
    )
    assert len(responses) == 3
    assert not responses[0].has_error()
    assert responses[0].output_tensors[0].as_numpy().shape == (1, 32)
    assert responses[1].has_error()
    assert responses[1].error.code == "INVALID_ARG"
    assert responses[1].error.message().startswith("IMAGE[1]: cannot decode image")
    assert responses[2].output_tensors[0].as_numpy().shape == (2, 32)
    assert responses[2].output_tensors[0].as_numpy().dtype == np.float32


def test_model_info_only_when_asked(triton_model):
    good = photos()["chelsea.jpg"]
    plain = triton_model.execute([request(good)])[0]
    assert [t.name() for t in plain.output_tensors] == ["EMBEDDING"]
    asked = InferenceRequest(request(good, good).tensors.values(), ("EMBEDDING", "MODEL_INFO"))
    info = triton_model.execute([asked])[0].output_tensors[1].as_numpy()
    assert info.shape == (2, 1)
    facts = json.loads(info[0, 0])
    assert facts["model_type"] == "vit"
    assert facts["architecture"] == "ViTModel"
    assert facts["dtype"] == "float32"
    assert facts["device"] == "cpu"
    assert facts["pooling"] == "mean"


def test_batching_does_not_change_a_vector(triton_model):
    good = list(photos().values())
    alone = triton_model.execute([request(good[0])])[0].output_tensors[0].as_numpy()
    batched = triton_model.execute([request(*good)])[0].output_tensors[0].as_numpy()
    np.testing.assert_allclose(alone[0], batched[0], rtol=1e-4, atol=1e-5)


def test_draft_decoding_stays_close_to_the_full_decode(triton_model):
    embedder = triton_model.embedder
    assert embedder.draft_side == 448  # on by default, from the tiny ViT's 224 x 224
    big = large_jpeg(4000, 3000)
    other = photos()["chelsea.jpg"]
    try:
        drafted = embedder.embed([big, other])
        pixels_drafted = embedder.preprocess([embedder.decode(b) for b in [big, other]])
        embedder.draft_side = 0
        full = embedder.embed([big, other])
        pixels_full = embedder.preprocess([embedder.decode(b) for b in [big, other]])
    finally:
        embedder.draft_side = 448
    drafted_pixels = pixels_drafted[0]["pixel_values"].numpy()
    # The model input itself (224 x 224 x 3) is nearly the same...
    assert centred_cosine(drafted_pixels, pixels_full[0]["pixel_values"].numpy()) >= 0.99
    # ...which a different photo is not (the comparison can fail).
    assert centred_cosine(drafted_pixels, pixels_full[1]["pixel_values"].numpy()) < 0.9
    # and so is the embedding.
    vectors = np.stack([drafted[0], full[0]]).astype(np.float64)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    assert vectors[0] @ vectors[1] >= 0.99
    np.testing.assert_array_equal(drafted[1], full[1])  # a small photo is never drafted


def test_forward_runs_in_sub_batches(triton_model):
    embedder = triton_model.embedder
    size = embedder.forward_batch_size
    assert embedder.forward(embedder.blank(size + 3)).shape == (size + 3, 32)


class SpyProcessor:
    """Wraps the real processor: records each call's keyword arguments, and raises `failure`
    for any call that contains an image of `poison_size`."""

    def __init__(self, real, poison_size=None, failure=None):
        self.real, self.poison_size, self.failure = real, poison_size, failure
        self.calls: list[dict] = []

    def __call__(self, images, **options):
        self.calls.append(options)
        if self.failure is not None and any(i.size == self.poison_size for i in images):
            raise self.failure
        return self.real(images=images, **options)


@pytest.fixture
def embedder(triton_model):
    """The tiny ViT's embedder; what a test changes on it is put back afterwards."""
    embedder = triton_model.embedder
    saved = (embedder.processor, embedder.threads, embedder.preprocess_device)
    yield embedder
    embedder.processor, embedder.threads, embedder.preprocess_device = saved


@pytest.mark.parametrize("threads", [1, 3, 16])
def test_prepare_in_threads_matches_decode_then_processor_with_failures_in_place(embedder, threads):
    embedder.threads = threads  # chunks of the batch; the pool itself has one thread per core
    good = list(photos().values())
    blobs = [good[0], b"broken", good[1], good[2], b"", good[3], good[4]]
    prepared = embedder.prepare(blobs)
    decoded = [embedder.decode(b) for b in blobs]
    assert [type(r).__name__ for r in prepared] == [
        "InvalidImage" if isinstance(d, images.InvalidImage) else "dict" for d in decoded
    ]
    assert str(prepared[1]).startswith("cannot decode image")
    reference = embedder.preprocess([d for d in decoded if isinstance(d, Image.Image)])
    inputs = [t for t in prepared if isinstance(t, dict)]
    assert len(inputs) == 5
    for ours, theirs in zip(inputs, reference, strict=True):
        assert ours.keys() == theirs.keys() == {"pixel_values"}
        assert torch.equal(ours["pixel_values"], theirs["pixel_values"])
    assert embedder.prepare([]) == []


@pytest.mark.parametrize("threads", [1, 3])
def test_a_processor_failure_fails_only_its_own_image(embedder, threads):
    embedder.threads = threads
    odd = encode(Image.new("RGB", (31, 17), (9, 9, 9)), "PNG")
    embedder.processor = SpyProcessor(embedder.processor, (31, 17), ValueError("odd size"))
    good = list(photos().values())
    prepared = embedder.prepare([good[0], odd, good[1], good[2]])
    assert [isinstance(r, dict) for r in prepared] == [True, False, True, True]
    assert str(prepared[1]) == "preprocessing failed: odd size"


def test_a_device_failure_is_a_server_error_not_a_bad_image(embedder):
    """Out of GPU memory (or a CUDA error) must fail the execution, not blame the images."""
    odd = encode(Image.new("RGB", (31, 17), (9, 9, 9)), "PNG")
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    embedder.processor = SpyProcessor(embedder.processor, (31, 17), oom)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        embedder.prepare([photos()["chelsea.jpg"], odd])
    assert embedding.is_device_failure(RuntimeError("CUDA error: an illegal memory access"))
    assert not embedding.is_device_failure(ValueError("Unsupported number of image dimensions"))


def test_the_processor_gets_the_instance_device_only_on_a_gpu_instance(embedder):
    """The GPU path passes the instance's device to the processor; on the CPU it must agree."""
    images = [embedder.decode(b) for b in photos().values()]
    embedder.processor = spy = SpyProcessor(embedder.processor)
    plain = embedder.preprocess(images)
    assert spy.calls == [{"return_tensors": "pt"}]  # a CPU instance: no device argument
    embedder.preprocess_device = torch.device("cpu")
    on_device = embedder.preprocess(images)
    assert spy.calls[-1] == {"return_tensors": "pt", "device": torch.device("cpu")}
    for a, b in zip(plain, on_device, strict=True):
        assert b["pixel_values"].device.type == "cpu"
        torch.testing.assert_close(a, b)
