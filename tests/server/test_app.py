"""The frontend without Triton: chunking, concurrency, error mapping, health when Triton is down.

A fake tritonclient stands in for Triton, so these run in milliseconds.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import re
import time
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from iei.contract import (
    EXECUTION_CORES_METRIC,
    EXECUTION_SECONDS_METRIC,
    PROBE_IMAGE,
    PROBE_PRIORITY,
)
from iei.server import routing, triton_client
from iei.server.app import create_app
from iei.server.errors import ApiError, ErrorType
from iei.server.inputs import InvalidInput
from iei.server.settings import ServerSettings
from iei.server.triton_client import TritonClient
from iei.settings import SETTINGS
from PIL import Image
from polling import eventually
from pydantic import SecretStr
from sample_images import encode
from stack import free_port
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
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
        self.outputs: list[tuple[str, ...]] = []  # the outputs each call asked for

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
        self.outputs.append(tuple(output.name() for output in outputs or []))
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
    """Let the fake read the items back as tritonclient's numpy input would hold them."""
    from iei.server.triton_http import FilesInput

    def test_images(self: FilesInput) -> np.ndarray:
        array = np.empty((len(self.items), 1), dtype=np.object_)
        array[:, 0] = self.items
        return array

    monkeypatch.setattr(FilesInput, "test_images", property(test_images), raising=False)


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


async def test_the_readmes_chunk_example_with_the_default_settings():
    """README: with the defaults (IEI_CONCURRENCY_LEVEL 32, max_batch_size 64) a request of 64
    images is two chunks of 32, sent one after the other."""
    level = ServerSettings(triton_url="127.0.0.1:1").concurrency_level
    fake = FakeTriton(max_batch_size=64, delay=0.01)
    await triton_client_with(fake, concurrency=level).embed([bytes([i]) for i in range(64)])
    assert (level, fake.chunks, fake.peak) == (32, [32, 32], 32)


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


async def test_the_first_failed_chunk_cancels_the_unsent_ones_and_outlives_the_sent_ones():
    """A chunk already in Triton is computed anyway: it runs to its end, counted in the
    request's work (its permits stay taken); the chunks not yet sent never are."""
    from iei.server.limits import WORK, Work

    class FailsFirst(FakeTriton):
        async def infer(self, name, inputs, outputs=None, priority=0):
            if inputs[0].test_images[0][0] == b"\x00":
                raise InferenceServerException("IMAGE[0]: bad", status="400")
            return await super().infer(name, inputs, outputs, priority)

    fake = FailsFirst(max_batch_size=1, delay=1.0)
    triton = triton_client_with(fake, concurrency=2)  # two chunks of one in flight at once
    work = Work()
    WORK.set(work)
    started = time.monotonic()
    with pytest.raises(InvalidInput, match=r"inputs\[0\]: bad"):
        await triton.embed([bytes([i]) for i in range(4)])
    assert time.monotonic() - started < 1.0  # the request fails at once, before a chunk's 1 s
    # chunk 1 (and chunk 2, when it took chunk 0's turn first) runs on, counted in the work
    assert work.running == fake.in_flight >= 1
    await eventually(lambda: (fake.in_flight, work.running) == (0, 0), "the work done")
    assert len(fake.chunks) <= 2  # the last chunks were never sent


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
    assert time.monotonic() - started < 1.5  # at the 0.3 s patched in, not the default 2 s


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


class TritonMetrics:
    """Triton's metrics port as the model's instances show their long executions on it: every
    instance's execution `grows` seconds a second, shown in whole seconds (the stubs show them
    once a second)."""

    def __init__(self, instances: dict[str, str], cores: float, grows: float = 1.0) -> None:
        self.instances = instances  # instance -> its model
        self.cores, self.grows = cores, grows
        self.began = time.monotonic()
        self.status = 200
        self.reads = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/metrics"
        self.reads += 1
        self.seconds = 10.0 + math.floor(self.grows * (time.monotonic() - self.began))
        lines = [
            "# HELP nv_inference_count Number of inferences",
            "# TYPE nv_inference_count counter",
            'nv_inference_count{model="iei",version="1"} 7',
        ]
        for name, value in (
            (EXECUTION_SECONDS_METRIC, self.seconds),
            (EXECUTION_CORES_METRIC, self.cores),
        ):
            lines += [f"# HELP {name} what it is", f"# TYPE {name} gauge"]
            lines += [
                f'{name}{{model="{model}",instance="{instance}"}} {value}'
                for instance, model in self.instances.items()
            ]
        return httpx.Response(self.status, text="\n".join(lines) + "\n")


def held_probe_client(
    metrics: TritonMetrics | None, monkeypatch, model: str = "iei"
) -> TritonClient:
    """A client whose probes are held in the queue (an execution in front of them), reading
    `metrics` as Triton's metrics port."""
    monkeypatch.setattr(triton_client, "PROBE_TIMEOUT", 0.3)
    triton = triton_client_with(FakeTriton(delay=30), concurrency=4)
    if metrics is not None:
        transport = httpx.MockTransport(metrics)
        triton._metrics = httpx.AsyncClient(transport=transport, base_url="http://triton:8002")
    return triton


@pytest.mark.parametrize(
    ("instances", "model"),
    [
        ({"iei_0_0": "iei", "iei_0_1": "iei"}, "iei"),
        ({"iei_encoder_0_0": "iei_encoder"}, "iei"),  # the split layout's step
        ({"iei__b_preprocess_0_0": "iei__b_preprocess"}, "iei__b"),  # another model's step
    ],
)
async def test_a_probe_held_behind_an_execution_that_computes_is_healthy(
    instances, model, monkeypatch
):
    """One batch of a large model on a CPU runs for tens of seconds: the probe waits behind it
    and nothing completes meanwhile, but the model works (it used to read as not ready)."""
    metrics = TritonMetrics(instances, cores=1.7)
    triton = held_probe_client(metrics, monkeypatch)
    assert await triton.is_ready((model,))
    assert metrics.reads == 2  # as the probe began, and once it was held
    assert not await held_probe_client(None, monkeypatch).is_ready((model,))  # no metrics known


@pytest.mark.parametrize(
    ("metrics", "why"),
    [
        (TritonMetrics({"iei_0_0": "iei"}, cores=0.05), "a sleep or a deadlock: no CPU"),
        (TritonMetrics({"iei_0_0": "iei"}, cores=1.7, grows=0.0), "frozen: the stub stopped"),
        (TritonMetrics({"iei__b_0_0": "iei__b"}, cores=1.7), "another model's execution"),
        (TritonMetrics({"iei_text_0_0": "iei_text"}, cores=1.7), "the text model's"),
        (TritonMetrics({}, cores=1.7), "no instance shows one"),
    ],
)
async def test_a_held_probe_is_not_excused_by_an_execution_that_does_not_compute(
    metrics, why, monkeypatch
):
    triton = held_probe_client(metrics, monkeypatch)
    assert not await triton.is_ready(("iei",)), why


async def test_a_held_probe_is_not_ready_when_the_metrics_cannot_be_read(monkeypatch):
    metrics = TritonMetrics({"iei_0_0": "iei"}, cores=1.7)
    metrics.status = 500
    assert not await held_probe_client(metrics, monkeypatch).is_ready()
    triton = held_probe_client(None, monkeypatch)
    nothing_listens = f"http://127.0.0.1:{free_port()}"
    triton._metrics = httpx.AsyncClient(base_url=nothing_listens)
    assert not await triton.is_ready()
    await triton.close()


async def test_a_probe_answered_at_once_reads_no_metrics():
    """A healthy model's probe (the common case, here 0.1 s) costs Triton no metrics page."""
    metrics = TritonMetrics({"iei_0_0": "iei"}, cores=1.7)
    triton = triton_client_with(FakeTriton(delay=0.1), concurrency=4)
    triton._metrics = httpx.AsyncClient(
        transport=httpx.MockTransport(metrics), base_url="http://triton:8002"
    )
    assert await triton.model_answers()
    await asyncio.sleep(2 * triton_client.FIRST_READ_AFTER)
    assert metrics.reads == 0


async def test_a_probe_refused_by_a_full_queue_is_excused_by_an_execution_that_computes():
    """Refused at once (503): the second read waits until the stubs have shown a second more."""
    metrics = TritonMetrics({"iei_0_0": "iei"}, cores=1.2)
    triton = triton_client_with(QueueFull(), concurrency=4)
    triton._metrics = httpx.AsyncClient(
        transport=httpx.MockTransport(metrics), base_url="http://triton:8002"
    )
    started = time.monotonic()
    assert await triton.is_ready()
    assert triton_client.READS_APART <= time.monotonic() - started < 2.5


async def test_a_held_probe_is_not_ready_when_the_metrics_page_is_not_prometheus_text(
    monkeypatch,
):
    def garbage(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text='iei_execution_seconds{model="iei" 12\n')

    triton = held_probe_client(None, monkeypatch)
    triton._metrics = httpx.AsyncClient(transport=httpx.MockTransport(garbage), base_url="http://t")
    assert not await triton.is_ready()


def test_the_metrics_endpoint_is_host_and_port():
    given = ServerSettings(triton_url="triton:8000", triton_metrics_url="http://triton:8002/")
    assert given.triton_metrics_url == "triton:8002"
    with pytest.raises(ValueError, match="expected host:port"):
        ServerSettings(triton_metrics_url="triton")


@asynccontextmanager
async def app_client(settings: ServerSettings, fake: FakeTriton | None = None):
    """The app with its lifespan run, and Triton replaced by `fake` when given. The content cache
    is off unless `settings` name `cache_mb`: the fake's vectors tell calls apart (chunk sizes),
    and these tests count calls; the cache's own tests turn it on."""
    if "cache_mb" not in settings.model_fields_set:
        settings = settings.model_copy(update={"cache_mb": 0})
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


async def test_a_timed_out_request_keeps_its_permits_until_triton_answers():
    """The 504 does not stop Triton: the request's inputs stay counted (and refuse others)
    until its call returns, so IEI_MAX_CONCURRENT_IMAGES bounds what really runs."""
    settings = ServerSettings(
        triton_url="127.0.0.1:1",
        request_timeout=0.2,
        max_client_batch_size=2,
        max_concurrent_images=2,
    )
    fake = FakeTriton(delay=1.5)
    async with app_client(settings, fake) as client:
        permits = client._transport.app.state.services.permits  # type: ignore[attr-defined]
        bodies = client._transport.app.state.bodies  # type: ignore[attr-defined]
        timed_out = await client.post("/embed", json={"inputs": [PNG, PNG]})
        assert timed_out.status_code == 504
        assert (fake.in_flight, permits.used) == (2, 2)  # Triton still computes both
        assert bodies.used > 0  # and the body's bytes live on in that work
        refused = await client.post("/embed", json={"inputs": [PNG]})
        assert refused.status_code == 429
        # Given back when Triton answered: the call's done-callback runs a loop turn after the
        # fake's last line, so the poll waits for all three rather than reading the permits at once.
        await eventually(
            lambda: (fake.in_flight, permits.used, bodies.used) == (0, 0, 0), "all given back"
        )
        fake.delay = 0
        assert (await client.post("/embed", json={"inputs": [PNG]})).status_code == 200


async def test_a_timed_out_request_keeps_its_permits_until_its_decoding_thread_ends(monkeypatch):
    from iei.server import embedding as service

    finished = []

    def slow_prepare(*args):
        time.sleep(1.0)
        finished.append(True)
        return []

    monkeypatch.setattr(service, "prepare_inputs", slow_prepare)
    monkeypatch.setattr(service, "INLINE_INPUTS", 0)  # every input decoded in a thread
    settings = ServerSettings(triton_url="127.0.0.1:1", request_timeout=0.2)
    async with app_client(settings, FakeTriton()) as client:
        permits = client._transport.app.state.services.permits  # type: ignore[attr-defined]
        response = await client.post("/embed", json={"inputs": [PNG, PNG, PNG]})
        assert response.status_code == 504
        assert (finished, permits.used) == ([], 3)  # the thread runs on: its inputs counted
        await eventually(lambda: bool(finished), "the request finished")
        await eventually(lambda: permits.used == 0, "the permits given back")


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


async def test_refusals_of_truncate_false_and_dimensions_come_before_any_embedding():
    settings = ServerSettings(triton_url="127.0.0.1:1")
    fake = FakeTriton(info=WITH_TEXT)
    async with app_client(settings, fake) as client:
        assert (await client.get("/info")).json()["embedding_dimension"] == 2  # asked once
        fake.outputs.clear()
        too_long = {"inputs": ["a", "a b c d", PNG], "modality": "text", "truncate": False}
        refused = await client.post("/embed", json=too_long)
        assert refused.status_code == 422
        assert "inputs[1]: text of 6 tokens is longer" in refused.json()["error"]
        assert fake.outputs == [("TOKENS",)]  # tokens counted, nothing embedded
        wide = {"input": [{"text": "a"}, {"image": PNG}], "dimensions": 3}
        refused = await client.post("/v1/embeddings", json=wide)
        assert refused.status_code == 422
        assert "dimensions 3 > the model's 2 dimensions" in refused.json()["error"]["message"]
        assert fake.outputs == [("TOKENS",)]  # no call at all
        fits = {"inputs": ["a b c"], "modality": "text", "truncate": False, "normalize": False}
        assert (await client.post("/embed", json=fits)).json() == [[5.0, 1.0]]
        assert fake.outputs[1:] == [("TOKENS",), ("EMBEDDING", "TOKENS")]


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
    assert info["limits"]["body_worker_max_bytes"] == 64 * 1024 * 1024
    assert info["limits"]["body_read_timeout"] == 30


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
        assert (await client.head("/health")).status_code == 200


def documented_exempt_routes() -> list[str]:
    """The routes IEI_API_KEY's description (the settings table, README's table) names as open."""
    description = SETTINGS["api_key"].description
    return re.findall(r"`(?:GET )?(/[a-z./]*)`", description)


def served_routes(routes: list) -> list[tuple[str, set[str]]]:
    """(path, methods but HEAD) of every route, those of included routers too (FastAPI 0.165
    keeps an included router whole, as `original_router`)."""
    found = []
    for route in routes:
        if hasattr(route, "original_router"):
            found += served_routes(route.original_router.routes)
        elif getattr(route, "methods", None):
            found.append((route.path, set(route.methods) - {"HEAD"}))
    return found


async def test_the_routes_documented_as_open_are_open_and_no_other():
    exempt = documented_exempt_routes()
    assert {"/health", "/live", "/metrics", "/docs", "/redoc", "/openapi.json", "/"} == set(exempt)

    def documented(method: str, path: str) -> bool:  # "`/docs` and below"; the demo page is a GET
        return method == "GET" and (path in exempt or path.startswith("/docs/"))

    settings = ServerSettings(triton_url="127.0.0.1:1", api_key=SecretStr("k"))
    async with app_client(settings, FakeTriton()) as client:
        app = client._transport.app  # type: ignore[attr-defined]
        routes = {(m, path) for path, methods in served_routes(app.routes) for m in methods}
        assert {("GET", p) for p in exempt} <= routes
        for method, path in sorted(routes):
            response = await client.request(method, path)
            if documented(method, path):
                assert response.status_code != 401, (method, path)
            else:
                assert response.status_code == 401, (method, path, response.text)
                key = {"Authorization": "Bearer k"}
                assert (await client.request(method, path, headers=key)).status_code != 401
    # The prose of README and docs/ says the same wherever it lists them.
    for document in (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))):
        text = " ".join(document.read_text().split())
        for found in re.finditer(r"every route (?:but|except)", text):
            listed = text[found.start() : found.start() + 300]
            for route in ("`/health`", "`/live`", "`/metrics`", "`/redoc`", "`/openapi.json`"):
                assert route in listed, (document.name, listed)
            assert "`GET /`" in listed, (document.name, listed)


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


class SlowBody:
    """A body sent in two parts, the second only once `go` is set."""

    def __init__(self, first: bytes, second: bytes = b"") -> None:
        self.first, self.second = first, second
        self.go = asyncio.Event()
        self.read = False  # the server asked for it

    async def __aiter__(self):
        self.read = True
        yield self.first
        await self.go.wait()
        yield self.second


async def test_a_body_that_does_not_arrive_in_time_is_a_408_and_frees_its_bytes():
    settings = ServerSettings(triton_url="127.0.0.1:1", body_read_timeout=0.3)
    async with app_client(settings, FakeTriton()) as client:
        bodies = client._transport.app.state.bodies  # type: ignore[attr-defined]
        started = time.monotonic()
        body = SlowBody(b'{"inputs": ["')
        response = await client.post(
            "/embed", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 408
        assert response.json()["error_type"] == "Timeout"
        assert "IEI_BODY_READ_TIMEOUT" in response.json()["error"]
        assert time.monotonic() - started < 5  # at its 0.3 s timeout, not never
        assert bodies.used == 0
        assert (await client.post("/embed", json={"inputs": [PNG]})).status_code == 200


async def test_the_bodies_a_worker_holds_are_bounded_together():
    """Bodies count as their bytes arrive, until their request ends; a Content-Length that could
    not fit beside them is a 429 at once, and a body that grows past IEI_BODY_WORKER_MAX_BYTES a
    429 when it does."""
    settings = ServerSettings(
        triton_url="127.0.0.1:1", payload_limit=6000, body_worker_max_bytes=10000
    )
    json_type = {"content-type": "application/json"}
    async with app_client(settings, FakeTriton()) as client:
        bodies = client._transport.app.state.bodies  # type: ignore[attr-defined]
        first = b'{"inputs": ["' + PNG.encode() + b'"], "padding": "' + b"x" * 4000
        slow = SlowBody(first, b"x" * (5000 - len(first) - 2) + b'"}')
        declared = {**json_type, "content-length": "5000"}
        holding = asyncio.create_task(client.post("/embed", content=slow, headers=declared))
        await eventually(lambda: bodies.used == len(first), "its first part counted")
        chunked = SlowBody(b"x" * 3000, b"x" * 3000)  # no Content-Length
        streaming = asyncio.create_task(client.post("/embed", content=chunked, headers=json_type))
        await eventually(lambda: bodies.used == len(first) + 3000, "3000 bytes more counted")
        unread = UnreadBody(5400)
        refused = await client.post(
            "/v1/embeddings", content=unread, headers={"content-length": "5500"}
        )
        assert refused.status_code == 429 and not unread.read
        assert refused.headers["retry-after"] == "1"
        assert "IEI_BODY_WORKER_MAX_BYTES" in refused.json()["error"]["message"]
        chunked.go.set()  # its second part would pass the worker's bound
        overloaded = await streaming
        assert overloaded.status_code == 429, overloaded.text
        assert overloaded.json()["error_type"] == "Overloaded"
        assert bodies.used == len(first)
        slow.go.set()
        assert (await holding).status_code == 200
        assert bodies.used == 0


async def test_a_body_declared_but_not_sent_holds_nothing():
    """Two clients that declare the largest body and send none of it do not shut the worker to
    others until their 408."""
    settings = ServerSettings(
        triton_url="127.0.0.1:1", payload_limit=6000, body_worker_max_bytes=10000
    )
    async with app_client(settings, FakeTriton()) as client:
        bodies = client._transport.app.state.bodies  # type: ignore[attr-defined]
        idle = [SlowBody(b"") for _ in range(2)]
        headers = {"content-type": "application/json", "content-length": "6000"}
        waiting = [
            asyncio.create_task(client.post("/embed", content=body, headers=headers))
            for body in idle
        ]
        await eventually(lambda: all(body.read for body in idle), "both bodies being read")
        assert not any(task.done() for task in waiting)
        assert bodies.used == 0
        assert (await client.post("/embed", json={"inputs": [PNG]})).status_code == 200
        for task in waiting:
            task.cancel()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/embed", b'{"inputs": [' + b'"a",' * 200_000 + b'"a"]}'),
        ("/v1/embeddings", b'{"input": [' + b"{}," * 200_000 + b"{}]}"),
        ("/v2/embed", b'{"model": "m", "inputs": [' + b'{"content": []},' * 200_000 + b"{}]}"),
    ],
)
async def test_a_json_body_of_too_many_values_is_refused_before_it_is_parsed(path, body):
    """Millions of tiny values in a body within IEI_PAYLOAD_LIMIT once took a worker's memory
    to gigabytes and its loop for half a minute (uvicorn killed it as hung)."""
    settings = ServerSettings(triton_url="127.0.0.1:1")
    async with app_client(settings, FakeTriton(info=WITH_TEXT)) as client:
        started = time.monotonic()
        response = await client.post(
            path, content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 422, response.text
        assert "the JSON body holds more than 100000 values" in response.text
        assert time.monotonic() - started < 5  # validating them all: tens of seconds
        # Bodies that would make a backtracking search of the strings take minutes: invalid
        # JSON (a string left open), answered at once.
        for hostile in (  # over INLINE_JSON_BYTES: counted
            b'"' + b'\\"' * 100_000 + b"," * 100_001,
            b'"' + b'\\"' * 100_000 + b"," * 100_001 + b"\\",
        ):
            started = time.monotonic()
            response = await client.post(path, content=hostile)
            assert response.status_code == 422 and time.monotonic() - started < 5
        # Empty strings back to back: each one a token, counted (reading through tens of
        # millions of them took seconds when only the tokens outside strings counted).
        strings = b'["' + b"," * 100_001 + b'"' + b'""' * 400_000 + b"]"
        response = await client.post(path, content=strings)
        assert "the JSON body holds more than 100000 values" in response.text
        # Commas in texts are no values: 64 texts of 4000 each are a request like any other.
        texts = {"inputs": ["," * 4000] * 64, "modality": "text"}
        assert (await client.post("/embed", json=texts)).status_code == 200


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


async def test_a_body_without_content_type_is_json_and_a_json_route_refuses_others():
    settings = ServerSettings(triton_url="127.0.0.1:1")
    body = json.dumps({"inputs": [PNG]}).encode()
    async with app_client(settings, FakeTriton()) as client:
        untyped = await client.post("/embed", content=body)  # no Content-Type at all
        assert untyped.status_code == 200, untyped.text
        openai = await client.post("/v1/embeddings", content=json.dumps({"input": PNG}))
        assert openai.status_code == 200, openai.text
        for path in ("/v1/embeddings", "/v2/embed"):
            refused = await client.post(
                path, content=b"\xff\xd8", headers={"content-type": "image/jpeg"}
            )
            assert refused.status_code == 415, refused.text
            assert "'image/jpeg' is not supported: send `application/json`" in refused.text


async def test_liveness_does_not_depend_on_triton():
    settings = ServerSettings(triton_url=f"127.0.0.1:{free_port()}")
    async with app_client(settings) as client:
        assert (await client.get("/live")).json() == {"status": "alive"}
        assert (await client.get("/health")).status_code == 503
        # A load balancer's check may send HEAD: the same status, no body.
        assert (await client.head("/live")).status_code == 200
        assert (await client.head("/health")).status_code == 503


# --- access log and metrics ---------------------------------------------------------------------


class Lines(logging.Handler):
    """The `iei` logger's records, formatted as the frontend writes them."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def log_lines():
    handler = Lines()
    logger = logging.getLogger("iei")
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


async def test_client_strings_cannot_forge_a_log_line(log_lines):
    settings = ServerSettings(triton_url="127.0.0.1:1")
    forged = "/health%0aINFO GET /embed 200 1.0 ms%0d%1b[2J%e2%80%a8"
    async with app_client(settings, FakeTriton()) as client:
        response = await client.get(forged, headers={"x-request-id": "ok\nINFO forged"})
    assert response.status_code == 404
    assert response.headers["x-request-id"] != "ok\nINFO forged"  # replaced by a fresh id
    [line] = [line for line in log_lines if " 404 " in line]
    assert "\n" not in line and "\r" not in line and "\x1b" not in line and "\u2028" not in line
    assert line.startswith(
        "INFO GET /health\\x0aINFO GET /embed 200 1.0 ms\\x0d\\x1b[2J\\x2028 404 "
    )


def requests_counted(route: str, status: int) -> float:
    from prometheus_client import REGISTRY

    labels = {"route": route, "status": str(status)}
    return REGISTRY.get_sample_value("iei_requests_total", labels) or 0.0


async def test_answers_given_before_the_route_are_counted_by_route_and_status():
    settings = ServerSettings(triton_url="127.0.0.1:1", api_key=SecretStr("k"), payload_limit=2048)
    key = {"authorization": "Bearer k"}
    # (method, path, headers, body, route label, status)
    cases = [
        ("POST", "/embed", {}, b"{}", "/embed", 401),
        ("POST", "/v1/embeddings", key, b"x" * 4096, "/v1/embeddings", 413),
        ("POST", "/embed", key, b"{}", "/embed", 429),
        ("GET", "/no/such/route/1", {}, b"", "unmatched", 401),
        ("GET", "/no/such/route/2", key, b"", "unmatched", 404),
        ("GET", "/openapi.json", {}, b"", "/openapi.json", 200),  # FastAPI's own routes too
        ("GET", "/docs", {}, b"", "/docs", 200),
        (
            "POST",
            "/embed",
            {**key, "content-type": "application/json"},
            json.dumps({"inputs": [PNG]}).encode(),
            "/embed",
            200,
        ),
    ]
    async with app_client(settings, FakeTriton()) as client:
        permits = client._transport.app.state.services.permits  # type: ignore[attr-defined]
        for method, path, headers, body, route, status in cases:
            before = requests_counted(route, status)
            permits.used = permits.capacity if status == 429 else 0
            response = await client.request(method, path, headers=headers, content=body)
            assert response.status_code == status, (path, response.text)
            assert requests_counted(route, status) == before + 1, (route, status)
        exposed = (await client.get("/metrics")).text
    assert "/no/such/route" not in exposed  # clients cannot make label values


class BrokenTriton(FakeTriton):
    """A bug of ours, not a failure of Triton's: an exception no handler maps."""

    async def infer(self, name, inputs, outputs=None, priority=0):
        raise KeyError("a bug")


@pytest.mark.parametrize("path", ["/embed", "/v1/embeddings"])
async def test_an_unexpected_error_is_a_500_in_the_route_s_shape_with_the_request_id(path):
    """Starlette answers the unexpected outside every middleware, where the id was gone."""
    body = {"inputs": [PNG]} if path == "/embed" else {"input": [PNG]}
    async with app_client(ServerSettings(triton_url="127.0.0.1:1"), BrokenTriton()) as client:
        response = await client.post(path, json=body, headers={"x-request-id": "abc123"})
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "abc123"
    answer = response.json()
    assert answer["request_id"] == "abc123"
    if path == "/embed":
        assert (answer["error_type"], answer["error"]) == ("Internal", "internal error")
    else:
        assert answer["error"]["type"] == "server_error"
        assert answer["error"]["message"] == "internal error"
    assert "a bug" not in response.text  # nothing of the cause leaks
