"""Several models in Triton (IEI_MODELS): the rendered repository, what loads at start, the stub
watch across unloads, and the model reading its own settings from its config."""

from __future__ import annotations

import sys
from pathlib import Path

from google.protobuf import text_format
from iei.launcher.repository import PARAMETERS_FIRST, shipped_model_repository
from iei.launcher.serve import idle_unloader
from iei.launcher.settings import LauncherSettings
from iei.launcher.triton_process import TritonServer, model_plans, startup_models
from tritonclient.grpc import model_config_pb2

SHIPPED = shipped_model_repository()
KIND = model_config_pb2.ModelInstanceGroup


def read(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def folders(tmp_path: Path) -> dict[str, str]:
    made = {}
    for name, model_type in (("first", "vit"), ("dino", "dinov2"), ("clip", "clip")):
        folder = tmp_path / name
        folder.mkdir()
        text = '{"model_type": "clip", "text_config": {}, "vision_config": {}}'
        (folder / "config.json").write_text(
            text if model_type == "clip" else f'{{"model_type": "{model_type}"}}'
        )
        made[name] = str(folder)
    return made


def settings_for(tmp_path: Path, **options: object) -> LauncherSettings:
    paths = folders(tmp_path)
    # CLIP keeps its joint space (auto) under a global `mean`, which would leave it without texts.
    models = (
        f"{paths['first']},dino={paths['dino']}?pooling=cls&instances=2,"
        f"clip={paths['clip']}?pooling=auto"
    )
    return LauncherSettings(models=models, pooling="mean", dtype="float32", **options)


def test_each_model_gets_its_own_triton_models_and_settings(tmp_path):
    settings = settings_for(tmp_path)
    plans = model_plans(settings, gpus=0)
    assert [p.triton_models for p in plans] == [
        ("iei",),
        ("iei__dino",),
        ("iei__clip", "iei__clip_text"),
    ]
    repository = settings.render(tmp_path / "repo", gpus=0, models=plans)
    first, dino, clip_text = (read(repository / n / "config.pbtxt") for n in
                              ("iei", "iei__dino", "iei__clip_text"))  # fmt: skip
    assert (dino.name, clip_text.name) == ("iei__dino", "iei__clip_text")
    assert dino.parameters["pooling"].string_value == "cls"  # its own
    assert first.parameters["pooling"].string_value == "mean"  # the global one
    assert dino.parameters["dtype"].string_value == "float32"
    assert dino.parameters["model_id"].string_value == str(tmp_path / "dino")
    assert dino.parameters[PARAMETERS_FIRST].string_value == "true"
    assert [(g.kind, g.count) for g in dino.instance_group] == [(KIND.KIND_CPU, 2)]
    assert [(g.kind, g.count) for g in first.instance_group] == [(KIND.KIND_CPU, 1)]
    assert (repository / "iei__dino" / "1" / "model.py").is_file()


def test_a_models_own_pooling_decides_whether_it_serves_texts(tmp_path):
    paths = folders(tmp_path)
    settings = LauncherSettings(models=f"a={paths['clip']},b={paths['clip']}?pooling=mean")
    plans = model_plans(settings, gpus=0)
    assert [p.triton_models for p in plans] == [("iei", "iei_text"), ("iei__b",)]


def test_the_split_layout_is_per_model_with_its_own_steps(tmp_path):
    settings = settings_for(tmp_path, triton_layout="split")
    plans = model_plans(settings, gpus=0)
    assert plans[1].triton_models == ("iei__dino_preprocess", "iei__dino_encoder", "iei__dino")
    repository = settings.render(tmp_path / "repo", gpus=0, models=plans)
    ensemble = read(repository / "iei__dino" / "config.pbtxt")
    assert ensemble.platform == "ensemble"
    assert [s.model_name for s in ensemble.ensemble_scheduling.step] == [
        "iei__dino_preprocess", "iei__dino_encoder"
    ]  # fmt: skip
    assert not (repository / "iei__dino" / "1" / "model.py").exists()
    assert (
        read(repository / "iei__dino_encoder" / "config.pbtxt").parameters["pooling"].string_value
        == "cls"
    )


def test_with_idle_unload_only_pinned_models_load_at_start(tmp_path):
    plans = model_plans(settings_for(tmp_path), gpus=0)
    every = ("iei", "iei__dino", "iei__clip", "iei__clip_text")
    assert startup_models(plans, None) == every
    assert startup_models(plans, 30.0) == ("iei",)  # the default is always pinned


def test_the_stubs_of_an_unloaded_model_are_no_crash(tmp_path, monkeypatch):
    server = TritonServer(LauncherSettings(), tmp_path)
    monkeypatch.setattr(server, "running", lambda: True)
    server.next_probe = float("inf")
    server.stubs = {2**22 + 1: "iei__dino", 1: "iei"}  # the first pid does not exist
    problem = server.problem()
    assert problem is not None and problem.reason == "stub_died" and "iei__dino" in str(problem)
    server.forget_stubs(["iei__dino"])
    assert server.problem() is None


def test_a_rendered_config_comes_before_the_environment():
    sys.path.insert(0, str(SHIPPED))
    from iei_runtime.settings import read_settings

    config = {"parameters": {
        "model_id": {"string_value": "/models/dino"}, "pooling": {"string_value": "cls"},
        PARAMETERS_FIRST: {"string_value": "true"},
    }}  # fmt: skip
    environ = {"IMAGE_EMBEDDING_MODEL": "/models/default", "IEI_POOLING": "mean",
               "IEI_DTYPE": "float32"}  # fmt: skip
    own = read_settings(config, environ)
    assert (own.model_id, own.pooling, own.dtype) == ("/models/dino", "cls", "float32")
    del config["parameters"][PARAMETERS_FIRST]  # a config not rendered: the environment first
    assert read_settings(config, environ).model_id == "/models/default"


def test_idle_unload_with_every_model_pinned_warns_and_watches_nothing(tmp_path, caplog):
    paths = folders(tmp_path)
    for models, unloads in (
        (paths["first"], False),
        (f"{paths['first']},dino={paths['dino']}", True),
        (f"{paths['first']},dino={paths['dino']}?pinned=true", False),
    ):
        settings = LauncherSettings(models=models, model_idle_unload=30.0)
        caplog.clear()
        unloader = idle_unloader(TritonServer(settings, tmp_path), settings, None)
        assert (unloader is not None) == unloads, models
        warned = "nothing will be unloaded" in caplog.text
        assert warned == (not unloads), caplog.text
