"""`POST /classify` without Triton: parsing, validation, the scores' formula, the labels' cache,
raw uploads. The fake Triton answers image vector = [first byte, chunk size] and text vector =
[characters, chunk size]; the real models' scores are checked in tests/integration."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
from iei.server.label_vectors import LabelVectors
from iei.server.settings import ServerSettings
from PIL import Image
from sample_images import encode
from test_app import (  # noqa: F401 (fixtures)
    IMAGE_ONLY,
    FakeTriton,
    anyio_backend,
    app_client,
    keep_numpy_inputs,
)

pytestmark = pytest.mark.anyio

PNG = encode(Image.new("RGB", (4, 4)), "PNG")
JPEG = encode(Image.new("RGB", (6, 3), (200, 10, 10)), "JPEG")
SETTINGS = ServerSettings(triton_url="127.0.0.1:1", max_client_batch_size=4, max_text_chars=40)
CLIP = {"model_type": "clip", "modalities": ["image", "text"], "text_context_length": 77,
        "zero_shot": "softmax", "logit_scale": 3.0, "logit_bias": 0.0}  # fmt: skip
SIGLIP = dict(CLIP, model_type="siglip", zero_shot="sigmoid", logit_bias=-1.25)
TEMPLATE = "This is a photo of {}."


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unit(rows: list[list[float]]) -> np.ndarray:
    array = np.asarray(rows, dtype=np.float64)
    return array / np.linalg.norm(array, axis=1, keepdims=True)


def expected(files: list[bytes], labels: list[str], info: dict, template=TEMPLATE) -> np.ndarray:
    """The scores the fake's vectors give, by the formula written out here."""
    images = unit([[f[0], len(files)] for f in files])
    texts = unit([[len(template.replace("{}", label)), len(labels)] for label in labels])
    logits = info["logit_scale"] * images @ texts.T + info["logit_bias"]
    if info["zero_shot"] == "softmax":
        return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return 1 / (1 + np.exp(-logits))


def as_matrix(answer: list[list[dict]], labels: list[str]) -> np.ndarray:
    return np.array([[{d["label"]: d["score"] for d in row}[label] for label in labels]
                     for row in answer])  # fmt: skip


def tei_error(response: httpx.Response, status: int, text: str) -> None:
    assert response.status_code == status, response.text
    assert text in response.json()["error"], response.json()
    assert response.json()["error_type"] in ("Validation", "Empty")


@pytest.mark.parametrize("info", [CLIP, SIGLIP], ids=["softmax", "sigmoid"])
async def test_one_image_gets_its_labels_by_score_the_models_own_way(info):
    labels = ["a cat", "a lighthouse at dusk", "dog"]
    async with app_client(SETTINGS, FakeTriton(info=info)) as client:
        body = {"inputs": b64(PNG), "parameters": {"candidate_labels": labels}}
        response = await client.post("/classify", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert [set(d) for d in answer] == [{"label", "score"}] * 3
    scores = [d["score"] for d in answer]
    assert scores == sorted(scores, reverse=True)
    assert np.allclose(as_matrix([answer], labels), expected([PNG], labels, info), atol=1e-9)
    if info["zero_shot"] == "softmax":
        assert sum(scores) == pytest.approx(1.0)


async def test_a_list_of_images_gets_a_list_of_lists_in_order_and_the_template_counts():
    labels, template = ["cat", "sea"], "a {} in a picture: {}"
    async with app_client(SETTINGS, FakeTriton(info=SIGLIP)) as client:
        params = {"candidate_labels": labels, "hypothesis_template": template}
        body = {"inputs": [b64(JPEG), f"data:image/png;base64,{b64(PNG)}"], "parameters": params}
        answer = (await client.post("/classify", json=body)).json()
    assert len(answer) == 2
    want = expected([JPEG, PNG], labels, SIGLIP, template)
    assert np.allclose(as_matrix(answer, labels), want, atol=1e-9)


async def test_a_label_set_used_again_does_not_reach_the_text_model():
    fake = FakeTriton(info=CLIP)
    labels = ["cat", "dog"]
    body = {"inputs": [b64(PNG)], "parameters": {"candidate_labels": labels}}
    async with app_client(SETTINGS, fake) as client:
        first = (await client.post("/classify", json=body)).json()
        text_calls = fake.models.count("iei_text")
        again = (await client.post("/classify", json=body)).json()
        assert fake.models.count("iei_text") == text_calls == 1
        # One new label: only it is embedded; another template: every label again.
        body["parameters"]["candidate_labels"] = ["dog", "cat", "bird"]
        (await client.post("/classify", json=body)).json()
        assert fake.models.count("iei_text") == 2
        body["parameters"]["hypothesis_template"] = "{}!"
        await client.post("/classify", json=body)
        exposed = (await client.get("/metrics")).text
    assert first == again
    assert fake.chunks[-1] == 3  # the three labels in the new template, in one call
    assert 'iei_requests_total{route="/classify",status="200"}' in exposed


@pytest.mark.parametrize(
    ("parameters", "status", "message"),
    [
        ({"candidate_labels": []}, 422, "parameters.candidate_labels: give at least one label"),
        ({"candidate_labels": ["a", "b", "a"]}, 422, "candidate_labels[2]: 'a' is given twice"),
        ({"candidate_labels": ["a", " "]}, 422, "parameters.candidate_labels[1]: empty label"),
        ({"candidate_labels": list("abcde")}, 422, "5 labels > maximum allowed 4"),
        ({"candidate_labels": ["x" * 30]}, 422, "candidate_labels[0]: its text of 50 characters"),
        ({"candidate_labels": ["a"], "hypothesis_template": "a photo"}, 422,
         "parameters.hypothesis_template: 'a photo' has no `{}`"),
        ({"candidate_labels": "a,b"}, 422, "candidate_labels"),  # a list, as in HF's API
        ({"candidate_labels": ["a", 3]}, 422, "candidate_labels"),
        ({"candidate_label": ["a"]}, 422, "candidate_label"),  # misspelt: refused, not ignored
    ],
)  # fmt: skip
async def test_bad_parameters_are_422s_naming_the_field(parameters, status, message):
    fake = FakeTriton(info=CLIP)
    async with app_client(SETTINGS, fake) as client:
        body = {"inputs": b64(PNG), "parameters": parameters}
        response = await client.post("/classify", json=body)
    tei_error(response, status, message)
    assert fake.models == [], "refused before anything reached Triton"


@pytest.mark.parametrize(
    ("template", "label", "length"),
    [
        ("{}" * 20_000, "x" * 5000, 100_000_000),  # 45 KB of body: 100 MB of text when built
        ("{{}} and {}", "abc", 13),  # `replace` counts non-overlapping `{}` from the left
    ],
)
def test_a_hypothesis_is_measured_not_built(template, label, length):
    """Its length is checked against IEI_MAX_TEXT_CHARS before any text is built: a template of
    many `{}` and a long label were gigabytes in a worker (a 500 under a memory cap)."""
    import tracemalloc

    from iei.server.classify import check_labels, hypothesis
    from iei.server.errors import ApiError

    assert len(template.replace("{}", label)) == length  # the text it would be
    tracemalloc.start()
    try:
        with pytest.raises(ApiError) as refused:
            check_labels([label], template, 4, 10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"its text of {length} characters" in refused.value.message
    assert peak < 1 << 20, peak
    check_labels([label], template, 4, length)  # within the limit
    assert len(hypothesis(template, label)) == length


async def test_bad_inputs_as_on_embed():
    async with app_client(SETTINGS, FakeTriton(info=CLIP)) as client:
        params = {"candidate_labels": ["a"]}
        empty = await client.post("/classify", json={"inputs": [], "parameters": params})
        many = await client.post("/classify", json={"inputs": [b64(PNG)] * 5, "parameters": params})
        broken = await client.post(
            "/classify", json={"inputs": ["bm90IGFuIGltYWdl"], "parameters": params}
        )
        no_params = await client.post("/classify", json={"inputs": b64(PNG)})
        unknown = await client.post(
            "/classify", json={"inputs": b64(PNG), "parameters": params, "model": "x"}
        )
    tei_error(empty, 400, "`inputs` cannot be empty")
    tei_error(many, 422, "batch size 5 > maximum allowed batch size 4")
    tei_error(broken, 422, "inputs[0]")
    tei_error(no_params, 422, "parameters")
    assert unknown.status_code == 404


async def test_a_model_without_a_text_tower_is_a_422_naming_it():
    fake = FakeTriton(info=IMAGE_ONLY)
    async with app_client(SETTINGS, fake) as client:
        body = {"inputs": b64(PNG), "parameters": {"candidate_labels": ["a"]}}
        response = await client.post("/classify", json=body)
        info = (await client.get("/info")).json()
    tei_error(response, 422, "model 'google/vit-base-patch16-224' cannot classify: it serves no")
    assert "iei_text" not in fake.models
    assert info["zero_shot"] is None and info["models"][0]["zero_shot"] is None


async def test_info_says_how_a_dual_encoder_classifies():
    async with app_client(SETTINGS, FakeTriton(info=SIGLIP)) as client:
        await client.post("/embed", json={"inputs": [b64(PNG)]})  # facts asked once
        info = (await client.get("/info")).json()
    assert info["zero_shot"] == "sigmoid"
    assert info["models"][0]["zero_shot"] == "sigmoid"


@pytest.mark.parametrize(
    "query",
    [
        "candidate_labels=cat,dog,bird",
        "candidate_labels=cat&candidate_labels=dog,bird",
        "candidate_labels=cat&candidate_labels=dog&candidate_labels=bird",
    ],
)
async def test_a_raw_upload_takes_its_labels_from_the_query(query):
    labels = ["cat", "dog", "bird"]
    async with app_client(SETTINGS, FakeTriton(info=SIGLIP)) as client:
        response = await client.post(
            f"/classify?{query}&hypothesis_template=a%20{{}}", content=JPEG,
            headers={"content-type": "image/jpeg"},
        )  # fmt: skip
    assert response.status_code == 200, response.text
    want = expected([JPEG], labels, SIGLIP, "a {}")
    assert np.allclose(as_matrix(response.json(), labels), want, atol=1e-9)


async def test_a_form_of_files_with_its_labels_as_fields():
    labels = ["cat", "dog"]
    async with app_client(SETTINGS, FakeTriton(info=CLIP)) as client:
        response = await client.post(
            "/classify",
            files=[("file", ("a.png", PNG, "image/png")), ("file", ("b.jpg", JPEG, "image/jpeg"))],
            data={"candidate_labels": "cat,dog"},
        )
        broken = await client.post(
            "/classify?candidate_labels=a",
            files=[("file", ("a.png", PNG, "image/png")), ("f", ("bad.jpg", b"xx", "image/jpeg"))],
        )
    assert response.status_code == 200, response.text
    assert np.allclose(as_matrix(response.json(), labels), expected([PNG, JPEG], labels, CLIP))
    tei_error(broken, 422, "inputs[1] (bad.jpg)")


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("", "candidate_labels: missing"),
        ("candidate_labels=a,,b", "candidate_labels[1]: empty label"),
        ("candidate_labels=a,a", "candidate_labels[1]: 'a' is given twice"),
        ("candidate_labels=a&top_k=2", "unknown option 'top_k'"),
        ("candidate_labels=a&hypothesis_template=x&hypothesis_template=y", "given more than once"),
        ("candidate_labels=a&hypothesis_template=photo", "hypothesis_template: 'photo' has no"),
    ],
)
async def test_a_raw_uploads_bad_options_are_422s(query, message):
    fake = FakeTriton(info=CLIP)
    async with app_client(SETTINGS, fake) as client:
        response = await client.post(
            f"/classify?{query}", content=PNG, headers={"content-type": "image/png"}
        )
        wrong_type = await client.post(
            "/classify?candidate_labels=a", content=b"x", headers={"content-type": "text/plain"}
        )
    tei_error(response, 422, message)
    assert wrong_type.status_code == 415


async def test_the_route_is_documented_with_its_raw_forms():
    async with app_client(SETTINGS, FakeTriton(info=CLIP)) as client:
        schema = (await client.get("/openapi.json")).json()
    operation = schema["paths"]["/classify"]["post"]
    content = operation["requestBody"]["content"]
    assert {"application/json", "image/*", "multipart/form-data"} <= set(content)
    assert "candidate_labels" in {p["name"] for p in operation["parameters"]}
    assert "ClassifyRequest" in schema["components"]["schemas"]


def test_the_label_cache_is_bounded_least_recently_used_out_first():
    cache = LabelVectors(capacity=2)
    a, b, c = (("m", "{}", label) for label in "abc")
    cache.put(a, np.ones(2))
    cache.put(b, np.ones(2))
    assert cache.get(a) is not None  # a used: b is now the oldest
    cache.put(c, np.ones(2))
    assert cache.get(b) is None
    assert cache.get(a) is not None and cache.get(c) is not None
    assert len(cache.entries) == 2


def test_the_label_cache_keeps_its_vectors_not_the_batches_they_came_in():
    """Its bound counts vectors: a row of a 64-label batch kept the whole batch alive."""
    cache = LabelVectors()
    batch = np.ones((64, 1152), "float32")
    cache.put(("m", "{}", "a"), batch[3])
    kept = cache.get(("m", "{}", "a"))
    assert kept is not None and kept.base is None and kept.nbytes == 1152 * 4


async def test_images_and_labels_that_never_fit_the_worker_together_go_one_after_the_other():
    """4 images and 4 labels under IEI_MAX_CONCURRENT_IMAGES=4 (each within it, as the settings
    require): embedded together they were a 429 on an idle worker, every time."""
    settings = SETTINGS.model_copy(update={"max_concurrent_images": 4})
    labels = ["a", "bb", "ccc", "dddd"]
    files = [PNG, JPEG, PNG, JPEG]
    async with app_client(settings, FakeTriton(info=CLIP)) as client:
        body = {"inputs": [b64(f) for f in files], "parameters": {"candidate_labels": labels}}
        response = await client.post("/classify", json=body)
    assert response.status_code == 200, response.text
    assert np.allclose(as_matrix(response.json(), labels), expected(files, labels, CLIP))
