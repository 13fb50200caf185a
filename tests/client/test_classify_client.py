"""`IEIClient.classify`, its async twin and `iei tag` without a server (MockTransport): the
request's shape (Hugging Face's JSON, or a form of files), chunking, order, errors."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os

import httpx
import orjson
import pytest
from iei import cli
from iei.client import AsyncIEIClient, IEIClient, ValidationError
from PIL import Image

INFO = {"max_client_batch_size": 2, "embedding_dimension": 4, "limits": {}}


def png(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (shade, shade, shade)).save(buffer, format="PNG")
    return buffer.getvalue()


class FakeServer:
    """/info and /classify: label i of an image scores (i + 1) / 10 + its shade / 1000 (so the
    answer says which image it is for), in descending order; a 1x1 image is refused."""

    def __init__(self, raw_uploads: bool = False):
        self.info = {**INFO, "raw_uploads": raw_uploads}
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path == "/info":
            return httpx.Response(200, json=self.info)
        content_type = request.headers["content-type"]
        if content_type.startswith("multipart/"):
            labels = ["form"]
            images = request.content.count(b'filename="')
            shades = [0] * images
        else:
            body = orjson.loads(request.content)
            labels = body["parameters"]["candidate_labels"]
            files = [base64.b64decode(item) for item in body["inputs"]]
            shades = []
            for index, data in enumerate(files):
                image = Image.open(io.BytesIO(data))
                if image.size == (1, 1):
                    message = f"inputs[{index}]: the image is too small"
                    return httpx.Response(422, json={"error": message, "error_type": "Validation"})
                shades.append(image.getpixel((0, 0))[0])
        answer = [
            sorted(
                (
                    {"label": label, "score": (i + 1) / 10 + shade / 1000}
                    for i, label in enumerate(labels)
                ),
                key=lambda d: -d["score"],
            )
            for shade in shades
        ]
        return httpx.Response(200, json=answer)

    def bodies(self) -> list[dict]:
        return [orjson.loads(r.content) for r in self.requests if r.url.path == "/classify"]


def test_classify_sends_hugging_faces_shape_in_the_servers_chunks_and_keeps_order():
    server = FakeServer()
    images = [png(shade) for shade in (10, 20, 30)]
    with IEIClient("http://iei.test", transport=httpx.MockTransport(server)) as client:
        answer = client.classify(images, ["cat", "dog"], template="a {}", model="clip")
    bodies = server.bodies()
    assert [len(b["inputs"]) for b in bodies] == [2, 1]  # max_client_batch_size 2
    assert bodies[0]["parameters"] == {
        "candidate_labels": ["cat", "dog"],
        "hypothesis_template": "a {}",
    }
    assert {b["model"] for b in bodies} == {"clip"}
    assert [row[0]["label"] for row in answer] == ["dog"] * 3
    assert [round(row[0]["score"] - 0.2, 3) for row in answer] == [0.01, 0.02, 0.03]


def test_the_async_client_answers_the_same():
    server = FakeServer()
    images = [png(shade) for shade in (10, 20, 30)]

    async def main():
        async with AsyncIEIClient("http://iei.test", transport=httpx.MockTransport(server)) as c:
            return await c.classify(images, ["cat", "dog"])

    with IEIClient("http://iei.test", transport=httpx.MockTransport(FakeServer())) as client:
        assert asyncio.run(main()) == client.classify(images, ["cat", "dog"])
    assert server.bodies()[0]["parameters"]["hypothesis_template"] == "This is a photo of {}."
    assert "model" not in server.bodies()[0]


def test_files_go_as_a_form_unless_a_label_has_a_comma(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(png(5))
    server = FakeServer(raw_uploads=True)
    with IEIClient("http://iei.test", transport=httpx.MockTransport(server)) as client:
        form = client.classify([path], ["cat", "dog"])
        as_json = client.classify([path], ["cat, black", "dog"])
    sent = [r for r in server.requests if r.url.path == "/classify"]
    assert sent[0].headers["content-type"].startswith("multipart/form-data")
    assert b'name="candidate_labels"\r\n\r\ncat,dog\r\n' in sent[0].content
    assert form[0][0]["label"] == "form"
    assert sent[1].headers["content-type"] == "application/json"
    assert as_json[0][0]["label"] == "dog"


@pytest.mark.parametrize("labels", ["cat,dog", ["cat", 3]])
def test_labels_must_be_a_list_of_str(labels):
    with (
        IEIClient("http://iei.test", transport=httpx.MockTransport(FakeServer())) as client,
        pytest.raises(TypeError, match="labels"),
    ):
        client.classify([png(1)], labels)


def run_tag(monkeypatch, server: FakeServer, argv: list[str]) -> int:
    real = httpx.Client.__init__

    def with_mock(self, *args, **kwargs):  # the CLI's client talks to `server`
        kwargs["transport"] = httpx.MockTransport(server)
        real(self, *args, **kwargs)

    monkeypatch.setattr(httpx.Client, "__init__", with_mock)
    return cli.main(["tag", *argv])


def test_iei_tag_writes_each_files_labels_and_skips_a_broken_one(tmp_path, monkeypatch, caplog):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, shade in (("a.png", 10), ("b.png", 20), ("c.png", 30)):
        (folder / name).write_bytes(png(shade))
    tiny = io.BytesIO()
    Image.new("RGB", (1, 1)).save(tiny, format="PNG")
    (folder / "bad.png").write_bytes(tiny.getvalue())
    out = tmp_path / "tags.jsonl"
    code = run_tag(monkeypatch, FakeServer(), [str(folder), "--labels", "cat, dog,car",
                                               "--top", "2", "--out", str(out)])  # fmt: skip
    assert code == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["path"].rsplit("/", 1)[1] for line in lines] == ["a.png", "b.png", "c.png"]
    assert [d["label"] for d in lines[0]["labels"]] == ["car", "dog"]
    assert lines[2]["labels"][0]["score"] == pytest.approx(0.33)
    assert "bad.png: the image is too small" in caplog.text


@pytest.mark.skipif(os.name != "posix", reason="a name of bytes that are not UTF-8")
def test_iei_tag_names_a_file_that_is_not_utf8_printably(tmp_path, monkeypatch, capsys):
    try:
        with open(os.path.join(os.fsencode(tmp_path), b"caf\xe9.png"), "wb") as file:
            file.write(png(10))
    except OSError:  # macOS's file systems refuse such names
        pytest.skip("this file system takes only UTF-8 names")
    out = tmp_path / "tags.jsonl"
    assert (
        run_tag(monkeypatch, FakeServer(), [str(tmp_path), "--labels", "x", "--out", str(out)]) == 0
    )
    assert json.loads(out.read_text())["path"] == f"{tmp_path}/caf\\xe9.png"
    assert run_tag(monkeypatch, FakeServer(), [str(tmp_path), "--labels", "x"]) == 0
    assert capsys.readouterr().out == f"{tmp_path}/caf\\xe9.png\tx=0.1100\n"


def test_iei_tag_refuses_labels_that_are_not_utf8_in_one_line(tmp_path, monkeypatch, caplog):
    """A label of Latin-1 bytes (argv as the shell passed it) was a traceback when sent."""
    (tmp_path / "a.png").write_bytes(png(10))
    argv = [str(tmp_path), "--labels", "caf\udce9,dog"]  # the bytes b"caf\xe9" in argv
    assert run_tag(monkeypatch, FakeServer(), argv) == 2
    assert "--labels is not UTF-8 text: caf\\xe9,dog" in caplog.text


def test_iei_tag_prints_a_line_per_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "a.png").write_bytes(png(10))
    code = run_tag(monkeypatch, FakeServer(), [str(tmp_path / "a.png"), "--labels", "x,y"])
    assert code == 0
    assert capsys.readouterr().out == f"{tmp_path / 'a.png'}\ty=0.2100\tx=0.1100\n"


def test_iei_tag_stops_on_a_refusal_of_the_labels(tmp_path, monkeypatch):
    (tmp_path / "a.png").write_bytes(png(10))

    class Refusing(FakeServer):
        def __call__(self, request):
            if request.url.path == "/classify":
                message = "parameters.candidate_labels[1]: 'x' is given twice (also [0])"
                return httpx.Response(422, json={"error": message, "error_type": "Validation"})
            return super().__call__(request)

    assert run_tag(monkeypatch, Refusing(), [str(tmp_path), "--labels", "x,x"]) == 1
    transport = httpx.MockTransport(Refusing())
    with (
        IEIClient("http://iei.test", transport=transport) as client,
        pytest.raises(ValidationError),
    ):
        client.classify([png(1)], ["x", "x"])


def test_iei_tag_skips_a_file_over_the_payload_limit_and_tags_the_others(
    tmp_path, monkeypatch, caplog
):
    """A 413 is that file's, as a 422 naming it is: the run goes on (it stopped there)."""
    for name, shade in (("a.png", 10), ("huge.png", 20), ("c.png", 30)):
        (tmp_path / name).write_bytes(png(shade) + (b"\0" * 5000 if name == "huge.png" else b""))

    class Limited(FakeServer):
        def __call__(self, request):
            if request.url.path == "/classify" and len(request.content) > 4000:
                message = "payload is larger than the limit of 4000 bytes (IEI_PAYLOAD_LIMIT)"
                return httpx.Response(413, json={"error": message, "error_type": "Validation"})
            return super().__call__(request)

    out = tmp_path / "tags.jsonl"
    assert (
        run_tag(monkeypatch, Limited(), [str(tmp_path), "--labels", "x,y", "--out", str(out)]) == 0
    )
    tagged = [json.loads(line)["path"].rsplit("/", 1)[1] for line in out.read_text().splitlines()]
    assert tagged == ["a.png", "c.png"]
    assert "skipped " + str(tmp_path / "huge.png") + ": payload is larger" in caplog.text


@pytest.mark.parametrize(("status", "retry_after"), [(424, None), (504, None)])
def test_iei_tag_skips_a_file_that_breaks_the_model_and_tags_the_others(
    tmp_path, monkeypatch, caplog, status, retry_after
):
    """A 424 (the request broke the model) or a 504 without Retry-After may be one file's, as
    `iei embed` takes them: the batch is tried file by file (the run stopped there)."""
    for name, shade in (("a.png", 10), ("poison.png", 20), ("c.png", 30)):
        (tmp_path / name).write_bytes(png(shade))
    poison = png(20)

    class Breaking(FakeServer):
        def __call__(self, request):
            if request.url.path == "/classify" and base64.b64encode(poison) in request.content:
                error = {"error": "stack expects each tensor to be equal size",
                         "error_type": "Backend" if status == 424 else "Timeout"}  # fmt: skip
                return httpx.Response(status, json=error)
            return super().__call__(request)

    out = tmp_path / "tags.jsonl"
    argv = [str(tmp_path), "--labels", "x,y", "--out", str(out)]
    assert run_tag(monkeypatch, Breaking(), argv) == 0
    tagged = [json.loads(line)["path"].rsplit("/", 1)[1] for line in out.read_text().splitlines()]
    assert tagged == ["a.png", "c.png"]
    assert "skipped " + str(tmp_path / "poison.png") + ": the service failed on it" in caplog.text


def test_iei_tag_stops_when_the_service_fails_every_file(tmp_path, monkeypatch):
    for shade in range(5):
        (tmp_path / f"{shade}.png").write_bytes(png(shade))

    class Broken(FakeServer):
        def __call__(self, request):
            if request.url.path == "/classify":
                error = {"error": "CUDA error", "error_type": "Backend"}
                return httpx.Response(424, json=error)
            return super().__call__(request)

    assert run_tag(monkeypatch, Broken(), [str(tmp_path), "--labels", "x"]) == 1


def test_a_failed_iei_tag_run_leaves_an_earlier_out_file_as_it_was(tmp_path, monkeypatch):
    (tmp_path / "a.png").write_bytes(png(10))
    out = tmp_path / "tags.jsonl"
    out.write_text('{"path": "earlier"}\n')

    class Down(FakeServer):
        def __call__(self, request):
            return httpx.Response(401, json={"error": "wrong key", "error_type": "Unauthorized"})

    assert (
        run_tag(monkeypatch, Down(), [str(tmp_path / "a.png"), "--labels", "x", "--out", str(out)])
        == 1
    )
    assert out.read_text() == '{"path": "earlier"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "tags.jsonl"]  # no partial


def test_ctrl_c_in_the_client_commands_is_one_line(tmp_path, monkeypatch, capsys):
    from iei.client import similar, tag

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(tag, "run_tag", interrupted)
    monkeypatch.setattr(similar, "run_similar", interrupted)
    assert cli.main(["tag", str(tmp_path), "--labels", "x"]) == 130
    assert cli.main(["similar", str(tmp_path / "q.jpg"), "--index", str(tmp_path / "i.npy")]) == 130
    assert "Traceback" not in capsys.readouterr().err


def test_iei_tag_on_a_folder_without_images_refuses_and_keeps_the_earlier_out(
    tmp_path, monkeypatch, caplog
):
    """It wrote an empty file over the earlier --out and said 0 (`iei embed` refuses)."""
    (tmp_path / "empty").mkdir()
    out = tmp_path / "tags.jsonl"
    out.write_text('{"path": "earlier"}\n')
    argv = [str(tmp_path / "empty"), "--labels", "x,y", "--out", str(out)]
    assert run_tag(monkeypatch, FakeServer(), argv) == 2
    assert "no image files in" in caplog.text
    assert out.read_text() == '{"path": "earlier"}\n'


def test_iei_tag_that_tags_nothing_says_so_in_its_exit_status(tmp_path, monkeypatch):
    tiny = io.BytesIO()
    Image.new("RGB", (1, 1)).save(tiny, format="PNG")  # the fake refuses it: too small
    (tmp_path / "bad.png").write_bytes(tiny.getvalue())
    assert run_tag(monkeypatch, FakeServer(), [str(tmp_path), "--labels", "x,y"]) == 1
