"""The Python client, `iei embed` and `iei similar` on the real stack, checked against /embed."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
from iei.client import AsyncIEIClient, IEIClient, ValidationError
from iei.client.index_files import load_index
from PIL import Image
from sample_images import PHOTOS_DIR
from stack import IEI

pytestmark = pytest.mark.integration

PHOTOS = sorted(p for p in PHOTOS_DIR.iterdir() if p.suffix in {".jpg", ".png"})


def embed_endpoint(stack, files: list[bytes], normalize: bool = True) -> np.ndarray:
    """The reference: one POST /embed with the files' base64."""
    inputs = [base64.b64encode(f).decode() for f in files]
    response = httpx.post(
        f"{stack.url}/embed", json={"inputs": inputs, "normalize": normalize}, timeout=60
    )
    assert response.status_code == 200, response.text
    return np.asarray(response.json(), dtype=np.float32)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --- the Python client -------------------------------------------------------------------------


def test_the_client_gives_the_vectors_of_embed_for_every_input_kind(vit_stack):
    cat = Image.open(PHOTOS_DIR / "chelsea.jpg").convert("RGB")
    pixels = np.asarray(cat)
    grey = pixels[:, :, 0].copy()
    with IEIClient(vit_stack.url, batch_size=2) as client:  # 2 a request: chunks keep order
        vectors = client.embed(
            [*map(str, PHOTOS), PHOTOS[0], PHOTOS[1].read_bytes(), cat, pixels, grey]
        )
        raw = client.embed(PHOTOS, normalize=False)
    files = [p.read_bytes() for p in PHOTOS]
    expected = embed_endpoint(
        vit_stack, [*files, files[0], files[1], png(cat), png(cat), png(Image.fromarray(grey))]
    )
    assert vectors.dtype == np.float32 and vectors.shape == expected.shape
    np.testing.assert_allclose(vectors, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(raw, embed_endpoint(vit_stack, files, False), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)


def test_the_async_client_matches_and_errors_are_typed(vit_stack):
    async def run() -> np.ndarray:
        async with AsyncIEIClient(vit_stack.url) as client:
            parts = await asyncio.gather(*(client.embed([p]) for p in PHOTOS))
            with pytest.raises(ValidationError) as refused:
                await client.embed([b"not an image"])
            assert refused.value.status == 422 and refused.value.error_type == "Validation"
            return np.concatenate(parts)

    expected = embed_endpoint(vit_stack, [p.read_bytes() for p in PHOTOS])
    np.testing.assert_allclose(asyncio.run(run()), expected, rtol=1e-5, atol=1e-6)


# --- iei embed / iei similar -------------------------------------------------------------------


def iei(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(IEI), *map(str, args)], capture_output=True, text=True, timeout=120
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture
def photo_folder(tmp_path) -> Path:
    """The photos in two folders, a file that is no image, a dangling link and a text file."""
    folder = tmp_path / "photos"
    (folder / "b").mkdir(parents=True)
    for index, photo in enumerate(PHOTOS):
        shutil.copy(photo, folder / ("b" if index % 2 else "") / photo.name)
    (folder / "b" / "broken.jpg").write_bytes(b"this is not a JPEG")
    (folder / "gone.png").symlink_to(folder / "nowhere.png")
    (folder / "notes.txt").write_text("not an image suffix: never sent")
    return folder


def walked(folder: Path) -> list[str]:
    """The order `iei embed` walks: sorted names per folder, the folder's files before deeper."""
    return [str(folder / p.name) for p in PHOTOS[::2]] + [
        str(folder / "b" / p.name) for p in PHOTOS[1::2]
    ]


def reference(stack, paths: list[str]) -> np.ndarray:
    return embed_endpoint(stack, [Path(p).read_bytes() for p in paths])


@pytest.mark.parametrize("suffix", [".jsonl", ".npy", ".parquet"])
def test_iei_embed_writes_every_format_and_skips_bad_files(vit_stack, photo_folder, suffix):
    out = photo_folder.parent / f"index{suffix}"
    result = iei("embed", photo_folder, "--out", out, "--url", vit_stack.url, "--batch-size", "2")
    assert f"embedded {len(PHOTOS)} images, skipped 2" in result.stdout
    assert "images/s" in result.stdout
    assert "skipped " + str(photo_folder / "b" / "broken.jpg") in result.stderr
    assert "skipped " + str(photo_folder / "gone.png") + ": cannot read" in result.stderr
    assert "notes.txt" not in result.stdout + result.stderr
    paths, vectors, _ = load_index(out)
    if suffix == ".jsonl":  # completion order
        order = np.argsort(paths)
        paths, vectors = sorted(paths), vectors[order]
        expected_paths = sorted(walked(photo_folder))
    else:  # walk order
        expected_paths = walked(photo_folder)
        assert not Path(f"{out}.progress.jsonl").exists()
    assert paths == expected_paths
    np.testing.assert_allclose(vectors, reference(vit_stack, paths), rtol=1e-5, atol=1e-6)
    if suffix == ".npy":
        assert json.loads(out.with_suffix(".ids.json").read_text()) == paths


def test_iei_embed_raw_vectors_and_no_overwrite_by_accident(vit_stack, photo_folder):
    out = photo_folder.parent / "raw.npy"
    iei("embed", PHOTOS[0], "--out", out, "--url", vit_stack.url, "--raw")
    expected = embed_endpoint(vit_stack, [PHOTOS[0].read_bytes()], normalize=False)
    np.testing.assert_allclose(np.load(out), expected, rtol=1e-5, atol=1e-6)
    again = iei("embed", PHOTOS[0], "--out", out, "--url", vit_stack.url, check=False)
    assert again.returncode == 2 and "--resume" in again.stderr
    iei("embed", PHOTOS[1], "--out", out, "--url", vit_stack.url, "--overwrite")
    assert load_index(out)[0] == [str(PHOTOS[1])]


def test_resume_a_jsonl_run_with_a_torn_last_line(vit_stack, photo_folder):
    out = photo_folder.parent / "index.jsonl"
    paths = walked(photo_folder)
    done = reference(vit_stack, paths[:2])
    lines = [
        json.dumps({"path": p, "embedding": v.tolist()})
        for p, v in zip(paths[:2], done, strict=True)
    ]
    # A marker value proves the finished lines are kept, not embedded again.
    lines[0] = json.dumps({"path": paths[0], "embedding": [7.0] * done.shape[1]})
    out.write_text("\n".join(lines) + "\n" + '{"path": "torn", "embed')
    result = iei("embed", photo_folder, "--out", out, "--url", vit_stack.url, "--resume")
    assert f"embedded {len(paths) - 2} images, skipped 2, 2 already done" in result.stdout
    assert "incomplete last line" in result.stderr
    found, vectors, _ = load_index(out)
    assert sorted(found) == sorted(paths)
    assert vectors[found.index(paths[0])].tolist() == [7.0] * done.shape[1]
    rest = [p for p in found if p != paths[0]]
    np.testing.assert_allclose(
        vectors[[found.index(p) for p in rest]], reference(vit_stack, rest), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("suffix", [".npy", ".parquet"])
def test_resume_an_npy_or_parquet_run_from_its_journal(vit_stack, photo_folder, suffix):
    out = photo_folder.parent / f"index{suffix}"
    paths = walked(photo_folder)
    journal = Path(f"{out}.progress.jsonl")
    dimension = reference(vit_stack, paths[:1]).shape[1]
    journal.write_text(json.dumps({"path": paths[3], "embedding": [7.0] * dimension}) + "\n")
    result = iei("embed", photo_folder, "--out", out, "--url", vit_stack.url, "--resume")
    assert "1 already done" in result.stdout
    assert not journal.exists()
    found, vectors, _ = load_index(out)
    assert found == paths  # walk order, the journal's row in its place
    assert vectors[3].tolist() == [7.0] * dimension
    # A finished file resumes too: a new photo in the folder is added, the others kept.
    shutil.copy(PHOTOS[0], photo_folder / "b" / "zz-new.jpg")
    result = iei("embed", photo_folder, "--out", out, "--url", vit_stack.url, "--resume")
    assert f"embedded 1 images, skipped 2, {len(paths)} already done" in result.stdout
    found, vectors, _ = load_index(out)
    assert found == [*paths, str(photo_folder / "b" / "zz-new.jpg")]
    assert vectors[found.index(paths[3])].tolist() == [7.0] * dimension


def test_iei_similar_finds_the_query_first(vit_stack, photo_folder):
    out = photo_folder.parent / "index.npy"
    iei("embed", photo_folder, "--out", out, "--url", vit_stack.url, "--no-progress")
    query = photo_folder / "b" / PHOTOS[1].name
    result = iei("similar", query, "--index", out, "--top", "3", "--url", vit_stack.url)
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    assert len(lines) == 3
    assert lines[0][1] == str(query) and float(lines[0][0]) == pytest.approx(1.0, abs=1e-4)
    scores = [float(score) for score, _ in lines]
    assert scores == sorted(scores, reverse=True)
    # The scores are the cosines of /embed's unit vectors.
    paths, vectors, _ = load_index(out)
    second = paths.index(lines[1][1])
    assert scores[1] == pytest.approx(
        float(vectors[second] @ vectors[paths.index(str(query))]), abs=1e-4
    )


def test_iei_embed_reports_an_unreachable_service(tmp_path):
    from stack import free_port

    env_free = f"http://127.0.0.1:{free_port()}"
    result = subprocess.run(
        [str(IEI), "embed", str(PHOTOS[0]), "--out", str(tmp_path / "x.jsonl"), "--url", env_free,
         "--retries", "1"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "IEI_API_KEY": ""},
    )  # fmt: skip
    assert result.returncode == 1
    assert "cannot reach" in result.stderr and "Traceback" not in result.stderr


def test_iei_embed_refuses_a_folder_without_images(tmp_path):
    (tmp_path / "notes.txt").write_text("no image here")
    result = iei("embed", tmp_path, "--out", tmp_path / "x.npy", check=False)
    assert result.returncode == 2 and "no image files in" in result.stderr
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize("suffix", [".jsonl", ".npy", ".parquet"])
def test_a_run_where_every_file_is_skipped_writes_no_index(vit_stack, tmp_path, suffix):
    """An index of nothing was written (a (0, 0) `.npy` that `iei similar` could not read, a
    Parquet write that failed in a traceback)."""
    (tmp_path / "broken.jpg").write_bytes(b"this is not a JPEG")
    out = tmp_path / f"x{suffix}"
    result = iei("embed", tmp_path, "--out", out, "--url", vit_stack.url, check=False)
    assert result.returncode == 1, result.stderr
    assert "nothing embedded: all 1 files were skipped" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.jpg"]  # no journal either


def test_an_out_that_cannot_be_written_is_one_line(tmp_path):
    result = iei("embed", PHOTOS[0], "--out", tmp_path / "no" / "x.jsonl", check=False)
    assert result.returncode == 2 and "No such file or directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_overwrite_keeps_the_old_index_until_the_new_one_is_written(vit_stack, tmp_path):
    out = tmp_path / "index.npy"
    iei("embed", PHOTOS[0], "--out", out, "--url", vit_stack.url)
    old = out.read_bytes()
    from stack import free_port

    down = f"http://127.0.0.1:{free_port()}"
    failed = iei("embed", PHOTOS[1], "--out", out, "--url", down, "--overwrite", "--retries", "0",
                 check=False)  # fmt: skip
    assert failed.returncode == 1 and "cannot reach" in failed.stderr
    assert out.read_bytes() == old and load_index(out)[0] == [str(PHOTOS[0])]
    iei("embed", PHOTOS[1], "--out", out, "--url", vit_stack.url, "--resume")
    assert load_index(out)[0] == [str(PHOTOS[1])]  # the new run's journal, not the old file


def test_iei_embed_to_parquet_without_pyarrow_says_so_before_any_work(tmp_path):
    """The client alone (`pip install iei`) has no pyarrow: one line at once, not a traceback
    after every image was embedded."""
    hidden = tmp_path / "hidden" / "pyarrow"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('no pyarrow in this install')\n")
    out = tmp_path / "x.parquet"
    result = subprocess.run(
        [str(IEI), "embed", str(PHOTOS[0]), "--out", str(out), "--url", "http://127.0.0.1:9"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(hidden.parent)},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert ".parquet needs pyarrow: pip install 'iei[tools]'" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == [tmp_path / "hidden"]  # no journal, no output


# --- texts: the client and `iei search` (a dual encoder) ------------------------------------------


def embed_texts_endpoint(stack, texts: list[str]) -> np.ndarray:
    body = {"inputs": texts, "modality": "text"}
    response = httpx.post(f"{stack.url}/embed", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return np.asarray(response.json(), dtype=np.float32)


def test_the_clients_embed_texts_as_embed_does(clip_stack):
    texts = ["a photo of a cat", "a red car at night", "the sea"]
    expected = embed_texts_endpoint(clip_stack, texts)
    with IEIClient(clip_stack.url, batch_size=2) as client:
        np.testing.assert_allclose(client.embed_texts(texts), expected, rtol=1e-5, atol=1e-6)

    async def run() -> np.ndarray:
        async with AsyncIEIClient(clip_stack.url) as client:
            return await client.embed_texts(texts)

    np.testing.assert_allclose(asyncio.run(run()), expected, rtol=1e-5, atol=1e-6)


def test_iei_search_ranks_an_index_by_a_text(clip_stack, photo_folder):
    out = photo_folder.parent / "index.parquet"
    iei("embed", photo_folder, "--out", out, "--url", clip_stack.url, "--no-progress")
    query = "a photo of a cat"
    result = iei("search", query, "--index", out, "--top", "3", "--url", clip_stack.url)
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    assert len(lines) == 3
    paths, vectors, _ = load_index(out)
    text = embed_texts_endpoint(clip_stack, [query])[0]
    cosines = vectors @ text / np.linalg.norm(vectors, axis=1) / np.linalg.norm(text)
    best = np.argsort(-cosines)[:3]
    assert [path for _, path in lines] == [paths[i] for i in best]
    np.testing.assert_allclose([float(s) for s, _ in lines], cosines[best], atol=1e-4)


def test_iei_search_on_an_image_only_model_says_why(vit_stack, photo_folder):
    out = photo_folder.parent / "index.npy"
    iei("embed", PHOTOS[0], "--out", out, "--url", vit_stack.url, "--no-progress")
    result = iei("search", "a cat", "--index", out, "--url", vit_stack.url, check=False)
    assert result.returncode == 1
    assert "embeds images only" in result.stderr and "Traceback" not in result.stderr
