"""The split layout through the real stack (IEI_TRITON_LAYOUT=split): `iei` is Triton's ensemble of
`iei_preprocess` (CPU processes) and `iei_encoder`, with JPEGs decoded as tensors by torchvision
(on a GPU host nvImageCodec or nvJPEG take that place: the same code after the decode). The
contract does not change: the reference's vectors, one bad image fails its own request, Triton's
`iei` answers gRPC clients directly, the health probe passes through the ensemble (also when the
queue is full), and every image that falls back to PIL is counted in Triton's metrics."""

from __future__ import annotations

import asyncio
import base64
import io
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpc_aio
from iei.server.triton_client import PROBE_TIMEOUT, VERIFIED_FOR
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


def test_the_supervisor_counts_the_ensemble_s_answers_as_progress(split_stack, tmp_path):
    """A held probe is load when `iei` answered others meanwhile: in the split layout that is
    the ensemble, whose successes Triton counts once both steps have answered."""
    from iei.launcher.settings import LauncherSettings
    from iei.launcher.triton_process import TritonServer

    settings = LauncherSettings(triton_http_port=split_stack.triton_http_port)
    server = TritonServer(settings, tmp_path)
    before = server.completed()
    assert before is not None
    # An image no other test sent: the content cache would answer one it has seen.
    pixels = np.random.default_rng().integers(0, 255, (64, 48, 3), dtype=np.uint8)
    fresh = encode(Image.fromarray(pixels), "JPEG", quality=90)
    assert post_embed(split_stack, [fresh]).status_code == 200
    assert (server.completed() or 0) >= before + 1


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


def fallbacks(stack: Stack) -> dict[tuple[str, str], float]:
    """iei_pil_fallback_total by (model, reason), from Triton's metrics endpoint."""
    port = stack.env["IEI_TRITON_METRICS_PORT"]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    series = re.findall(r"iei_pil_fallback_total\{([^}]*)\} ([0-9.e+]+)", text)
    found = {}
    for labels, value in series:
        named = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        found[(named["model"], named["reason"])] = float(value)
    return found


def test_every_fallback_to_pil_is_counted_in_triton_s_metrics(split_stack):
    before = fallbacks(split_stack)
    assert before.get(("iei_encoder", "decoder_refused")) is not None, before  # from 0
    picture = Image.open(io.BytesIO(photos()["chelsea.jpg"]))
    cmyk = encode(picture.convert("CMYK"), "JPEG")
    files = [encode(picture, "PNG"), cmyk, encode(picture, "GIF")]
    assert post_embed(split_stack, files).status_code == 200
    after = fallbacks(split_stack)
    grown = {key: after[key] - before.get(key, 0) for key in after}
    # The supervisor's and /health's probes (a 1x1 PNG) count here too, whenever they run.
    assert grown[("iei_preprocess", "other_format")] >= 2
    assert grown[("iei_preprocess", "unsupported_jpeg")] == 1
    assert grown[("iei_encoder", "decoder_refused")] == 0


@pytest.fixture
def queue_stack(model_dirs, tmp_path):
    """The split layout with a short queue (4 requests) and one preprocessing process."""
    stack = Stack(
        model_dirs["vit"], tmp_path / "queue_stack.log",
        IEI_TRITON_LAYOUT="split", IEI_JPEG_DECODER="torchvision", IEI_PREPROCESS_INSTANCES="1",
        IEI_ENGINE="torch", IEI_TRITON_MAX_QUEUE_SIZE="4",
    ).start()  # fmt: skip
    yield stack
    assert stack.stop() == 0, stack.log()


class QueueFiller:
    """Keeps 16 requests of 32 PNGs (small files, but 1024x768 pixels for PIL to decode and
    resize: a second or more an execution on a busy CPU) in flight against Triton's `iei`
    directly (the frontend sees none of them succeed), so that its queue of 4 is full all along:
    the requests it refuses are counted and sent again."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.done = self.refused = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        ramp = np.linspace(0, 255, 1024 * 768 * 3).astype(np.uint8).reshape(768, 1024, 3)
        self.batch = np.array([[encode(Image.fromarray(ramp), "PNG")]] * 32, dtype=np.object_)

    def __enter__(self) -> QueueFiller:
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(120)

    async def _run(self) -> None:
        client = grpc_aio.InferenceServerClient(self.endpoint)
        try:
            await asyncio.gather(*(self._client(client) for _ in range(16)))
        finally:
            await client.close()

    async def _client(self, client: grpc_aio.InferenceServerClient) -> None:
        while not self.stop.is_set():
            image = grpc_aio.InferInput("IMAGE", list(self.batch.shape), "BYTES")
            image.set_data_from_numpy(self.batch)
            try:
                await client.infer("iei", [image])
                self.done += 1
            except Exception as exc:
                if "queue" in str(exc).lower():  # refused: the queue is full
                    self.refused += 1
                else:
                    self.errors.append(str(exc)[:200])
                await asyncio.sleep(0.05)


def test_health_stays_true_while_the_ensemble_s_queue_is_full(queue_stack):
    """Probed every 2 s as Kubernetes and compose do, for longer than a success vouches for the
    model (VERIFIED_FOR): past that, each probe asks the model itself, behind a full queue."""
    with QueueFiller(queue_stack.triton_grpc) as load:
        deadline = time.monotonic() + 120
        while load.done == 0 and time.monotonic() < deadline and not load.errors:
            time.sleep(0.2)
        assert load.done > 0, (load.refused, load.errors[:3])
        until = time.monotonic() + VERIFIED_FOR + 8
        while time.monotonic() < until:
            refused = load.refused
            started = time.monotonic()
            response = httpx.get(f"{queue_stack.url}/health", timeout=30)
            assert response.status_code == 200, (response.text, load.done, load.refused)
            assert time.monotonic() - started < PROBE_TIMEOUT + 1
            time.sleep(2.0)
            assert load.refused > refused  # the queue was full all along
    assert not load.errors, load.errors[:3]
