"""Client inputs -> image bytes, and the header check that runs before Triton."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from iei.server.inputs import (
    MAX_JPEG_HEADER_SEGMENTS,
    MAX_PNG_CHUNKS,
    InvalidInput,
    allow_pixels,
    decode_input,
    fetch_urls,
    inspect_image,
    jpeg_header_segments,
    png_header,
    prepare_inputs,
    url_scheme,
)
from PIL import Image, PngImagePlugin
from sample_images import encode, odd_images, photos, png_chunk, png_with_chunks, tiled_tiff

PNG = encode(Image.new("RGB", (3, 2)), "PNG")
B64 = base64.b64encode(PNG).decode()


@pytest.mark.parametrize(
    "item",
    [
        B64,
        f"  {B64}\n",
        "\n".join(B64[i : i + 10] for i in range(0, len(B64), 10)),
        B64.rstrip("="),
        f"data:image/png;base64,{B64}",
        f"DATA:image/png;charset=binary;base64,{B64}",
        f"data:;base64,{B64}",
    ],
)
def test_accepted_forms(item):
    assert decode_input(item) == PNG


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("", "empty input"),
        ("   \n", "empty input"),
        ("not base64 at all!", "not valid base64"),
        ("====", "not valid base64"),
        ("data:image/png," + B64, "data:image/<type>;base64"),
        ("data:text/html;base64," + B64, "text/html is not an image"),
        ("http://example.org/x.png", "must be fetched"),
    ],
)
def test_refused_forms(item, message):
    with pytest.raises(InvalidInput, match=message):
        decode_input(item)


def traced_peak(call) -> int:
    """The most memory `call()` held at once beyond what there was before (tracemalloc)."""
    import tracemalloc

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        with contextlib.suppress(InvalidInput):
            call()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    "item",
    [
        "data:image/png" + ";a" * (2 << 20),  # no comma: the backtracking regex took 88x this
        "data:image/png;base64" + " " * 2000 + "," + B64,  # a header past the head
        "data:image/png;" + "a" * 2000 + ";base64," + B64,
    ],
    ids=["no comma", "long header", "long parameter"],
)
def test_a_data_uri_header_is_looked_for_in_its_head_only(item):
    with pytest.raises(InvalidInput, match="data:image/<type>;base64"):
        decode_input(item)
    assert traced_peak(lambda: decode_input(item)) < 3 * len(item)


def test_line_wrapped_base64_costs_a_few_times_its_size():
    """Short pieces between spaces: `split` made a str of each, 28 times the input in all."""
    payload = base64.b64encode(bytes(range(256)) * 4096).decode()
    item = " ".join(payload[i : i + 2] for i in range(0, len(payload), 2))
    assert decode_input(item) == bytes(range(256)) * 4096
    assert traced_peak(lambda: decode_input(item)) < 5 * len(item)


def test_a_character_outside_ascii_is_not_base64():
    with pytest.raises(InvalidInput, match="not valid base64"):
        decode_input("\U0001f600" + B64)
    with pytest.raises(InvalidInput, match="not valid base64"):
        decode_input(B64[:8] + "\u00a0" + B64[8:])  # a no-break space is no line break


@pytest.mark.parametrize(
    ("item", "scheme"),
    [
        ("https://example.org/a.png", "https"),
        ("  file:///etc/passwd", "file"),
        (" " * 300 + "http://example.org/a.png", None),  # past the head: base64, refused as such
        ("data:image/png;base64," + B64, None),
        (B64, None),
    ],
)
def test_a_url_scheme_is_looked_for_in_the_head_only(item, scheme):
    assert url_scheme(item) == scheme


@pytest.mark.parametrize("name", sorted({**photos(), **odd_images()}))
def test_header_of_every_sample(name):
    data = {**photos(), **odd_images()}[name]
    info = inspect_image(data, 50_000_000)
    assert info.width > 0 and info.height > 0
    assert info.data is data


def test_header_limit_and_unknown_formats():
    with pytest.raises(InvalidInput, match="larger than the limit of 5 pixels"):
        inspect_image(PNG, 5)
    with pytest.raises(InvalidInput, match="not an image in a supported format"):
        inspect_image(b"%!PS-Adobe-3.0 EPSF-3.0\n", 100)
    with pytest.raises(InvalidInput, match="not an image"):
        inspect_image(encode(Image.new("RGB", (3, 2)), "PPM"), 100)


def test_a_jpeg_header_of_too_many_segments_is_refused_before_pil_walks_it():
    """A file of millions of empty segments took PIL seconds to read; real headers have tens."""
    data = encode(Image.new("RGB", (3, 2)), "JPEG")

    def padded(segments: int) -> bytes:
        return data[:2] + b"\xff\xfe\x00\x02" * segments + data[2:]  # empty comments

    assert jpeg_header_segments(padded(1000)) - jpeg_header_segments(data) == 1000
    assert inspect_image(padded(1000), 100).width == 3
    with pytest.raises(InvalidInput, match="JPEG of over 4096 segments before its first scan"):
        inspect_image(padded(MAX_JPEG_HEADER_SEGMENTS), 100)
    hidden = data[:2] + b"\x00" + padded(MAX_JPEG_HEADER_SEGMENTS)[2:]  # junk PIL skips
    assert jpeg_header_segments(hidden) > MAX_JPEG_HEADER_SEGMENTS
    assert jpeg_header_segments(PNG) == 0


def test_a_png_header_of_too_many_chunks_is_refused_before_pil_walks_it():
    """Millions of empty chunks before the image data held the event loop for seconds."""
    picture = Image.new("RGB", (3, 2))
    assert inspect_image(png_with_chunks(picture, 1000), 100).width == 3
    with pytest.raises(InvalidInput, match="PNG of over 4096 chunks besides its image data"):
        inspect_image(png_with_chunks(picture, MAX_PNG_CHUNKS + 1), 100)


def test_a_tiff_whose_tiles_are_over_the_pixel_limit_is_refused_from_its_header():
    """The model's decoder holds a whole tile, however small the image: as the model refuses."""
    with pytest.raises(InvalidInput, match=r"TIFF of 2048x2048 = 4194304 pixel tiles: over the"):
        inspect_image(tiled_tiff(16, 2048), 1_000_000)
    assert inspect_image(tiled_tiff(16, 2048), 5_000_000).width == 16


def with_chunks(png: bytes, *chunks: bytes) -> bytes:
    """`png` with `chunks` after its IHDR (before its image data)."""
    return png[:33] + b"".join(chunks) + png[33:]


def compressed_chunks(kind: bytes, count: int) -> list[bytes]:
    """`count` chunks of `kind` (zTXt, iTXt or iCCP), each 1 MiB of text in 1 KiB of zlib."""
    import zlib

    packed = zlib.compress(b"a" * (1 << 20), 9)
    prefix = {b"zTXt": b"\0\0", b"iCCP": b"\0\0", b"iTXt": b"\0\1\0\0\0"}[kind]
    return [png_chunk(kind, b"k%d" % i + prefix + packed) for i in range(count)]


@pytest.mark.parametrize("kind", [b"zTXt", b"iTXt", b"iCCP"])
def test_compressed_png_chunks_are_not_inflated_by_the_header_check(kind):
    """PIL inflated each, up to 64 MB of text (and any number of ICC profiles): 64 MiB from a
    file of 70 KB held the event loop for the time of it. The file still goes to the model as
    it came."""
    import tracemalloc

    bomb = with_chunks(PNG, *compressed_chunks(kind, 64))
    assert len(bomb) < 100_000
    inspect_image(PNG, 100)  # what a first call imports is not counted
    tracemalloc.start()
    try:
        info = inspect_image(bomb, 100)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (info.format, info.width, info.height, info.mode) == ("PNG", 3, 2, "RGB")
    assert info.data is bomb
    assert peak < 256 * 1024, f"the header check allocated {peak} bytes"


def ordinary_pngs() -> dict[str, bytes]:
    """PNGs with what real files carry beside their pixels: text, XMP, an ICC profile, EXIF; and
    an animated one."""
    from PIL import ImageCms

    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "iei tests")
    info.add_text("Comment", "compressed " * 100, zip=True)
    xmp = '<x:xmpmeta xmlns:x="adobe:ns:meta/">' + "<rdf:RDF/>" * 200 + "</x:xmpmeta>"
    info.add_itxt("XML:com.adobe.xmp", xmp, zip=True)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    image = Image.new("RGB", (5, 4), (10, 20, 30))
    frames = [Image.new("RGBA", (6, 5), (i * 60, 0, 0, 255)) for i in range(3)]
    return {
        "text": encode(image, "PNG", pnginfo=info),
        "icc_exif": encode(image, "PNG", icc_profile=srgb, exif=Image.Exif()),
        "palette_text": encode(image.quantize(8), "PNG", pnginfo=info, transparency=0),
        "animated": encode(frames[0], "PNG", save_all=True, append_images=frames[1:]),
    }


def pngs() -> dict[str, bytes]:
    samples = {n: d for n, d in odd_images().items() if n.endswith(".png")}
    return {**ordinary_pngs(), **samples}


@pytest.mark.parametrize("name", sorted(pngs()))
def test_an_ordinary_png_reads_as_pil_reads_the_whole_file(name):
    data = pngs()[name]
    info = inspect_image(data, 1_000_000)
    with Image.open(io.BytesIO(data)) as whole:
        assert (info.format, info.width, info.height, info.mode) == (
            whole.format,
            whole.width,
            whole.height,
            whole.mode,
        )
        assert name != "text" or "xmp" in whole.info  # what was skipped is in the file sent
    assert info.data is data
    assert b"zTXt" not in png_header(data) and b"iTXt" not in png_header(data)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (PNG[:40], "not an image in a supported format"),  # PIL's SyntaxError, as before
        (with_chunks(PNG, *compressed_chunks(b"zTXt", 1))[:100], "header: Truncated File Read"),
        (PNG[:33], "not an image in a supported format"),
    ],
    ids=["cut at the image data", "cut inside a skipped chunk", "no image data"],
)
def test_a_png_cut_short_is_still_refused(data, message):
    with pytest.raises(InvalidInput, match=message):
        inspect_image(data, 100)


def test_prepare_names_the_bad_index():
    with pytest.raises(InvalidInput, match=r"^inputs\[2\]: "):
        prepare_inputs([B64, B64, "###"], 100)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_text_is_an_image_or_invalid_input(text):
    with contextlib.suppress(InvalidInput):
        inspect_image(decode_input(text), 1_000_000)


WHITESPACE_AT = st.lists(st.tuples(st.integers(0), st.sampled_from(" \t\r\n")))


@given(st.binary(min_size=1, max_size=300), WHITESPACE_AT)
def test_base64_decodes_with_whitespace_anywhere_and_padding_optional(data, breaks):
    text = base64.b64encode(data).decode()
    for position, space in breaks:
        cut = position % (len(text) + 1)
        text = text[:cut] + space + text[cut:]
    assert decode_input(text) == data
    assert decode_input(text.rstrip().rstrip("=")) == data
    assert decode_input(text.rstrip() + "==") == data  # surplus padding, as the stdlib allows


@given(st.binary(min_size=1, max_size=300), st.sampled_from("!$%*-_.~"), st.integers(0))
def test_a_character_outside_base64_is_refused(data, bad, position):
    text = base64.b64encode(data).decode()
    cut = position % (len(text) + 1)
    with pytest.raises(InvalidInput, match="not valid base64"):
        decode_input(text[:cut] + bad + text[cut:])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_are_an_image_or_invalid_input(data):
    with contextlib.suppress(InvalidInput):
        inspect_image(data, 1_000_000)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(PNG) - 1), st.integers(0, 255))
def test_corrupted_headers_never_escape(position, value):
    data = bytearray(PNG)
    data[position] = value
    with contextlib.suppress(InvalidInput):
        inspect_image(bytes(data), 1_000_000)


def test_one_failed_url_cancels_the_other_downloads_of_its_request():
    class Fetcher:
        def __init__(self) -> None:
            self.running = 0

        async def fetch(self, url: str, budget: object) -> bytes:
            self.running += 1
            try:
                if url.endswith("/bad"):
                    raise InvalidInput("the URL answered HTTP 404")
                await asyncio.sleep(30)
                return b""
            finally:
                self.running -= 1

    fetcher = Fetcher()
    items = ["http://a.example/slow", "http://b.example/bad", "http://c.example/slow"]

    async def run() -> None:
        with pytest.raises(InvalidInput, match=r"inputs\[1\]: the URL answered HTTP 404"):
            await fetch_urls(items, fetcher, budget=None)

    started = time.monotonic()
    asyncio.run(run())
    assert time.monotonic() - started < 5  # the two slow downloads were cancelled
    assert fetcher.running == 0  # and none is left running


def png_header_of(width: int, height: int) -> bytes:
    """A PNG's signature and IHDR for `width` x `height` (no pixels: the header check reads no
    more)."""
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", b"")


def test_the_pixel_setting_above_pil_s_own_cap_is_the_limit(monkeypatch):
    """PIL refuses a header over twice its cap (about 358 MP) with its own error, which read
    as over the setting: IEI_MAX_IMAGE_PIXELS=400 MP refused a 380 MP image."""
    # PIL's default cap (other code in the suite may have raised it already)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 178_956_970)
    limit = 400_000_000
    allow_pixels(limit)
    image = inspect_image(png_header_of(20_000, 19_000), limit)
    assert (image.width, image.height) == (20_000, 19_000)
    with pytest.raises(InvalidInput, match="20000x21000 = 420000000 pixels is larger than"):
        inspect_image(png_header_of(20_000, 21_000), limit)
    allow_pixels(1000)  # never lowered: other code in the process keeps its cap
    assert limit == Image.MAX_IMAGE_PIXELS
