"""The model code for dual encoders and DINOv2 without Triton: what `auto` picks, NaFlex's
tensors, texts, the original families' vectors unchanged, and the text model's per-request
errors (with the stand-in for Triton's utils)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from fake_pb_utils import TEXT_MODEL_PY, InferenceRequest, Tensor, load_model_module
from PIL import Image
from reference import Reference, cosine_rows
from sample_images import encode, odd_images, photos
from tiny_models import (
    JOINT_FAMILIES,
    ORIGINAL_FAMILIES,
    build_classification_checkpoint,
    build_openclip_style_clip,
)

text_model = load_model_module(TEXT_MODEL_PY)  # installs the stand-in for Triton's utils first

from iei.launcher.settings import LauncherSettings  # noqa: E402
from iei.launcher.triton_process import TritonServer  # noqa: E402
from iei_runtime import embedder as embedding  # noqa: E402
from iei_runtime import families, loading, texts  # noqa: E402
from iei_runtime.settings import read_settings  # noqa: E402

CPU = torch.device("cpu")
TEXTS = ["a photo of a cat", "A Red Car at NIGHT", "the sea and the sky " * 30]
TOLERANCE = 0.999  # the contract's; what the service must reach, and what a mistake misses


def settings_for(folder, **environ: str):
    """float32 on torch: the model code itself (tests/model/test_engines.py has the others)."""
    return read_settings({}, {"IMAGE_EMBEDDING_MODEL": str(folder), "IEI_DTYPE": "float32",
                              "IEI_ENGINE": "torch", **environ})  # fmt: skip


@pytest.fixture(scope="module")
def embedders(model_dirs):
    """family -> the image embedder the `iei` model would load (default settings)."""
    built: dict[str, embedding.Embedder] = {}

    class Lazy(dict):  # type: ignore[type-arg]
        def __missing__(self, family: str) -> embedding.Embedder:
            built[family] = loading.load_embedder(settings_for(model_dirs[family]), CPU, 2)
            self[family] = built[family]
            return built[family]

    yield Lazy()
    for embedder in built.values():
        embedder.close()


@pytest.fixture(scope="module")
def text_embedders(model_dirs):
    class Lazy(dict):  # type: ignore[type-arg]
        def __missing__(self, family: str) -> texts.TextEmbedder:
            self[family] = loading.load_text_embedder(settings_for(model_dirs[family]), CPU)
            return self[family]

    return Lazy()


# --- what auto means ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "pooling", "architecture", "dimension"),
    [
        ("clip", "projected", "CLIPVisionModelWithProjection", 16),
        ("siglip", "projected", "SiglipVisionModel", 32),
        ("siglip2", "projected", "SiglipVisionModel", 32),
        ("siglip2_naflex", "projected", "Siglip2VisionModel", 32),
        ("dinov2", "pooler", "Dinov2Model", 32),
        ("dinov2_registers", "pooler", "Dinov2WithRegistersModel", 32),
        ("vit", "mean", "ViTModel", 32),
        ("convnext", "mean", "ConvNextModel", 32),
    ],
)
def test_auto_picks_the_familys_embedding(embedders, family, pooling, architecture, dimension):
    embedder = embedders[family]
    info = json.loads(loading.describe(embedder, settings_for("x")))
    assert (info["pooling"], info["architecture"]) == (pooling, architecture)
    joint = family in JOINT_FAMILIES
    assert info["modalities"] == (["image", "text"] if joint else ["image"])
    assert info["text_context_length"] == ({"clip": 77}.get(family, 64) if joint else None)
    # /classify's scalars, read from the full checkpoint (tiny_models sets them): CLIP's softmax
    # has no bias; logit_scale is the multiplier, exp() of the parameter.
    if joint:
        kind = "softmax" if family == "clip" else "sigmoid"
        assert info["zero_shot"] == kind
        assert info["logit_scale"] == pytest.approx(12.0, rel=1e-6)
        assert info["logit_bias"] == pytest.approx(0.0 if family == "clip" else -1.5)
    else:
        assert "zero_shot" not in info and "logit_scale" not in info
    assert embedder.forward(embedder.blank(2)).shape == (2, dimension)


def test_the_rule_reads_plain_config_dicts():
    joint = {"model_type": "siglip", "text_config": {}, "vision_config": {}}
    assert families.resolve_pooling("auto", joint) == "projected"
    assert families.resolve_pooling("auto", {"model_type": "dinov2"}) == "pooler"
    assert families.resolve_pooling("auto", {"model_type": "beit"}) == "mean"
    assert families.resolve_pooling("mean", joint) == "mean"  # forced stays forced
    assert families.resolve_pooling("cls", {**joint, "model_type": "clip"}) == "cls"
    with pytest.raises(ValueError, match="IEI_POOLING=cls: a siglip model has no CLS token"):
        families.resolve_pooling("cls", joint)  # SigLIP's tokens are all patches
    assert families.text_context(joint) == 64
    assert families.text_context({**joint, "text_config": {"max_position_embeddings": 32}}) == 32
    assert families.text_context({"model_type": "vit"}) is None


def test_a_forced_pooling_on_a_dual_encoder_pools_its_vision_tower(model_dirs):
    embedder = loading.load_embedder(settings_for(model_dirs["clip"], IEI_POOLING="cls"), CPU, 1)
    try:
        assert embedder.encoder.architecture == "CLIPVisionModel"  # no projection: 32, not 16
        assert embedder.forward(embedder.blank(1)).shape == (1, 32)
    finally:
        embedder.close()


def test_a_pooling_the_model_cannot_do_stops_loading_with_one_line(model_dirs, tmp_path):
    with pytest.raises(RuntimeError) as refused:
        loading.load_embedder(settings_for(model_dirs["convnext"], IEI_POOLING="cls"), CPU, 1)
    message = str(refused.value)
    assert message == (
        f"IEI cannot load model {str(model_dirs['convnext'])!r} (IMAGE_EMBEDDING_MODEL): "
        "IEI_POOLING=cls: a convolutional model has no CLS token; use IEI_POOLING=mean"
    )
    # The line `iei serve` shows, from what Triton logs when the model's initialize raises.
    server = TritonServer(LauncherSettings(), tmp_path)
    server.log_path.write_text(
        "E1128 18:38:17.348727 1 model_lifecycle.cc:642] \"failed to load 'iei' version 1: "
        f'Internal: RuntimeError: {message}\\n\\nAt:\\n  model.py(1): initialize"\n'
    )
    assert server.failure_reason() == message


@pytest.mark.parametrize("family", ["vit", "deit"])
def test_pooler_on_a_checkpoint_without_pooler_weights_is_refused(tmp_path, family):
    """A classification checkpoint (the default google/vit-base-patch16-224) has no pooler
    weights: IEI_POOLING=pooler would serve a random pooler, other vectors at every start."""
    folder = build_classification_checkpoint(family, tmp_path / family)
    with pytest.raises(RuntimeError) as refused:
        loading.load_embedder(settings_for(folder, IEI_POOLING="pooler"), CPU, 1)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"IEI cannot load model {str(folder)!r} (IMAGE_EMBEDDING_MODEL): ")
    assert "IEI_POOLING=pooler: the checkpoint has no weights for the model's pooler" in message
    for pooling in ("mean", "cls"):  # what the same checkpoint serves
        embedder = loading.load_embedder(settings_for(folder, IEI_POOLING=pooling), CPU, 1)
        embedder.close()


def test_pooler_on_a_checkpoint_with_pooler_weights_is_served(model_dirs):
    """The tiny ViT is saved as ViTModel, pooler included: the same vectors at every start."""
    from transformers import AutoModel

    starts = []
    for _ in range(2):
        settings = settings_for(model_dirs["vit"], IEI_POOLING="pooler")
        embedder = loading.load_embedder(settings, CPU, 1)
        try:
            batch = embedder.blank(2)
            starts.append(embedder.forward(batch))
        finally:
            embedder.close()
    model = AutoModel.from_pretrained(model_dirs["vit"]).eval()
    with torch.inference_mode():
        expected = model(pixel_values=batch["pixel_values"]).pooler_output.numpy()
    assert np.array_equal(starts[0], starts[1])
    np.testing.assert_allclose(starts[0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["swin", "siglip", "siglip2", "siglip2_naflex"])
def test_cls_on_a_model_without_a_cls_token_is_refused_with_one_line(model_dirs, family):
    """Their tokens are all patches: `cls` would pool the first patch of the image."""
    with pytest.raises(RuntimeError) as refused:
        loading.load_embedder(settings_for(model_dirs[family], IEI_POOLING="cls"), CPU, 1)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"IEI cannot load model {str(model_dirs[family])!r}")
    assert "IEI_POOLING=cls: a " in message and "has no CLS token" in message


def test_mean_on_naflex_averages_the_real_patches_not_the_padding(model_dirs):
    """A tall image fills 150 of NaFlex's 256 patches: the other 106 are padding."""
    from transformers import AutoModel

    embedder = loading.load_embedder(
        settings_for(model_dirs["siglip2_naflex"], IEI_POOLING="mean"), CPU, 1
    )
    try:
        tall = encode(Image.new("RGB", (20, 3000), (200, 30, 90)), "PNG")
        [inputs] = embedder.prepare([tall])
        served = embedder.forward(embedding.stack([inputs]))
    finally:
        embedder.close()
    mask = inputs["pixel_attention_mask"].bool()
    assert 0 < int(mask.sum()) < 256
    model = AutoModel.from_pretrained(model_dirs["siglip2_naflex"]).eval()
    with torch.inference_mode():
        hidden = model.vision_model(
            pixel_values=inputs["pixel_values"][None],
            pixel_attention_mask=inputs["pixel_attention_mask"][None],
            spatial_shapes=inputs["spatial_shapes"][None],
        ).last_hidden_state[0]
    real, everything = hidden[mask].mean(0)[None].numpy(), hidden.mean(0)[None].numpy()
    assert cosine_rows(served, real)[0] >= 0.9999
    assert cosine_rows(served, everything)[0] < cosine_rows(served, real)[0]
    np.testing.assert_allclose(served[0], real[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("family", "pooling", "texts"),
    [
        ("clip", "mean", False),
        ("clip", "cls", False),
        ("clip", "pooler", False),  # CLIP's pooler_output is before the projection
        ("clip", "auto", True),
        ("siglip", "mean", False),
        ("siglip", "pooler", True),  # SigLIP's pooler_output is its image embedding
        ("siglip2_naflex", "mean", False),
        ("siglip2_naflex", "pooler", True),
    ],
)
def test_a_pooling_outside_the_joint_space_serves_no_texts(model_dirs, family, pooling, texts):
    """Texts in the space of the projected image embedding beside image vectors from another
    space would be silently useless: /info says images only and the text model refuses."""
    settings = settings_for(model_dirs[family], IEI_POOLING=pooling)
    embedder = loading.load_embedder(settings, CPU, 1)
    try:
        info = json.loads(loading.describe(embedder, settings))
    finally:
        embedder.close()
    config = json.loads((model_dirs[family] / "config.json").read_text())
    assert families.serves_texts(config, pooling) is texts
    assert info["modalities"] == (["image", "text"] if texts else ["image"])
    assert (info["text_context_length"] is not None) is texts
    assert ("zero_shot" in info) is texts  # /classify scores where the texts share the space
    if texts:
        loading.load_text_embedder(settings, CPU)
    else:
        with pytest.raises(RuntimeError, match=f"IEI_POOLING={pooling}: .* serves no texts"):
            loading.load_text_embedder(settings, CPU)


# --- the original families: bit for bit what they were ------------------------------------------


@pytest.mark.parametrize("family", ORIGINAL_FAMILIES)
def test_the_original_families_give_the_vectors_of_before_bit_for_bit(embedders, model_dirs,
                                                                       family):  # fmt: skip
    """`auto` is the mean of before: the same model, the same tensors, the same pooling code
    path as the service had (AutoModel without its pooler, last_hidden_state averaged)."""
    from transformers import AutoModel

    embedder = embedders[family]
    assert embedder.encoder.pooling == "mean"
    batch = embedding.stack(embedder.prepare(list(photos().values())))
    assert batch.keys() == {"pixel_values"}
    options = {} if family == "convnext" else {"add_pooling_layer": False}  # ConvNeXt has none
    before = AutoModel.from_pretrained(model_dirs[family], dtype=torch.float32, **options).eval()
    with torch.inference_mode():
        hidden = before(pixel_values=batch["pixel_values"]).last_hidden_state
        expected = hidden.mean(dim=(2, 3)) if hidden.dim() == 4 else hidden.mean(dim=1)
    assert np.array_equal(embedder.forward(batch), expected.float().numpy())


# --- dual encoders: images and texts against the reference ----------------------------------------


@pytest.mark.parametrize("family", JOINT_FAMILIES)
def test_images_and_texts_match_the_reference(embedders, text_embedders, model_dirs, family):
    files = [*photos().values(), *odd_images().values()]
    reference = Reference(model_dirs[family])
    served = np.stack(embedders[family].embed(files))
    assert cosine_rows(served, reference.embed(files)).min() >= 0.9999
    vectors, tokens = text_embedders[family].embed([t.encode() for t in TEXTS])
    assert cosine_rows(np.stack(vectors), reference.embed_texts(TEXTS)).min() >= 0.9999
    context = text_embedders[family].context
    assert tokens[0] < context < tokens[2]  # the long one was cut to fit


def test_a_clip_whose_towers_keep_another_projection_size_loads_both_towers(tmp_path):
    """LAION's OpenCLIP conversions say projection_dim 1280 at the top level and keep 512 in
    vision_config/text_config (transformers #25622): each tower loads with the real size."""
    folder = build_openclip_style_clip(tmp_path / "clip-openclip")
    config = json.loads((folder / "config.json").read_text())
    assert config["projection_dim"] == 24
    towers = (config["vision_config"]["projection_dim"], config["text_config"]["projection_dim"])
    assert 24 not in towers
    files = list(photos().values())
    reference = Reference(folder)
    images = loading.load_embedder(settings_for(folder), CPU, 1)
    try:
        served = np.stack(images.embed(files))
    finally:
        images.close()
    assert served.shape == (len(files), 24)
    assert cosine_rows(served, reference.embed(files)).min() >= 0.9999
    vectors, _ = loading.load_text_embedder(settings_for(folder), CPU).embed(
        [t.encode() for t in TEXTS]
    )
    assert np.stack(vectors).shape == (len(TEXTS), 24)
    assert cosine_rows(np.stack(vectors), reference.embed_texts(TEXTS)).min() >= 0.9999


def test_siglip_texts_are_padded_to_the_context(text_embedders, model_dirs):
    """SigLIP's text tower pools the last position: padding to the longest text is wrong."""
    served, _ = text_embedders["siglip"].embed([t.encode() for t in TEXTS[:2]])
    assert text_embedders["siglip"].padding == "max_length"
    wrong = Reference(model_dirs["siglip"], padding="longest").embed_texts(TEXTS[:2])
    assert cosine_rows(np.stack(served), wrong).max() < TOLERANCE


def test_siglip2_texts_are_lower_cased_as_trained(text_embedders, model_dirs):
    """Fixed-resolution SigLIP2 names Gemma's tokenizer, which keeps the case: IEI folds it."""
    embedder = text_embedders["siglip2"]
    assert embedder.lower_case and not text_embedders["siglip2_naflex"].lower_case
    reference = Reference(model_dirs["siglip2"]).embed_texts([TEXTS[1]])
    embedder.lower_case = False
    try:
        kept, _ = embedder.embed([TEXTS[1].encode()])
    finally:
        embedder.lower_case = True
    assert cosine_rows(np.stack(kept), reference)[0] < TOLERANCE


@pytest.mark.parametrize("family", JOINT_FAMILIES)
def test_a_special_tokens_text_in_a_text_is_read_as_text(text_embedders, model_dirs, family):
    """CLIP pools at its first end token: `<|endoftext|>` in a client's text, read as that token,
    ended the text there, silently (cosine 1.0 to the text before it, and its tokens counted as
    that one)."""
    embedder = text_embedders[family]
    head = "a photo of a cat"
    text = f"{head}{embedder.tokenizer.eos_token} and a long story about dogs"
    vectors, tokens = embedder.embed([text.encode(), head.encode()])
    assert cosine_rows(np.stack(vectors[:1]), np.stack(vectors[1:]))[0] < TOLERANCE
    reference = Reference(model_dirs[family]).embed_texts([text])
    assert cosine_rows(np.stack(vectors[:1]), reference)[0] >= 0.9999
    if family == "clip":  # the others' tokenizers pad to their context when they count
        assert tokens[0] > len(embedder.tokenizer(text)["input_ids"])  # counted as text too


def test_naflex_gets_every_tensor_of_its_processor(embedders):
    """Without pixel_attention_mask a NaFlex model runs, silently wrong for images that leave
    patches empty; the mask and the patch grid go in with the pixels."""
    embedder = embedders["siglip2_naflex"]
    tall = encode(Image.new("RGB", (20, 3000), (200, 30, 90)), "PNG")  # 150 of 256 patches
    [inputs] = embedder.prepare([tall])
    assert inputs.keys() == {"pixel_values", "pixel_attention_mask", "spatial_shapes"}
    assert int(inputs["pixel_attention_mask"].sum()) < 256
    batch = embedding.stack([inputs])
    served = embedder.forward(batch)
    unmasked = {**batch, "pixel_attention_mask": torch.ones_like(batch["pixel_attention_mask"])}
    assert cosine_rows(served, embedder.forward(unmasked))[0] < TOLERANCE


def test_only_floating_tensors_take_the_models_dtype():
    pixels = embedding.to_device(torch.zeros(2, 3), CPU, torch.bfloat16)
    mask = embedding.to_device(torch.ones(2, 3, dtype=torch.int32), CPU, torch.bfloat16)
    shapes = embedding.to_device(torch.ones(2, 2, dtype=torch.int64), CPU, torch.bfloat16)
    assert (pixels.dtype, mask.dtype, shapes.dtype) == (torch.bfloat16, torch.int32, torch.int64)


def test_a_tower_with_missing_weights_is_refused(model_dirs, tmp_path):
    """Loading one tower from a checkpoint that lacks some of its weights would make them random:
    silently wrong vectors. It is an error instead."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "clip-without-text-projection"
    shutil.copytree(model_dirs["clip"], broken)
    weights = load_file(broken / "model.safetensors")
    del weights["text_projection.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match=r"IEI cannot load model .*misses 1 weights"):
        loading.load_text_embedder(settings_for(broken), CPU)


# --- the Triton model iei_text ------------------------------------------------------------------


@pytest.fixture(scope="module")
def triton_text_model(model_dirs):
    instance = text_model.TritonPythonModel()
    config = {
        "parameters": {
            "model_id": {"string_value": str(model_dirs["clip"])},
            "dtype": {"string_value": "float32"},
            "max_text_chars": {"string_value": "40"},
        },
        "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
    }
    instance.initialize(
        {
            "model_config": json.dumps(config),
            "model_instance_kind": "CPU",
            "model_instance_device_id": "0",
        }
    )
    return instance


def text_request(*items: bytes) -> InferenceRequest:
    tensor = np.empty((len(items), 1), dtype=np.object_)
    tensor[:, 0] = items
    return InferenceRequest([Tensor("TEXT", tensor)], ("EMBEDDING", "TOKENS"))


def test_each_bad_text_fails_only_its_own_request(triton_text_model):
    good = [b"a photo of a cat", b"a dog"]
    responses = triton_text_model.execute(
        [
            text_request(good[0]),
            text_request(good[1], b"\xff\xfe", good[0]),
            text_request(b"   "),
            text_request(b"x" * 41),
            text_request(*good),
        ]
    )
    assert len(responses) == 5
    first = {t.name(): t.as_numpy() for t in responses[0].output_tensors}
    assert first["EMBEDDING"].shape == (1, 16) and first["EMBEDDING"].dtype == np.float32
    assert first["TOKENS"].tolist() == [[7]] and first["TOKENS"].dtype == np.int32
    errors = [r.error for r in responses[1:4]]
    assert all(e.code == "INVALID_ARG" for e in errors)
    assert errors[0].message() == "TEXT[1]: not valid UTF-8: invalid start byte at byte 0"
    assert errors[1].message() == "TEXT[0]: empty text"
    assert (
        errors[2].message() == "TEXT[0]: text of 41 characters is over the limit of 40 characters"
    )
    last = {t.name(): t.as_numpy() for t in responses[4].output_tensors}
    np.testing.assert_allclose(last["EMBEDDING"][0], first["EMBEDDING"][0], rtol=1e-5, atol=1e-6)
    logged = " ".join(text_model.pb_utils.Logger.messages)
    assert "context 77 tokens, padding=longest" in logged


def test_a_request_for_tokens_alone_is_not_embedded(triton_text_model, monkeypatch):
    """The frontend's check of `truncate: false`: tokens counted as for embedding (its
    lower-casing included), the text tower not run for them, and its metric says so."""
    forwarded: list[int] = []
    embedder = triton_text_model.embedder
    original = embedder.forward
    monkeypatch.setattr(embedder, "forward", lambda batch: forwarded.append(1) or original(batch))
    encoded = triton_text_model.encoded.value()
    tokens_only = text_request(b"a photo of a cat", b"A DOG")
    tokens_only.outputs = ["TOKENS"]
    bad = text_request(b"   ")
    bad.outputs = ["TOKENS"]
    full = text_request(b"a dog")
    counted, refused, embedded = triton_text_model.execute([tokens_only, bad, full])
    assert [t.name() for t in counted.output_tensors] == ["TOKENS"]
    assert counted.output_tensors[0].as_numpy().tolist() == [[7], [4]]
    assert refused.error.message() == "TEXT[0]: empty text"
    assert {t.name() for t in embedded.output_tensors} == {"EMBEDDING", "TOKENS"}
    assert forwarded == [1]  # the embedded request's forward pass only
    assert triton_text_model.encoded.value() == encoded + 1
    assert triton_text_model.execute([tokens_only]) and forwarded == [1]


def test_the_text_model_refuses_a_model_without_a_text_tower(model_dirs):
    with pytest.raises(RuntimeError, match=r"IEI cannot load model .*has no text tower"):
        loading.load_text_embedder(settings_for(model_dirs["dinov2"]), CPU)
