"""The demo page at `/` in headless Chromium, against a stack with an API key.

Chromium is Debian's (`make browser` installs it); Playwright only drives it, never downloads one.
"""

from __future__ import annotations

import base64
import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from sample_images import PHOTOS_DIR
from stack import Stack

pytestmark = pytest.mark.integration

KEY = "demo-page-key"
PHOTOS = [PHOTOS_DIR / name for name in ("chelsea.jpg", "coffee.jpg", "rocket.jpg")]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="module")
def keyed_stack(model_dirs, tmp_path_factory) -> Iterator[Stack]:
    # A payload limit that two of the three photos fit and all three do not: the page splits
    # its requests by size too (it sent every photo in one and got a 413).
    stack = Stack(
        model_dirs["vit"], tmp_path_factory.mktemp("logs") / "keyed.log", IEI_API_KEY=KEY,
        IEI_PAYLOAD_LIMIT="150000",
    ).start()  # fmt: skip
    yield stack
    assert stack.stop() == 0, stack.log()


def test_the_page_is_open_and_its_api_calls_are_not(keyed_stack):
    page = httpx.get(f"{keyed_stack.url}/", timeout=60)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert 'id="key"' in page.text and 'fetch("embed"' in page.text
    assert httpx.get(f"{keyed_stack.url}/info", timeout=60).status_code == 401
    api = httpx.get(f"{keyed_stack.url}/openapi.json", headers=auth(), timeout=60).json()
    assert "/" not in api["paths"]


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def embed(stack: Stack, normalize: bool) -> np.ndarray:
    """The reference: /embed of each photo (one request each: the stack's payload limit)."""
    rows = []
    for photo in PHOTOS:
        response = httpx.post(
            f"{stack.url}/embed",
            json={
                "inputs": [base64.b64encode(photo.read_bytes()).decode()],
                "normalize": normalize,
            },
            headers=auth(),
            timeout=60,
        )
        assert response.status_code == 200, response.text
        rows.append(response.json()[0])
    return np.asarray(rows)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).exists():
        pytest.skip("no Chromium at /usr/bin/chromium: `make browser` installs Debian's (as root)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS
        )
        yield browser
        browser.close()


def test_the_page_embeds_dropped_images_and_draws_the_heatmap(keyed_stack, browser, tmp_path):
    page = browser.new_page(viewport={"width": 900, "height": 700})  # type: ignore[attr-defined]
    page.goto(f"{keyed_stack.url}/")
    page.wait_for_function("document.getElementById('model').textContent.includes('401')")

    page.fill("#key", KEY)
    page.dispatch_event("#key", "change")
    page.wait_for_function("document.getElementById('model').textContent.includes('dimensions')")
    assert page.is_hidden("#search")  # a ViT has no text tower: no text box
    page.set_input_files("#files", [str(p) for p in PHOTOS])
    page.wait_for_function("document.querySelectorAll('#heatmap td.cell').length === 9")
    assert "3 image(s) embedded (raw vectors)" in page.text_content("#status")

    # The cells are the cosines of the service's unit vectors, the norms those of its raw ones.
    unit = embed(keyed_stack, normalize=True)
    shown = np.array(
        [
            float(v)
            for v in page.eval_on_selector_all(
                "#heatmap td.cell", "c => c.map(e => e.dataset.value)"
            )
        ]
    ).reshape(3, 3)
    np.testing.assert_allclose(shown, unit @ unit.T, atol=2e-4)
    total = sum(len(base64.b64encode(p.read_bytes())) for p in PHOTOS)
    assert total > 150000  # so the page's three photos went in more than one request
    norms = [
        float(t)
        for t in page.eval_on_selector_all("#norms td.norm", "c => c.map(e => e.textContent)")
    ]
    np.testing.assert_allclose(norms, np.linalg.norm(embed(keyed_stack, False), axis=1), rtol=2e-3)

    # The screenshot shows coloured cells: sample each cell's corner (away from its text).
    screenshot = tmp_path / "demo.png"
    page.screenshot(path=str(screenshot), full_page=True)
    pixels = Image.open(io.BytesIO(screenshot.read_bytes())).convert("RGB")
    cells = page.query_selector_all("#heatmap td.cell")
    colours = []
    for cell in cells:
        box = cell.bounding_box()
        colours.append(pixels.getpixel((int(box["x"] + 4), int(box["y"] + 4))))
    for diagonal in (0, 4, 8):  # cosine 1: the deep red end of the scale
        assert colours[diagonal] == pytest.approx((165, 0, 38), abs=3), colours
    assert len(set(colours)) >= 3  # not blank: off-diagonal cells take other colours
    page.close()


def test_the_text_box_ranks_the_dropped_images_by_cosine(clip_stack, browser):
    """With a text tower the page shows a text box; its ranking is the service's cosines."""
    page = browser.new_page(viewport={"width": 900, "height": 700})  # type: ignore[attr-defined]
    page.goto(f"{clip_stack.url}/")
    page.wait_for_function("document.getElementById('model').textContent.includes('texts')")
    page.set_input_files("#files", [str(p) for p in PHOTOS])
    page.wait_for_function("document.querySelectorAll('#heatmap td.cell').length === 9")
    query = "a photo of a cat"
    page.fill("#query", query)
    page.click("#search button[type=submit]")
    page.wait_for_function("document.querySelectorAll('#ranking li').length === 3")
    shown = page.eval_on_selector_all(
        "#ranking li", "items => items.map(i => [i.dataset.name, Number(i.dataset.score)])"
    )
    inputs = [base64.b64encode(p.read_bytes()).decode() for p in PHOTOS]
    images = np.asarray(
        httpx.post(f"{clip_stack.url}/embed", json={"inputs": inputs}, timeout=60).json()
    )
    text = httpx.post(
        f"{clip_stack.url}/embed", json={"inputs": [query], "modality": "text"}, timeout=60
    ).json()[0]
    scores = images @ np.asarray(text)
    order = np.argsort(-scores)
    assert [name for name, _ in shown] == [PHOTOS[i].name for i in order]
    np.testing.assert_allclose([score for _, score in shown], scores[order], atol=2e-4)
    assert f'ranked by "{query}"' in page.text_content("#status")
    page.close()


def test_the_text_box_tags_the_dropped_images_with_the_models_scores(clip_stack, browser):
    """Tag: the dropped images classified against comma-separated labels (POST /classify), each
    image's three best labels with their scores."""
    page = browser.new_page(viewport={"width": 900, "height": 700})  # type: ignore[attr-defined]
    page.goto(f"{clip_stack.url}/")
    page.wait_for_function("document.getElementById('model').textContent.includes('texts')")
    page.set_input_files("#files", [str(p) for p in PHOTOS])
    page.wait_for_function("document.querySelectorAll('#heatmap td.cell').length === 9")
    labels = ["a cat", "a cup of coffee", "a rocket", "a dog"]
    page.fill("#query", " , ".join(labels))
    page.click("#tag")
    page.wait_for_function("document.querySelectorAll('#tags li').length === 3")
    shown = page.eval_on_selector_all(
        "#tags li", "items => items.map(i => [i.dataset.name, JSON.parse(i.dataset.labels)])"
    )
    inputs = [base64.b64encode(p.read_bytes()).decode() for p in PHOTOS]
    body = {"inputs": inputs, "parameters": {"candidate_labels": labels}}
    answer = httpx.post(f"{clip_stack.url}/classify", json=body, timeout=60).json()
    assert [name for name, _ in shown] == [p.name for p in PHOTOS]
    for (_, tags), expected in zip(shown, answer, strict=True):
        assert [t["label"] for t in tags] == [e["label"] for e in expected[:3]]
        np.testing.assert_allclose([t["score"] for t in tags], [e["score"] for e in expected[:3]])
    assert "3 image(s) tagged with 4 label(s)" in page.text_content("#status")
    assert "a cat" in page.text_content("#tags")
    page.close()


def test_the_page_offers_the_served_models_and_embeds_with_the_chosen_one(models_stack, browser):
    """Several models (IEI_MODELS): a select of /info's models; the heatmap is the chosen one's."""
    page = browser.new_page(viewport={"width": 900, "height": 700})  # type: ignore[attr-defined]
    page.goto(f"{models_stack.url}/")
    page.wait_for_function("document.getElementById('model').textContent.includes('texts')")
    offered = page.eval_on_selector_all("#models option", "o => o.map(e => e.value)")
    assert offered == ["siglip", "dino", "vit"]  # the default (a dual encoder) first
    page.select_option("#models", "dino")
    page.wait_for_function("document.getElementById('model').textContent.includes('dino')")
    assert page.is_hidden("#search")  # DINOv2 has no text tower
    page.set_input_files("#files", [str(p) for p in PHOTOS])
    page.wait_for_function("document.querySelectorAll('#heatmap td.cell').length === 9")
    shown = page.eval_on_selector_all(
        "#heatmap td.cell", "c => c.map(e => Number(e.dataset.value))"
    )
    inputs = [base64.b64encode(p.read_bytes()).decode() for p in PHOTOS]
    body = {"inputs": inputs, "model": "dino"}
    dino = np.asarray(httpx.post(f"{models_stack.url}/embed", json=body, timeout=60).json())
    np.testing.assert_allclose(np.reshape(shown, (3, 3)), dino @ dino.T, atol=2e-4)
    page.close()
