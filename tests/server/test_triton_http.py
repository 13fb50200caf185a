"""triton_http.py: the inference request written part by part is the one tritonclient sends, and
Triton's answers (vectors, errors) read back as tritonclient reads them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as triton_http
from aiohttp import web
from iei.server.triton_http import FilesInput, TritonHttpClient, request_parts
from stack import aiohttp_stand_in
from tritonclient.http._utils import _get_inference_request
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.anyio
FILES = [b"\xff\xd8first", b"", b"third file" * 1000]


@pytest.fixture
def anyio_backend():
    return "asyncio"


def tritonclients_body(items: list[bytes], priority: int) -> tuple[bytes, int]:
    tensor = np.empty((len(items), 1), dtype=np.object_)
    tensor[:, 0] = items
    request = triton_http.InferInput("IMAGE", [len(items), 1], "BYTES")
    request.set_data_from_numpy(tensor, binary_data=True)
    wanted = [triton_http.InferRequestedOutput("EMBEDDING", binary_data=True)]
    body, header = _get_inference_request(
        [request], "", wanted, 0, False, False, priority, None, None
    )
    return body, header


@pytest.mark.parametrize("priority", [0, 1])
def test_the_parts_joined_are_tritonclients_request_byte_for_byte(priority):
    wanted = [triton_http.InferRequestedOutput("EMBEDDING", binary_data=True)]
    parts, header = request_parts([FilesInput("IMAGE", FILES)], wanted, priority)
    assert (b"".join(parts), header) == tritonclients_body(FILES, priority)
    assert any(part is FILES[2] for part in parts)  # the file itself, not a copy
    assert FilesInput("IMAGE", FILES)._get_binary_data() == b"".join(parts[1:])


async def test_a_request_goes_out_in_parts_and_its_answer_and_errors_read_back():
    seen: list[tuple[bytes, str]] = []
    vectors = np.arange(6, dtype=np.float32).reshape(3, 2)

    async def infer(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append((body, request.headers["Inference-Header-Content-Length"]))
        if request.match_info["model"] == "broken":
            return web.json_response({"error": "IMAGE[1]: cannot decode image"}, status=400)
        header = json.dumps({"outputs": [{
            "name": "EMBEDDING", "datatype": "FP32", "shape": [3, 2],
            "parameters": {"binary_data_size": vectors.nbytes},
        }]}).encode()  # fmt: skip
        return web.Response(
            body=header + vectors.tobytes(),
            headers={"Inference-Header-Content-Length": str(len(header))},
            content_type="application/octet-stream",
        )

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v2/models/{model}/infer", infer)
    async with aiohttp_stand_in(app) as triton:
        client = TritonHttpClient(triton)
        wanted = [triton_http.InferRequestedOutput("EMBEDDING", binary_data=True)]
        try:
            result = await client.infer("iei", [FilesInput("IMAGE", FILES)], outputs=wanted)
            np.testing.assert_array_equal(result.as_numpy("EMBEDDING"), vectors)
            body, header = tritonclients_body(FILES, 0)
            assert seen[-1] == (body, str(header))
            with pytest.raises(InferenceServerException) as caught:
                await client.infer("broken", [FilesInput("IMAGE", FILES)], outputs=wanted)
            assert caught.value.status() == "400"
            assert caught.value.message() == "IMAGE[1]: cannot decode image"
        finally:
            await client.close()


async def test_triton_is_asked_for_uncompressed_answers_unless_the_caller_asks_otherwise():
    """aiohttp's default Accept-Encoding (gzip, deflate, br) made Triton gzip every answer."""
    asked: list[tuple[str, str]] = []

    async def record(request: web.Request) -> web.Response:
        asked.append((request.path, request.headers.get("Accept-Encoding", "")))
        return web.json_response({"outputs": []})

    app = web.Application(client_max_size=64 << 20)
    app.router.add_get("/v2/health/ready", record)
    app.router.add_post("/v2/models/{model}/infer", record)
    async with aiohttp_stand_in(app) as triton:
        client = TritonHttpClient(triton)
        wanted = [triton_http.InferRequestedOutput("EMBEDDING", binary_data=True)]
        try:
            assert await client.is_server_ready()
            await client.infer("iei", [FilesInput("IMAGE", FILES)], outputs=wanted)
            text = triton_http.InferInput("TEXT", [1, 1], "BYTES")
            text.set_data_from_numpy(np.array([[b"a cat"]], dtype=np.object_))
            await client.infer("iei_text", [text], outputs=wanted)
            await client.infer(
                "iei_text", [text], outputs=wanted, response_compression_algorithm="gzip"
            )
        finally:
            await client.close()
    assert asked == [
        ("/v2/health/ready", "identity"),
        ("/v2/models/iei/infer", "identity"),
        ("/v2/models/iei_text/infer", "identity"),
        ("/v2/models/iei_text/infer", "gzip"),
    ]
