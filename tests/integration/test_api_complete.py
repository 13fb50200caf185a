"""The rest of the HTTP API on the real stack: OpenAI routes, /info, /metrics, URL inputs,
auth, limits (413, 429), timing headers, and a schema-driven fuzz run."""

from __future__ import annotations

import asyncio
import base64
import functools
import http.server
import subprocess
import sys
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from sample_images import photos
from stack import Stack, local_http_server

# httpx's 5 s default timeout is short for real embeddings on a loaded 2-core CI machine.
http_post = functools.partial(httpx.post, timeout=60)
http_get = functools.partial(httpx.get, timeout=60)

pytestmark = pytest.mark.integration

KEY = "test-key-123"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def image_server() -> Iterator[str]:
    """Sample photos over HTTP on 127.0.0.1, plus redirects and an oversized file."""
    files = photos()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            name = self.path.lstrip("/")
            if name.startswith("redirect/"):
                self.send_response(302)
                self.send_header("Location", "/" + name.removeprefix("redirect/"))
                self.end_headers()
            elif name == "big.jpg":
                self.send_response(200)
                self.send_header("Content-Length", str(3 * 1024 * 1024))
                self.end_headers()
                self.wfile.write(b"\xff" * (3 * 1024 * 1024))
            elif name in files:
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(files[name])))
                self.end_headers()
                self.wfile.write(files[name])
            else:
                self.send_error(404)

    with local_http_server(Handler) as url:
        yield url


@pytest.fixture(scope="module")
def guarded_stack(model_dirs, tmp_path_factory) -> Iterator[Stack]:
    """A stack with an API key, private URLs allowed, and small limits."""
    log = tmp_path_factory.mktemp("logs") / "guarded.log"
    stack = Stack(
        model_dirs["vit"],
        log,
        IEI_API_KEY=KEY,
        IEI_ALLOW_PRIVATE_URLS="true",
        IEI_PAYLOAD_LIMIT=str(2 * 1024 * 1024),
        IEI_URL_MAX_BYTES=str(2 * 1024 * 1024),
        IEI_MAX_CONCURRENT_REQUESTS="8",  # the earlier name of IEI_MAX_CONCURRENT_IMAGES
        IEI_MAX_CLIENT_BATCH_SIZE="8",  # more would contradict it: start-up refuses that
        IEI_SERVED_MODEL_NAME="my-vit",
        IEI_WORKERS="2",
    ).start()
    yield stack
    assert stack.stop() == 0, stack.log()


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def tei_error(response: httpx.Response, status: int, error_type: str, fragment: str = "") -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_type", "request_id"}, body
    assert body["error_type"] == error_type
    assert fragment in body["error"]


def openai_error(response: httpx.Response, status: int, fragment: str = "") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code"}, error
    assert fragment in error["message"]
    return error


# --- OpenAI --------------------------------------------------------------------------------


def test_openai_shape_and_same_vectors_as_embed(vit_stack):
    files = list(photos().values())[:3]
    tei = http_post(f"{vit_stack.url}/embed", json={"inputs": [b64(f) for f in files]}).json()
    for path in ("/v1/embeddings", "/embeddings"):
        response = http_post(f"{vit_stack.url}{path}", json={"input": [b64(f) for f in files]})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "list"
        assert body["usage"] == {"prompt_tokens": 0, "total_tokens": 0}
        assert body["model"] == vit_stack.env["IMAGE_EMBEDDING_MODEL"]
        assert [d["index"] for d in body["data"]] == [0, 1, 2]
        assert all(d["object"] == "embedding" for d in body["data"])
        np.testing.assert_allclose([d["embedding"] for d in body["data"]], tei, rtol=1e-5)


def test_openai_base64_is_little_endian_float32(vit_stack):
    image = b64(photos()["coffee.jpg"])
    floats = http_post(f"{vit_stack.url}/v1/embeddings", json={"input": image}).json()
    packed = http_post(
        f"{vit_stack.url}/v1/embeddings", json={"input": image, "encoding_format": "base64"}
    ).json()
    decoded = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, floats["data"][0]["embedding"], rtol=1e-6)


def test_openai_dimensions_truncate_and_renormalise(vit_stack):
    image = b64(photos()["coffee.jpg"])
    full = http_post(f"{vit_stack.url}/v1/embeddings", json={"input": image}).json()
    cut = http_post(f"{vit_stack.url}/v1/embeddings", json={"input": image, "dimensions": 8})
    vector = np.array(cut.json()["data"][0]["embedding"])
    assert vector.shape == (8,)
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    head = np.array(full["data"][0]["embedding"][:8])
    np.testing.assert_allclose(vector, head / np.linalg.norm(head), rtol=1e-5)
    too_many = {"input": image, "dimensions": 33}
    openai_error(http_post(f"{vit_stack.url}/v1/embeddings", json=too_many), 422, "33")
    zero = {"input": image, "dimensions": 0}
    openai_error(http_post(f"{vit_stack.url}/v1/embeddings", json=zero), 422, "dimensions")


def test_openai_model_is_checked_and_errors_use_openais_envelope(vit_stack):
    image = b64(photos()["coffee.jpg"])
    model = vit_stack.env["IMAGE_EMBEDDING_MODEL"]
    ok = http_post(f"{vit_stack.url}/v1/embeddings", json={"input": image, "model": model})
    assert ok.status_code == 200
    wrong = {"input": image, "model": "text-embedding-3-small"}
    # An unknown model is OpenAI's 404 model_not_found (it was a 422 before several models).
    error = openai_error(http_post(f"{vit_stack.url}/v1/embeddings", json=wrong), 404, "not")
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "model_not_found"
    error = openai_error(http_post(f"{vit_stack.url}/v1/embeddings", json={"input": []}), 400)
    assert error["code"] == "Empty"
    bad = {"input": ["###"], "user": "u1"}
    openai_error(http_post(f"{vit_stack.url}/v1/embeddings", json=bad), 422, "inputs[0]")
    openai_error(http_post(f"{vit_stack.url}/v1/embeddings", json={"input": 5}), 422, "input")


def test_openai_sdk_raises_our_errors(vit_stack):
    import openai

    client = openai.OpenAI(base_url=f"{vit_stack.url}/v1", api_key="unused")
    image = b64(photos()["coffee.jpg"])
    result = client.embeddings.create(input=[image], model=vit_stack.env["IMAGE_EMBEDDING_MODEL"])
    assert len(result.data[0].embedding) == 32
    with pytest.raises(openai.UnprocessableEntityError):
        client.embeddings.create(input=["###"], model=vit_stack.env["IMAGE_EMBEDDING_MODEL"])
    with pytest.raises(openai.NotFoundError):  # a model not served here (a 422 before IEI_MODELS)
        client.embeddings.create(input=[image], model="x")


# --- /info, /metrics, timing headers ------------------------------------------------------


def test_info(vit_stack):
    info = http_get(f"{vit_stack.url}/info").json()
    assert info["model_id"] == vit_stack.env["IMAGE_EMBEDDING_MODEL"]
    assert info["model_type"] == "vit"
    assert info["architecture"] == "ViTModel"
    assert info["embedding_dimension"] == 32
    assert info["dtype"] == "float32"
    # IEI_ENGINE=auto in float32 on a CPU: OpenVINO (README, engines); one model, PIL decoding.
    assert info["engine"] == "openvino"
    assert (info["layout"], info["jpeg_decoder"]) == ("single", "pil")
    assert info["device"] == "cpu"
    assert info["pooling"] == "mean"
    assert info["max_batch_size"] == 64
    assert info["max_client_batch_size"] == 64
    assert info["limits"]["max_image_pixels"] == 50_000_000
    assert info["triton"] == {"endpoint": vit_stack.triton_http, "ready": True}


def test_timing_headers(vit_stack):
    response = http_post(f"{vit_stack.url}/embed", json={"inputs": b64(photos()["coffee.jpg"])})
    for header in ("x-total-time", "x-queue-time", "x-inference-time"):
        assert response.headers[header].isdigit()
    assert int(response.headers["x-total-time"]) >= int(response.headers["x-inference-time"])


def test_metrics_count_requests_and_images_across_workers(guarded_stack):
    # Four different photos: the content cache would answer a repeated one without Triton.
    for name in ("coffee.jpg", "chelsea.jpg", "rocket.jpg", "astronaut.jpg"):
        image = b64(photos()[name])  # two workers: requests land on both
        response = http_post(
            f"{guarded_stack.url}/embed", json={"inputs": [image, image]}, headers=auth()
        )
        assert response.status_code == 200
    text = http_get(f"{guarded_stack.url}/metrics").text  # open without the key
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert samples['iei_requests_total{route="/embed",status="200"}'] >= 4
    # Counted by model (the one model's name: IEI_SERVED_MODEL_NAME here).
    model = guarded_stack.env["IEI_SERVED_MODEL_NAME"]
    assert samples[f'iei_images_embedded_total{{model="{model}"}}'] >= 8
    assert samples[f'iei_images_per_request_count{{model="{model}"}}'] >= 4
    assert samples["iei_triton_round_trip_seconds_count"] >= 4
    assert "iei_request_duration_seconds_bucket" in text
    assert "iei_requests_in_flight" in text


# --- auth ---------------------------------------------------------------------------------


def test_api_key(guarded_stack):
    body = {"inputs": b64(photos()["coffee.jpg"])}
    tei_error(http_post(f"{guarded_stack.url}/embed", json=body), 401, "Unauthorized")
    wrong = http_post(f"{guarded_stack.url}/embed", json=body, headers=auth("nope"))
    tei_error(wrong, 401, "Unauthorized")
    assert wrong.headers["www-authenticate"] == "Bearer"
    assert http_post(f"{guarded_stack.url}/embed", json=body, headers=auth()).status_code == 200
    openai_error(http_post(f"{guarded_stack.url}/v1/embeddings", json={"input": "x"}), 401)
    assert http_get(f"{guarded_stack.url}/info").status_code == 401
    assert http_get(f"{guarded_stack.url}/health").status_code == 200
    assert http_get(f"{guarded_stack.url}/metrics").status_code == 200


@pytest.mark.parametrize("example", ["request_example_batch.py", "request_example_concurrent.py"])
def test_the_request_examples_send_the_api_key(guarded_stack, example):
    command = [sys.executable, f"examples/{example}", "--url", guarded_stack.url]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "401" in refused.stderr
    result = subprocess.run(
        [*command, "--api-key", KEY], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "embedded 5 images" in result.stdout


def test_served_model_name(guarded_stack):
    body = {"input": b64(photos()["coffee.jpg"]), "model": "my-vit"}
    response = http_post(f"{guarded_stack.url}/v1/embeddings", json=body, headers=auth())
    assert response.status_code == 200
    assert response.json()["model"] == "my-vit"


# --- limits -------------------------------------------------------------------------------


def test_payload_limit_is_413_before_the_body_is_read(guarded_stack):
    big = {"inputs": ["A" * (3 * 1024 * 1024)]}
    response = http_post(f"{guarded_stack.url}/embed", json=big, headers=auth())
    tei_error(response, 413, "Validation", "2097152 bytes")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while it streams
        yield b'{"inputs": ["'
        for _ in range(48):
            yield b"A" * 65536
        yield b'"]}'

    response = http_post(
        f"{guarded_stack.url}/embed",
        content=chunks(),
        headers={**auth(), "content-type": "application/json"},
    )
    tei_error(response, 413, "Validation", "2097152 bytes")
    openai = http_post(f"{guarded_stack.url}/v1/embeddings", json=big, headers=auth())
    openai_error(openai, 413, "2097152 bytes")


def test_more_images_in_flight_than_allowed_is_429_at_once(guarded_stack):
    """8 images may be in flight per worker (and so at most 8 in one request): under a burst of
    concurrent requests some are refused at once while the others succeed."""
    image = b64(photos()["coffee.jpg"])
    response = http_post(f"{guarded_stack.url}/embed", json={"inputs": [image] * 9}, headers=auth())
    tei_error(response, 422, "Validation", "batch size 9 > maximum allowed batch size 8")

    async def bursts(count: int = 3) -> list[int]:
        """Bursts of 12 until one has both answers: on a busy machine the client may send a
        burst slower than the worker answers it (as `refused_answer`)."""
        statuses: list[int] = []
        async with httpx.AsyncClient(
            base_url=guarded_stack.url, headers=auth(), timeout=60
        ) as client:
            body = {"inputs": [image] * 6}
            for _ in range(count):
                answers = await asyncio.gather(
                    *(client.post("/embed", json=body) for _ in range(12))
                )
                statuses += [a.status_code for a in answers]
                if {200, 429} <= set(statuses):
                    break
        return statuses

    statuses = asyncio.run(bursts())
    assert set(statuses) <= {200, 429}
    assert 200 in statuses and 429 in statuses
    refused = asyncio.run(refused_answer(guarded_stack.url, body={"inputs": [image] * 6}))
    tei_error(refused, 429, "Overloaded", "limit of 8 inputs in flight")
    assert refused.headers["retry-after"] == "1"


async def refused_answer(url: str, body: dict, bursts: int = 3) -> httpx.Response:
    """One 429 out of a burst that overfills a worker. On a busy machine the client may send a
    burst slower than the worker answers it: up to `bursts` of them."""
    async with httpx.AsyncClient(base_url=url, headers=auth(), timeout=60) as client:
        for _ in range(bursts):
            answers = await asyncio.gather(*(client.post("/embed", json=body) for _ in range(12)))
            refused = [a for a in answers if a.status_code == 429]
            if refused:
                return refused[0]
    raise AssertionError(f"no 429 in {bursts} bursts of 12 requests")


# --- URL inputs ---------------------------------------------------------------------------


def test_url_inputs_equal_base64(guarded_stack, image_server):
    files = photos()
    body = {"inputs": [f"{image_server}/chelsea.jpg", b64(files["coffee.jpg"])]}
    by_url = http_post(f"{guarded_stack.url}/embed", json=body, headers=auth()).json()
    body = {"inputs": [b64(files["chelsea.jpg"]), b64(files["coffee.jpg"])]}
    by_value = http_post(f"{guarded_stack.url}/embed", json=body, headers=auth()).json()
    np.testing.assert_allclose(by_url, by_value, rtol=1e-6)
    redirected = {"inputs": f"{image_server}/redirect/chelsea.jpg"}
    response = http_post(f"{guarded_stack.url}/embed", json=redirected, headers=auth())
    np.testing.assert_allclose(response.json()[0], by_value[0], rtol=1e-6)


def test_url_errors(guarded_stack, image_server):
    def post(url: str) -> httpx.Response:
        return http_post(f"{guarded_stack.url}/embed", json={"inputs": [url]}, headers=auth())

    tei_error(post(f"{image_server}/missing.jpg"), 422, "Validation", "HTTP 404")
    tei_error(post(f"{image_server}/big.jpg"), 422, "Validation", "larger than 2097152 bytes")
    tei_error(post("http://no-such-host.invalid/x.jpg"), 422, "Validation", "cannot resolve")


def test_private_urls_are_refused_by_default(vit_stack, image_server):
    def post(url: str) -> httpx.Response:
        return http_post(f"{vit_stack.url}/embed", json={"inputs": [b64(b"x"), url]})

    tei_error(post(f"{image_server}/chelsea.jpg"), 422, "Validation", "not resolve to public")
    tei_error(post("http://[::1]:9/x.jpg"), 422, "Validation", "not resolve to public")
    tei_error(
        post("http://169.254.169.254/latest/meta-data"), 422, "Validation", "not resolve to public"
    )
    tei_error(post("http://localhost:9/x"), 422, "Validation", "inputs[1]")
    # a name that does not resolve reads the same: no oracle for the names inside the network
    tei_error(post("http://no-such-host.invalid/x"), 422, "Validation", "not resolve to public")


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.org/x.jpg", "gopher://x/"])
def test_other_schemes_are_refused_without_reading(vit_stack, url):
    response = http_post(f"{vit_stack.url}/embed", json={"inputs": [url]})
    tei_error(response, 422, "Validation", "is not allowed")
    assert "root:" not in response.text


# --- TEI's ignored options ----------------------------------------------------------------


def test_truncate_options_are_accepted(vit_stack):
    body = {"inputs": b64(photos()["coffee.jpg"]), "truncate": True, "truncation_direction": "Left"}
    assert http_post(f"{vit_stack.url}/embed", json=body).status_code == 200


# --- fuzz ---------------------------------------------------------------------------------


def test_schema_driven_fuzz_finds_no_server_error(vit_stack):
    """schemathesis generates requests from our own OpenAPI document: never a 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"{vit_stack.url}/openapi.json")

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=schema.as_strategy())
    def call(case) -> None:
        response = case.call(base_url=vit_stack.url, timeout=30)
        assert response.status_code < 500, (case.method, case.path, response.text)

    call()


def test_docs_are_served(vit_stack):
    assert http_get(f"{vit_stack.url}/docs").status_code == 200
    paths = http_get(f"{vit_stack.url}/openapi.json").json()["paths"]
    assert {"/embed", "/v1/embeddings", "/info", "/health", "/metrics"} <= set(paths)


def test_the_api_key_never_reaches_the_log(guarded_stack):
    log = guarded_stack.log()
    assert "settings:" in log
    assert KEY not in log
