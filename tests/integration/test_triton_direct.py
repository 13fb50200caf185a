"""Clients that skip the frontend: Triton's own HTTP and gRPC endpoints, and its batcher."""

from __future__ import annotations

import base64
import queue

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from polling import count_reaching
from reference import cosine_rows
from sample_images import photos
from stack import COUNTING_WINDOWS
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.integration


def images_tensor(files: list[bytes]) -> np.ndarray:
    tensor = np.empty((len(files), 1), dtype=np.object_)
    tensor[:, 0] = files
    return tensor


def served_by_frontend(stack, files: list[bytes]) -> np.ndarray:
    body = {"inputs": [base64.b64encode(f).decode() for f in files], "normalize": False}
    response = httpx.post(f"{stack.url}/embed", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return np.array(response.json())


@pytest.mark.parametrize("protocol", [triton_http, triton_grpc], ids=["http", "grpc"])
def test_direct_inference_equals_embed(vit_stack, protocol):
    files = list(photos().values())
    url = vit_stack.triton_http if protocol is triton_http else vit_stack.triton_grpc
    client = protocol.InferenceServerClient(url)
    tensor = images_tensor(files)
    request = protocol.InferInput("IMAGE", list(tensor.shape), "BYTES")
    request.set_data_from_numpy(tensor)
    result = client.infer("iei", [request], outputs=[protocol.InferRequestedOutput("EMBEDDING")])
    direct = result.as_numpy("EMBEDDING")

    assert direct.dtype == np.float32
    frontend = served_by_frontend(vit_stack, files)
    assert direct.shape == frontend.shape
    np.testing.assert_allclose(direct, frontend, rtol=1e-5, atol=1e-6)  # raw, not normalised


def test_a_dynamic_batch_mixing_good_and_corrupt_images(vit_stack):
    """Concurrent requests merged into one execution: each bad one fails alone."""
    good = list(photos().values())
    corrupt = [b"not an image", good[0][: len(good[0]) // 3], b"\x89PNG\r\n\x1a\n" + b"\0" * 40]
    requests = []
    for i in range(24):
        requests.append(("bad", corrupt[i % 3]) if i % 4 == 3 else ("good", good[i % len(good)]))
    expected = dict(zip(good, served_by_frontend(vit_stack, good), strict=True))

    client = triton_grpc.InferenceServerClient(vit_stack.triton_grpc)

    def stats():
        return client.get_inference_statistics("iei").model_stats[0]

    for _ in range(COUNTING_WINDOWS):
        before = stats()
        answers: queue.Queue = queue.Queue()
        for index, (_, data) in enumerate(requests):
            tensor = images_tensor([data])
            request = triton_grpc.InferInput("IMAGE", list(tensor.shape), "BYTES")
            request.set_data_from_numpy(tensor)
            client.async_infer(
                "iei",
                [request],
                callback=lambda result, error, i=index, q=answers: q.put((i, result, error)),
            )
        results = {}
        for _ in requests:
            index, result, error = answers.get(timeout=60)
            results[index] = (result, error)
        # Triton updates its statistics just after sending the responses: wait for the last ones.
        count_reaching(lambda: stats().inference_count, before.inference_count + len(requests), 10)
        after = stats()
        executions = after.execution_count - before.execution_count
        inferences = after.inference_count - before.inference_count
        if inferences == len(requests):
            break
    assert inferences == len(requests)
    assert executions < len(requests), "Triton never merged requests into one batch"
    for index, (kind, data) in enumerate(requests):
        result, error = results[index]
        if kind == "good":
            assert error is None, error
            vector = result.as_numpy("EMBEDDING")
            assert cosine_rows(vector, expected[data][None])[0] > 0.99999
        else:
            assert isinstance(error, InferenceServerException)
            assert "IMAGE[0]:" in error.message()
            assert "cannot decode image" in error.message() or "empty" in error.message()


def test_the_model_survives_bad_input(vit_stack):
    """After the corrupt files above the model still answers (it must never die on input)."""
    files = list(photos().values())[:1]
    client = triton_http.InferenceServerClient(vit_stack.triton_http)
    assert client.is_model_ready("iei")
    tensor = images_tensor(files)
    request = triton_http.InferInput("IMAGE", list(tensor.shape), "BYTES")
    request.set_data_from_numpy(tensor)
    assert client.infer("iei", [request]).as_numpy("EMBEDDING").shape == (1, 32)
