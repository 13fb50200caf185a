"""The content cache (IEI_CACHE_MB): its bounds and keys, and what reaches Triton via the app."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from iei.server import metrics
from iei.server.cache import ENTRY_OVERHEAD, VectorCache, digest
from iei.server.settings import ServerSettings
from PIL import Image
from sample_images import encode
from test_app import WITH_TEXT, FakeTriton, anyio_backend, app_client, keep_numpy_inputs  # noqa: F401

pytestmark = pytest.mark.anyio

CLIP = ("clip", "openai/clip-vit-base-patch32", "cls", "float32", "torch")


def key(text: str, model=CLIP, modality: str = "text"):
    return (model, modality, digest(text))


def vector(value: float, dimension: int = 4) -> np.ndarray:
    return np.full(dimension, value, np.float32)


def test_the_least_recently_used_entries_go_first_when_the_bytes_are_full():
    entry = vector(0).nbytes + ENTRY_OVERHEAD
    cache = VectorCache(3 * entry)
    for name in "abc":
        cache.put(key(name), vector(ord(name)))
    assert cache.get(key("a")) is not None  # a is now the most recently used
    cache.put(key("d"), vector(4))
    assert cache.get(key("b")) is None  # the least recently used went
    assert [cache.get(key(n)) is not None for n in "acd"] == [True, True, True]
    assert (len(cache), cache.size) == (3, 3 * entry)
    cache.put(key("e", modality="image"), vector(5, dimension=8))  # larger: two go
    assert len(cache) == 2 and cache.size <= cache.max_bytes
    assert cache.get(key("a")) is None and cache.get(key("c")) is None


def test_a_vector_larger_than_the_whole_cache_is_not_kept_and_zero_keeps_nothing():
    cache = VectorCache(100)
    cache.put(key("a"), vector(1, dimension=64))
    assert len(cache) == 0 and cache.size == 0
    off = VectorCache(0)
    off.put(key("a"), vector(1))
    assert not off.enabled and off.get(key("a")) is None


def test_the_cache_keeps_a_copy_not_a_view_of_the_batch():
    batch = np.ones((64, 4), np.float32)
    cache = VectorCache(2**20)
    cache.put(key("a"), batch[0])
    batch[0] = 7
    kept = cache.get(key("a"))
    assert kept is not None and kept.base is None and kept.tolist() == [1, 1, 1, 1]


def test_another_checkpoint_pooling_dtype_engine_or_name_shares_no_entry():
    cache = VectorCache(2**20)
    cache.put(key("a"), vector(1))
    checkpoint = CLIP[1]
    for other in (
        ("clip", checkpoint, "mean", "float32", "torch"),
        ("clip", checkpoint, "cls", "float16", "torch"),
        ("clip", checkpoint, "cls", "float32", "openvino"),
        ("other", checkpoint, "cls", "float32", "torch"),
        ("clip", "/models/clip-finetuned", "cls", "float32", "torch"),
    ):
        assert cache.get(key("a", model=other)) is None
    assert cache.get(key("a", modality="image")) is None  # a text and an image of the same bytes
    assert cache.get(key("a")) is not None


def png(shade: int) -> str:
    return base64.b64encode(encode(Image.new("RGB", (4, 4), (shade, 0, 0)), "PNG")).decode()


def counted(model: str, modality: str) -> tuple[float, float]:
    hits = metrics.CACHE_HITS.labels(model, modality)._value.get()
    misses = metrics.CACHE_MISSES.labels(model, modality)._value.get()
    return hits, misses


def sent(fake: FakeTriton, name: str = "iei") -> int:
    """Inputs the fake Triton embedded for `name`, the model-info probe not counted."""
    return sum(
        size
        for size, model, outputs in zip(fake.chunks, fake.models, fake.outputs, strict=True)
        if model == name and "MODEL_INFO" not in outputs
    )


async def test_a_repeated_input_and_a_duplicate_in_one_request_never_reach_triton():
    settings = ServerSettings(triton_url="127.0.0.1:1", cache_mb=1)
    fake = FakeTriton(max_batch_size=8, info=WITH_TEXT)
    async with app_client(settings, fake) as client:
        model = client._transport.app.state.services.models.default.name  # type: ignore[attr-defined]
        before = counted(model, "image")
        first = await client.post("/embed", json={"inputs": [png(1), png(2), png(1)]})
        assert first.status_code == 200, first.text
        assert sent(fake) == 2  # the duplicate was computed once
        again = await client.post("/embed", json={"inputs": [png(2), png(1)], "normalize": False})
        assert again.status_code == 200
        assert sent(fake) == 2  # nothing new reached Triton
        hits, misses = counted(model, "image")
        assert (hits - before[0], misses - before[1]) == (3, 2)
        raw = np.array(first.json())
        assert np.allclose(raw[0], raw[2])
        # Texts too, keyed apart from images.
        texts = await client.post("/embed", json={"inputs": ["a b", "a b"], "modality": "text"})
        assert texts.status_code == 200 and sent(fake, "iei_text") == 1


async def test_with_the_cache_off_every_input_reaches_triton():
    settings = ServerSettings(triton_url="127.0.0.1:1", cache_mb=0)
    fake = FakeTriton(max_batch_size=8)
    async with app_client(settings, fake) as client:
        for _ in range(2):
            response = await client.post("/embed", json={"inputs": [png(1), png(1)]})
            assert response.status_code == 200
    assert sent(fake) == 4


async def test_a_model_that_comes_back_as_another_checkpoint_shares_no_entry():
    """An external Triton restarted with another checkpoint under the same name: the worker
    asks the model's facts again once it saw it gone, and the old vectors are not served."""
    import aiohttp

    settings = ServerSettings(triton_url="127.0.0.1:1", cache_mb=1)
    fake = FakeTriton(max_batch_size=8, info={**WITH_TEXT, "model_id": "org/first"})
    async with app_client(settings, fake) as client:
        assert (await client.post("/embed", json={"inputs": [png(1)]})).status_code == 200
        fake.fail = aiohttp.ClientConnectionError("Triton is down")
        assert (await client.post("/embed", json={"inputs": [png(2)]})).status_code == 503
        fake.fail = None
        fake.info = {**WITH_TEXT, "model_id": "org/second"}
        again = await client.post("/embed", json={"inputs": [png(1)]})
        assert again.status_code == 200
    # png(1), png(2) while Triton was down, png(1) again by the second checkpoint (not cached)
    assert sent(fake) == 3
