"""The frontend without Triton: chunking, concurrency, error mapping, health when Triton is down.

A fake tritonclient stands in for Triton, so these run in milliseconds.
"""

from __future__ import annotations

import asyncio
import base64
import time
from contextlib import asynccontextmanager

import httpx
import numpy as np
import pytest
from iei.contract import PROBE_IMAGE, PROBE_PRIORITY
from iei.server import routing, triton_client
from iei.server.app import create_app
from iei.server.errors import ApiError, ErrorType
from iei.server.settings import ServerSettings
from iei.server.triton_client import TritonClient
from PIL import Image
from pydantic import SecretStr
from sample_images import encode
from stack import free_port
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.anyio

PNG = base64.b64encode(encode(Image.new("RGB", (4, 4)), "PNG")).decode()


class FakeTriton:
    """Answers like tritonclient's aio client: vector i = [first byte value, chunk size]."""

    def __init__(
        self,
        max_batch_size: int = 4,
        fail: Exception | None = None,
        delay=0.0,
        probe_fails: bool = False,
    ):
        self.max_batch_size = max_batch_size
        self.fail = fail  # for every request but the health probe's 1x1 PNG...
        self.probe_fails = probe_fails  # ... which fails too when the whole model is broken
        self.delay = delay
        self.priorities: list[int] = []
        self.in_flight = 0
        self.peak = 0
        self.chunks: list[int] = []

    async def get_model_config(self, name):
        return {"max_batch_size": self.max_batch_size}

    async def is_model_ready(self, name):
        return True

    async def infer(self, name, inputs, outputs=None, priority=0):
        images = inputs[0].test_images
        probe = images.reshape(-1).tolist() == [PROBE_IMAGE]
        self.priorities.append(priority)
        self.in_flight += len(images)
        self.peak = max(self.peak, self.in_flight)
        self.chunks.append(len(images))
        try:
            await asyncio.sleep(self.delay)
            if self.fail and (not probe or self.probe_fails):
                raise self.fail
            return FakeResult(np.array([[row[0][0], len(images)] for row in images], "float32"))
        finally:
            self.in_flight -= len(images)

    async def close(self):
        pass


class FakeResult:
    def __init__(self, vectors):
        self.vectors = vectors

    def as_numpy(self, name):
        return self.vectors


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


async def test_the_models_image_error_names_the_clients_index():
    error = InferenceServerException("IMAGE[1]: cannot decode image: broken", status="400")
    triton = triton_client_with(FakeTriton(max_batch_size=4, fail=error), concurrency=4)
    with pytest.raises(ApiError) as caught:
        await triton._infer([b"a", b"b"], offset=8)
    assert caught.value.error_type == ErrorType.VALIDATION
    assert caught.value.message == "inputs[9]: cannot decode image: broken"


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
        ("400", "the model refused it", False, 422),
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
    with pytest.raises(ApiError, match=r"inputs\[0\]: bad"):
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
