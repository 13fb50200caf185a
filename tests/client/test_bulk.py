"""`iei embed`, `iei similar` and `iei search` end to end against a fake service (MockTransport):
names that are not UTF-8, failed batches, stops and corrupt files."""

from __future__ import annotations

import base64
import logging
import os
import sys
from pathlib import Path

import httpx
import orjson
import pytest
from iei import cli
from iei.client import bulk, index_files, similar
from iei.client.index_files import Made, journal_path, load_index

DIMENSION = 4
URL = "http://iei.test"


class FakeService:
    """/info and /embed (JSON): a file's vector is its bytes' length. A request holding a file
    in `fail` is answered with that file's canned error (a whole-request failure, as Triton's);
    `fail_all` answers every /embed so."""

    def __init__(self) -> None:
        self.fail: dict[bytes, httpx.Response] = {}
        self.fail_all: httpx.Response | None = None
        self.embedded: list[bytes] = []  # every file the service embedded, in order
        self.keys: list[str | None] = []  # each request's Authorization header
        self.model_id = "org/model-a"  # the model /info says it serves

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.keys.append(request.headers.get("authorization"))
        if request.url.path == "/info":
            info = {"max_client_batch_size": 64, "embedding_dimension": DIMENSION, "limits": {},
                    "model_id": self.model_id}  # fmt: skip
            return httpx.Response(200, json=info)
        files = [base64.b64decode(item) for item in orjson.loads(request.content)["inputs"]]
        if self.fail_all is not None:
            return self.fail_all
        for file in files:
            if file in self.fail:
                return self.fail[file]
        self.embedded += files
        return httpx.Response(200, json=[[float(len(f)), 1.0, 0.0, 0.0] for f in files])


def error(status: int, error_type: str, message: str, **headers: str) -> httpx.Response:
    return httpx.Response(
        status, json={"error": message, "error_type": error_type}, headers=headers
    )


@pytest.fixture
def service(monkeypatch) -> FakeService:
    """The fake service behind every client `iei embed` / `similar` / `search` opens."""
    fake = FakeService()
    transport = httpx.MockTransport(fake)

    def async_client(*args, **options):
        return real_async(*args, transport=transport, sleep=no_sleep, **options)

    def sync_client(*args, **options):
        return real_sync(*args, transport=transport, sleep=lambda _: None, **options)

    async def no_sleep(_: float) -> None:
        return None

    real_async, real_sync = bulk.AsyncIEIClient, similar.IEIClient
    monkeypatch.setattr(bulk, "AsyncIEIClient", async_client)
    monkeypatch.setattr(similar, "IEIClient", sync_client)
    return fake


def embed(*arguments: str | Path) -> int:
    return cli.main(["embed", *map(str, arguments), "--url", URL, "--no-progress"])


def photos(folder: Path, count: int) -> list[Path]:
    folder.mkdir(exist_ok=True)
    files = [folder / f"p{i}.jpg" for i in range(count)]
    for i, file in enumerate(files):
        file.write_bytes(b"x" * (i + 1))
    return files


# --- names that are not UTF-8 ------------------------------------------------------------------


def bytes_named(folder: Path, name: bytes, content: bytes) -> str:
    """A file named by bytes that are not UTF-8 (what a camera card or an old archive holds)."""
    path = os.path.join(os.fsencode(folder), name)
    try:
        with open(path, "wb") as file:
            file.write(content)
    except OSError:  # macOS's file systems refuse such names
        pytest.skip("this file system takes only UTF-8 names")
    return os.fsdecode(path)


@pytest.mark.skipif(sys.platform == "win32", reason="Windows names are UTF-16")
@pytest.mark.parametrize("suffix", [".jsonl", ".npy", ".parquet"])
def test_a_name_that_is_not_utf8_is_embedded_and_recorded_printably(
    service, tmp_path, suffix, capsys
):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    folder = tmp_path / "photos"
    photos(folder, 2)
    odd = bytes_named(folder, b"caf\xe9.jpg", b"cafe" * 3)
    out = tmp_path / f"index{suffix}"
    assert embed(folder, "--out", out) == 0
    recorded = f"{folder}/caf\\xe9.jpg"
    paths, vectors, _ = load_index(out)
    assert sorted(paths) == sorted([recorded, f"{folder}/p0.jpg", f"{folder}/p1.jpg"])
    assert vectors[paths.index(recorded), 0] == 12.0  # read through its real name
    assert "-> " in capsys.readouterr().out

    # --resume knows it again: only the new file is sent
    photos(folder, 3)
    sent = len(service.embedded)
    assert embed(folder, "--out", out, "--resume") == 0
    assert service.embedded[sent:] == [b"xxx"]
    assert len(load_index(out)[0]) == 4

    # `iei similar` of the odd file itself prints its recorded name
    capsys.readouterr()
    assert cli.main(["similar", odd, "--index", str(out), "--url", URL, "--top", "1"]) == 0
    assert capsys.readouterr().out == f"1.0000\t{recorded}\n"


# --- a batch that one image breaks -------------------------------------------------------------

BROKE_IT = {
    "424": error(424, "Backend", "stack expects each tensor to be equal size"),
    "504": error(504, "Timeout", "the request took longer than 60 s"),
}


@pytest.mark.parametrize("answer", BROKE_IT.values(), ids=BROKE_IT.keys())
def test_a_batch_one_image_breaks_is_retried_alone_and_only_that_image_skipped(
    service, tmp_path, answer, caplog
):
    files = photos(tmp_path / "photos", 6)
    service.fail[b"xx"] = answer  # p1.jpg
    out = tmp_path / "index.npy"
    assert embed(tmp_path / "photos", "--out", out, "--batch-size", "4") == 0
    assert load_index(out)[0] == [str(f) for f in files if f.name != "p1.jpg"]
    [warning] = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert warning.startswith(f"skipped {files[1]}: the service failed on it ({answer.status_code}")


@pytest.mark.parametrize(
    "answer",
    [*BROKE_IT.values(), error(504, "Timeout", "loading", **{"Retry-After": "1"})],
    ids=["424", "504", "504-retry-after"],
)
def test_a_service_that_fails_every_image_stops_the_run(service, tmp_path, answer, caplog):
    photos(tmp_path / "photos", 8)
    service.fail_all = answer
    out = tmp_path / "index.npy"
    assert embed(tmp_path / "photos", "--out", out, "--batch-size", "4") == 1
    assert f"stopped: {answer.status_code}" in caplog.text
    assert len([r for r in caplog.records if "skipped" in r.getMessage()]) < 3
    assert not out.exists()


# --- stops -------------------------------------------------------------------------------------


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_disk_under_the_journal_stops_the_run_in_one_line(
    service, tmp_path, monkeypatch, caplog
):
    class FullDisk(index_files.Journal):
        def __init__(self, path: Path) -> None:
            super().__init__(path)
            self.file.close()
            self.file = open("/dev/full", "ab")  # noqa: SIM115 - every write: ENOSPC

    monkeypatch.setattr(bulk, "Journal", FullDisk)
    photos(tmp_path / "photos", 3)
    out = tmp_path / "index.npy"
    assert embed(tmp_path / "photos", "--out", out) == 1
    [line] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert line.startswith("stopped: [Errno 28] No space left on device (0 vectors kept;")
    assert journal_path(out).exists() and not out.exists()


# --- corrupt index files -----------------------------------------------------------------------


def test_a_corrupt_index_is_one_line_in_similar_search_and_resume(service, tmp_path, caplog):
    (tmp_path / "q.jpg").write_bytes(b"query")
    photos(tmp_path / "photos", 2)
    index = tmp_path / "index.npy"
    index.write_text("not numpy\n")
    index.with_suffix(".ids.json").write_text('["a"]')
    service_args = ["--url", URL]
    assert cli.main(["similar", str(tmp_path / "q.jpg"), "--index", str(index), *service_args]) == 2
    assert cli.main(["search", "a cat", "--index", str(index), *service_args]) == 2
    assert embed(tmp_path / "photos", "--out", index, "--resume") == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"{index}: not an index written by iei embed (Cannot load file containing "
                      "pickled data when allow_pickle=False)"] * 3  # fmt: skip


# --- Ctrl-C ------------------------------------------------------------------------------------


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["find_images", "prepare"])
def test_ctrl_c_before_the_embedding_is_one_line(service, tmp_path, monkeypatch, caplog, where):
    photos(tmp_path / "photos", 2)
    monkeypatch.setattr(bulk, where, interrupt)
    assert embed(tmp_path / "photos", "--out", tmp_path / "index.npy") == 130
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == ["interrupted"]


def test_ctrl_c_while_the_index_is_written_keeps_the_journal_and_no_partial_file(
    service, tmp_path, monkeypatch, caplog
):
    photos(tmp_path / "photos", 3)
    out = tmp_path / "index.npy"

    def save_then_interrupt(file, array):
        file.write(b"half an array")
        raise KeyboardInterrupt

    real_save = index_files.np.save
    monkeypatch.setattr(index_files.np, "save", save_then_interrupt)
    assert embed(tmp_path / "photos", "--out", out) == 130
    assert "interrupted writing" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.npy.progress.jsonl", "photos"]
    monkeypatch.setattr(index_files.np, "save", real_save)
    assert embed(tmp_path / "photos", "--out", out, "--resume") == 0
    assert len(load_index(out)[0]) == 3


def test_ctrl_c_while_resume_seeds_its_journal_leaves_no_journal(
    service, tmp_path, monkeypatch, caplog
):
    files = photos(tmp_path / "photos", 2)
    out = tmp_path / "index.npy"
    assert embed(tmp_path / "photos", "--out", out) == 0
    files[0].unlink()  # gone from the folder: only the finished index remembers it

    def append_one_then_interrupt(self, paths, vectors):
        real_append(self, paths[:1], vectors[:1])
        raise KeyboardInterrupt

    real_append = index_files.Journal.append
    monkeypatch.setattr(index_files.Journal, "append", append_one_then_interrupt)
    files[0].with_name("p9.jpg").write_bytes(b"new")
    assert embed(tmp_path / "photos", "--out", out, "--resume") == 130
    assert not journal_path(out).exists()
    assert not index_files.partial(journal_path(out)).exists()
    monkeypatch.setattr(index_files.Journal, "append", real_append)
    assert embed(tmp_path / "photos", "--out", out, "--resume") == 0
    assert sorted(Path(p).name for p in load_index(out)[0]) == ["p0.jpg", "p1.jpg", "p9.jpg"]


# --- what a folder may hold besides images ----------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes")
def test_a_fifo_named_like_an_image_is_skipped_not_waited_for(service, tmp_path, caplog):
    """Reading it waited for a writer for ever, and Ctrl-C did not end the run."""
    photos(tmp_path / "in", 2)
    os.mkfifo(tmp_path / "in" / "pipe.jpg")
    out = tmp_path / "v.jsonl"
    assert embed(tmp_path / "in", "--out", out) == 0
    assert "pipe.jpg: cannot read: not a regular file" in caplog.text
    assert len(service.embedded) == 2


def test_a_folder_that_cannot_be_listed_is_a_warning(service, tmp_path, caplog, monkeypatch):
    photos(tmp_path / "in", 2)
    walk = os.walk

    def refusing(top, onerror=None, **options):  # as for a folder of mode 000 (tests run as root)
        if onerror is not None:
            onerror(PermissionError(13, "Permission denied", str(tmp_path / "in" / "locked")))
        return walk(top, onerror=onerror, **options)

    monkeypatch.setattr(os, "walk", refusing)
    assert embed(tmp_path / "in", "--out", tmp_path / "v.jsonl") == 0
    assert f"skipped the folder {tmp_path / 'in' / 'locked'}: Permission denied" in caplog.text


def test_an_out_that_is_a_folder_is_refused_before_anything_is_embedded(service, tmp_path, caplog):
    """It was found at the end, once every image was embedded (and --resume failed alike)."""
    photos(tmp_path / "in", 2)
    (tmp_path / "v.npy").mkdir()
    assert embed(tmp_path / "in", "--out", tmp_path / "v.npy", "--overwrite") == 2
    assert f"{tmp_path / 'v.npy'} is a folder: --out names the index file" in caplog.text
    assert service.embedded == []


def test_a_file_over_the_payload_limit_is_skipped_unread(service, tmp_path, caplog, monkeypatch):
    """It was read whole and sent (twice: the request, then the file alone), answered 413."""
    files = photos(tmp_path / "in", 3)
    files[1].write_bytes(b"x" * 5000)
    real = bulk.AsyncIEIClient

    def limited(*args, **options):
        client = real(*args, **options)

        async def info():
            return {"max_client_batch_size": 64, "embedding_dimension": DIMENSION,
                    "limits": {"payload_limit": 4096}}  # fmt: skip

        client.info = info
        return client

    monkeypatch.setattr(bulk, "AsyncIEIClient", limited)
    assert embed(tmp_path / "in", "--out", tmp_path / "v.jsonl") == 0
    assert service.embedded == [b"x", b"xxx"]
    assert "p1.jpg: cannot read: 5000 bytes, over the service's payload limit of 4096" in (
        caplog.text
    )


def test_resuming_a_jsonl_keeps_no_vectors_in_memory(service, tmp_path):
    """A `.jsonl` run needs which paths are done: the whole journal was read and parsed into
    memory (a million vectors, about 20 GB)."""
    out = tmp_path / "v.jsonl"
    lines = [orjson.dumps({"path": f"done{i}.jpg", "embedding": [1.0, 2.0, 3.0, 4.0]})
             for i in range(3)]  # fmt: skip
    out.write_bytes(b"\n".join(lines) + b"\n" + b'{"path": "torn')
    done = bulk.prepare(out, resume=True, overwrite=False).done
    assert list(done) == ["done0.jpg", "done1.jpg", "done2.jpg"]
    assert [len(v) for v in done.values()] == [4, 0, 0]  # the first, for the vectors' size
    assert out.read_bytes().endswith(b"\n")  # the torn line was cut off
    npy = tmp_path / "w.npy"
    journal_path(npy).write_bytes(b"\n".join(lines) + b"\n")
    resumed = bulk.prepare(npy, resume=True, overwrite=False).done
    assert [len(v) for v in resumed.values()] == [4] * 3


def test_a_url_without_http_is_refused_with_the_arguments(tmp_path, capsys):
    """`127.0.0.1:8000` (how IEI_TRITON_URL is written) was retried for seconds as unreachable."""
    with pytest.raises(SystemExit) as exited:
        cli.main(["embed", str(tmp_path), "--url", "127.0.0.1:8000", "--out", "v.npy"])
    assert exited.value.code == 2
    assert "'127.0.0.1:8000' is no http:// or https:// URL" in capsys.readouterr().err


def test_the_api_key_is_sent_without_the_white_space_around_it(service, tmp_path, monkeypatch):
    """A key read from a file keeps its newline: httpx refused the header, read as unreachable."""
    photos(tmp_path / "in", 1)
    monkeypatch.setenv("IEI_API_KEY", "secret\n")
    assert embed(tmp_path / "in", "--out", tmp_path / "v.jsonl") == 0
    assert set(service.keys) == {"Bearer secret"}


# --- what made an index's vectors ---------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".npy", ".parquet"])
def test_an_index_records_the_model_and_whether_its_vectors_are_normalized(
    service, tmp_path, suffix
):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    photos(tmp_path / "in", 2)
    out = tmp_path / f"v{suffix}"
    assert embed(tmp_path / "in", "--out", out) == 0
    # A `.npy` has nowhere to say it: taken on trust.
    expected = Made() if suffix == ".npy" else Made("org/model-a", True)
    assert load_index(out).made == expected
    if suffix == ".jsonl":
        first = orjson.loads(out.read_bytes().splitlines()[0])
        assert (first["model"], first["normalized"]) == ("org/model-a", True)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
@pytest.mark.parametrize("change", ["model", "raw"])
def test_resuming_with_another_model_or_raw_vectors_is_refused_before_embedding(
    service, tmp_path, suffix, change, caplog
):
    """Another model of the same dimension (or raw vectors after normalized ones) passed the
    length check: the index mixed vectors that no query ranks together."""
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    photos(tmp_path / "in", 2)
    out = tmp_path / f"v{suffix}"
    assert embed(tmp_path / "in", "--out", out) == 0
    photos(tmp_path / "in", 3)
    sent = len(service.embedded)
    before = out.read_bytes()
    if change == "model":
        service.model_id = "org/model-b"
        assert embed(tmp_path / "in", "--out", out, "--resume") == 2
        clash = "vectors of org/model-a, not of org/model-b"
    else:
        assert embed(tmp_path / "in", "--out", out, "--resume", "--raw") == 2
        clash = "normalized vectors, not raw ones (--raw)"
    assert service.embedded[sent:] == []
    assert f"{out} holds {clash} (this run's): resume with the same model" in caplog.text
    assert out.read_bytes() == before
    # The same model resumes.
    service.model_id = "org/model-a"
    assert embed(tmp_path / "in", "--out", out, "--resume") == 0
    assert service.embedded[sent:] == [b"xxx"] and len(load_index(out).paths) == 3


def test_an_index_of_an_earlier_version_resumes_and_its_new_lines_say_what_made_them(
    service, tmp_path
):
    photos(tmp_path / "in", 2)
    out = tmp_path / "v.jsonl"
    old = orjson.dumps({"path": str(tmp_path / "in" / "p0.jpg"), "embedding": [1.0, 1, 0, 0]})
    out.write_bytes(old + b"\n")
    assert embed(tmp_path / "in", "--out", out, "--resume") == 0
    assert service.embedded == [b"xx"]
    lines = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert "model" not in lines[0] and lines[1]["model"] == "org/model-a"
    assert load_index(out).made == Made("org/model-a", True)


def test_a_journal_of_two_models_is_refused_in_one_line(tmp_path):
    out = tmp_path / "v.jsonl"
    lines = [
        {"path": "a.jpg", "embedding": [1.0], "model": "org/model-a", "normalized": True},
        {"path": "b.jpg", "embedding": [1.0]},
        {"path": "c.jpg", "embedding": [1.0], "model": "org/model-b", "normalized": True},
    ]
    out.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    with pytest.raises(index_files.BulkError, match=rf"{out}:3: vectors of org/model-b, not of "
                       "org/model-a as on the lines before it"):  # fmt: skip
        load_index(out)


@pytest.mark.parametrize("command", ["similar", "search"])
def test_similar_refuses_an_index_of_another_model(service, tmp_path, command, caplog, capsys):
    """A query of another model of the same dimension ranked the index by noise."""
    photos(tmp_path / "in", 2)
    out = tmp_path / "v.jsonl"
    assert embed(tmp_path / "in", "--out", out) == 0
    query = str(tmp_path / "in" / "p0.jpg") if command == "similar" else "a cat"
    arguments = [command, query, "--index", str(out), "--url", URL]
    service.model_id = "org/model-b"
    sent = len(service.embedded)
    assert cli.main(arguments) == 2
    assert (f"{out} holds vectors of org/model-a; the service embeds with org/model-b: name "
            "that model with --model, or embed the images again") in caplog.text  # fmt: skip
    assert len(service.embedded) == sent  # refused before the query was embedded
    if command == "similar":  # the fake service embeds images only
        service.model_id = "org/model-a"
        capsys.readouterr()
        assert cli.main(arguments) == 0
        assert capsys.readouterr().out.startswith("1.0000\t")
