"""Property-based abuse of the real stack: whatever a client sends, a clear JSON answer.

Bounded for `make test` (IEI_FUZZ_EXAMPLES, default 40 per property); `make fuzz` runs longer.
"""

from __future__ import annotations

import base64
import json
import os

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from sample_images import encode, odd_images, photos

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("IEI_FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize="IEI_FUZZ_EXAMPLES" not in os.environ,  # CI: the same examples every run
)

SEEDS = [
    photos()["chelsea.jpg"],
    photos()["camera.png"],
    odd_images()["animated.gif"],
    odd_images()["webp.webp"],
]


def huge_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb's shape)."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    return bytes(data)


POSING = [
    b"<html><body>not an image</body></html>",
    b"<svg xmlns='http://www.w3.org/2000/svg' width='100000' height='100000'/>",
    b"%PDF-1.7\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF",
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
    b"GIF89a" + b"\xff\xff\xff\xff" + b"\0" * 20,
    b"BM" + b"\xff" * 60,
]


@st.composite
def damaged_images(draw: st.DrawFn) -> bytes:
    seed = draw(st.sampled_from(SEEDS))
    kind = draw(st.sampled_from(["truncate", "flip", "splice"]))
    data = bytearray(seed)
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if kind == "flip":
        for _ in range(draw(st.integers(1, 16))):
            position = draw(st.integers(0, len(data) - 1))
            data[position] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    start = draw(st.integers(0, len(data) - 1))
    return bytes(data[:start]) + draw(st.binary(max_size=64)) + bytes(data[start:])


image_bytes = st.one_of(
    st.binary(max_size=2048),
    damaged_images(),
    st.sampled_from(POSING),
    st.builds(huge_png, st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1)),
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children)
    ),
    max_leaves=30,
)

bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({"inputs": json_values}),
    st.fixed_dictionaries({"inputs": st.lists(st.text(max_size=30), max_size=300)}),
    st.fixed_dictionaries(
        {"inputs": st.text(max_size=50), "normalize": json_values, "truncate": json_values}
    ),
)


# URLs: every part may be malformed. Hosts are addresses that are refused before any
# connection (no network needed) or names that cannot resolve (.invalid).
private_v4 = st.sampled_from(["127.0.0.1", "10.1.2.3", "192.168.0.1", "169.254.169.254",
                              "0.0.0.0", "100.64.0.1", "192.0.2.1"])  # fmt: skip
ODD_HOSTS = [
    "[::1]", "[fe80::1]", "[2002:c0a8:101::1]", "localhost", "[::1", "::1]", "[]", "",
    "[64:ff9b::7f00:1%eth0]", "x.invalid", "münchen.invalid", "a..b.invalid", "-.invalid",
    "[v1.fe80::a+en1]",
]  # fmt: skip
hosts = st.one_of(
    private_v4,
    private_v4.map(lambda v4: f"[::ffff:{v4}]"),
    private_v4.map(lambda v4: f"[64:ff9b::{v4}]"),
    st.sampled_from(ODD_HOSTS),
    st.text(max_size=12).map(lambda t: f"{t}.invalid"),
)
ports = st.one_of(
    st.just(""),
    st.integers(-5, 100_000).map(lambda p: f":{p}"),
    st.text(max_size=6).map(lambda t: f":{t}"),
)
urls = st.builds(
    lambda scheme, user, host, port, path: f"{scheme}://{user}{host}{port}/{path}",
    st.sampled_from(["http", "https", "HTTP", "hTtPs", "ftp", "file", "gopher"]),
    st.sampled_from(["", "user@", "user:pass@", "@", ":@"]),
    hosts,
    ports,
    st.text(max_size=20),
)


@pytest.fixture(scope="module")
def client(vit_stack):
    with httpx.Client(base_url=vit_stack.url, timeout=60) as client:
        yield client


def check(response: httpx.Response, allow_ok: bool) -> None:
    assert response.status_code < 500, response.text
    assert response.headers["content-type"].startswith("application/json")
    if response.status_code != 200 or not allow_ok:
        assert 400 <= response.status_code < 500, response.text
        body = response.json()
        assert "error" in body, body


@FUZZ
@given(data=image_bytes, route=st.sampled_from(["/embed", "/v1/embeddings"]))
def test_any_image_bytes_get_a_clear_answer(client, data, route):
    key = "inputs" if route == "/embed" else "input"
    check(client.post(route, json={key: [base64.b64encode(data).decode()]}), allow_ok=True)


@FUZZ
@given(body=bodies)
def test_any_json_body_gets_a_clear_answer(client, body):
    check(client.post("/embed", json=body), allow_ok=True)


@FUZZ
@given(raw=st.binary(max_size=512))
def test_any_raw_body_gets_a_clear_answer(client, raw):
    response = client.post("/embed", content=raw, headers={"content-type": "application/json"})
    check(response, allow_ok=False)


@FUZZ
@given(url=urls, route=st.sampled_from(["/embed", "/v1/embeddings"]))
def test_any_url_gets_a_clear_answer_naming_the_input(client, url, route):
    """Malformed ports, IPv6 literals, empty hosts, credentials, addresses with a private IPv4
    address inside: a 422 that names the input, never a 5xx."""
    key = "inputs" if route == "/embed" else "input"
    response = client.post(route, json={key: [url]})
    check(response, allow_ok=False)
    assert response.status_code == 422, response.text
    assert "inputs[0]" in response.text or "input" in response.text


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deeply_nested_json(client, depth):
    body = "[" * depth + "]" * depth
    response = client.post("/embed", content=body, headers={"content-type": "application/json"})
    check(response, allow_ok=False)
    nested = '{"inputs": ' + "[" * depth + "]" * depth + "}"
    response = client.post("/embed", content=nested, headers={"content-type": "application/json"})
    check(response, allow_ok=False)


def test_a_good_request_is_answered_after_all_that(client):
    good = base64.b64encode(photos()["coffee.jpg"]).decode()
    response = client.post("/embed", json={"inputs": [good]})
    assert response.status_code == 200
    assert len(json.loads(response.content)[0]) == 32
