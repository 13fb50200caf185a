"""Raw uploads through the real stack: the image file as the body, or a multipart form of files,
give the vectors of the JSON/base64 form and of the in-process reference."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
from iei.client import IEIClient
from reference import Reference, cosine_rows
from sample_images import photos

pytestmark = pytest.mark.integration

TOLERANCE = 0.9999


def vectors(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array(response.json(), dtype=np.float64)


def test_raw_bodies_and_forms_equal_json_and_the_reference(vit_stack, model_dirs):
    files = photos()
    jpeg, png = files["chelsea.jpg"], files["camera.png"]
    three = [files["astronaut.jpg"], png, files["rocket.jpg"]]
    url = f"{vit_stack.url}/embed"

    def as_json(images: list[bytes]) -> np.ndarray:
        body = {"inputs": [base64.b64encode(f).decode() for f in images]}
        return vectors(httpx.post(url, json=body, timeout=60))

    raw_jpeg = vectors(
        httpx.post(url, content=jpeg, headers={"content-type": "image/jpeg"}, timeout=60)
    )
    raw_png = vectors(
        httpx.post(
            url, content=png, headers={"content-type": "application/octet-stream"}, timeout=60
        )
    )
    form = [("file", (f"{i}.img", data)) for i, data in enumerate(three)]
    multipart = vectors(httpx.post(url, files=form, timeout=60))
    assert raw_jpeg.shape[0] == raw_png.shape[0] == 1 and multipart.shape[0] == 3

    np.testing.assert_allclose(raw_jpeg, as_json([jpeg]), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(raw_png, as_json([png]), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(multipart, as_json(three), rtol=1e-6, atol=1e-7)

    reference = Reference(model_dirs["vit"]).embed([jpeg, png, *three])
    served = np.concatenate([raw_jpeg, raw_png, multipart])
    assert cosine_rows(served, reference).min() >= TOLERANCE

    # options as a query parameter and as a form field: raw vectors
    raw = vectors(
        httpx.post(
            f"{url}?normalize=false",
            content=jpeg,
            headers={"content-type": "image/jpeg"},
            timeout=60,
        )
    )
    form_raw = vectors(httpx.post(url, files=form[:1], data={"normalize": "false"}, timeout=60))
    assert abs(np.linalg.norm(raw) - 1) > 1e-3  # not unit length: the option was applied
    np.testing.assert_allclose(raw / np.linalg.norm(raw), raw_jpeg, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(form_raw, vectors(httpx.post(
        url, json={"inputs": [base64.b64encode(three[0]).decode()], "normalize": False}, timeout=60
    )), rtol=1e-6, atol=1e-7)  # fmt: skip


def test_a_bad_upload_is_a_clear_4xx(vit_stack):
    url = f"{vit_stack.url}/embed"
    files = [("file", ("a.jpg", photos()["chelsea.jpg"])), ("file", ("notes.txt", b"not an image"))]
    response = httpx.post(url, files=files, timeout=60)
    assert response.status_code == 422
    assert response.json()["error"].startswith("inputs[1] (notes.txt): not an image")
    response = httpx.post(url, content=b"", headers={"content-type": "image/jpeg"}, timeout=60)
    assert (response.status_code, response.json()["error_type"]) == (400, "Empty")
    response = httpx.post(url, content=b"x", headers={"content-type": "text/plain"}, timeout=60)
    assert response.status_code == 415 and "not supported" in response.json()["error"]


def test_the_client_uploads_files_raw(vit_stack, tmp_path):
    files = photos()
    paths = []
    for name in ("chelsea.jpg", "camera.png"):
        (tmp_path / name).write_bytes(files[name])
        paths.append(tmp_path / name)
    with IEIClient(vit_stack.url) as client:
        assert client.info()["raw_uploads"] is True
        uploaded = client.embed(paths)
    body = {"inputs": [base64.b64encode(p.read_bytes()).decode() for p in paths]}
    as_json = vectors(httpx.post(f"{vit_stack.url}/embed", json=body, timeout=60))
    np.testing.assert_allclose(uploaded, as_json, rtol=1e-6, atol=1e-7)
