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
from iei.client.index_files import journal_path, load_index

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

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/info":
            info = {"max_client_batch_size": 64, "embedding_dimension": DIMENSION, "limits": {}}
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
    paths, vectors = load_index(out)
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
