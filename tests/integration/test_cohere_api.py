"""Cohere's SDK (`cohere.ClientV2`) against the real stack with the tiny CLIP, and the content
cache proved by Triton's own inference counts."""

from __future__ import annotations

import base64
import io

import cohere
import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http
from PIL import Image
from polling import count_reaching
from sample_images import photos
from stack import COUNTING_WINDOWS, Stack

pytestmark = pytest.mark.integration
TEXTS = ["a photo of a cat", "a red car at night"]


def data_uri(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def noise_png(seed: int) -> bytes:
    """An image no other test sends (so never cached before)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def model_name(stack: Stack) -> str:
    return str(httpx.get(f"{stack.url}/v1/models", timeout=30).json()["data"][0]["id"])


def raw(stack: Stack, inputs: list[str], modality: str = "image") -> np.ndarray:
    body = {"inputs": inputs, "modality": modality, "normalize": False}
    response = httpx.post(f"{stack.url}/embed", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return np.array(response.json(), dtype=np.float32)


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_cohere_s_sdk_embeds_texts_images_and_inputs_in_every_type(clip_stack):
    co = cohere.ClientV2(api_key="unused", base_url=clip_stack.url, timeout=120)
    model = model_name(clip_stack)
    files = list(photos().values())[:3]
    uris = [data_uri(f) for f in files]
    kinds = ["float", "int8", "uint8", "binary", "ubinary", "base64"]
    answer = co.embed(model=model, input_type="image", images=uris, embedding_types=kinds)
    assert answer.response_type == "embeddings_by_type" and answer.id
    expected = unit(raw(clip_stack, [base64.b64encode(f).decode() for f in files]))
    got = np.array(answer.embeddings.float_, dtype=np.float32)
    assert np.allclose(got, expected, atol=1e-6)
    # Each type against its definition, computed here from the float vectors.
    int8 = np.rint(got / np.abs(got).max(1, keepdims=True) * 127)
    assert np.abs(np.array(answer.embeddings.int8) - int8).max() <= 1  # float32 vs JSON's float
    assert (np.array(answer.embeddings.uint8) == np.array(answer.embeddings.int8) + 128).all()
    ubinary = np.packbits(got > 0, axis=1)
    assert (np.array(answer.embeddings.ubinary) == ubinary).all()
    assert (np.array(answer.embeddings.binary) == ubinary.astype(int) - 128).all()
    decoded = [np.frombuffer(base64.b64decode(s), "<f4") for s in answer.embeddings.base64]
    assert np.allclose(np.array(decoded), got, atol=1e-7)
    int8_cosine = (unit(np.array(answer.embeddings.int8, dtype=np.float64)) * got).sum(1)
    assert int8_cosine.min() >= 0.99
    assert [(i.width, i.height, i.format, i.bit_depth) for i in answer.images or []] == [
        (*i.size, str(i.format).lower(), 8) for i in map(Image.open, map(io.BytesIO, files))
    ]
    # Texts, and content lists; search_query and search_document give the same vectors.
    query = co.embed(model=model, input_type="search_query", texts=TEXTS)
    document = co.embed(model=model, input_type="search_document", texts=TEXTS)
    assert query.embeddings.float_ == document.embeddings.float_
    assert np.allclose(query.embeddings.float_, unit(raw(clip_stack, TEXTS, "text")), atol=1e-6)
    assert query.texts == TEXTS
    mixed = co.embed(
        model=model,
        input_type="classification",
        inputs=[
            {"content": [{"type": "text", "text": TEXTS[0]}]},
            {"content": [{"type": "image_url", "image_url": {"url": uris[0]}}]},
        ],
    )
    assert np.allclose(mixed.embeddings.float_, [query.embeddings.float_[0], got[0]], atol=1e-6)
    # output_dimension: the first components, re-normalised.
    short = co.embed(model=model, input_type="image", images=uris[:1], output_dimension=8)
    assert np.allclose(short.embeddings.float_, unit(expected[:1, :8]), atol=1e-6)


def test_cohere_s_sdk_raises_its_errors_with_our_message(clip_stack):
    co = cohere.ClientV2(api_key="unused", base_url=clip_stack.url, timeout=60, max_retries=0)
    model = model_name(clip_stack)
    with pytest.raises(cohere.NotFoundError) as missing:
        co.embed(model="embed-v4.0", input_type="search_query", texts=["a"])
    assert "not served" in missing.value.body["message"]
    cases = [
        ({"texts": ["a"], "output_dimension": 17}, "dimensions 17"),
        ({"texts": [" ".join(["a photo of the cat"] * 40)], "truncate": "NONE"}, "context"),
        ({"texts": ["a"], "truncate": "START"}, "START"),
        ({"images": ["data:image/png;base64,bm90IGFuIGltYWdl"]}, "inputs[0]"),
    ]
    for options, says in cases:
        with pytest.raises(cohere.UnprocessableEntityError) as refused:
            co.embed(model=model, input_type="search_query", **options)
        assert says in refused.value.body["message"], refused.value.body
    long = co.embed(model=model, input_type="search_query", texts=cases[1][0]["texts"])
    assert len(long.embeddings.float_[0]) == 16  # END (the default) cuts it


def test_a_repeated_input_and_a_duplicate_never_reach_triton(clip_stack):
    triton = triton_http.InferenceServerClient(clip_stack.triton_http)

    def inferences(name: str) -> int:
        return int(triton.get_inference_statistics(name)["model_stats"][0]["inference_count"])

    raw(clip_stack, [base64.b64encode(noise_png(0)).decode()])  # the model's facts asked
    for attempt in range(COUNTING_WINDOWS):  # fresh content in each window
        image = base64.b64encode(noise_png(2121 + attempt)).decode()
        text = f"a text no other test sends, {2121 + attempt}"
        before = inferences("iei"), inferences("iei_text")
        first = raw(clip_stack, [image, data_uri(noise_png(2121 + attempt), "image/png"), image])
        # three inputs, one content: one inference
        once = count_reaching(lambda: inferences("iei"), before[0] + 1) - before[0]
        again = raw(clip_stack, [image])
        texts = raw(clip_stack, [text, text], "text")
        texts_again = raw(clip_stack, [text], "text")
        text_count = count_reaching(lambda: inferences("iei_text"), before[1] + 1) - before[1]
        counted = (once, inferences("iei") - before[0], text_count)
        if counted == (1, 1, 1):
            break
    assert counted == (1, 1, 1)  # and neither the repeat nor the text's duplicate reached Triton
    assert np.array_equal(first[0], first[1]) and np.array_equal(first[0], first[2])
    assert np.array_equal(again[0], first[0]) and np.array_equal(texts_again[0], texts[0])
    metrics = httpx.get(f"{clip_stack.url}/metrics", timeout=30).text
    assert 'iei_cache_hits_total{modality="image"' in metrics
    assert 'iei_cache_misses_total{modality="text"' in metrics


def test_with_iei_cache_mb_0_every_input_reaches_triton(model_dirs, tmp_path):
    stack = Stack(model_dirs["clip"], tmp_path / "stack.log", IEI_CACHE_MB="0").start()
    try:
        triton = triton_http.InferenceServerClient(stack.triton_http)

        def inferences() -> int:
            stats = triton.get_inference_statistics("iei")["model_stats"][0]
            return int(stats["inference_count"])

        for attempt in range(COUNTING_WINDOWS):  # fresh content in each window
            image = base64.b64encode(noise_png(7 + attempt)).decode()
            raw(stack, [image])  # first requests' own calls out of the count
            before = inferences()
            raw(stack, [image, image])
            raw(stack, [image])
            if count_reaching(inferences, before + 3) == before + 3:
                break
        assert inferences() == before + 3
        assert "iei_cache_hits_total" not in httpx.get(f"{stack.url}/metrics", timeout=30).text
    finally:
        assert stack.stop() == 0, stack.log()


def test_cohere_s_model_picks_among_several_models(models_stack):
    """SigLIP through the SDK; an image-only model refuses texts; each model its own vectors
    (and cache entries) for one image."""
    co = cohere.ClientV2(api_key="unused", base_url=models_stack.url, timeout=120, max_retries=0)
    uri = data_uri(noise_png(31), "image/png")
    kinds = ["float", "int8"]
    siglip = co.embed(model="siglip", input_type="image", images=[uri], embedding_types=kinds)
    dino = co.embed(model="dino", input_type="image", images=[uri])
    assert not np.allclose(siglip.embeddings.float_, dino.embeddings.float_, atol=1e-3)
    again = co.embed(model="siglip", input_type="image", images=[uri], embedding_types=kinds)
    assert again.embeddings.int8 == siglip.embeddings.int8
    texts = co.embed(model="siglip", input_type="search_query", texts=TEXTS)
    assert len(texts.embeddings.float_) == len(TEXTS)
    with pytest.raises(cohere.UnprocessableEntityError) as refused:
        co.embed(model="dino", input_type="search_query", texts=TEXTS)
    assert "no text tower" in refused.value.body["message"]
