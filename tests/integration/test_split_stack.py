"""The split layout through the real stack (IEI_TRITON_LAYOUT=split): `iei` is Triton's ensemble of
`iei_preprocess` (CPU processes) and `iei_encoder`, with JPEGs decoded as tensors by torchvision
(on a GPU host nvImageCodec or nvJPEG take that place: the same code after the decode). The
contract does not change: the reference's vectors, one bad image fails its own request, Triton's
`iei` answers gRPC clients directly, the health probe passes through the ensemble."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from reference import Reference, cosine_rows
from sample_images import encode, photos
from stack import Stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def split_stack(model_dirs, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "split_stack.log"
    stack = Stack(
        model_dirs["vit"], log,
        IEI_TRITON_LAYOUT="split", IEI_JPEG_DECODER="torchvision", IEI_PREPROCESS_INSTANCES="2",
        IEI_ENGINE="torch",
    ).start()  # fmt: skip
    yield stack
    assert stack.stop() == 0, stack.log()


def post_embed(stack: Stack, files: list[bytes]) -> httpx.Response:
    inputs = [base64.b64encode(f).decode() for f in files]
    return httpx.post(f"{stack.url}/embed", json={"inputs": inputs}, timeout=120)


def rotated(orientation: int) -> bytes:
    picture = Image.open(io.BytesIO(photos()["chelsea.jpg"]))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(picture, "JPEG", quality=95, exif=exif.tobytes())


def test_the_ensemble_serves_the_reference_s_vectors(split_stack, model_dirs):
    files = [*photos().values(), rotated(6), rotated(3)]  # JPEGs as tensors, the PNG by PIL
    response = post_embed(split_stack, files)
    assert response.status_code == 200, response.text
    expected = Reference(model_dirs["vit"]).embed(files)
    assert cosine_rows(np.asarray(response.json()), expected).min() >= 0.999

    info = httpx.get(f"{split_stack.url}/info", timeout=30).json()
    assert (info["layout"], info["jpeg_decoder"]) == ("split", "torchvision")
    assert info["max_batch_size"] == 64


def test_triton_loads_the_ensemble_and_its_steps(split_stack):
    models = httpx.post(f"http://{split_stack.triton_http}/v2/repository/index", timeout=30).json()
    ready = {m["name"] for m in models if m.get("state") == "READY"}
    assert {"iei", "iei_preprocess", "iei_encoder"} <= ready
    config = httpx.get(f"http://{split_stack.triton_http}/v2/models/iei_preprocess/config").json()
    assert [(g["kind"], g["count"]) for g in config["instance_group"]] == [("KIND_CPU", 2)]


def test_a_bad_image_fails_only_its_own_request(split_stack):
    good = photos()["chelsea.jpg"]
    truncated = good[: len(good) // 2]  # no end marker: PIL's, in the preprocessing step
    requests = [[good, good], [good, truncated], [good], [truncated, good, good]]
    with ThreadPoolExecutor(len(requests)) as pool:
        responses = list(pool.map(lambda files: post_embed(split_stack, files), requests))
    assert [r.status_code for r in responses] == [200, 422, 200, 422]
    assert "inputs[1]" in responses[1].json()["error"]
    assert "truncated" in responses[1].json()["error"]
    assert "inputs[0]" in responses[3].json()["error"]
    np.testing.assert_allclose(responses[0].json()[0], responses[2].json()[0], atol=1e-5)


def test_grpc_clients_call_the_ensemble_directly(split_stack, model_dirs):
    client = grpcclient.InferenceServerClient(split_stack.triton_grpc)
    files = [photos()["chelsea.jpg"], photos()["coffee.jpg"]]
    image = grpcclient.InferInput("IMAGE", [2, 1], "BYTES")
    image.set_data_from_numpy(np.array([[f] for f in files], dtype=np.object_))
    result = client.infer("iei", [image], outputs=[grpcclient.InferRequestedOutput("EMBEDDING")])
    vectors = result.as_numpy("EMBEDDING")
    assert cosine_rows(vectors, Reference(model_dirs["vit"]).embed(files)).min() >= 0.999


def test_health_probes_the_model_through_the_ensemble(split_stack):
    response = httpx.get(f"{split_stack.url}/health", timeout=30)
    assert response.status_code == 200, response.text
