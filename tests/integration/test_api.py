"""POST /embed and GET /health on the real stack: inputs accepted, errors and their bodies."""

from __future__ import annotations

import base64
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from polling import wait_for
from sample_images import encode, photos, scan_bomb

pytestmark = pytest.mark.integration


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def post(stack, body: object, **kwargs: object) -> httpx.Response:
    return httpx.post(f"{stack.url}/embed", json=body, timeout=60, **kwargs)


def assert_error(response: httpx.Response, status: int, error_type: str, *fragments: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "error_type", "request_id"}, body
    assert body["error_type"] == error_type
    for fragment in fragments:
        assert fragment in body["error"], body


@pytest.fixture(scope="module")
def photo() -> bytes:
    return photos()["chelsea.jpg"]


def test_health(vit_stack):
    response = httpx.get(f"{vit_stack.url}/health")
    assert response.status_code == 200


def test_one_string_and_data_uri_and_wrapped_base64_give_the_same_vector(vit_stack, photo):
    plain = post(vit_stack, {"inputs": b64(photo)}).json()
    uri = post(vit_stack, {"inputs": ["data:image/jpeg;base64," + b64(photo)]}).json()
    wrapped = "\n".join(b64(photo)[i : i + 76] for i in range(0, len(b64(photo)), 76))
    mime = post(vit_stack, {"inputs": [wrapped + "\n"]}).json()
    assert len(plain) == len(uri) == len(mime) == 1
    np.testing.assert_allclose(plain, uri, rtol=1e-6)
    np.testing.assert_allclose(plain, mime, rtol=1e-6)


def test_more_images_than_one_triton_batch_keep_their_order(vit_stack):
    """64 inputs in chunks of IEI_CONCURRENCY_LEVEL (32): order survives the concurrency."""
    colours = [Image.new("RGB", (8, 8), (i * 4, 255 - i * 4, (i * 37) % 256)) for i in range(64)]
    files = [encode(c, "PNG") for c in colours]
    together = np.array(post(vit_stack, {"inputs": [b64(f) for f in files]}).json())
    for i in (0, 31, 32, 63):
        alone = np.array(post(vit_stack, {"inputs": b64(files[i])}).json()[0])
        np.testing.assert_allclose(together[i], alone, rtol=1e-4, atol=1e-6)


def test_empty_inputs_is_400(vit_stack):
    assert_error(post(vit_stack, {"inputs": []}), 400, "Empty", "`inputs` cannot be empty")


def test_too_many_inputs_is_422_with_teis_message(vit_stack, photo):
    response = post(vit_stack, {"inputs": [b64(photo)] * 65})
    assert_error(response, 422, "Validation", "batch size 65 > maximum allowed batch size 64")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"inputs": 3}, "inputs"),
        ({"inputs": [1, 2]}, "inputs"),
        ({"inputs": ["aGVsbG8="], "normalize": "yes"}, "normalize"),
        ({"images": ["aGVsbG8="]}, "inputs"),
        ([1, 2, 3], "valid dictionary"),
    ],
)
def test_wrong_shape_or_types_are_422(vit_stack, body, fragment):
    assert_error(post(vit_stack, body), 422, "Validation", fragment)


def test_invalid_json_is_422(vit_stack):
    response = httpx.post(
        f"{vit_stack.url}/embed", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_error(response, 422, "Validation")


@pytest.mark.parametrize(
    ("item", "fragment"),
    [
        ("this is not base64!", "not valid base64"),
        (b64(b"plain text, not an image"), "not an image in a supported format"),
        (b64(b"<svg xmlns='http://www.w3.org/2000/svg'></svg>"), "not an image"),
        (b64(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj"), "not an image"),
        ("data:text/plain;base64," + b64(b"hello"), "not an image"),
        ("data:image/png,rawdata", "data:image/<type>;base64"),
        ("ftp://example.org/cat.jpg", "is not allowed"),
        ("", "empty input"),
    ],
)
def test_bad_items_are_422_naming_the_index(vit_stack, photo, item, fragment):
    response = post(vit_stack, {"inputs": [b64(photo), item]})
    assert_error(response, 422, "Validation", "inputs[1]", fragment)


def test_truncated_image_is_422_from_the_model_with_the_clients_index(vit_stack, photo):
    """The header is fine, so only the model finds out; the index is still the client's."""
    items = [b64(photo)] * 40
    items[37] = b64(photo[: len(photo) // 2])
    response = post(vit_stack, {"inputs": items})
    assert_error(response, 422, "Validation", "inputs[37]", "truncated")


def test_a_jpeg_of_too_many_scans_is_422_from_the_model_quickly(vit_stack, photo):
    """A 580 KB file of 2000 scans once held the model for 75 s (and the launcher restarted
    Triton under it): refused before it is decoded, its neighbours embedded."""
    bomb = scan_bomb(2000, side=4000)
    started = time.monotonic()
    response = post(vit_stack, {"inputs": [b64(photo), b64(bomb)]})
    assert_error(response, 422, "Validation", "inputs[1]", "progressive JPEG of over 100 scans")
    assert time.monotonic() - started < 10  # the full decode: minutes
    assert post(vit_stack, {"inputs": [b64(photo)]}).status_code == 200


def test_huge_dimensions_are_refused_from_the_header_quickly(vit_stack):
    # A real PNG header claiming 40000x40000 pixels (1.6 GP), a few hundred bytes in all.
    header = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    header[16:24] = (40000).to_bytes(4, "big") * 2  # IHDR width, height (CRC no longer matches)
    start = time.monotonic()
    response = post(vit_stack, {"inputs": [b64(bytes(header))]})
    elapsed = time.monotonic() - start
    assert response.status_code == 422, response.text
    assert "inputs[0]" in response.json()["error"]
    assert elapsed < 5.0  # refused from its header, never decoded


def test_image_over_the_pixel_limit_is_422(vit_stack):
    big = encode(Image.new("RGB", (8000, 7000)), "PNG")  # 56 MP > 50 MP default
    assert_error(post(vit_stack, {"inputs": [b64(big)]}), 422, "Validation", "50000000 pixels")


def test_unknown_route_and_method_are_json(vit_stack):
    assert_error(httpx.get(f"{vit_stack.url}/nope"), 404, "NotFound")
    assert_error(httpx.get(f"{vit_stack.url}/embed"), 405, "Validation")


def test_openapi_documents_embed(vit_stack):
    schema = httpx.get(f"{vit_stack.url}/openapi.json").json()
    assert "/embed" in schema["paths"]
    assert "/health" in schema["paths"]


def test_request_ids_in_headers_error_bodies_and_logs_but_no_payloads(vit_stack, photo):
    marker = b64(photo)[100:160]  # a piece of the payload that must never be logged
    response = post(vit_stack, {"inputs": [b64(photo), "###"]}, headers={"X-Request-Id": "abc-42"})
    assert response.status_code == 422
    assert response.headers["x-request-id"] == "abc-42"
    assert response.json()["request_id"] == "abc-42"
    fresh = post(vit_stack, {"inputs": b64(photo)}, headers={"X-Request-Id": "bad id!"})
    assert fresh.status_code == 200
    generated = fresh.headers["x-request-id"]
    assert len(generated) == 32 and generated != "bad id!"
    # The worker writes its log line after the answer.
    wait_for(lambda: generated in vit_stack.log(), "the access log line written", 5)
    log = vit_stack.log()
    assert "abc-42 POST /embed 422" in log
    assert f"{generated} POST /embed 200" in log
    assert marker not in log
