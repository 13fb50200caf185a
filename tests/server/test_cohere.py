"""`POST /v2/embed` (Cohere's v2 embed) against the fake Triton, and the compact types against
their definitions (frontend/iei/server/quantize.py), computed here independently."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from iei.server.quantize import encode
from iei.server.settings import ServerSettings
from test_app import (  # noqa: F401
    PNG,
    WITH_TEXT,
    FakeTriton,
    anyio_backend,
    app_client,
    keep_numpy_inputs,
)

pytestmark = pytest.mark.anyio
SETTINGS = ServerSettings(triton_url="127.0.0.1:1")
DATA_URI = f"data:image/png;base64,{PNG}"
M = SETTINGS.served[0].name  # the served model's name: Cohere's `model` is required


def units(count: int, dimension: int, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, dimension)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_int8_is_each_unit_vector_scaled_to_127_and_keeps_its_cosine():
    unit = units(50, 512)
    q = np.asarray(encode(unit, "int8"))
    assert q.dtype == np.int8 and q.min() >= -127
    for row, v in zip(q, unit, strict=True):
        expected = [round(x) for x in (v / max(abs(v)) * 127).tolist()]
        assert row.tolist() == expected
        assert max(abs(row)) == 127
    assert cosine(q, unit).min() >= 0.99
    uint8 = np.asarray(encode(unit, "uint8"))
    assert uint8.dtype == np.uint8 and (uint8.astype(int) == q.astype(int) + 128).all()


def test_binary_types_are_packed_signs():
    unit = units(10, 20)  # not a multiple of 8: padded with zero bits
    ubinary = np.asarray(encode(unit, "ubinary"))
    binary = np.asarray(encode(unit, "binary"))
    assert ubinary.shape == (10, 3) and binary.shape == (10, 3)
    for packed, signed, v in zip(ubinary, binary, unit, strict=True):
        bits = "".join("1" if x > 0 else "0" for x in v.tolist()).ljust(24, "0")
        assert packed.tolist() == [int(bits[i : i + 8], 2) for i in range(0, 24, 8)]
        assert signed.tolist() == [b - 128 for b in packed.tolist()]


def test_base64_is_little_endian_float32():
    unit = units(2, 8)
    for text, v in zip(encode(unit, "base64"), unit, strict=True):
        assert np.frombuffer(base64.b64decode(text), "<f4").tolist() == v.tolist()


async def test_texts_and_images_answer_cohere_s_shape():
    fake = FakeTriton(info={**WITH_TEXT, "embedding_dimension": 2})
    async with app_client(SETTINGS, fake) as client:
        images = await client.post(
            "/v2/embed",
            json={"model": M, "input_type": "image", "images": [DATA_URI],
                  "embedding_types": ["float", "int8", "ubinary"]},
        )  # fmt: skip
        assert images.status_code == 200, images.text
        body = images.json()
        assert body["response_type"] == "embeddings_by_type" and body["id"]
        assert set(body["embeddings"]) == {"float", "int8", "ubinary"}
        assert body["images"] == [{"width": 4, "height": 4, "format": "png", "bit_depth": 8}]
        assert body["texts"] == []
        texts = await client.post(
            "/v2/embed", json={"model": M, "input_type": "search_query", "texts": ["a b"]}
        )
        assert texts.status_code == 200, texts.text
        assert list(texts.json()["embeddings"]) == ["float"] and texts.json()["texts"] == ["a b"]
        mixed = await client.post(
            "/v2/embed",
            json={"model": M, "inputs": [
                {"content": [{"type": "text", "text": "a b"}]},
                {"content": [{"type": "image_url", "image_url": {"url": DATA_URI}}]},
            ]},
        )  # fmt: skip
        assert mixed.status_code == 200, mixed.text
        assert len(mixed.json()["embeddings"]["float"]) == 2


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"model": "nope", "texts": ["a"]}, 404, "not served"),
        ({"texts": ["a"]}, 422, "model"),
        ({"model": M, "texts": ["a"], "images": [DATA_URI]}, 422, "exactly one"),
        ({"model": M}, 422, "exactly one"),
        ({"model": M, "texts": ["a"], "truncate": "START"}, 422, "START"),
        ({"model": M, "texts": ["a"], "max_tokens": 5}, 422, "max_tokens"),
        ({"model": M, "texts": ["a"], "input_type": "image"}, 422, "image"),
        ({"model": M, "texts": ["a"], "embedding_types": ["int4"]}, 422, "embedding_types"),
        ({"model": M, "texts": ["a"], "output_dimension": 3}, 422, "dimensions"),
        ({"model": M, "texts": []}, 400, "empty"),
        ({"model": M, "images": ["data:text/plain;base64,YQ=="]}, 422, "inputs[0]"),
        (
            {
                "model": M,
                "inputs": [
                    {
                        "content": [
                            {"type": "text", "text": "a"},
                            {"type": "image_url", "image_url": {"url": DATA_URI}},
                        ]
                    }
                ],
            },
            422,
            "one part",
        ),
    ],
)
async def test_errors_are_cohere_s_message_with_the_right_status(body, status, says):
    fake = FakeTriton(info={**WITH_TEXT, "embedding_dimension": 2})
    async with app_client(SETTINGS, fake) as client:
        response = await client.post("/v2/embed", json=body)
    assert response.status_code == status, response.text
    error = response.json()
    assert isinstance(error["message"], str) and says in error["message"], error
    embedded = [m for m, o in zip(fake.models, fake.outputs, strict=True) if "MODEL_INFO" not in o]
    assert embedded == []  # refused before any inference


async def test_output_dimension_keeps_the_first_components_renormalised():
    fake = FakeTriton(info={**WITH_TEXT, "embedding_dimension": 2})
    async with app_client(SETTINGS, fake) as client:
        response = await client.post(
            "/v2/embed", json={"model": M, "images": [DATA_URI], "output_dimension": 1}
        )
    assert response.status_code == 200, response.text
    assert response.json()["embeddings"]["float"] == [[1.0]]
