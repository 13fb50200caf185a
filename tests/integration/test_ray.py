"""`iei embed --ray` and `iei.ray` on a local Ray with the tiny ViT, checked against
`iei embed --url` (the served stack) on the same folder: both modes, broken files, resume, URIs.

Ray stays small: one local Ray for the session (2 CPUs, a 100 MiB object store, no dashboard),
one actor per job, shut down at the end, and nothing of it may be left running.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from iei.cli import main
from iei.client.index_files import load_index
from sample_images import PHOTOS_DIR
from stack import IEI

pytestmark = pytest.mark.integration
ray = pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")

PHOTOS = sorted(p for p in PHOTOS_DIR.iterdir() if p.suffix in {".jpg", ".png"})


def processes_mentioning(text: str) -> list[str]:
    """Command lines of living processes that name `text` (Ray's own name their session)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline[:200]}")
    return found


def none_left(text: str, seconds: float = 20.0) -> list[str]:
    """Processes still naming `text` after `seconds` (Ray's stop within a few)."""
    deadline = time.monotonic() + seconds
    while (left := processes_mentioning(text)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@pytest.fixture(scope="session")
def local_ray() -> Iterator[None]:
    """A local Ray, small, for every test here; `iei embed --ray local` joins it."""
    temp = tempfile.mkdtemp(prefix="iei-ray-", dir="/tmp")  # short: Ray's socket paths
    ray.init(
        num_cpus=2, object_store_memory=100 * 2**20, include_dashboard=False, _temp_dir=temp,
        logging_level="warning",
    )  # fmt: skip
    yield
    ray.shutdown()
    left = none_left(temp)
    shutil.rmtree(temp, ignore_errors=True)
    assert not left, left


@pytest.fixture
def photo_folder(tmp_path) -> Path:
    """The photos in two folders, a file that is no image, a dangling link and a text file."""
    folder = tmp_path / "photos"
    (folder / "b").mkdir(parents=True)
    for index, photo in enumerate(PHOTOS):
        shutil.copy(photo, folder / ("b" if index % 2 else "") / photo.name)
    (folder / "b" / "broken.jpg").write_bytes(b"this is not a JPEG")
    (folder / "gone.png").symlink_to(folder / "nowhere.png")
    (folder / "notes.txt").write_text("not an image suffix: never read")
    return folder


def embed_url(stack, folder: Path, out: Path) -> dict[str, np.ndarray]:
    """The reference: `iei embed --url` (the served model) into a .parquet file."""
    result = subprocess.run(
        [str(IEI), "embed", str(folder), "--out", str(out), "--url", stack.url, "--no-progress"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    paths, vectors, _ = load_index(out)
    return dict(zip(paths, vectors, strict=True))


def rows(folder: Path | str) -> list[dict]:
    """Every row of a `--ray` output folder, by path."""
    table = pq.read_table(str(folder))
    assert table.column_names == ["path", "embedding", "sha256", "error"]
    assert str(table.schema.field("embedding").type) == "list<element: float>"
    return sorted(table.to_pylist(), key=lambda r: r["path"])


def ray_embed(*args: str | Path) -> int:
    return main(["embed", *map(str, args), "--no-progress"])


def assert_same_vectors(found: dict[str, list[float]], expected: dict[str, np.ndarray]) -> None:
    assert sorted(found) == sorted(expected)
    got = np.asarray([found[p] for p in sorted(expected)], dtype=np.float32)
    want = np.stack([expected[p] for p in sorted(expected)])
    cosine = (got * want).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() >= 0.999, cosine
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)  # normalised


def good(found: list[dict]) -> dict[str, list[float]]:
    return {r["path"]: r["embedding"] for r in found if r["error"] is None}


@pytest.mark.parametrize("mode", ["model", "url"])
def test_ray_job_rows_and_vectors_equal_iei_embed_url(
    local_ray, vit_stack, model_dirs, photo_folder, mode, capsys
):
    expected = embed_url(vit_stack, photo_folder, photo_folder.parent / "reference.parquet")
    out = photo_folder.parent / "vectors"
    source = (
        ["--model", model_dirs["vit"], "--dtype", "float32"]  # the stack's IEI_DTYPE
        if mode == "model"
        else ["--url", vit_stack.url, "--batch-size", "2", "--concurrency", "2"]
    )
    assert ray_embed(photo_folder, "--out", out, "--ray", "local", *source) == 0
    found = rows(out)
    assert_same_vectors(good(found), expected)
    if mode == "url":  # the same service: the same numbers
        for path, vector in good(found).items():
            np.testing.assert_allclose(vector, expected[path], rtol=1e-5, atol=1e-6)
    # Broken files: a row each with the reason and no vector; never fatal.
    failed = {r["path"]: r for r in found if r["error"] is not None}
    assert sorted(failed) == [
        str(photo_folder / "b" / "broken.jpg"),
        str(photo_folder / "gone.png"),
    ]
    assert failed[str(photo_folder / "gone.png")]["error"].startswith("cannot read")
    assert all(r["embedding"] is None for r in failed.values())
    import hashlib

    for row in found:
        if row["path"] != str(photo_folder / "gone.png"):
            digest = hashlib.sha256(Path(row["path"]).read_bytes()).hexdigest()
            assert row["sha256"] == digest
    printed = capsys.readouterr()
    assert f"embedded {len(PHOTOS)} images, skipped 2, 0 already done" in printed.out


def test_resume_keeps_the_rows_written_and_embeds_only_the_rest(
    local_ray, vit_stack, model_dirs, photo_folder, capsys, caplog
):
    out = photo_folder.parent / "vectors"
    model = ["--model", model_dirs["vit"], "--dtype", "float32"]
    assert ray_embed(photo_folder, "--out", out, "--ray", *model) == 0
    first = rows(out)
    capsys.readouterr()
    # Again without --resume or --overwrite: refused, nothing touched.
    assert ray_embed(photo_folder, "--out", out, "--ray", *model) == 2
    assert "--resume" in caplog.text
    # A marker proves the rows written are kept, not embedded again.
    [part] = [p for p in out.iterdir() if p.suffix == ".parquet"]
    table = pq.read_table(part)
    marked = table.to_pylist()
    kept = next(r for r in marked if r["error"] is None)
    kept["embedding"] = [7.0] * len(kept["embedding"])
    pq.write_table(table.from_pylist(marked, schema=table.schema), part)
    # A file cut short by a killed run, a repaired file, a new file.
    (out / "killed-run.parquet").write_bytes(b"PAR1 cut short")
    shutil.copy(PHOTOS[0], photo_folder / "b" / "broken.jpg")
    shutil.copy(PHOTOS[1], photo_folder / "zz-new.jpg")
    assert ray_embed(photo_folder, "--out", out, "--ray", *model, "--resume") == 0
    printed = capsys.readouterr()
    assert f"embedded 2 images, skipped 1, {len(PHOTOS)} already done" in printed.out
    assert "killed-run.parquet: unreadable" in caplog.text
    found = rows(out)
    assert len(found) == len({r["path"] for r in found}) == len(first) + 1  # no path twice
    vectors = good(found)
    assert vectors[kept["path"]] == [7.0] * len(kept["embedding"])
    expected = embed_url(vit_stack, photo_folder, photo_folder.parent / "reference.parquet")
    del vectors[kept["path"]], expected[kept["path"]]
    assert_same_vectors(vectors, expected)
    assert [r["path"] for r in found if r["error"]] == [str(photo_folder / "gone.png")]


def test_object_store_uris_in_and_out(local_ray, vit_stack, photo_folder, capsys):
    """`file://` (pyarrow's filesystems, as `s3://`) in, `local://` (fsspec's) out; rows name
    files by URI."""
    expected = embed_url(vit_stack, photo_folder, photo_folder.parent / "reference.parquet")
    out = f"local://{photo_folder.parent}/vectors"
    source = f"file://{photo_folder}"
    assert ray_embed(source, "--out", out, "--ray", "local", "--url", vit_stack.url) == 0
    found = rows(photo_folder.parent / "vectors")
    assert all(r["path"].startswith(f"file://{photo_folder}/") for r in found)
    vectors = {r["path"].removeprefix("file://"): r["embedding"] for r in found if not r["error"]}
    assert_same_vectors(vectors, expected)
    # A dangling link is not listed by the store's filesystem (it has no such thing): one error.
    assert [r["path"] for r in found if r["error"]] == [f"{source}/b/broken.jpg"]
    assert "skipped 1" in capsys.readouterr().out


def test_the_python_api_embeds_a_dataset_of_bytes_and_one_of_paths(
    local_ray, vit_stack, model_dirs, photo_folder
):
    import iei.ray

    expected = embed_url(vit_stack, photo_folder, photo_folder.parent / "reference.parquet")
    files = [p for p in expected]
    ds = ray.data.read_binary_files(files, include_paths=True)
    found = iei.ray.embed_dataset(ds, model=str(model_dirs["vit"]), dtype="float32").take_all()
    assert_same_vectors({r["path"]: r["embedding"] for r in found}, expected)
    paths = ray.data.from_items([{"path": p, "id": i} for i, p in enumerate(files)])
    found = iei.ray.embed_dataset(paths, url=vit_stack.url, in_flight=2).take_all()
    assert_same_vectors({r["path"]: r["embedding"] for r in found}, expected)
    assert sorted(r["id"] for r in found) == list(range(len(files)))  # other columns pass
    assert all(r["error"] is None and len(r["sha256"]) == 64 for r in found)


def test_iei_embed_ray_local_starts_and_stops_its_own_ray(vit_stack, photo_folder, tmp_path):
    """The command as a user runs it: its own local Ray, bounded to the cores, gone after."""
    temp = tempfile.mkdtemp(prefix="iei-ray-", dir="/tmp")
    out = tmp_path / "vectors"
    result = subprocess.run(
        [str(IEI), "embed", str(photo_folder / "b"), "--out", str(out), "--ray", "--url",
         vit_stack.url, "--no-progress"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_TMPDIR": temp},
    )  # fmt: skip
    left = none_left(temp)
    shutil.rmtree(temp, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "embedded 2 images, skipped 1" in result.stdout
    assert not left, left
    assert sys.executable  # the same environment's `iei`
