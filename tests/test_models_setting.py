"""IEI_MODELS: parsing, checks, names, lookup (iei/models.py), and the settings that read it."""

from __future__ import annotations

import pytest
from iei.models import ModelsError, lookup, parse_models, single_model
from iei.server.settings import ServerSettings
from pydantic import ValidationError


def test_names_default_to_the_id_or_the_folder_name(tmp_path):
    folder = tmp_path / "my-dino"
    folder.mkdir()
    models = parse_models(f"google/siglip-base-patch16-224, {folder},vit=./models/vit")
    assert [m.name for m in models] == ["google/siglip-base-patch16-224", "my-dino", "vit"]
    assert [m.default for m in models] == [True, False, False]
    assert models[2].model_id == "./models/vit"


def test_a_folder_s_name_is_its_path_as_written_not_where_a_link_leads(tmp_path, monkeypatch):
    """The frontend's container and Triton's may see `./models/current` lead to different
    folders (or none): the name came from the link's target, and their names differed."""
    (tmp_path / "models" / "v7").mkdir(parents=True)
    (tmp_path / "models" / "current").symlink_to(tmp_path / "models" / "v7")
    monkeypatch.chdir(tmp_path)
    models = parse_models("a=x/a,./models/current,./models/v7/")
    assert [m.name for m in models[1:]] == ["current", "v7"]
    monkeypatch.chdir(tmp_path / "models")
    assert parse_models("a=x/a,.")[1].name == "models"  # only the folder itself names `.`


def test_the_default_keeps_the_contract_names_and_the_others_get_derived_ones():
    first, dino, odd = parse_models("a=x/a,dino=x/dino,odd.name/v1=x/odd")
    assert (first.triton_image, first.triton_text) == ("iei", "iei_text")
    assert (dino.triton_image, dino.triton_text) == ("iei__dino", "iei__dino_text")
    assert dino.triton_name("iei_preprocess") == "iei__dino_preprocess"
    assert odd.triton_image == "iei__odd_name_v1"  # only letters, digits, _ and - in Triton


def test_per_model_options_are_checked_as_the_global_settings():
    first, second = parse_models("a=x/a?dtype=float32&engine=torch,b=x/b?pooling=cls&instances=2")
    assert (first.dtype, first.engine, first.pinned) == ("float32", "torch", True)
    assert (second.pooling, second.instances, second.pinned) == ("cls", 2, False)
    assert parse_models("a=x/a,b=x/b?pinned=true")[1].pinned


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("a=x/a,a=x/b", "the name 'a' is given twice"),
        ("a=x/a,b=x/b?pooling=max",
         "pooling='max': expected one of auto, mean, cls, pooler (as IEI_POOLING)"),
        ("a=x/a?dtype=fp8",
         "expected one of auto, float32, bfloat16, float16, int8 (as IEI_DTYPE)"),
        ("a=x/a?instances=0", "instances='0': expected 1 to 64"),
        ("a=x/a?colour=red", "unknown option 'colour'"),
        ("a=x/a?pinned=false", "the default (first) model is always pinned"),
        ("a=x/a?pinned=maybe", "pinned='maybe': expected true or false"),
        ("a=x/a,,b=x/b", "empty item"),
        ("a=", "no model"),
        (" ", "names no model"),
        ("-a=x/a", "name '-a' must start with a letter or digit"),
        ("z=x/z,a.b=x/1,a_b=x/2", "would share the Triton model 'iei__a_b'"),
    ],
)  # fmt: skip
def test_bad_lists_are_refused_with_one_line(value, message):
    with pytest.raises(ModelsError) as caught:
        parse_models(value)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_request_names_a_model_by_name_id_or_the_ids_last_part():
    models = parse_models(
        "clip=openai/clip-vit-base-patch32,dino=facebook/dinov2-small,x/dinov2-small"
    )
    assert lookup(models, None).name == "clip"
    assert lookup(models, "").name == "clip"
    assert lookup(models, "dino").name == "dino"
    assert lookup(models, "facebook/dinov2-small").name == "dino"
    assert lookup(models, "clip-vit-base-patch32").name == "clip"
    assert lookup(models, "dinov2-small") is None  # two models end so: neither answers to it
    assert lookup(models, "x/dinov2-small").name == "x/dinov2-small"
    assert lookup(models, "gpt-4") is None


def test_the_one_model_form_keeps_its_names():
    (model,) = single_model("google/vit-base-patch16-224", "vit")
    assert model.name == "vit" and model.default and model.pinned
    assert set(model.aliases) == {"google/vit-base-patch16-224", "vit-base-patch16-224"}


def test_settings_refuse_both_forms_and_take_the_served_name_as_the_defaults(monkeypatch):
    monkeypatch.setenv("IMAGE_EMBEDDING_MODEL", "google/vit-base-patch16-224")
    monkeypatch.setenv("IEI_MODELS", "a=x/a")
    with pytest.raises(ValidationError, match="IEI_MODELS and IMAGE_EMBEDDING_MODEL are both set"):
        ServerSettings()
    monkeypatch.setenv("IMAGE_EMBEDDING_MODEL", "")  # empty = unset
    monkeypatch.setenv("IEI_SERVED_MODEL_NAME", "main")
    settings = ServerSettings()
    assert [m.name for m in settings.served] == ["a"]
    assert "main" in settings.default_model.aliases
    assert settings.public_model_name == "a"
    monkeypatch.setenv("IEI_MODELS", "a=x/a?pooling=max")
    with pytest.raises(ValidationError, match="pooling='max'"):
        ServerSettings()
