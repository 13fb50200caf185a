"""What one request costs a frontend worker in resident memory, per byte of its body and of its
URL downloads: the factors behind the worst case in docs/reliability.md ("The frontend's memory"),
which tests/test_kubernetes.py holds against the container's limit. `-s` prints the figures.

Peak resident size (VmHWM, reset through /proc/self/clear_refs) of this process around one
request through the app, with a fake Triton that builds the HTTP body tritonclient sends.
"""

from __future__ import annotations

import base64
import gc
import http.server
import io
import json
from pathlib import Path

import numpy as np
import pytest
from deployment_settings import BODY_RESIDENT_FACTOR, URL_RESIDENT_FACTOR
from iei.server.settings import ServerSettings
from PIL import Image
from stack import local_http_server
from test_app import FakeTriton, anyio_backend, app_client, keep_numpy_inputs  # noqa: F401
from tritonclient.http._utils import _get_inference_request

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux only"),
]
MiB = 2**20


class WireTriton(FakeTriton):
    """The fake Triton, holding each call's HTTP body (the copy tritonclient makes) meanwhile."""

    async def infer(self, name, inputs, outputs=None, priority=0):
        body = _get_inference_request(inputs, "", outputs, 0, False, False, priority, None, None)
        try:
            return await super().infer(name, inputs, outputs, priority)
        finally:
            del body


def peak_resident() -> int:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024


def reset_peak() -> int:
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return peak_resident()


def noise_png(side: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG", compress_level=0)  # as large as its pixels
    return out.getvalue()


async def test_a_json_body_costs_at_most_its_factor():
    images = [base64.b64encode(noise_png(512, seed)).decode() for seed in range(32)]
    body = json.dumps({"inputs": images}).encode()  # 33 MiB
    del images
    settings = ServerSettings(triton_url="127.0.0.1:1")
    async with app_client(settings, WireTriton(max_batch_size=8)) as client:
        assert (await client.post("/embed", json={"inputs": []})).status_code == 400  # warm
        before = reset_peak()
        response = await client.post(
            "/embed", content=body, headers={"content-type": "application/json"}
        )
        growth = peak_resident() - before
    assert response.status_code == 200, response.text[:300]
    print(f"\nbody of {len(body) / MiB:.1f} MiB: peak grew {growth / MiB:.0f} MiB")  # noqa: T201
    # The body's own bytes are the client's here too (not counted): one factor less.
    assert growth <= (BODY_RESIDENT_FACTOR - 1) * len(body)


async def test_url_downloads_cost_at_most_their_factor():
    files = {f"/{i}.png": noise_png(1900, i) for i in range(6)}  # 62 MiB

    class Files(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data = files[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    total = sum(map(len, files.values()))
    settings = ServerSettings(triton_url="127.0.0.1:1", allow_private_urls=True)
    with local_http_server(Files) as url:
        async with app_client(settings, WireTriton(max_batch_size=8)) as client:
            assert (await client.post("/embed", json={"inputs": []})).status_code == 400
            before = reset_peak()
            response = await client.post("/embed", json={"inputs": [url + p for p in files]})
            growth = peak_resident() - before
    assert response.status_code == 200, response.text[:300]
    print(f"\nURLs of {total / MiB:.1f} MiB: peak grew {growth / MiB:.0f} MiB")  # noqa: T201
    assert growth <= URL_RESIDENT_FACTOR * total
