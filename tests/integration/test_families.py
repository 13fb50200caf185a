"""Every model family through the real stack, against the independent in-process reference."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from reference import Reference, cosine_rows, load_naive
from sample_images import HANDLING_MATTERS, odd_images, photos
from stack import Stack

pytestmark = pytest.mark.integration

# Both sides run float32 and the torchvision and PIL processors agree to ~1e-6 here, so we hold
# the service to 0.9999 (the contract says 0.999): distinct images of the tiny random models can
# reach 0.999 between themselves, 0.9999 they do not.
TOLERANCE = 0.9999

FAMILIES = ["vit", "deit", "beit", "convnext", "swin"]


@pytest.fixture(scope="module", params=FAMILIES)
def family_stack(
    request: pytest.FixtureRequest, model_dirs: dict[str, Path], tmp_path_factory
) -> Iterator[tuple[str, Stack]]:
    family = request.param
    log = tmp_path_factory.mktemp("logs") / f"{family}.log"
    stack = Stack(model_dirs[family], log).start()
    yield family, stack
    assert stack.stop() == 0, stack.log()


def embed(stack: Stack, files: list[bytes], **options: object) -> np.ndarray:
    body = {"inputs": [base64.b64encode(f).decode() for f in files], **options}
    response = httpx.post(f"{stack.url}/embed", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return np.array(response.json(), dtype=np.float64)


def test_photos_and_odd_images_match_reference(family_stack, model_dirs):
    family, stack = family_stack
    files = {**photos(), **odd_images()}
    served = embed(stack, list(files.values()))
    reference = Reference(model_dirs[family]).embed(list(files.values()))

    assert served.shape == reference.shape
    similarity = dict(zip(files, cosine_rows(served, reference), strict=True))
    wrong = {name: round(float(c), 6) for name, c in similarity.items() if c < TOLERANCE}
    assert not wrong, f"{family}: cosine to the reference below {TOLERANCE}: {wrong}"
    # normalize defaults to true, as in TEI
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_comparison_can_fail(family, model_dirs):
    """Ignoring EXIF, alpha or 16-bit depth would be caught: the naive decoding is far off."""
    files = odd_images()
    reference = Reference(model_dirs[family])
    careful = reference.embed([files[n] for n in HANDLING_MATTERS])
    naive = reference.embed_images([load_naive(files[n]) for n in HANDLING_MATTERS])
    similarity = dict(zip(HANDLING_MATTERS, cosine_rows(careful, naive), strict=True))
    assert all(c < TOLERANCE for c in similarity.values()), similarity


def test_single_requests_equal_one_batch(family_stack):
    _, stack = family_stack
    files = list(photos().values())
    batch = embed(stack, files)
    singles = np.concatenate([embed(stack, [f]) for f in files])
    assert cosine_rows(batch, singles).min() > 0.99999


def test_raw_vectors_when_normalize_is_false(family_stack, model_dirs):
    family, stack = family_stack
    files = list(photos().values())[:2]
    raw = embed(stack, files, normalize=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    unit = embed(stack, files)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), unit, atol=1e-5)
    dimension = {"convnext": 32, "swin": 64}.get(family, 32)
    assert raw.shape == (2, dimension)


def test_a_processor_whose_output_shape_follows_the_image_fails_the_whole_execution(
    model_dirs, tmp_path
):
    """README "Supported models": a processor that keeps the aspect ratio without a crop is not
    supported. One image alone is served; two shapes in one execution fail it whole (424)."""
    import json
    import shutil

    folder = tmp_path / "convnext-aspect"
    shutil.copytree(model_dirs["convnext"], folder)
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    processor.update(image_processor_type="BitImageProcessor", do_center_crop=False)
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    wide, square = photos()["coffee.jpg"], photos()["astronaut.jpg"]  # 600x400, 512x512
    # Without the content cache: the second request's wide photo must reach the model again.
    stack = Stack(folder, tmp_path / "stack.log", IEI_ENGINE="torch", IEI_CACHE_MB="0").start()
    try:
        assert embed(stack, [wide]).shape == (1, 32)
        body = {"inputs": [base64.b64encode(f).decode() for f in (wide, square)]}
        response = httpx.post(f"{stack.url}/embed", json=body, timeout=120)
        assert response.status_code == 424, response.text
        assert "stack expects each tensor to be equal size" in response.json()["error"]
    finally:
        assert stack.stop() == 0, stack.log()
