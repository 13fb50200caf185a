"""Dual encoders (CLIP, SigLIP, SigLIP2 NaFlex) and DINOv2 through the real stack, against the
independent in-process reference: images and texts through every door, rankings, limits."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http
from reference import Reference, cosine_rows
from sample_images import odd_images, photos
from stack import Stack
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.integration

# The contract says 0.999; float32 on both sides, the processors (torchvision here, PIL in the
# reference) agree far closer for these families.
TOLERANCE = 0.999
JOINT = ["clip", "siglip", "siglip2_naflex"]  # served with texts
IMAGE_ONLY = ["dinov2", "dinov2_registers"]
TEXTS = [
    "a photo of a cat",
    "A Red Car at NIGHT",  # SigLIP2 was trained lower-cased; its Gemma tokenizer is not
    "the big blue house with a man and a woman",
    "an image of the sea, the sky and a small bird!",
]
DIMENSION = {"clip": 16}  # the projection, narrower than the towers' 32


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def family_stack(
    request: pytest.FixtureRequest, model_dirs: dict[str, Path], tmp_path_factory
) -> Iterator[tuple[str, Stack]]:
    """One stack per family for this module (the tiny CLIP's is the session's); tests choose
    the families with `every_family`, `joint` or `image_only`."""
    family = request.param
    if family == "clip":
        yield family, request.getfixturevalue("clip_stack")
        return
    log = tmp_path_factory.mktemp("logs") / f"{family}.log"
    stack = Stack(model_dirs[family], log).start()
    yield family, stack
    assert stack.stop() == 0, stack.log()


@pytest.fixture(scope="module")
def references(model_dirs: dict[str, Path]) -> dict[str, Reference]:
    class Lazy(dict):  # type: ignore[type-arg]
        def __missing__(self, family: str) -> Reference:
            self[family] = Reference(model_dirs[family])
            return self[family]

    return Lazy()


every_family = pytest.mark.parametrize("family_stack", JOINT + IMAGE_ONLY, indirect=True)
joint = pytest.mark.parametrize("family_stack", JOINT, indirect=True)
image_only = pytest.mark.parametrize("family_stack", IMAGE_ONLY, indirect=True)


def post(stack: Stack, path: str, body: object) -> httpx.Response:
    return httpx.post(f"{stack.url}{path}", json=body, timeout=120)


def vectors(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    body = response.json()
    rows = [d["embedding"] for d in body["data"]] if isinstance(body, dict) else body
    return np.asarray(rows, dtype=np.float64)


def embed_texts(stack: Stack, texts: list[str], **options: object) -> np.ndarray:
    return vectors(post(stack, "/embed", {"inputs": texts, "modality": "text", **options}))


def triton_texts(stack: Stack, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Triton's `iei_text` directly: (raw vectors, tokens before truncation)."""
    client = triton_http.InferenceServerClient(stack.triton_http)
    tensor = np.array([[t.encode()] for t in texts], dtype=np.object_)
    request = triton_http.InferInput("TEXT", list(tensor.shape), "BYTES")
    request.set_data_from_numpy(tensor)
    result = client.infer("iei_text", [request])
    return result.as_numpy("EMBEDDING"), result.as_numpy("TOKENS")


def assert_close_to(served: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert served.shape == expected.shape, what
    similarity = cosine_rows(served, expected)
    assert similarity.min() >= TOLERANCE, f"{what}: cosine to the reference {similarity.round(6)}"


# --- images ---------------------------------------------------------------------------------


@every_family
def test_images_match_the_reference(family_stack, references):
    family, stack = family_stack
    files = [*photos().values(), *odd_images().values()]
    served = vectors(post(stack, "/embed", {"inputs": [b64(f) for f in files]}))
    assert_close_to(served, references[family].embed(files), f"{family} images")
    info = httpx.get(f"{stack.url}/info").json()
    assert info["embedding_dimension"] == DIMENSION.get(family, 32) == served.shape[1]
    joint = family in JOINT
    assert info["modalities"] == (["image", "text"] if joint else ["image"])
    assert info["text_context_length"] == ({"clip": 77}.get(family, 64) if joint else None)
    assert info["pooling"] == ("projected" if joint else "pooler")


# --- texts ----------------------------------------------------------------------------------


@joint
def test_texts_match_the_reference_through_every_door(family_stack, references):
    family, stack = family_stack
    expected = references[family].embed_texts(TEXTS)
    tei = embed_texts(stack, TEXTS)
    assert_close_to(tei, expected, "/embed")
    np.testing.assert_allclose(np.linalg.norm(tei, axis=1), 1.0, rtol=1e-5)
    openai = vectors(post(stack, "/v1/embeddings", {"input": TEXTS, "modality": "text"}))
    assert_close_to(openai, expected, "/v1/embeddings modality text")
    items = vectors(post(stack, "/v1/embeddings", {"input": [{"text": t} for t in TEXTS]}))
    assert_close_to(items, expected, "/v1/embeddings text items")
    raw, tokens = triton_texts(stack, TEXTS)
    assert raw.dtype == np.float32 and tokens.shape == (len(TEXTS), 1)
    assert_close_to(raw, expected, "Triton iei_text")
    np.testing.assert_allclose(embed_texts(stack, TEXTS, normalize=False), raw, rtol=1e-5)


@joint
def test_a_text_ranks_the_images_as_the_reference_does(family_stack, references):
    family, stack = family_stack
    files = list(photos().values())
    reference = references[family]
    images = vectors(post(stack, "/embed", {"inputs": [b64(f) for f in files]}))
    served = embed_texts(stack, TEXTS) @ images.T
    expected = reference.embed_texts(TEXTS) @ reference.embed(files).T
    for row, text in enumerate(TEXTS):
        assert np.argsort(-served[row]).tolist() == np.argsort(-expected[row]).tolist(), text


@joint
def test_one_request_mixes_texts_and_images(family_stack):
    _, stack = family_stack
    photo = b64(photos()["chelsea.jpg"])
    mixed = vectors(
        post(
            stack,
            "/v1/embeddings",
            {"input": [{"text": TEXTS[0]}, {"image": photo}, TEXTS[1]], "modality": "text"},
        )
    )
    image = vectors(post(stack, "/embed", {"inputs": [photo]}))
    texts = embed_texts(stack, TEXTS[:2])
    np.testing.assert_allclose(mixed, np.stack([texts[0], image[0], texts[1]]), atol=1e-5)
    # Plain strings follow `modality` (default image): here an image, then a text object.
    default = vectors(post(stack, "/v1/embeddings", {"input": [photo, {"text": TEXTS[1]}]}))
    np.testing.assert_allclose(default, np.stack([image[0], texts[1]]), atol=1e-5)


@joint
def test_an_overlong_text_is_cut_to_the_context_or_refused(family_stack, references):
    family, stack = family_stack
    context = httpx.get(f"{stack.url}/info").json()["text_context_length"]
    long_text = " ".join(["a photo of the cat"] * 40)  # far over 77 and 64 tokens
    cut = embed_texts(stack, [long_text, TEXTS[0]])
    assert_close_to(cut, references[family].embed_texts([long_text, TEXTS[0]]), "truncated")
    _, tokens = triton_texts(stack, [long_text, TEXTS[0]])
    assert tokens[0, 0] > context >= tokens[1, 0]
    refused = post(
        stack, "/embed", {"inputs": [TEXTS[0], long_text], "modality": "text", "truncate": False}
    )
    assert refused.status_code == 422, refused.text
    message = refused.json()["error"]
    assert message.startswith(f"inputs[1]: text of {tokens[0, 0]} tokens")
    assert f"context of {context} tokens" in message
    fits = embed_texts(stack, [TEXTS[0]], truncate=False)
    np.testing.assert_allclose(fits, cut[1:], atol=1e-6)


def test_refusals_of_truncate_false_and_dimensions_run_no_text_tower(clip_stack):
    """Refused before anything is embedded: `truncate: false` asks iei_text for the tokens alone
    (its text tower runs nothing: Triton's iei_text_tower_texts_total), `dimensions` no call."""
    triton = triton_http.InferenceServerClient(clip_stack.triton_http)
    metrics_url = f"http://127.0.0.1:{clip_stack.env['IEI_TRITON_METRICS_PORT']}/metrics"

    def counted() -> tuple[int, float]:
        stats = triton.get_inference_statistics("iei_text")["model_stats"][0]
        encoded = re.search(
            r'^iei_text_tower_texts_total\{model="iei_text"\} (\S+)$',
            httpx.get(metrics_url).text,
            re.M,
        )
        assert encoded, "the text model exposes no iei_text_tower_texts_total"
        return int(stats["inference_count"]), float(encoded.group(1))

    long_text = " ".join(["a photo of the cat"] * 40)  # far over 77 tokens
    before = counted()
    refused = post(
        clip_stack,
        "/embed",
        {"inputs": ["a cat", long_text], "modality": "text", "truncate": False},
    )
    assert refused.status_code == 422 and "inputs[1]: text of" in refused.text, refused.text
    wide = post(clip_stack, "/v1/embeddings", {"input": ["a cat"], "modality": "text",
                                               "dimensions": DIMENSION["clip"] + 1})  # fmt: skip
    assert wide.status_code == 422 and "dimensions 17 > the model's 16" in wide.text, wide.text
    after = counted()
    assert after == (before[0] + 2, before[1])  # two texts' tokens counted; none encoded
    fits = post(clip_stack, "/embed", {"inputs": ["a cat"], "modality": "text", "truncate": False})
    assert fits.status_code == 200
    assert counted() == (after[0] + 2, after[1] + 1)  # its tokens, then its vector


@pytest.mark.parametrize(
    ("path", "body", "fragment"),
    [
        ("/embed", {"inputs": ["a cat", " "], "modality": "text"}, "inputs[1]: empty text"),
        ("/embed", {"inputs": ["x" * 4097], "modality": "text"},
         "inputs[0]: text of 4097 characters is longer than the limit of 4096"),
        ("/embed", {"inputs": ["a cat"], "modality": "sound"}, "modality"),
        ("/v1/embeddings", {"input": ["a cat"], "modality": "video"}, "modality"),
        ("/v1/embeddings", {"input": ["a", {"text": "b", "image": "c"}]},
         "inputs[1]: an item is a string, or an object with exactly one of `text` and `image`"),
        ("/v1/embeddings", {"input": [{}]}, "inputs[0]: an item is a string"),
        ("/v1/embeddings", {"input": [{"text": 3}]}, "inputs[0]: an item is a string"),
        ("/v1/embeddings", {"input": [{"text": "a cat"}, {"image": "bm90IGFuIGltYWdl"}]},
         "inputs[1]: not an image"),
        ("/embed", {"inputs": ["a cat"], "modality": "text", "truncation_direction": "left"},
         "truncation_direction left is not supported"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("family_stack", ["clip"], indirect=True)  # the frontend's checks
def test_bad_text_requests_are_422_naming_the_input(family_stack, path, body, fragment):
    _, stack = family_stack
    response = post(stack, path, body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    message = error["message"] if isinstance(error, dict) else error
    assert fragment in message, message


@joint
def test_triton_fails_only_the_bad_texts_own_request(family_stack):
    _, stack = family_stack
    client = triton_http.InferenceServerClient(stack.triton_http)
    tensor = np.array([[b"a photo of a cat"], [b"\xff\xfe broken"]], dtype=np.object_)
    request = triton_http.InferInput("TEXT", list(tensor.shape), "BYTES")
    request.set_data_from_numpy(tensor)
    with pytest.raises(InferenceServerException, match=r"TEXT\[1\]: not valid UTF-8"):
        client.infer("iei_text", [request])
    assert triton_texts(stack, TEXTS[:1])[0].shape[0] == 1  # and the model still answers


@image_only
def test_text_on_an_image_only_model_is_refused(family_stack):
    _, stack = family_stack
    for path, body in [
        ("/embed", {"inputs": ["a cat"], "modality": "text"}),
        ("/v1/embeddings", {"input": [{"text": "a cat"}]}),
    ]:
        response = post(stack, path, body)
        assert response.status_code == 422, response.text
        assert "embeds images only" in response.text
    ready = httpx.get(f"http://{stack.triton_http}/v2/models/iei_text/ready")
    assert ready.status_code != 200  # not loaded at all


@pytest.mark.parametrize("family_stack", ["clip"], indirect=True)
def test_metrics_count_texts_and_images(family_stack):
    _, stack = family_stack

    def counted() -> dict[str, float]:
        names = ("iei_texts_embedded_total", "iei_images_embedded_total")
        return {name: stack.metric(name + "{") for name in names}  # one model: one label

    before = counted()
    photo = b64(photos()["coffee.jpg"])
    post(stack, "/v1/embeddings", {"input": [{"text": "a"}, {"text": "b"}, {"image": photo}]})
    after = counted()
    assert after["iei_texts_embedded_total"] - before["iei_texts_embedded_total"] == 2
    assert after["iei_images_embedded_total"] - before["iei_images_embedded_total"] == 1


def test_huggingface_hubs_inference_client_posts_to_the_root(clip_stack):
    """TEI's root route: `InferenceClient(model=URL).feature_extraction(...)` posts to `/`."""
    hub = pytest.importorskip("huggingface_hub")
    photo = b64(photos()["rocket.jpg"])
    client = hub.InferenceClient(model=clip_stack.url)
    served = np.asarray(client.feature_extraction(photo), dtype=np.float64)
    expected = vectors(post(clip_stack, "/embed", {"inputs": [photo]}))
    np.testing.assert_allclose(served.reshape(expected.shape), expected, atol=1e-6)


def test_the_openai_sdk_sends_texts_with_extra_body(clip_stack):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{clip_stack.url}/v1", api_key="unused")
    texts = client.embeddings.create(
        input=TEXTS[:2], model="clip", extra_body={"modality": "text"}
    )  # the SDK asks for base64 and decodes it
    served = np.asarray([d.embedding for d in texts.data])
    np.testing.assert_allclose(served, embed_texts(clip_stack, TEXTS[:2]), atol=1e-6)


def test_a_pooling_outside_clips_joint_space_serves_images_only(model_dirs, tmp_path):
    """IEI_POOLING=mean pools CLIP's vision tower before its projection: texts (in the projected
    space) would be silently useless beside those image vectors, so none are served."""
    stack = Stack(model_dirs["clip"], tmp_path / "clip-mean.log", IEI_POOLING="mean").start()
    try:
        info = httpx.get(f"{stack.url}/info", timeout=30).json()
        assert info["modalities"] == ["image"] and info["embedding_dimension"] == 32
        response = post(stack, "/embed", {"inputs": ["a cat"], "modality": "text"})
        assert response.status_code == 422 and "embeds images only" in response.text
        image = post(stack, "/embed", {"inputs": [b64(next(iter(photos().values())))]})
        assert image.status_code == 200 and len(image.json()[0]) == 32
        ready = httpx.get(f"http://{stack.triton_http}/v2/models/iei_text/ready")
        assert ready.status_code != 200  # not loaded at all
    finally:
        assert stack.stop() == 0, stack.log()
