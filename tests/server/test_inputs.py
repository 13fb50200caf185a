"""Client inputs -> image bytes, and the header check that runs before Triton."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from iei.server.inputs import (
    MAX_JPEG_HEADER_SEGMENTS,
    InvalidInput,
    decode_input,
    fetch_urls,
    inspect_image,
    jpeg_header_segments,
    prepare_inputs,
)
from PIL import Image
from sample_images import encode, odd_images, photos

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
