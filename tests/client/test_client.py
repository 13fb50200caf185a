"""The Python client without a server: inputs, chunking, retries, typed errors (MockTransport)."""

from __future__ import annotations

import asyncio
import base64
import io
import os
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from iei.client import (
    AsyncIEIClient,
    AuthenticationError,
    BackendError,
    IEIClient,
    IEIError,
    OverloadedError,
    RetryPolicy,
    UnavailableError,
    ValidationError,
    chunks,
    encode_image,
)
from iei.client.bulk import embed_paths
from PIL import Image

DIMENSION = 4
INFO = {"max_client_batch_size": 3, "embedding_dimension": DIMENSION, "limits": {}}


def vector_of(item: str) -> list[float]:
    """A vector that tells which input it came from (its length), so order is checkable."""
    return [float(len(item))] * DIMENSION


class FakeServer:
    """Answers /info and /embed; `script` is a list of canned error answers served first."""

    def __init__(self, script: list[httpx.Response] | None = None, info: dict | None = None):
        self.script = list(script or [])
        self.info = info or INFO
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path == "/info":
            return httpx.Response(200, json=self.info)
        if self.script:
            return self.script.pop(0)
        body = orjson.loads(request.content)
        return httpx.Response(200, json=[vector_of(item) for item in body["inputs"]])

    @property
    def embed_bodies(self) -> list[dict]:
        return [orjson.loads(r.content) for r in self.requests if r.url.path == "/embed"]


def error(status: int, error_type: str, message: str = "no", **headers: str) -> httpx.Response:
    return httpx.Response(
        status, json={"error": message, "error_type": error_type}, headers=headers
    )


def client_for(server: FakeServer, **options) -> tuple[IEIClient, list[float]]:
    slept: list[float] = []
    client = IEIClient(
        "http://iei.test", transport=httpx.MockTransport(server), sleep=slept.append, **options
    )
    return client, slept


def png(color: tuple[int, int, int], size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def decoded(item: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item)))


# --- inputs ------------------------------------------------------------------------------------


def test_every_input_kind_is_encoded(tmp_path):
    path = tmp_path / "red.png"
    path.write_bytes(png((255, 0, 0)))
    grey = np.full((5, 6), 7, dtype=np.uint8)
    rgba = np.zeros((3, 2, 4), dtype=np.uint8)
    items = [
        encode_image(str(path)),
        encode_image(path),
        encode_image(png((255, 0, 0))),
        encode_image(Image.new("RGB", (8, 8), (255, 0, 0))),
        encode_image(grey),
        encode_image(rgba),
    ]
    assert items[0] == items[1] == items[2] == base64.b64encode(path.read_bytes()).decode()
    assert decoded(items[3]).getpixel((0, 0)) == (255, 0, 0)
    assert decoded(items[4]).size == (6, 5) and decoded(items[4]).mode == "L"
    assert np.array_equal(np.asarray(decoded(items[4])), grey)
    assert decoded(items[5]).mode == "RGBA"


def test_urls_and_data_uris_pass_through():
    assert encode_image("https://example.org/a.jpg") == "https://example.org/a.jpg"
    assert encode_image("data:image/png;base64,AAAA") == "data:image/png;base64,AAAA"


@pytest.mark.parametrize(
    "bad",
    [np.zeros((4, 4), dtype=np.float32), np.zeros((4, 4, 2), dtype=np.uint8), 3.5, None],
)
def test_unusable_inputs_are_refused_before_sending(bad):
    with pytest.raises(TypeError):
        encode_image(bad)


def test_chunks_respect_count_and_size():
    assert [list(r) for r in chunks(["a"] * 7, 3, None)] == [[0, 1, 2], [3, 4, 5], [6]]
    # A 5-character budget: "aaa"+"bb" fit, "cccc" alone, one oversized item still goes alone.
    items = ["aaa", "bb", "cccc", "dddddddd", "e"]
    assert [list(r) for r in chunks(items, 10, 5)] == [[0, 1], [2], [3], [4]]
    assert list(chunks([], 3, None)) == []


# --- embedding ---------------------------------------------------------------------------------


def test_embed_chunks_to_the_servers_batch_limit_and_keeps_order():
    server = FakeServer()
    images = [b"x" * n for n in range(1, 8)]  # base64 lengths differ: 4, 4, 4, 8, 8, 8, 12
    client, _ = client_for(server)
    with client:
        vectors = client.embed(images, normalize=False)
        client.embed(images[:1])
    assert vectors.dtype == np.float32 and vectors.shape == (7, DIMENSION)
    expected = [len(base64.b64encode(image)) for image in images]
    assert vectors[:, 0].tolist() == expected
    bodies = server.embed_bodies
    assert [len(b["inputs"]) for b in bodies] == [3, 3, 1, 1]
    assert [b["normalize"] for b in bodies] == [False, False, False, True]
    assert sum(r.url.path == "/info" for r in server.requests) == 1  # fetched once


def test_a_smaller_batch_size_and_the_payload_limit_split_further():
    server = FakeServer(info={"max_client_batch_size": 64, "limits": {"payload_limit": 100}})
    client, _ = client_for(server, batch_size=2)
    client.embed([b"x" * 30] * 5)  # 40 base64 characters each; 90 of 100 allowed -> 2 a request
    assert [len(b["inputs"]) for b in server.embed_bodies] == [2, 2, 1]
    server = FakeServer(info={"max_client_batch_size": 64, "limits": {"payload_limit": 100}})
    client, _ = client_for(server)
    client.embed([b"x" * 45] * 3)  # 60 characters each: one a request
    assert [len(b["inputs"]) for b in server.embed_bodies] == [1, 1, 1]


def test_no_images_give_an_empty_matrix_of_the_models_width():
    client, _ = client_for(FakeServer())
    assert client.embed([]).shape == (0, DIMENSION)


def test_texts_go_as_they_are_with_modality_text_in_the_servers_chunks():
    server = FakeServer()
    texts = ["a cat", "a dog on a sofa", "x", "the sea at night"]
    client, _ = client_for(server)
    with client:
        vectors = client.embed_texts(texts)
        client.embed_texts(texts[:1], normalize=False, truncate=False)
    assert vectors.dtype == np.float32 and vectors.shape == (4, DIMENSION)
    assert vectors[:, 0].tolist() == [len(t) for t in texts]  # in order, nothing encoded
    bodies = server.embed_bodies
    assert [b["inputs"] for b in bodies] == [texts[:3], texts[3:], texts[:1]]
    assert {b["modality"] for b in bodies} == {"text"}
    assert [(b["normalize"], b["truncate"]) for b in bodies] == [(True, True)] * 2 + [
        (False, False)
    ]


@pytest.mark.parametrize("bad", ["a single string", [b"bytes"], [3]])
def test_texts_must_be_a_list_of_str(bad):
    client, _ = client_for(FakeServer())
    with pytest.raises(TypeError):
        client.embed_texts(bad)


def test_the_api_key_is_sent_as_bearer():
    server = FakeServer()
    IEIClient("http://iei.test", "s3cret", transport=httpx.MockTransport(server)).embed([b"x"])
    assert {r.headers["authorization"] for r in server.requests} == {"Bearer s3cret"}
    server = FakeServer()
    IEIClient("http://iei.test", transport=httpx.MockTransport(server)).embed([b"x"])
    assert all("authorization" not in r.headers for r in server.requests)


# --- retries and errors ------------------------------------------------------------------------


def test_429_and_503_are_retried_honouring_retry_after():
    server = FakeServer([error(429, "Overloaded", **{"Retry-After": "2"}), error(503, "Unhealthy")])
    client, slept = client_for(server, retry=RetryPolicy(attempts=3, backoff=0.1))
    assert client.embed([b"x"]).shape == (1, DIMENSION)
    assert 2.0 <= slept[0] <= 2.5  # the server's Retry-After (over the back-off), +25 % at most
    assert 0.15 <= slept[1] <= 0.25  # the second retry, no hint: backoff * 2**1, ±25 % jitter
    assert len(server.embed_bodies) == 3


def test_retry_after_is_a_floor_so_the_waits_still_grow_past_a_restart():
    """The server says `Retry-After: 1` for every 503: taken as the whole wait, 8 retries gave
    up after 8 s, inside a Triton restart (--ray's claim was about 90 s)."""
    server = FakeServer([error(503, "Unhealthy", **{"Retry-After": "1"})] * 8)
    client, slept = client_for(server, retry=RetryPolicy(attempts=9))
    assert client.embed([b"x"]).shape == (1, DIMENSION)
    assert all(wait >= 1.0 for wait in slept)
    assert 0.75 * 60 <= sum(slept) <= 1.25 * 92  # 1, 1, 2, 4, 8, 16, 30, 30 (±25 %, capped)
    assert slept[-1] == 30.0


def test_a_504_is_retried_only_when_it_says_when():
    loading = error(504, "Timeout", "model 'vit' did not load within 60 s", **{"Retry-After": "5"})
    server = FakeServer([loading])
    client, slept = client_for(server, retry=RetryPolicy(attempts=2))
    assert client.embed([b"x"]).shape == (1, DIMENSION)
    assert 5.0 <= slept[0] <= 6.25
    server = FakeServer([error(504, "Timeout", "the inference took too long")])
    client, slept = client_for(server, retry=RetryPolicy(attempts=5))
    with pytest.raises(BackendError):
        client.embed([b"x"])
    assert slept == [] and len(server.embed_bodies) == 1  # a timed-out inference is not resent


def test_an_answer_that_is_not_json_is_an_iei_error():
    """`--url` naming another web server that answers 200 with a page."""
    page = httpx.Response(200, text="<html>hello</html>", headers={"content-type": "text/html"})
    client = IEIClient("http://iei.test", transport=httpx.MockTransport(lambda _: page))
    with pytest.raises(IEIError, match=r"http://iei.test/info answered 200 .*text/html.*IEI"):
        client.embed([b"x"])


def test_back_off_grows_exponentially_and_is_capped():
    policy = RetryPolicy(attempts=10, backoff=1.0, max_backoff=5.0)
    waits = [policy.delay(n, None) for n in range(1, 6)]
    assert 0.75 <= waits[0] <= 1.25 and 1.5 <= waits[1] <= 2.5 and 3.0 <= waits[2] <= 5.0
    assert waits[3] == waits[4] == 5.0
    assert policy.delay(1, 4.5) >= 4.5  # the server's Retry-After is a floor


def read_timeouts(server: FakeServer) -> list[float]:
    return [r.extensions["timeout"]["read"] for r in server.requests]


def test_answers_are_awaited_as_long_as_the_server_may_take():
    """A fixed 120 s gave up on a server allowed longer (IEI_REQUEST_TIMEOUT up to an hour),
    and then sent the request again."""
    server = FakeServer(info={**INFO, "limits": {"request_timeout": 600}})
    client, _ = client_for(server)
    client.embed([b"x"])
    assert read_timeouts(server) == [120.0, 630.0]  # /info itself, then the server's + 30 s
    server = FakeServer(info={**INFO, "limits": {"request_timeout": 600}})
    client, _ = client_for(server, timeout=5.0)  # the client's own, when given
    client.embed([b"x"])
    assert read_timeouts(server) == [5.0, 5.0]


def test_an_answer_that_never_comes_is_not_asked_again():
    """A read timeout was retried as a lost connection: the same batch computed five times,
    reported as an unreachable server."""
    calls: list[str] = []

    def silent(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path == "/info":
            return httpx.Response(200, json=INFO)
        raise httpx.ReadTimeout("timed out", request=request)

    client = IEIClient("http://iei.test", transport=httpx.MockTransport(silent), sleep=print)
    with pytest.raises(BackendError, match=r"/embed gave no answer within 120 s"):
        client.embed([b"x"])
    assert calls == ["/info", "/embed"]


@pytest.mark.parametrize(
    "failure",
    [httpx.UnsupportedProtocol("no scheme"), httpx.LocalProtocolError("Illegal header value")],
)
def test_a_call_httpx_cannot_make_is_not_retried(failure):
    """`--url 127.0.0.1:8000`, or a key with a newline: retried for seconds as unreachable."""
    calls: list[str] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        raise failure

    client = IEIClient("http://iei.test", transport=httpx.MockTransport(refuse), sleep=print)
    with pytest.raises(IEIError, match=f"cannot call http://iei.test/info: {failure}"):
        client.embed([b"x"])
    assert calls == ["/info"]


def test_a_retry_after_longer_than_the_longest_wait_is_raised_at_once():
    """A model that failed to load says when it is tried again (up to 300 s): the retries were
    capped at 30 s each, all inside the time the server had announced, then gave up."""
    failed = error(503, "Unhealthy", "model 'b' failed to load", **{"Retry-After": "160"})
    server = FakeServer([failed])
    client, slept = client_for(server, retry=RetryPolicy(attempts=5, max_backoff=30))
    with pytest.raises(UnavailableError) as raised:
        client.embed([b"x"])
    assert raised.value.retry_after == 160.0
    assert slept == [] and len(server.embed_bodies) == 1


def test_retries_are_bounded_then_the_typed_error_is_raised():
    server = FakeServer([error(429, "Overloaded", "too busy", **{"Retry-After": "1"})] * 5)
    client, slept = client_for(server, retry=RetryPolicy(attempts=3))
    with pytest.raises(OverloadedError) as raised:
        client.embed([b"x"])
    assert raised.value.status == 429
    assert raised.value.error_type == "Overloaded"
    assert raised.value.message == "too busy"
    assert raised.value.retry_after == 1.0
    assert len(slept) == 2 and all(1.0 <= wait <= 1.25 for wait in slept)
    assert len(server.embed_bodies) == 3


@pytest.mark.parametrize(
    ("response", "kind", "error_type"),
    [
        (error(422, "Validation", "inputs[0]: not an image"), ValidationError, "Validation"),
        (error(400, "Empty"), ValidationError, "Empty"),
        (error(401, "Unauthorized"), AuthenticationError, "Unauthorized"),
        (error(424, "Backend"), BackendError, "Backend"),
        (error(504, "Timeout"), BackendError, "Timeout"),
        (httpx.Response(413, text="payload too large"), ValidationError, None),
        (httpx.Response(418, text="teapot"), IEIError, None),
    ],
)
def test_other_errors_are_typed_and_not_retried(response, kind, error_type):
    server = FakeServer([response])
    client, slept = client_for(server)
    with pytest.raises(kind) as raised:
        client.embed([b"x"])
    assert type(raised.value) is kind
    assert raised.value.status == response.status_code
    assert raised.value.error_type == error_type
    assert not slept and len(server.embed_bodies) == 1


def test_the_openai_envelope_is_understood_too():
    body = {"error": {"message": "bad", "type": "invalid_request_error", "code": "Validation"}}
    server = FakeServer([httpx.Response(422, json=body)])
    client, _ = client_for(server)
    with pytest.raises(ValidationError) as raised:
        client.embed([b"x"])
    assert (raised.value.error_type, raised.value.message) == ("Validation", "bad")


def test_lost_connections_are_retried_then_reported_as_unavailable():
    calls = 0

    def refuse(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        raise httpx.ConnectError("refused", request=request)

    slept: list[float] = []
    client = IEIClient(
        "http://iei.test",
        transport=httpx.MockTransport(refuse),
        retry=RetryPolicy(attempts=2),
        sleep=slept.append,
    )
    with pytest.raises(UnavailableError) as raised:
        client.embed([b"x"])
    assert raised.value.status is None
    assert calls == 2 and len(slept) == 1


# --- the async twin ----------------------------------------------------------------------------


def test_the_async_client_matches_the_blocking_one():
    server = FakeServer([error(503, "Unhealthy", **{"Retry-After": "0"})])
    slept: list[float] = []

    async def record(seconds: float) -> None:
        slept.append(seconds)

    async def run() -> np.ndarray:
        async with AsyncIEIClient(
            "http://iei.test", "k", transport=httpx.MockTransport(server), sleep=record
        ) as client:
            first, second, texts = await asyncio.gather(
                client.embed([b"a" * n for n in range(1, 6)]),
                client.embed([png((0, 0, 0))]),
                client.embed_texts(["a cat", "a dog"]),
            )
            assert texts[:, 0].tolist() == [5.0, 5.0]
            return np.concatenate([first, second])

    vectors = asyncio.run(run())
    assert vectors.shape == (6, DIMENSION) and vectors.dtype == np.float32
    assert vectors[:5, 0].tolist() == [len(base64.b64encode(b"a" * n)) for n in range(1, 6)]
    assert len(slept) == 1 and 0.375 <= slept[0] <= 0.625  # Retry-After: 0, under the back-off
    assert sum(r.url.path == "/info" for r in server.requests) == 1
    assert {r.headers["authorization"] for r in server.requests} == {"Bearer k"}


def test_the_async_client_raises_typed_errors():
    server = FakeServer([error(401, "Unauthorized")])

    async def run() -> None:
        async with AsyncIEIClient("http://iei.test", transport=httpx.MockTransport(server)) as c:
            await c.embed([b"x"])

    with pytest.raises(AuthenticationError):
        asyncio.run(run())


# --- bounded memory: inputs are read and encoded a request at a time ---------------------------


class ReadsBeforeFirstEmbed(FakeServer):
    """Counts the files read (Path.read_bytes) and remembers how many had been read when the
    first /embed arrived."""

    def __init__(self, info: dict) -> None:
        super().__init__(info=info)
        self.reads = 0
        self.reads_at_first_embed: int | None = None

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/embed" and self.reads_at_first_embed is None:
            self.reads_at_first_embed = self.reads
        return super().__call__(request)


@pytest.fixture
def counted_reads(monkeypatch, tmp_path):
    """A server that counts file reads, and 10,000 paths of one small image."""
    server = ReadsBeforeFirstEmbed({"max_client_batch_size": 8, "embedding_dimension": DIMENSION})
    read_bytes = Path.read_bytes

    def counting(path: Path) -> bytes:
        server.reads += 1
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", counting)
    image = tmp_path / "one.png"
    image.write_bytes(png((1, 2, 3)))
    return server, [str(image)] * 10_000


def test_embed_reads_and_encodes_one_request_s_images_before_sending_it(counted_reads):
    server, paths = counted_reads
    client, _ = client_for(server)
    vectors = client.embed(paths)
    assert vectors.shape == (10_000, DIMENSION)
    assert server.reads_at_first_embed == 8  # not 10,000 base64 strings at once
    assert server.reads == 10_000


def test_the_async_client_reads_and_encodes_one_request_s_images_before_sending_it(counted_reads):
    server, paths = counted_reads

    async def run() -> np.ndarray:
        async with AsyncIEIClient("http://iei.test", transport=httpx.MockTransport(server)) as c:
            return await c.embed(iter(paths))  # a generator works too

    assert asyncio.run(run()).shape == (10_000, DIMENSION)
    assert server.reads_at_first_embed == 8


def test_iei_embed_reads_at_most_batch_size_times_concurrency_before_the_first_request(
    counted_reads,
):
    server, paths = counted_reads
    embedded: list[str] = []

    async def run() -> None:
        async with AsyncIEIClient("http://iei.test", transport=httpx.MockTransport(server)) as c:
            await embed_paths(
                c, paths[:2000], batch_size=4, concurrency=3, normalize=True,
                on_embedded=lambda batch, _: embedded.extend(batch),
                on_skipped=lambda path, reason: pytest.fail(reason),
            )  # fmt: skip

    asyncio.run(run())
    assert len(embedded) == 2000
    assert server.reads_at_first_embed is not None and server.reads_at_first_embed <= 4 * 3


# --- raw uploads -------------------------------------------------------------------------------


class FormServer(FakeServer):
    """A server that takes raw uploads (`/info` says so): answers forms and JSON alike, a file's
    vector its length; `forms` are what each form carried (files, names, fields)."""

    def __init__(self, **options):
        super().__init__(**options)
        self.info = {**self.info, "raw_uploads": True}
        self.forms: list[tuple[list[bytes], list[str | None], list[tuple[str, str]]]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        content_type = request.headers.get("content-type", "")
        if request.url.path != "/embed" or not content_type.startswith("multipart/form-data"):
            return super().__call__(request)
        from iei.server.uploads import FormReader
        from python_multipart.multipart import parse_options_header

        self.requests.append(request)
        boundary = parse_options_header(content_type)[1][b"boundary"]
        reader = FormReader(boundary, max_files=64)
        reader.write(request.content)
        assert reader.ended
        self.forms.append((reader.files, reader.names, reader.fields))
        return httpx.Response(200, json=[[float(len(f))] * DIMENSION for f in reader.files])


def test_files_go_as_a_multipart_form_to_a_server_that_takes_uploads(tmp_path):
    path = tmp_path / "red cat.png"
    path.write_bytes(png((255, 0, 0)))
    server = FormServer()
    images = [path, b"x" * 5, png((0, 0, 0)), Image.new("RGB", (4, 4)), str(path)]
    client, _ = client_for(server)
    vectors = client.embed(images, normalize=False)
    assert [len(files) for files, _, _ in server.forms] == [3, 2]  # the server's batch limit
    files = [f for form in server.forms for f in form[0]]
    assert files[:3] == [path.read_bytes(), b"x" * 5, png((0, 0, 0))]  # the bytes, no base64
    assert Image.open(io.BytesIO(files[3])).size == (4, 4)  # PIL images as PNG files
    assert [n for form in server.forms for n in form[1]] == ["red cat.png", None, None, None,
                                                            "red cat.png"]  # fmt: skip
    assert [form[2] for form in server.forms] == [[("normalize", "false")]] * 2
    assert vectors[:, 0].tolist() == [len(f) for f in files]
    embeds = [r for r in server.requests if r.url.path == "/embed"]
    assert len(embeds) == 2 and all(b"base64" not in r.content for r in embeds)


@pytest.mark.skipif(os.name != "posix", reason="a name of bytes that are not UTF-8")
def test_a_file_name_that_is_not_utf8_goes_in_the_form_escaped(tmp_path):
    path = os.path.join(os.fsencode(tmp_path), b"caf\xe9.png")
    try:
        with open(path, "wb") as file:
            file.write(png((1, 2, 3)))
    except OSError:  # macOS's file systems refuse such names
        pytest.skip("this file system takes only UTF-8 names")
    server = FormServer()
    client, _ = client_for(server)
    client.embed([os.fsdecode(path)])  # os.walk's form of it: caf\udce9.png
    [(files, names, _)] = server.forms
    assert files == [png((1, 2, 3))] and names == ["caf\\xe9.png"]


def test_urls_or_an_older_server_get_json():
    server = FormServer()
    client, _ = client_for(server)
    client.embed([b"abc", "https://example.org/a.jpg"])
    assert server.forms == []
    [body] = server.embed_bodies
    assert body["inputs"] == [base64.b64encode(b"abc").decode(), "https://example.org/a.jpg"]
    client.embed_texts(["a cat"])  # texts: always JSON
    assert server.forms == []
    older = FakeServer()  # /info without raw_uploads
    client, _ = client_for(older)
    client.embed([b"abc"])
    assert older.embed_bodies[0]["inputs"] == [base64.b64encode(b"abc").decode()]


def test_the_payload_limit_counts_file_bytes():
    server = FormServer(info={"max_client_batch_size": 64, "limits": {"payload_limit": 100}})
    client, _ = client_for(server)
    client.embed([b"x" * 40] * 5)  # 40 bytes each; 90 of 100 allowed -> 2 a request
    assert [len(files) for files, _, _ in server.forms] == [2, 2, 1]


def test_the_async_client_uploads_files_too():
    server = FormServer()

    async def run() -> np.ndarray:
        async with AsyncIEIClient("http://iei.test", transport=httpx.MockTransport(server)) as c:
            return await c.embed([b"a" * n for n in range(1, 5)])

    vectors = asyncio.run(run())
    assert vectors[:, 0].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert [len(files) for files, _, _ in server.forms] == [3, 1]
    assert [form[2] for form in server.forms] == [[("normalize", "true")]] * 2


def test_model_names_the_served_model_in_every_request_of_both_clients():
    info = {**INFO, "embedding_dimension": 99, "models": [
        {"name": "default", "model_id": "x/default", "embedding_dimension": 99},
        {"name": "dino", "model_id": "facebook/dinov2-small", "embedding_dimension": DIMENSION},
    ]}  # fmt: skip
    server = FakeServer(info=info)
    with IEIClient("http://iei", transport=httpx.MockTransport(server), model="dino") as client:
        assert client.embed_texts([]).shape == (0, DIMENSION)  # the model's dimension, not 99
        client.embed_texts(["a", "b", "c", "d"])

    async def run() -> None:
        transport = httpx.MockTransport(server)
        async with AsyncIEIClient("http://iei", transport=transport, model="dino") as client:
            await client.embed_texts(["e"])

    asyncio.run(run())
    assert [body["model"] for body in server.embed_bodies] == ["dino", "dino", "dino"]
    with IEIClient("http://iei", transport=httpx.MockTransport(server)) as client:
        client.embed_texts(["f"])
    assert "model" not in server.embed_bodies[-1]  # the server's default


def test_resume_knows_a_file_done_under_another_spelling_of_its_folder(tmp_path, monkeypatch):
    from iei.client.bulk import not_done

    monkeypatch.chdir(tmp_path)
    done = {str(tmp_path / "Pictures" / "a.jpg"): np.ones(2), "./Pictures/b.jpg": np.ones(2)}
    paths = ["Pictures/a.jpg", "Pictures/b.jpg", "Pictures/c.jpg", str(tmp_path / "Pictures/b.jpg")]
    assert not_done(paths, done) == ["Pictures/c.jpg"]
