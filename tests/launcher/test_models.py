"""Which Triton models the launcher loads: `iei_text` only beside a dual encoder, decided from
the model's config.json with the model repository's own rule."""

from __future__ import annotations

import json
import shutil
import sys
import types

import pytest
from iei.launcher import models
from iei.launcher.repository import shipped_model_repository
from iei.launcher.settings import LauncherSettings
from iei.launcher.triton_process import triton_command

REPOSITORY = shipped_model_repository()
BOTH = ("iei", "iei_text")


def model_folder(tmp_path, config: dict | str, name: str = "model"):
    folder = tmp_path / name
    folder.mkdir()
    text = config if isinstance(config, str) else json.dumps(config)
    (folder / "config.json").write_text(text)
    return folder


TOWERS = {"text_config": {"hidden_size": 8}, "vision_config": {"hidden_size": 8}}


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"model_type": "clip", **TOWERS}, BOTH),
        ({"model_type": "siglip", **TOWERS}, BOTH),
        ({"model_type": "siglip2", **TOWERS}, BOTH),
        # old CLIP files spell the parts *_config_dict
        ({"model_type": "clip", "text_config_dict": {}, "vision_config_dict": {}}, BOTH),
        ({"model_type": "clip", "text_config": None, "vision_config": {}}, ("iei",)),
        ({"model_type": "clip_vision_model", "hidden_size": 8}, ("iei",)),  # a vision tower only
        ({"model_type": "clip", "vision_config": {"hidden_size": 8}}, ("iei",)),  # no text part
        ({"model_type": "llava", **TOWERS}, ("iei",)),  # text and vision, but generative
        ({"model_type": "vit"}, ("iei",)),
        ({"model_type": "dinov2"}, ("iei",)),
    ],
)
def test_text_only_for_a_dual_encoder(tmp_path, config, expected):
    assert models.served_models(str(model_folder(tmp_path, config)), REPOSITORY) == expected


def test_the_tiny_models_themselves(model_dirs):
    assert models.served_models(str(model_dirs["clip"]), REPOSITORY) == BOTH
    assert models.served_models(str(model_dirs["siglip2_naflex"]), REPOSITORY) == BOTH
    assert models.served_models(str(model_dirs["dinov2"]), REPOSITORY) == ("iei",)
    assert models.served_models(str(model_dirs["vit"]), REPOSITORY) == ("iei",)


@pytest.mark.parametrize(
    ("family", "pooling", "expected"),
    [
        ("clip", "mean", ("iei",)),  # the vision tower before its projection: another space
        ("clip", "cls", ("iei",)),
        ("clip", "pooler", ("iei",)),
        ("clip", "auto", BOTH),
        ("siglip", "pooler", BOTH),  # SigLIP's pooler_output is its image embedding
        ("siglip", "mean", ("iei",)),
    ],
)
def test_no_text_model_when_the_pooling_leaves_the_joint_space(model_dirs, family, pooling,
                                                                expected):  # fmt: skip
    assert models.served_models(str(model_dirs[family]), REPOSITORY, pooling) == expected


def test_the_launcher_applies_the_rule_with_iei_pooling(model_dirs, monkeypatch, tmp_path):
    """`iei serve` with IEI_POOLING=mean on CLIP: no iei_text (the rule above, with the setting)."""
    from iei.launcher import triton_process

    class Chosen(Exception):
        pass

    def stop_there(*args: object) -> str:
        raise Chosen

    monkeypatch.setenv("IMAGE_EMBEDDING_MODEL", str(model_dirs["clip"]))
    monkeypatch.setenv("IEI_POOLING", "mean")
    asked = []
    real = triton_process.served_models
    monkeypatch.setattr(triton_process, "served_models", lambda *a: asked.append(real(*a)))
    monkeypatch.setattr(triton_process, "find_triton", lambda work_dir: None)
    monkeypatch.setattr(triton_process, "model_layout", stop_there)  # the step after
    with pytest.raises(Chosen):
        triton_process.TritonServer(LauncherSettings(), tmp_path).start()
    assert asked == [("iei",)]


def test_an_unreadable_config_loads_the_image_model_alone(tmp_path, caplog):
    """The image model's own load error then says what is wrong (not the launcher's guess)."""
    assert models.served_models(str(tmp_path / "missing"), REPOSITORY) == ("iei",)
    assert models.served_models(str(model_folder(tmp_path, "{not json")), REPOSITORY) == ("iei",)
    assert "cannot read the config.json" in caplog.text


def test_a_hub_id_is_read_through_huggingface_hub(tmp_path, monkeypatch):
    config = model_folder(tmp_path, {"model_type": "siglip", **TOWERS}) / "config.json"
    asked = []

    def hf_hub_download(repo_id: str, filename: str) -> str:
        asked.append((repo_id, filename))
        return str(config)

    hub = types.ModuleType("huggingface_hub")
    hub.hf_hub_download = hf_hub_download  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    assert models.served_models("google/siglip-base-patch16-224", REPOSITORY) == BOTH
    assert asked == [("google/siglip-base-patch16-224", "config.json")]


def test_a_repository_without_the_text_model_or_the_rule(tmp_path):
    clip = str(model_folder(tmp_path, {"model_type": "clip", **TOWERS}))
    images_only = tmp_path / "images-only"
    shutil.copytree(REPOSITORY, images_only, ignore=shutil.ignore_patterns("iei_text"))
    assert models.served_models(clip, images_only) == ("iei",)
    no_rule = tmp_path / "no-rule"
    shutil.copytree(REPOSITORY, no_rule)
    (no_rule / models.RULES).unlink()
    assert models.served_models(clip, no_rule) == ("iei",)


def test_the_container_command_loads_the_models_by_name():
    argv = triton_command(LauncherSettings(), REPOSITORY, models=BOTH)
    assert "--model-control-mode=explicit" in argv
    assert [a for a in argv if a.startswith("--load-model=")] == [
        "--load-model=iei",
        "--load-model=iei_text",
    ]
