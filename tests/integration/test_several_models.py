"""Several models in one server (IEI_MODELS): a tiny SigLIP (the default, images and texts), a
tiny DINOv2 (pinned) and a tiny ViT (loaded on demand, unloaded when idle) through the real stack,
each against its own in-process reference."""

from __future__ import annotations

import base64
import concurrent.futures
import os
import subprocess

import httpx
import numpy as np
import pytest
from conftest import MODELS, MODELS_IDLE_UNLOAD
from polling import wait_for
from reference import Reference, cosine_rows
from sample_images import photos
from stack import IEI, Stack

pytestmark = pytest.mark.integration

TOLERANCE = 0.999
EMBEDDING_ROUTES = ["/embed", "/", "/v1/embeddings", "/embeddings"]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def images() -> tuple[list[bytes], list[str]]:
    files = list(photos().values())[:3]
    return files, [b64(f) for f in files]


def post(stack: Stack, path: str, body: object) -> httpx.Response:
    return httpx.post(f"{stack.url}{path}", json=body, timeout=120)


def rows(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    body = response.json()
    data = [d["embedding"] for d in body["data"]] if isinstance(body, dict) else body
    return np.asarray(data, dtype=np.float64)


def info(stack: Stack) -> dict:
    return httpx.get(f"{stack.url}/info", timeout=30).json()


def entry(stack: Stack, name: str) -> dict:
    return next(m for m in info(stack)["models"] if m["name"] == name)


def test_the_lazy_model_is_not_loaded_at_start_and_the_others_are(models_stack):
    models = {m["name"]: m for m in info(models_stack)["models"]}
    assert list(models) == list(MODELS)  # the default first
    # (this module's first test: nothing asked for the ViT yet)
    assert (models["siglip"]["loaded"], models["dino"]["loaded"]) == (True, True)
    assert models["vit"]["loaded"] is False and models["vit"]["pinned"] is False
    assert models["vit"]["embedding_dimension"] is None  # its facts come once it is loaded
    assert httpx.get(f"{models_stack.url}/health").status_code == 200  # pinned ones answer


def test_v1_models_lists_every_served_model_in_openais_shape(models_stack):
    body = httpx.get(f"{models_stack.url}/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == list(MODELS)
    for model in body["data"]:
        assert model["object"] == "model" and model["owned_by"] == "iei"
        assert isinstance(model["created"], int)
    one = httpx.get(f"{models_stack.url}/v1/models/dino").json()
    assert one["id"] == "dino"


def test_info_keeps_the_defaults_fields_and_lists_the_models(models_stack, model_dirs):
    body = info(models_stack)
    assert body["model_id"] == str(model_dirs["siglip"])
    assert body["modalities"] == ["image", "text"]
    models = {m["name"]: m for m in body["models"]}
    assert models["siglip"]["triton_models"] == {"image": "iei", "text": "iei_text"}
    assert models["dino"]["triton_models"] == {"image": "iei__dino", "text": None}
    assert models["vit"]["triton_models"] == {"image": "iei__vit", "text": None}
    assert models["siglip"]["embedding_dimension"] == body["embedding_dimension"]
    assert models["dino"]["modalities"] == ["image"]
    assert models["dino"]["pooling"] == "pooler"  # DINOv2's own, by IEI_POOLING=auto
    assert models["dino"]["dtype"] == "float32" and models["dino"]["engine"]
    assert models["dino"]["model_id"] == str(model_dirs["dinov2"])


def test_each_model_gives_its_own_references_vectors(models_stack, model_dirs):
    files, encoded = images()
    for name, family in MODELS.items():
        expected = Reference(model_dirs[family]).embed(files)
        got = rows(post(models_stack, "/embed", {"inputs": encoded, "model": name}))
        assert cosine_rows(got, expected).min() > TOLERANCE, name
        openai = post(models_stack, "/v1/embeddings", {"input": encoded, "model": name})
        assert openai.json()["model"] == name
        assert cosine_rows(rows(openai), expected).min() > TOLERANCE, name
    # the default: no `model` at all, and SigLIP's texts
    siglip = Reference(model_dirs["siglip"])
    default = rows(post(models_stack, "/", {"inputs": encoded}))
    assert cosine_rows(default, siglip.embed(files)).min() > TOLERANCE
    texts = ["a photo of a cat", "a red car"]
    got = rows(post(models_stack, "/embed", {"inputs": texts, "modality": "text"}))
    assert cosine_rows(got, siglip.embed_texts(texts)).min() > TOLERANCE


def test_a_model_answers_to_its_folders_path_too(models_stack, model_dirs):
    _, encoded = images()
    by_path = post(
        models_stack, "/v1/embeddings", {"input": encoded[:1], "model": str(model_dirs["dinov2"])}
    )
    by_name = post(models_stack, "/v1/embeddings", {"input": encoded[:1], "model": "dino"})
    np.testing.assert_allclose(rows(by_path), rows(by_name), rtol=1e-5)
    assert by_path.json()["model"] == "dino"


@pytest.mark.parametrize("path", EMBEDDING_ROUTES)
def test_an_unknown_model_is_a_404_on_every_route(models_stack, path):
    _, encoded = images()
    key = "input" if "embeddings" in path else "inputs"
    response = post(models_stack, path, {key: encoded[:1], "model": "gpt-4"})
    assert response.status_code == 404, response.text
    body = response.json()
    if "embeddings" in path:
        assert body["error"]["code"] == "model_not_found"
        assert body["error"]["type"] == "invalid_request_error"
        assert "'gpt-4' is not served here" in body["error"]["message"]
    else:
        assert body["error_type"] == "NotFound"
        assert "served: 'siglip', 'dino', 'vit'" in body["error"]


def test_an_unknown_model_is_a_404_on_v1_models_too(models_stack):
    response = httpx.get(f"{models_stack.url}/v1/models/gpt-4")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


def test_texts_to_a_model_without_a_text_tower_are_a_422(models_stack):
    response = post(
        models_stack, "/embed", {"inputs": ["a cat"], "modality": "text", "model": "dino"}
    )
    assert response.status_code == 422
    assert "'dino' embeds images only" in response.json()["error"]


def test_metrics_count_by_model(models_stack):
    _, encoded = images()
    before = models_stack.metric('iei_images_embedded_total{model="dino"}')
    rows(post(models_stack, "/embed", {"inputs": encoded[:2], "model": "dino"}))
    assert models_stack.metric('iei_images_embedded_total{model="dino"}') - before == 2


def test_an_idle_model_unloads_and_its_next_requests_share_one_load(models_stack, model_dirs):
    files, encoded = images()
    rows(post(models_stack, "/embed", {"inputs": encoded[:1], "model": "vit"}))
    assert entry(models_stack, "vit")["loaded"] is True
    wait_for(lambda: not entry(models_stack, "vit")["loaded"], "unloaded", 6 * MODELS_IDLE_UNLOAD)
    assert "unloading model 'vit'" in models_stack.log()
    # counted once Triton's unload call returned, which may come after /info says unloaded
    unloads = 'iei_model_unloads_total{model="vit"}'
    wait_for(lambda: models_stack.metric(unloads) >= 1, "the unload counted", 10)
    # pinned models stay, and the stub watch took no unloaded stub for a crash
    assert entry(models_stack, "dino")["loaded"] is True
    assert "restarting Triton" not in models_stack.log()

    loads = models_stack.metric('iei_model_loads_total{model="vit",outcome="loaded"}')
    body = {"inputs": encoded, "model": "vit"}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: post(models_stack, "/embed", body), range(4)))
    expected = Reference(model_dirs["vit"]).embed(files)
    for answer in answers:
        assert cosine_rows(rows(answer), expected).min() > TOLERANCE
    assert models_stack.metric('iei_model_loads_total{model="vit",outcome="loaded"}') == loads + 1
    assert entry(models_stack, "vit")["loaded"] is True
    assert httpx.get(f"{models_stack.url}/health").status_code == 200


def refusal(tmp_path, **env: str) -> tuple[int, str]:
    """`iei serve` with these settings: its exit code and output (it stops before Triton)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("IEI_")}
    clean.pop("IMAGE_EMBEDDING_MODEL", None)
    done = subprocess.run(
        [str(IEI), "serve"], env={**clean, **env}, capture_output=True, text=True, timeout=120
    )
    return done.returncode, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"IMAGE_EMBEDDING_MODEL": "google/vit-base-patch16-224", "IEI_MODELS": "a=x/a"},
         "IEI_MODELS and IMAGE_EMBEDDING_MODEL are both set"),
        ({"IEI_MODELS": "a=x/a,a=x/b"}, "the name 'a' is given twice"),
        ({"IEI_MODELS": "a=x/a,b=x/b?dtype=fp8"}, "dtype='fp8': expected one of"),
        ({"IEI_MODELS": "a=x/a", "IEI_MODEL_IDLE_UNLOAD": "-1"}, "IEI_MODEL_IDLE_UNLOAD"),
    ],
)  # fmt: skip
def test_contradicting_or_bad_model_lists_stop_iei_serve_with_one_line(tmp_path, env, message):
    code, output = refusal(tmp_path, **env)
    assert code == 2, output
    assert message in output
    assert "Traceback" not in output


def test_model_flags_replace_image_embedding_model_and_an_empty_one_is_refused(tmp_path):
    """A flag wins over the environment: `iei serve --model clip` with IMAGE_EMBEDDING_MODEL
    exported was refused as "both set". A bad option of the flag's model is what stops it here
    (after the replacement, before anything starts)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("IEI_")}
    env = {**clean, "IMAGE_EMBEDDING_MODEL": "google/vit-base-patch16-224"}

    def serve(*models: str) -> tuple[int, str]:
        arguments = [argument for model in models for argument in ("--model", model)]
        done = subprocess.run(
            [str(IEI), "serve", *arguments], env=env, capture_output=True, text=True, timeout=120
        )
        return done.returncode, done.stdout + done.stderr

    code, output = serve("a=x/a?dtype=fp8")
    assert code == 2, output
    assert "--model given: IMAGE_EMBEDDING_MODEL is not used" in output
    assert "dtype='fp8': expected one of" in output and "both set" not in output
    code, output = serve("a=x/a", "")  # `--model "$M"` with M unset
    assert code == 2 and "--model needs a model: one of them is empty" in output, output
    assert "Traceback" not in output
