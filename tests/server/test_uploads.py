"""Raw uploads on /embed without Triton: the image file as the body, or a multipart form of files;
their options, limits and errors. The fake Triton answers image vector i = [first byte, chunk]."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
from iei.server import uploads
from iei.server.settings import ServerSettings
from PIL import Image
from pydantic import SecretStr
from sample_images import encode
from test_app import FakeTriton, anyio_backend, app_client, keep_numpy_inputs  # noqa: F401

pytestmark = pytest.mark.anyio

PNG = encode(Image.new("RGB", (4, 4)), "PNG")
JPEG = encode(Image.new("RGB", (6, 3), (200, 10, 10)), "JPEG")
SETTINGS = ServerSettings(triton_url="127.0.0.1:1")


class SeenFiles(FakeTriton):
    """Remembers the files Triton was sent."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.files: list[bytes] = []

    async def infer(self, name, inputs, outputs=None, priority=0):
        if name == "iei":
            self.files += [bytes(row[0]) for row in inputs[0].test_images]
        return await super().infer(name, inputs, outputs, priority)


def tei_error(response: httpx.Response, status: int, error_type: str, text: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error_type"] == error_type, body
    assert text in body["error"], body


def expected(files: list[bytes], normalize: bool = True) -> np.ndarray:
    """The fake's vectors for `files` sent in one chunk, as /embed answers them."""
    vectors = np.array([[f[0], len(files)] for f in files], "float32")
    if normalize:
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


@pytest.mark.parametrize("content_type", ["image/jpeg", "image/png", "application/octet-stream"])
@pytest.mark.parametrize("path", ["/embed", "/"])
async def test_a_raw_body_is_one_image_sent_as_it_came(content_type, path):
    fake = SeenFiles()
    async with app_client(SETTINGS, fake) as client:
        response = await client.post(path, content=JPEG, headers={"content-type": content_type})
        assert response.status_code == 200, response.text
        assert np.allclose(response.json(), expected([JPEG]))
        assert fake.files == [JPEG]  # the bytes themselves: no base64, no re-encoding
        for header in ("x-total-time", "x-queue-time", "x-inference-time"):
            assert header in response.headers
        # the same answer as the JSON form
        as_json = await client.post(path, json={"inputs": [base64.b64encode(JPEG).decode()]})
        assert as_json.json() == response.json()


async def test_a_form_is_its_file_parts_in_order_with_its_options():
    fake = SeenFiles(max_batch_size=8)
    files = [PNG, JPEG, PNG]
    async with app_client(SETTINGS, fake) as client:
        form = [("file", (f"{i}.img", data, "image/png")) for i, data in enumerate(files)]
        response = await client.post("/embed", files=form, data={"normalize": "false"})
        assert response.status_code == 200, response.text
        assert np.allclose(response.json(), expected(files, normalize=False))
        assert fake.files == files
        # any field name; a part without a filename is a file when its type says so
        form = [
            ("a", ("x.png", PNG, "application/octet-stream")),
            ("b", (None, JPEG, "image/jpeg")),
        ]
        response = await client.post("/embed", files=form)
        assert np.allclose(response.json(), expected([PNG, JPEG]))


@pytest.mark.parametrize(
    ("query", "fields", "normalize"),
    [("?normalize=false", {}, False), ("?normalize=true", {}, True), ("", {}, True)],
)
async def test_options_come_as_query_parameters(query, fields, normalize):
    async with app_client(SETTINGS, FakeTriton()) as client:
        raw = await client.post(
            f"/embed{query}", content=PNG, headers={"content-type": "image/png"}
        )
        form = await client.post(f"/embed{query}", files={"file": ("a.png", PNG)}, data=fields)
        for response in (raw, form):
            assert np.allclose(response.json(), expected([PNG], normalize)), response.text


@pytest.mark.parametrize(
    ("query", "fields", "message"),
    [
        ("?normalize=yes", {}, "normalize: Input should be a valid boolean"),
        ("?normalize=True", {}, "normalize: Input should be a valid boolean"),
        ("?normalize=1", {}, "normalize: Input should be a valid boolean"),
        ("?normalize=", {}, "normalize: Input should be a valid boolean"),
        ("", {"normalize": "no"}, "normalize: Input should be a valid boolean"),
        ("?truncate=maybe", {}, "truncate: Input should be a valid boolean"),
        ("?truncation_direction=up", {}, "truncation_direction: Input should be"),
        ("?normalise=false", {}, "unknown option 'normalise'"),
        ("?normalize=false&normalize=true", {}, "normalize: given more than once"),
        ("?normalize=false", {"normalize": "false"}, "normalize: given more than once"),
        ("?modality=video", {}, "modality: Input should be 'image' or 'text'"),
        ("?modality=text", {}, "a raw upload is images"),
    ],
)
async def test_options_are_validated_strictly(query, fields, message):
    async with app_client(SETTINGS, FakeTriton()) as client:
        if not fields:
            response = await client.post(
                f"/embed{query}", content=PNG, headers={"content-type": "image/png"}
            )
            tei_error(response, 422, "Validation", message)
        response = await client.post(f"/embed{query}", files={"file": ("a.png", PNG)}, data=fields)
        tei_error(response, 422, "Validation", message)


@pytest.mark.parametrize("path", ["/embed", "/", "/classify"])
async def test_a_json_body_with_query_parameters_is_refused_not_read_as_the_default(path):
    """`?model=clip` beside a JSON body would otherwise answer with the default model."""
    body = {"inputs": [base64.b64encode(PNG).decode()]}
    async with app_client(SETTINGS, FakeTriton()) as client:
        response = await client.post(f"{path}?normalize=false&model=other", json=body)
        tei_error(response, 422, "Validation", "query parameters (model, normalize) are the")
        assert "give them in the body" in response.json()["error"]
        without = await client.post(path, json=body)  # /classify: refused for what it lacks
        assert "query parameters" not in without.text, without.text


async def test_dimensions_keep_the_first_components_then_normalise_as_asked():
    """TEI's `dimensions` (huggingface_hub's feature_extraction sends it): JSON and raw alike."""
    body = {"inputs": [base64.b64encode(JPEG).decode()]}
    full = expected([JPEG], normalize=False)
    async with app_client(SETTINGS, FakeTriton()) as client:
        for normalize, want in ((False, full[:, :1]), (True, np.ones((1, 1)))):
            flag = str(normalize).lower()
            as_json = await client.post(
                "/embed", json=body | {"dimensions": 1, "normalize": normalize}
            )
            raw = await client.post(
                f"/embed?dimensions=1&normalize={flag}",
                content=JPEG,
                headers={"content-type": "image/jpeg"},
            )
            form = await client.post(
                "/embed", files={"file": ("a.jpg", JPEG)}, data={"dimensions": "1",
                                                                 "normalize": flag}
            )  # fmt: skip
            for response in (as_json, raw, form):
                assert response.status_code == 200, response.text
                assert np.allclose(response.json(), want)
        for asked, message in ((3, "dimensions 3 > the model's 2 dimensions"),
                               (0, "dimensions: Input should be greater than or equal to 1"),
                               ("1.0", "dimensions: Input should be a valid integer"),
                               ("+1", "dimensions: Input should be a valid integer")):  # fmt: skip
            raw = await client.post(
                f"/embed?dimensions={asked}", content=JPEG, headers={"content-type": "image/jpeg"}
            )
            tei_error(raw, 422, "Validation", message)
        as_json = await client.post("/embed", json=body | {"dimensions": 3})
        tei_error(as_json, 422, "Validation", "dimensions 3 > the model's 2 dimensions")


async def test_a_text_option_that_reads_true_stays_text():
    """`true` and `false` are booleans only for a boolean option: `?model=true` names a model."""
    async with app_client(SETTINGS, FakeTriton()) as client:
        response = await client.post(
            "/embed?model=true", content=PNG, headers={"content-type": "image/png"}
        )
    tei_error(response, 404, "NotFound", "'true'")


async def test_the_truncate_options_of_tei_are_accepted_for_images():
    async with app_client(SETTINGS, FakeTriton()) as client:
        response = await client.post(
            "/embed?truncate=true&truncation_direction=Left&modality=image",
            content=PNG,
            headers={"content-type": "image/png"},
        )
        assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("data", "name", "message"),
    [
        (b"GIF89a-not-really", "inputs[1] (bad.gif)", "not an image in a supported format"),
        (b"", "inputs[1] (bad.gif)", "empty input"),
    ],
)
async def test_a_bad_file_is_named_by_index_and_filename(data, name, message):
    async with app_client(SETTINGS, FakeTriton()) as client:
        form = [("file", ("a.png", PNG)), ("file", ("bad.gif", data))]
        response = await client.post("/embed", files=form)
        tei_error(response, 422, "Validation", f"{name}: {message}")


async def test_a_raw_body_is_checked_like_a_json_input():
    settings = ServerSettings(triton_url="127.0.0.1:1", max_image_pixels=100)
    big = encode(Image.new("RGB", (20, 20)), "PNG")
    async with app_client(settings, FakeTriton()) as client:
        response = await client.post("/embed", content=big, headers={"content-type": "image/png"})
        tei_error(response, 422, "Validation", "inputs[0]: image of 20x20 = 400 pixels")
        json_form = await client.post("/embed", json={"inputs": base64.b64encode(big).decode()})
        assert json_form.json()["error"] == response.json()["error"]  # the same text
        response = await client.post(
            "/embed", content=b"hello", headers={"content-type": "image/jpeg"}
        )
        tei_error(response, 422, "Validation", "inputs[0]: not an image in a supported format")


async def test_an_empty_body_or_form_is_400_empty():
    async with app_client(SETTINGS, FakeTriton()) as client:
        response = await client.post("/embed", content=b"", headers={"content-type": "image/png"})
        tei_error(response, 400, "Empty", "the request body is empty")
        response = await client.post("/embed", data={"normalize": "true"}, files={})
        # httpx sends a form without files as urlencoded: an unsupported type
        assert response.status_code == 415
        body = b"--b\r\nContent-Disposition: form-data; name=normalize\r\n\r\ntrue\r\n--b--\r\n"
        response = await client.post(
            "/embed", content=body, headers={"content-type": "multipart/form-data; boundary=b"}
        )
        tei_error(response, 400, "Empty", "the form has no file")


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "video/mp4", "application/xml"],
)
async def test_an_unsupported_content_type_is_415_json(content_type):
    async with app_client(SETTINGS, FakeTriton()) as client:
        response = await client.post("/embed", content=PNG, headers={"content-type": content_type})
        tei_error(response, 415, "Validation", f"Content-Type '{content_type}' is not supported")
        # JSON still works, with parameters and as a +json type
        for json_type in ("application/json; charset=utf-8", "application/vnd.api+json"):
            headers = {"content-type": json_type}
            body = b'{"inputs": "' + base64.b64encode(PNG) + b'"}'
            assert (await client.post("/embed", content=body, headers=headers)).status_code == 200


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (b"--b\r\nContent-Disposition: form-data; name=file; filename=a\r\n\r\nxx",
         "multipart/form-data; boundary=b", "ends before the closing boundary"),
        (b"whatever", "multipart/form-data", "no boundary parameter"),
        (b"nonsense without any boundary",
         "multipart/form-data; boundary=b", "malformed multipart/form-data body"),
        (b"--b\r\nContent-Type: image/png\r\n\r\nxx\r\n--b--\r\n",
         "multipart/form-data; boundary=b", "Content-Disposition: form-data; name="),
        (b"--b\r\nContent-Disposition: form-data; name=normalize\r\n\r\n\xff\r\n--b--\r\n",
         "multipart/form-data; boundary=b", "'normalize' is not valid UTF-8"),
        (b"--" + b"b" * 300 + b"\r\n", "multipart/form-data; boundary=" + "b" * 300,
         "malformed multipart/form-data body"),
    ],
)  # fmt: skip
async def test_a_malformed_form_is_422_json(body, content_type, message):
    async with app_client(SETTINGS, FakeTriton()) as client:
        response = await client.post("/embed", content=body, headers={"content-type": content_type})
        tei_error(response, 422, "Validation", message)


async def test_a_form_field_is_short_and_the_fields_few():
    async with app_client(SETTINGS, FakeTriton()) as client:
        long = {"normalize": "x" * (uploads.MAX_FIELD_BYTES + 1)}
        response = await client.post("/embed", files={"file": ("a.png", PNG)}, data=long)
        tei_error(response, 422, "Validation", "longer than 1024 bytes")
        many = {f"f{i}": "1" for i in range(uploads.MAX_FIELDS + 1)}
        response = await client.post("/embed", files={"file": ("a.png", PNG)}, data=many)
        tei_error(response, 422, "Validation", f"more than {uploads.MAX_FIELDS} fields")


async def test_the_number_of_files_is_bounded_by_the_client_batch_size():
    settings = ServerSettings(triton_url="127.0.0.1:1", max_client_batch_size=2)
    async with app_client(settings, FakeTriton()) as client:
        two = [("file", (f"{i}.png", PNG)) for i in range(2)]
        assert (await client.post("/embed", files=two)).status_code == 200
        response = await client.post("/embed", files=[*two, ("file", ("3.png", PNG))])
        tei_error(response, 422, "Validation", "maximum allowed batch size 2")


@pytest.mark.parametrize("form", [False, True])
async def test_the_payload_limit_holds_before_and_while_reading(form):
    settings = ServerSettings(triton_url="127.0.0.1:1", payload_limit=2048)
    big = PNG + b"\0" * 4000
    async with app_client(settings, FakeTriton()) as client:

        async def streamed():  # no Content-Length: counted while it streams
            for start in range(0, len(big), 100):
                yield big[start : start + 100]

        if form:
            response = await client.post("/embed", files={"file": ("a.png", big)})
            tei_error(response, 413, "Validation", "payload is larger than the limit of 2048")
            boundary = b"--b\r\nContent-Disposition: form-data; name=f; filename=a\r\n\r\n"
            chunks = [boundary, big, b"\r\n--b--\r\n"]

            async def streamed():
                for chunk in chunks:
                    yield chunk

            headers = {"content-type": "multipart/form-data; boundary=b"}
        else:
            response = await client.post(
                "/embed", content=big, headers={"content-type": "image/png"}
            )
            tei_error(response, 413, "Validation", "payload is larger than the limit of 2048")
            headers = {"content-type": "image/png"}
        response = await client.post("/embed", content=streamed(), headers=headers)
        tei_error(response, 413, "Validation", "payload is larger than the limit of 2048")


async def test_the_images_in_flight_limit_holds():
    settings = ServerSettings(
        triton_url="127.0.0.1:1", max_concurrent_images=3, max_client_batch_size=3
    )
    async with app_client(settings, FakeTriton()) as client:
        permits = client._transport.app.state.services.permits  # type: ignore[attr-defined]
        permits.used = 1
        three = [("file", (f"{i}.png", PNG)) for i in range(3)]
        response = await client.post("/embed", files=three)
        tei_error(response, 429, "Overloaded", "3 more inputs would exceed the limit of 3")
        assert response.headers["retry-after"] == "1"
        permits.used = 0
        assert (await client.post("/embed", files=three)).status_code == 200
        assert permits.used == 0


async def test_a_raw_upload_needs_the_api_key():
    settings = ServerSettings(triton_url="127.0.0.1:1", api_key=SecretStr("k"))
    async with app_client(settings, FakeTriton()) as client:
        headers = {"content-type": "image/png"}
        response = await client.post("/embed", content=PNG, headers=headers)
        tei_error(response, 401, "Unauthorized", "")
        response = await client.post(
            "/embed", content=PNG, headers={**headers, "authorization": "Bearer k"}
        )
        assert response.status_code == 200


async def test_raw_uploads_are_counted_and_advertised():
    async with app_client(SETTINGS, FakeTriton()) as client:
        before = (await client.get("/metrics")).text
        await client.post("/embed", files=[("file", ("a.png", PNG)), ("file", ("b.png", PNG))])
        after = (await client.get("/metrics")).text
        images = "iei_images_embedded_total"
        assert metric(after, images) - metric(before, images) == 2
        assert 'iei_requests_total{route="/embed",status="200"}' in after
        assert (await client.get("/info")).json()["raw_uploads"] is True
        schema = (await client.get("/openapi.json")).json()
        content = schema["paths"]["/embed"]["post"]["requestBody"]["content"]
        assert {"application/json", "image/*", "application/octet-stream",
                "multipart/form-data"} <= set(content)  # fmt: skip


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize(
    ("content_type", "first"),
    [("image/png", PNG[:8]), ("multipart/form-data; boundary=X", b"--X\r\n")],
    ids=["raw", "form"],
)
async def test_a_client_gone_mid_upload_is_a_400_not_an_unexpected_error(
    content_type, first, caplog
):
    """The body stops with the client's disconnect: Starlette's ClientDisconnect was a 500 with a
    traceback in the log (a JSON body was FastAPI's 400 already)."""
    import asyncio

    messages = [
        {"type": "http.request", "body": first, "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict] = []

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)  # nothing more will come
        raise AssertionError("read past the disconnect")

    async def send(message: dict) -> None:
        sent.append(message)

    async with app_client(SETTINGS, FakeTriton()) as client:
        app = client._transport.app  # the ASGI app itself: httpx cannot disconnect mid-body
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": "/embed", "raw_path": b"/embed", "query_string": b"",
            "root_path": "", "client": ("127.0.0.1", 1), "server": ("iei", 80),
            "headers": [(b"host", b"iei"), (b"content-type", content_type.encode())],
        }  # fmt: skip

        def answered(status: int, exposed: str) -> float:  # the counter is the process's
            return metric(exposed, f'iei_requests_total{{route="/embed",status="{status}"}}')

        before = (await client.get("/metrics")).text
        await asyncio.wait_for(app(scope, receive, send), 10)
        after = (await client.get("/metrics")).text
    started = [m for m in sent if m["type"] == "http.response.start"]
    assert [m["status"] for m in started] == [400]
    assert "unexpected error" not in caplog.text
    assert answered(400, after) == answered(400, before) + 1
    assert answered(500, after) == answered(500, before)
