"""Files handed to the real Triton through the frontend worker's shared memory region
(IEI_TRITON_SHM_MB, on by default): the vectors are the reference's, Triton lists the region, and
a Triton that lost it (as after a restart) gets the files in the body, then the region again."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from PIL import Image
from reference import Reference, cosine_rows
from sample_images import encode

pytestmark = pytest.mark.integration


def fresh_photos(seed: int, count: int = 4) -> dict[str, bytes]:
    """JPEGs no earlier test sent (the content cache would answer those without Triton)."""
    rng = np.random.default_rng(seed)
    return {
        f"photo{seed}-{i}.jpg": encode(
            Image.fromarray(rng.integers(0, 255, (240 + 16 * i, 320, 3), dtype=np.uint8)), "JPEG"
        )
        for i in range(count)
    }


def file_calls(stack, transport: str) -> float:
    return stack.metric(f'iei_triton_file_calls_total{{transport="{transport}"}}')


def regions(stack) -> list[str]:
    answer = httpx.get(f"http://{stack.triton_http}/v2/systemsharedmemory/status", timeout=10)
    answer.raise_for_status()
    return [region["name"] for region in answer.json()]


def embed_form(stack, files: dict[str, bytes]) -> np.ndarray:
    form = [("file", (name, data, "image/jpeg")) for name, data in files.items()]
    answer = httpx.post(f"{stack.url}/embed", files=form, timeout=120)
    assert answer.status_code == 200, answer.text
    return np.asarray(answer.json(), dtype=np.float32)


def test_files_reach_triton_through_shared_memory_with_the_references_vectors(
    vit_stack, model_dirs
):
    files = fresh_photos(1)
    before = file_calls(vit_stack, "shared_memory")
    served = embed_form(vit_stack, files)
    expected = Reference(model_dirs["vit"]).embed(list(files.values()))
    assert cosine_rows(served, expected).min() > 0.999
    assert file_calls(vit_stack, "shared_memory") > before
    assert any(name.startswith("iei-frontend-") for name in regions(vit_stack))


def test_a_region_triton_lost_is_registered_again_and_no_request_fails(vit_stack, model_dirs):
    reference = Reference(model_dirs["vit"])
    embed_form(vit_stack, fresh_photos(2))  # the region registered
    # What a restarted Triton knows: no region at all.
    httpx.post(
        f"http://{vit_stack.triton_http}/v2/systemsharedmemory/unregister", timeout=10
    ).raise_for_status()
    assert regions(vit_stack) == []
    body_before = file_calls(vit_stack, "body")
    for seed in (3, 4):  # refused by name and sent again in the body; then the region again
        files = fresh_photos(seed)
        served = embed_form(vit_stack, files)
        assert cosine_rows(served, reference.embed(list(files.values()))).min() > 0.999
        if seed == 3:
            assert file_calls(vit_stack, "body") > body_before
            shared_before = file_calls(vit_stack, "shared_memory")
    assert file_calls(vit_stack, "shared_memory") > shared_before
    assert any(name.startswith("iei-frontend-") for name in regions(vit_stack))


def test_with_no_region_the_files_go_in_the_body(clip_stack):
    """clip_stack runs with IEI_TRITON_SHM_MB=0 (its retrieval tests compare its vectors)."""
    embed_form(clip_stack, fresh_photos(5, count=2))
    assert file_calls(clip_stack, "body") > 0
    assert file_calls(clip_stack, "shared_memory") == 0
    assert regions(clip_stack) == []
