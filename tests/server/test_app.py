"""The frontend without Triton: chunking, concurrency, error mapping, health when Triton is down.

A fake tritonclient stands in for Triton, so these run in milliseconds.
"""

from __future__ import annotations

import asyncio
import base64
import json
from contextlib import asynccontextmanager

import httpx
import numpy as np
import pytest
from iei.server.app import create_app
from iei.server.errors import ApiError
from iei.server.inputs import InvalidInput
from iei.server.settings import ServerSettings
from iei.server.triton_client import TritonClient
from PIL import Image
from sample_images import encode
from stack import free_port
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.anyio

PNG = base64.b64encode(encode(Image.new("RGB", (4, 4)), "PNG")).decode()


IMAGE_ONLY = {"model_type": "vit", "modalities": ["image"], "text_context_length": None}
WITH_TEXT = {"model_type": "clip", "modalities": ["image", "text"], "text_context_length": 5}


class FakeTriton:
    """Answers like tritonclient's aio client: image vector i = [first byte value, chunk size];
    `iei_text`: text vector i = [characters, chunk size], TOKENS = words + 2, and `TEXT[i]` fails
    for a text that says BAD."""

    def __init__(
        self, max_batch_size: int = 4, fail: Exception | None = None, delay=0.0, info=IMAGE_ONLY
    ):
        self.max_batch_size = max_batch_size
        self.fail = fail
        self.delay = delay
        self.info = info
        self.in_flight = 0
        self.peak = 0
        self.chunks: list[int] = []
        self.models: list[str] = []

    async def get_model_config(self, name):
        return {"max_batch_size": self.max_batch_size}

    async def is_model_ready(self, name):
        return True

    async def infer(self, name, inputs, outputs=None):
        items = inputs[0].test_images
        self.in_flight += len(items)
        self.peak = max(self.peak, self.in_flight)
        self.chunks.append(len(items))
        self.models.append(name)
        try:
            await asyncio.sleep(self.delay)
            if self.fail:
                raise self.fail
            if name == "iei_text":
                return self.texts([bytes(row[0]).decode() for row in items])
            vectors = np.array([[row[0][0], len(items)] for row in items], "float32")
            info = np.full((len(items), 1), json.dumps(self.info).encode(), dtype=np.object_)
            return FakeResult(EMBEDDING=vectors, MODEL_INFO=info)
        finally:
            self.in_flight -= len(items)

    @staticmethod
    def texts(texts: list[str]) -> FakeResult:
        for i, text in enumerate(texts):
            if "BAD" in text:
                raise InferenceServerException(f"[400] TEXT[{i}]: not valid UTF-8")
        vectors = np.array([[len(t), len(texts)] for t in texts], "float32")
        tokens = np.array([[len(t.split()) + 2] for t in texts], "int32")
        return FakeResult(EMBEDDING=vectors, TOKENS=tokens)

    async def close(self):
        pass


class FakeResult:
    def __init__(self, **outputs: np.ndarray) -> None:
        self.outputs = outputs

    def as_numpy(self, name):
        return self.outputs[name]


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(autouse=True)
def keep_numpy_inputs(monkeypatch):
    """Let the fake read the images back: tritonclient serialises them otherwise."""
    import tritonclient.http as triton_http

    original = triton_http.InferInput.set_data_from_numpy

    def remember(self, array, binary_data=True):
        self.test_images = array
        return original(self, array, binary_data=binary_data)

    monkeypatch.setattr(triton_http.InferInput, "set_data_from_numpy", remember)


def triton_client_with(fake: FakeTriton, concurrency: int) -> TritonClient:
    triton = TritonClient("127.0.0.1:1", concurrency_level=concurrency, timeout=5)
    triton._client = fake  # type: ignore[assignment]
    return triton


async def test_chunks_respect_batch_size_and_concurrency_and_keep_order():
    fake = FakeTriton(max_batch_size=4, delay=0.01)
    triton = triton_client_with(fake, concurrency=8)
    images = [bytes([i]) for i in range(22)]
    vectors = await triton.embed(images)
    assert vectors[:, 0].tolist() == list(range(22))
    assert max(fake.chunks) == 4 and sum(fake.chunks) == 22
    assert fake.peak <= 8


async def test_concurrency_below_the_batch_size_makes_smaller_chunks():
    fake = FakeTriton(max_batch_size=64, delay=0.01)
    vectors = await triton_client_with(fake, concurrency=3).embed([bytes([i]) for i in range(7)])
    assert fake.chunks == [3, 3, 1]
    assert fake.peak <= 3
    assert vectors.shape == (7, 2)


@pytest.mark.parametrize(
    ("model", "message"),
    [("iei", "IMAGE[1]: cannot decode image: broken"), ("iei_text", "TEXT[1]: empty text")],
)
async def test_the_models_input_error_names_the_clients_index(model, message):
    error = InferenceServerException(f"[400] {message}")
    triton = triton_client_with(FakeTriton(max_batch_size=4, fail=error), concurrency=4)
    request = triton._bytes_input("IMAGE", [b"a", b"b"])
    with pytest.raises(InvalidInput) as caught:
        await triton._infer(model, request, ("EMBEDDING",), offset=8)
    assert caught.value.index == 9
    assert str(caught.value) == f"inputs[9]: {message.split(': ', 1)[1]}"


@pytest.mark.parametrize(
    ("message", "status"),
    [
        ("Stub process 'iei_0_0' is not healthy.", 503),  # a dead stub: retry later
        ("Request for unknown model: 'iei' is not found", 503),  # unloading or restarting
        ("Failed to process the request(s), message: the model broke", 424),
    ],
)
async def test_other_triton_errors(message, status):
    triton = triton_client_with(FakeTriton(fail=InferenceServerException(message)), concurrency=4)
    with pytest.raises(ApiError) as caught:
        await triton.embed([b"a"])
    assert caught.value.status == status
    assert message in caught.value.message


@asynccontextmanager
async def app_client(settings: ServerSettings, fake: FakeTriton | None = None):
    """The app with its lifespan run, and Triton replaced by `fake` when given."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        if fake is not None:
            app.state.services.triton._client = fake
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://iei") as client:
            yield client


async def test_when_triton_is_down_health_and_embed_are_503_json():
    settings = ServerSettings(triton_url=f"127.0.0.1:{free_port()}")
    async with app_client(settings) as client:
        health = await client.get("/health")
        assert health.status_code == 503
        assert health.json()["error_type"] == "Unhealthy"
        embed = await client.post("/embed", json={"inputs": PNG})
        assert embed.status_code == 503
        assert embed.json()["error_type"] == "Unhealthy"
        info = (await client.get("/info")).json()
        assert info["triton"]["ready"] is False
        assert info["embedding_dimension"] is None


async def test_a_slow_triton_ends_in_504():
    settings = ServerSettings(triton_url="127.0.0.1:1", request_timeout=0.2)
    async with app_client(settings, FakeTriton(delay=5)) as client:
        response = await client.post("/embed", json={"inputs": [PNG]})
    assert response.status_code == 504
    assert response.json()["error_type"] == "Timeout"


async def test_normalisation_in_the_frontend():
    settings = ServerSettings(triton_url="127.0.0.1:1")
    async with app_client(settings, FakeTriton()) as client:
        unit = (await client.post("/embed", json={"inputs": [PNG, PNG]})).json()
        raw = (await client.post("/embed", json={"inputs": [PNG], "normalize": False})).json()
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-6)
    assert raw == [[137.0, 1.0]]  # PNG's first byte, chunk of one


async def test_small_inputs_are_checked_inline_and_large_ones_in_a_thread(monkeypatch):
    """Both paths give the same answers; only many or large inputs pay the thread hop."""
    from iei.server import embedding as service

    hops: list[int] = []

    async def counting_threadpool(function, *args):
        hops.append(len(args[0]))
        return function(*args)

    monkeypatch.setattr(service, "run_in_threadpool", counting_threadpool)
    noise = np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    large = base64.b64encode(encode(Image.fromarray(noise), "PNG")).decode()
    assert len(large) > service.INLINE_INPUT_SIZE
    settings = ServerSettings(triton_url="127.0.0.1:1")
    async with app_client(settings, FakeTriton()) as client:
        small_answer = await client.post("/embed", json={"inputs": [PNG], "normalize": False})
        assert hops == []
        large_answer = await client.post("/embed", json={"inputs": [large], "normalize": False})
        assert hops == [1]
        many = [PNG] * (service.INLINE_INPUTS + 1)  # small, but many header checks
        assert (await client.post("/embed", json={"inputs": many})).status_code == 200
        assert hops == [1, len(many)]
        bad = await client.post("/embed", json={"inputs": [PNG, "not an image!"]})
    assert small_answer.json() == [[137.0, 1.0]]
    assert large_answer.json() == [[137.0, 1.0]]
    assert bad.status_code == 422
    assert bad.json()["error"].startswith("inputs[1]: not valid base64")


# --- texts -------------------------------------------------------------------------------------


async def test_texts_and_images_of_one_request_come_back_in_order():
    settings = ServerSettings(triton_url="127.0.0.1:1")
    fake = FakeTriton(info=WITH_TEXT)
    body = {"input": ["a cat", {"image": PNG}, {"text": "a big dog"}], "modality": "text"}
    async with app_client(settings, fake) as client:
        mixed = await client.post("/v1/embeddings", json=body)
        texts = await client.post(
            "/embed", json={"inputs": ["a cat", "dog"], "modality": "text", "normalize": False}
        )
        root = await client.post("/", json={"inputs": ["a cat"], "modality": "text"})
    assert mixed.status_code == 200, mixed.text
    rows = np.array([d["embedding"] for d in mixed.json()["data"]])
    raw = np.array([[5, 2], [137, 1], [9, 2]], dtype=np.float64)  # texts in one chunk of two
    np.testing.assert_allclose(rows, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=1e-6)
    assert texts.json() == [[5.0, 2.0], [3.0, 2.0]]
    assert root.status_code == 200  # TEI's root route answers as /embed
    assert "iei_text" in fake.models


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/embed", {"inputs": ["a", ""], "modality": "text"}, "inputs[1]: empty text"),
        ("/embed", {"inputs": ["12345678901"], "modality": "text"},
         "inputs[0]: text of 11 characters is longer than the limit of 10 characters"),
        ("/embed", {"inputs": ["a", "a b c d"], "modality": "text", "truncate": False},
         "inputs[1]: text of 6 tokens is longer than the model's context of 5 tokens"),
        ("/embed", {"inputs": ["a"], "modality": "text", "truncation_direction": "Left"},
         "truncation_direction left is not supported"),
        ("/embed", {"inputs": ["a"], "modality": "Text"}, "modality: Input should be 'image' or"),
        ("/embed", {"inputs": ["a"], "modality": "text", "truncate": "no"}, "truncate"),
        ("/v1/embeddings", {"input": [{"image": PNG}, "a", "BAD"], "modality": "text"},
         "inputs[2]: not valid UTF-8"),  # the model's TEXT[1]: its position in the request
        ("/v1/embeddings", {"input": ["a", {"image": PNG, "text": "b"}]},
         "inputs[1]: an item is a string, or an object with exactly one of `text` and `image`"),
        ("/v1/embeddings", {"input": [{"picture": PNG}]}, "inputs[0]: an item is a string"),
        ("/v1/embeddings", {"input": [{"text": ["a"]}]}, "inputs[0]: an item is a string"),
        ("/v1/embeddings", {"input": [{"text": "a"}, {"image": "not an image!"}]},
         "inputs[1]: not valid base64"),
    ],
)  # fmt: skip
async def test_bad_texts_and_items_are_422_naming_the_input(path, body, message):
    settings = ServerSettings(triton_url="127.0.0.1:1", max_text_chars=10)
    async with app_client(settings, FakeTriton(info=WITH_TEXT)) as client:
        response = await client.post(path, json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert message in (error["message"] if isinstance(error, dict) else error)


async def test_an_overlong_text_is_cut_by_default():
    settings = ServerSettings(triton_url="127.0.0.1:1")
    async with app_client(settings, FakeTriton(info=WITH_TEXT)) as client:
        body = {"inputs": ["one two three four"], "modality": "text", "normalize": False}
        response = await client.post("/embed", json=body)
    assert response.json() == [[18.0, 1.0]]


async def test_text_on_an_image_only_model_is_a_validation_error():
    settings = ServerSettings(triton_url="127.0.0.1:1")
    fake = FakeTriton(info=IMAGE_ONLY)
    async with app_client(settings, fake) as client:
        response = await client.post("/embed", json={"inputs": ["a cat"], "modality": "text"})
        mixed = await client.post("/v1/embeddings", json={"input": [PNG, {"text": "a cat"}]})
        info = (await client.get("/info")).json()
    assert response.status_code == 422
    assert response.json()["error_type"] == "Validation"
    assert "embeds images only: it has no text tower" in response.json()["error"]
    assert mixed.status_code == 422
    assert "iei_text" not in fake.models
    assert (info["modalities"], info["text_context_length"]) == (["image"], None)


async def test_info_says_what_a_dual_encoder_serves():
    settings = ServerSettings(triton_url="127.0.0.1:1", max_text_chars=99)
    async with app_client(settings, FakeTriton(info=WITH_TEXT)) as client:
        info = (await client.get("/info")).json()
    assert info["modalities"] == ["image", "text"]
    assert info["text_context_length"] == 5
    assert info["embedding_dimension"] == 2
    assert info["limits"]["max_text_chars"] == 99


def test_images_and_texts_of_different_widths_cannot_share_a_request():
    """A forced IEI_POOLING on a dual encoder pools its vision tower without the projection:
    its image vectors no longer have the texts' width (nor their space)."""
    from iei.server.embedding import in_order

    images, texts = np.ones((1, 3), np.float32), np.zeros((2, 2), np.float32)
    assert in_order(3, [([0, 2], texts), ([1], None)]) is texts  # one part: as it came
    merged = in_order(3, [([1], np.ones((1, 2), np.float32)), ([0, 2], texts)])
    assert merged.tolist() == [[0, 0], [1, 1], [0, 0]]
    with pytest.raises(ApiError, match=r"differ in dimension \[2, 3\]"):
        in_order(3, [([1], images), ([0, 2], texts)])
