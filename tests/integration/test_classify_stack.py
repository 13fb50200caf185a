"""`POST /classify` through the real stack (the tiny CLIP alone; the tiny SigLIP among several
models), against the full model's own `logits_per_image` computed in-process by the independent
reference (transformers' CLIPModel / SiglipModel on the same checkpoint, the PIL processor, the
reference's own image loading and tokenization)."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http
from iei.client import IEIClient
from reference import Reference, load_rgb
from sample_images import photos
from stack import IEI, Stack

pytestmark = pytest.mark.integration

TOLERANCE = 1e-3  # on the probabilities, as the contract says
LABELS = ["a cat", "a red car at night", "the sea and the sky", "two people", "a small bird"]
DEFAULT_TEMPLATE = "This is a photo of {}."
PHOTO = next(iter(photos().values()))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module", params=["clip", "siglip"])
def served(request: pytest.FixtureRequest, model_dirs: dict[str, Path]):
    """(stack, served model name or None, reference): the tiny CLIP's stack, or the tiny SigLIP
    as the default of the several-models stack."""
    family = request.param
    stack = request.getfixturevalue("clip_stack" if family == "clip" else "models_stack")
    return stack, (None if family == "clip" else "siglip"), Reference(model_dirs[family])


def own_scores(reference: Reference, files: list[bytes], hypotheses: list[str]) -> np.ndarray:
    """The full model's logits_per_image, through its own zero-shot head (softmax or sigmoid)."""
    torch = reference.torch
    images = reference.processor(images=[load_rgb(f) for f in files], return_tensors="pt")
    tokens = reference.tokenizer(
        hypotheses, padding=reference.padding, truncation=True, max_length=reference.context,
        return_tensors="pt",
    )  # fmt: skip
    with torch.no_grad():
        logits = reference.model(**images, **tokens).logits_per_image
    probs = logits.softmax(dim=-1) if reference.model_type == "clip" else torch.sigmoid(logits)
    return probs.double().numpy()


def classify(stack: Stack, body: dict, model: str | None) -> httpx.Response:
    if model is not None:
        body = {**body, "model": model}
    return httpx.post(f"{stack.url}/classify", json=body, timeout=120)


def matrix(answer: list[list[dict]], labels: list[str]) -> np.ndarray:
    return np.array([[{d["label"]: d["score"] for d in row}[label] for label in labels]
                     for row in answer])  # fmt: skip


def text_inferences(stack: Stack, text_model: str) -> int:
    triton = triton_http.InferenceServerClient(stack.triton_http)
    return int(triton.get_inference_statistics(text_model)["model_stats"][0]["inference_count"])


def test_scores_are_the_models_own_in_order(served):
    stack, model, reference = served
    files = list(photos().values())[:3]
    body = {"inputs": [b64(f) for f in files], "parameters": {"candidate_labels": LABELS}}
    response = classify(stack, body, model)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert len(answer) == len(files)
    for row in answer:
        assert sorted(d["label"] for d in row) == sorted(LABELS)
        assert [d["score"] for d in row] == sorted((d["score"] for d in row), reverse=True)
    expected = own_scores(reference, files, [DEFAULT_TEMPLATE.format(x) for x in LABELS])
    assert np.abs(matrix(answer, LABELS) - expected).max() <= TOLERANCE
    # Not a trivial match: the labels' scores differ (the tiny models' scalars are not 0).
    assert np.ptp(expected, axis=1).min() > 10 * TOLERANCE


def test_one_image_and_a_template(served):
    stack, model, reference = served
    data = list(photos().values())[3]
    labels, template = ["cat", "car", "bird"], "a blurry picture of {}, taken at night"
    params = {"candidate_labels": labels, "hypothesis_template": template}
    answer = classify(stack, {"inputs": b64(data), "parameters": params}, model).json()
    assert isinstance(answer[0], dict), "one image: one flat list"
    expected = own_scores(reference, [data], [template.format(x) for x in labels])
    assert np.abs(matrix([answer], labels) - expected).max() <= TOLERANCE
    default = own_scores(reference, [data], [DEFAULT_TEMPLATE.format(x) for x in labels])
    assert np.abs(default - expected).max() > 10 * TOLERANCE, "the template counts"


def test_a_raw_upload_answers_as_the_json_body(served):
    stack, model, _ = served
    files = list(photos().values())[:2]
    query = f"candidate_labels={','.join(LABELS)}" + (f"&model={model}" if model else "")
    raw = httpx.post(
        f"{stack.url}/classify?{query}", content=files[0],
        headers={"content-type": "image/jpeg"}, timeout=120,
    )  # fmt: skip
    form = httpx.post(
        f"{stack.url}/classify",
        files=[("file", (f"{i}.jpg", f, "image/jpeg")) for i, f in enumerate(files)],
        data={"candidate_labels": ",".join(LABELS), **({"model": model} if model else {})},
        timeout=120,
    )
    body = {"inputs": [b64(f) for f in files], "parameters": {"candidate_labels": LABELS}}
    json_answer = classify(stack, body, model).json()
    assert raw.status_code == 200 and form.status_code == 200, (raw.text, form.text)
    assert np.allclose(matrix(raw.json(), LABELS), matrix(json_answer[:1], LABELS), atol=1e-6)
    assert np.allclose(matrix(form.json(), LABELS), matrix(json_answer, LABELS), atol=1e-6)


def test_a_repeated_label_set_does_not_run_the_text_model_again(served):
    stack, model, _ = served
    name = model or "iei"
    info = httpx.get(f"{stack.url}/info", timeout=30).json()
    entry = next(m for m in info["models"] if m["name"] == name or (model is None and m["default"]))
    text_model = entry["triton_models"]["text"]
    labels = ["a lighthouse", "a mountain lake", "a busy street"]  # new to this stack
    body = {"inputs": [b64(PHOTO)], "parameters": {"candidate_labels": labels}}
    before = text_inferences(stack, text_model)
    first = classify(stack, body, model)
    middle = text_inferences(stack, text_model)
    # The stacks run one worker (each worker keeps its own cache).
    again = [classify(stack, body, model) for _ in range(3)]
    reordered = {**body, "parameters": {"candidate_labels": labels[::-1]}}
    again.append(classify(stack, reordered, model))
    after = text_inferences(stack, text_model)
    assert first.status_code == 200, first.text
    assert middle - before == len(labels)
    assert after == middle, "a cached label set reached the text model"
    assert all(a.json() == first.json() for a in again[:3])
    assert entry["zero_shot"] == ("softmax" if model is None else "sigmoid")


def test_a_model_without_a_text_tower_is_a_422(models_stack):
    body = {"inputs": b64(PHOTO), "parameters": {"candidate_labels": ["a"]}}
    response = classify(models_stack, body, "dino")
    assert response.status_code == 422, response.text
    assert "model 'dino' cannot classify: it serves no texts" in response.json()["error"]


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"candidate_labels": []}, "parameters.candidate_labels: give at least one label"),
        ({"candidate_labels": ["cat", "cat"]}, "parameters.candidate_labels[1]: 'cat' is given"),
        ({"candidate_labels": ["cat"], "hypothesis_template": "cat"}, "has no `{}`"),
    ],
)
def test_bad_parameters_are_422s(clip_stack, parameters, message):
    body = {"inputs": b64(PHOTO), "parameters": parameters}
    response = classify(clip_stack, body, None)
    assert response.status_code == 422, response.text
    assert message in response.json()["error"]


def test_the_client_and_iei_tag_give_the_services_scores(clip_stack, tmp_path):
    files = list(photos().items())[:3]
    for name, data in files:
        (tmp_path / name).write_bytes(data)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    paths = [tmp_path / name for name, _ in files]
    body = {"inputs": [b64(d) for _, d in files], "parameters": {"candidate_labels": LABELS}}
    expected = matrix(classify(clip_stack, body, None).json(), LABELS)
    with IEIClient(clip_stack.url) as client:
        answer = client.classify(paths, LABELS)  # files: sent as a form
        assert np.allclose(matrix(answer, LABELS), expected, atol=1e-6)
    out = tmp_path / "tags.jsonl"
    result = subprocess.run(
        [str(IEI), "tag", str(tmp_path), "--labels", ",".join(LABELS), "--top", "2",
         "--out", str(out), "--url", clip_stack.url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = {
        Path(j["path"]).name: j["labels"] for j in map(json.loads, out.read_text().splitlines())
    }
    assert sorted(lines) == sorted(name for name, _ in files)
    for (name, _), row in zip(files, expected, strict=True):
        best = [LABELS[i] for i in np.argsort(-row, kind="stable")[:2]]
        assert [d["label"] for d in lines[name]] == best
    assert "skipped" in result.stderr and "broken.jpg" in result.stderr


def test_huggingface_hubs_inference_client_classifies(clip_stack):
    """`InferenceClient(model=URL + "/classify").zero_shot_image_classification` speaks it."""
    hub = pytest.importorskip("huggingface_hub")
    client = hub.InferenceClient(model=f"{clip_stack.url}/classify")
    answer = client.zero_shot_image_classification(PHOTO, candidate_labels=LABELS)
    body = {"inputs": b64(PHOTO), "parameters": {"candidate_labels": LABELS}}
    ours = classify(clip_stack, body, None).json()
    assert [(e.label, round(e.score, 6)) for e in answer] == [
        (d["label"], round(d["score"], 6)) for d in ours
    ]


def test_schema_driven_fuzz_of_classify_finds_no_server_error(clip_stack):
    """schemathesis generates /classify requests from our OpenAPI document (JSON, raw bodies,
    forms, query labels) against a model that classifies: never a 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"{clip_stack.url}/openapi.json")

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=schema["/classify"]["POST"].as_strategy())
    def call(case) -> None:
        response = case.call(base_url=clip_stack.url, timeout=30)
        assert response.status_code < 500, (case.media_type, case.query, response.text)

    call()
