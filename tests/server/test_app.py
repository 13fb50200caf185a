"""The frontend without Triton: chunking, concurrency, error mapping, health when Triton is down.

A fake tritonclient stands in for Triton, so these run in milliseconds.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from contextlib import asynccontextmanager

import httpx
import numpy as np
import pytest
from iei.contract import PROBE_IMAGE, PROBE_PRIORITY
from iei.server import routing, triton_client
from iei.server.app import create_app
from iei.server.errors import ApiError, ErrorType
from iei.server.inputs import InvalidInput
from iei.server.settings import ServerSettings
from iei.server.triton_client import TritonClient
from PIL import Image
from pydantic import SecretStr
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
        self,
        max_batch_size: int = 4,
        fail: Exception | None = None,
        delay=0.0,
        info=IMAGE_ONLY,
        probe_fails: bool = False,
    ):
        self.max_batch_size = max_batch_size
        self.fail = fail  # for every request but the health probe's 1x1 PNG...
        self.probe_fails = probe_fails  # ... which fails too when the whole model is broken
        self.delay = delay
        self.info = info
        self.priorities: list[int] = []
        self.in_flight = 0
        self.peak = 0
        self.chunks: list[int] = []
        self.models: list[str] = []

    async def get_model_config(self, name):
        return {"max_batch_size": self.max_batch_size}

    async def is_model_ready(self, name):
        return True

    async def infer(self, name, inputs, outputs=None, priority=0):
        items = inputs[0].test_images
        probe = items.reshape(-1).tolist() == [PROBE_IMAGE]
        self.priorities.append(priority)
        self.in_flight += len(items)
        self.peak = max(self.peak, self.in_flight)
        self.chunks.append(len(items))
        self.models.append(name)
        try:
            await asyncio.sleep(self.delay)
            if self.fail and (not probe or self.probe_fails):
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
                raise InferenceServerException(f"TEXT[{i}]: not valid UTF-8", status="400")
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
    error = InferenceServerException(message, status="400")
    triton = triton_client_with(FakeTriton(max_batch_size=4, fail=error), concurrency=4)
    request = triton._bytes_input("IMAGE", [b"a", b"b"])
    with pytest.raises(InvalidInput) as caught:
        await triton._infer(model, request, ("EMBEDDING",), offset=8)
    assert caught.value.index == 9
    assert str(caught.value) == f"inputs[9]: {message.split(': ', 1)[1]}"


@pytest.mark.parametrize(
    ("status", "message", "probe_fails", "expected"),
    [
        # Triton's INTERNAL and the model is broken (its probe fails too): retry later.
        ("500", "Stub process 'iei_0_0' is not healthy.", True, 503),
        ("404", "Request for unknown model: 'iei' is not found", False, 503),  # restarting
        ("503", "Exceeds maximum queue size", False, 503),
        # Triton's INTERNAL but the model answers its probe: this inference failed.
        ("500", "Failed to process the request(s), message: the model broke", False, 424),
        # Words inside a message decide nothing: CUDA's "named symbol not found" is no 404.
        ("500", "CUDA error: named symbol not found", False, 424),
        ("400", "the model refused it", False, 422),  # INVALID_ARG without an item's index
    ],
)
async def test_triton_errors_are_classified_by_status(status, message, probe_fails, expected):
    fail = InferenceServerException(message, status=status)
    triton = triton_client_with(FakeTriton(fail=fail, probe_fails=probe_fails), concurrency=4)
    with pytest.raises(ApiError) as caught:
        await triton.embed([b"a"])
    assert caught.value.status == expected
    assert message in caught.value.message


async def test_the_first_failed_chunk_cancels_the_others():
    class FailsFirst(FakeTriton):
        async def infer(self, name, inputs, outputs=None, priority=0):
            if inputs[0].test_images[0][0] == b"\x00":
                raise InferenceServerException("IMAGE[0]: bad", status="400")
            return await super().infer(name, inputs, outputs, priority)

    fake = FailsFirst(max_batch_size=1, delay=30)
    triton = triton_client_with(fake, concurrency=4)
    started = time.monotonic()
    with pytest.raises(InvalidInput, match=r"inputs\[0\]: bad"):
        await triton.embed([bytes([i]) for i in range(4)])
    assert time.monotonic() - started < 5  # the three 30 s chunks were cancelled, not awaited
    assert fake.in_flight == 0  # and nothing of the request is left running


async def test_probes_share_one_inference_at_the_head_of_the_queue():
    fake = FakeTriton(delay=0.2)
    triton = triton_client_with(fake, concurrency=4)
    answers = await asyncio.gather(*(triton.is_ready() for _ in range(10)))
    assert answers == [True] * 10
    assert fake.priorities == [PROBE_PRIORITY]  # one probe for ten callers, prioritised
    assert await triton.is_ready()  # a recent success vouches for the model: no new probe
    assert len(fake.priorities) == 1


async def test_a_probe_that_cannot_finish_in_time_says_not_ready_in_time(monkeypatch):
    monkeypatch.setattr(triton_client, "PROBE_TIMEOUT", 0.3)
    triton = triton_client_with(FakeTriton(delay=30), concurrency=4)
    started = time.monotonic()
    assert not await triton.is_ready()
    assert time.monotonic() - started < 1


class QueueFull(FakeTriton):
    """Every request, the probe too, refused (a full queue), while Triton's statistics say that
    `successes` requests of other clients were completed."""

    def __init__(self) -> None:
        super().__init__(fail=InferenceServerException("Exceeds maximum queue size", status="503"))
        self.probe_fails = True
        self.successes = 100

    async def get_inference_statistics(self, name):
        count = {"success": {"count": self.successes, "ns": 1}}
        return {"model_stats": [{"name": name, "inference_stats": count}]}


async def test_a_full_queue_that_refuses_the_probe_is_healthy_while_the_model_makes_progress(
    monkeypatch,
):
    fake = QueueFull()
    triton = triton_client_with(fake, concurrency=4)
    assert not await triton.is_ready()  # nothing completed since: no evidence the model works
    fake.successes += 3  # others' requests completed meanwhile
    assert await triton.is_ready()
    assert await triton.is_ready()  # within the horizon of the earlier look
    monkeypatch.setattr(triton_client, "PROGRESS_HORIZON", 0.0)  # the earlier looks expire
    assert not await triton.is_ready()  # nothing completed since: as a dead model
    fake.successes += 1
    monkeypatch.setattr(triton_client, "PROGRESS_HORIZON", 30.0)
    assert await triton.is_ready()


async def test_progress_before_the_model_failed_a_request_does_not_excuse_a_held_probe(
    monkeypatch,
):
    """A dead stub's probe may hang rather than fail: the successes counted before the model
    failed a request do not vouch for it."""
    fake = QueueFull()
    triton = triton_client_with(fake, concurrency=4)
    assert not await triton.is_ready()  # a first look
    fake.successes += 3
    fake.fail = InferenceServerException("Stub process 'iei_0_0' is not healthy.", status="500")
    monkeypatch.setattr(triton_client, "PROBE_TIMEOUT", 0.3)
    fake.delay = 1  # every call, the probe's too, hangs past the probe's timeout
    with pytest.raises(ApiError) as failed:
        await triton.embed([b"a"])  # the model fails it, and its probe hangs
    assert failed.value.error_type == ErrorType.UNHEALTHY  # not a 424 for the request
    assert not await triton.is_ready()


async def test_a_probe_that_the_model_fails_is_not_excused_by_earlier_progress():
    fake = QueueFull()
    fake.fail = InferenceServerException("Stub process 'iei_0_0' is not healthy.", status="500")
    triton = triton_client_with(fake, concurrency=4)
    assert not await triton.is_ready()
    fake.successes += 5
    assert not await triton.is_ready()  # a dead stub: the others' past successes do not count


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


class UnreadBody:
    """A request body that records whether anyone read it."""

    def __init__(self, size: int = 1 << 20) -> None:
        self.size = size
        self.read = False

    async def __aiter__(self):
        self.read = True
        yield b'{"inputs": ["' + b"A" * self.size + b'"]}'


async def test_a_wrong_key_is_refused_before_the_body_is_read():
    settings = ServerSettings(triton_url="127.0.0.1:1", api_key=SecretStr("k"))
    async with app_client(settings, FakeTriton()) as client:
        body = UnreadBody()
        response = await client.post("/embed", content=body)
        assert response.status_code == 401
        assert response.json()["error_type"] == "Unauthorized"
        assert not body.read
        assert (await client.get("/live")).status_code == 200  # probes need no key
        assert (await client.get("/health")).status_code == 200


async def test_a_full_worker_refuses_before_the_body_is_read():
    settings = ServerSettings(triton_url="127.0.0.1:1", max_concurrent_images=64)
    async with app_client(settings, FakeTriton()) as client:
        permits = client._transport.app.state.services.permits  # type: ignore[attr-defined]
        permits.used = permits.capacity
        body = UnreadBody()
        response = await client.post("/v1/embeddings", content=body)
        assert response.status_code == 429
        assert response.headers["retry-after"] == "1"
        assert not body.read
        permits.used = 0
        assert (await client.post("/embed", json={"inputs": [PNG]})).status_code == 200


async def test_a_large_json_body_is_parsed_off_the_event_loop(monkeypatch):
    parsed_in_thread = []
    original = routing.run_in_threadpool

    async def recording(function, *args):
        parsed_in_thread.append(len(args[0]))
        return await original(function, *args)

    monkeypatch.setattr(routing, "run_in_threadpool", recording)
    settings = ServerSettings(triton_url="127.0.0.1:1")
    async with app_client(settings, FakeTriton()) as client:
        assert (await client.post("/embed", json={"inputs": [PNG]})).status_code == 200
        assert parsed_in_thread == []  # a small body: on the loop
        large = {"inputs": [PNG], "padding": "x" * routing.INLINE_JSON_BYTES}
        assert (await client.post("/embed", json=large)).status_code == 200
        assert len(parsed_in_thread) == 1 and parsed_in_thread[0] > routing.INLINE_JSON_BYTES
        bad = b"{" * (routing.INLINE_JSON_BYTES + 1)
        response = await client.post(
            "/embed", content=bad, headers={"content-type": "application/json"}
        )
        assert response.status_code == 422  # bad JSON parsed in the thread is still a 422


async def test_liveness_does_not_depend_on_triton():
    settings = ServerSettings(triton_url=f"127.0.0.1:{free_port()}")
    async with app_client(settings) as client:
        assert (await client.get("/live")).json() == {"status": "alive"}
        assert (await client.get("/health")).status_code == 503
