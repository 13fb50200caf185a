"""The two layouts of the model repository (IEI_TRITON_LAYOUT): which one `auto` picks, and what
the launcher renders for each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import text_format
from iei.contract import MODEL_NAME, STAGE_MODEL_NAMES, TEXT_MODEL_NAME
from iei.launcher import models
from iei.launcher.errors import TritonStartupError
from iei.launcher.repository import (
    ENCODERS_PER_GPU,
    render_model_repository,
    shipped_model_repository,
)
from iei.launcher.settings import LauncherSettings
from tritonclient.grpc import model_config_pb2

KIND = model_config_pb2.ModelInstanceGroup
SHIPPED = shipped_model_repository()


def read(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def model_folder(tmp_path: Path, model_type: str) -> Path:
    folder = tmp_path / model_type
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    return folder


@pytest.mark.parametrize(
    ("requested", "gpus", "model_type", "expected"),
    [
        ("auto", 0, "vit", "single"),  # a CPU host: one process measured faster
        ("auto", 1, "vit", "split"),  # a GPU host: decoding must not starve the device
        ("auto", 1, "siglip2", "single"),  # NaFlex: more than pixel_values crosses
        ("split", 0, "vit", "split"),
        ("single", 1, "vit", "single"),
    ],
)
def test_auto_layout_follows_the_device_and_the_model(
    tmp_path, requested, gpus, model_type, expected
):
    model = model_folder(tmp_path, model_type)
    assert models.model_layout(requested, gpus, str(model), SHIPPED) == expected


def test_the_split_layout_loads_the_ensemble_and_its_steps():
    served = (MODEL_NAME, TEXT_MODEL_NAME)
    assert models.layout_models(served, "single") == served
    assert models.layout_models(served, "split") == (*served, *STAGE_MODEL_NAMES)


def test_the_split_render_makes_iei_the_ensemble_of_its_steps(tmp_path):
    repository = render_model_repository(
        SHIPPED, tmp_path / "repo", gpus=1, instances=None, layout="split",
        preprocess_instances=5, request_timeout=7, max_queue_size=9,
    )  # fmt: skip
    ensemble = read(repository / MODEL_NAME / "config.pbtxt")
    assert ensemble.platform == "ensemble"
    assert [s.model_name for s in ensemble.ensemble_scheduling.step] == list(STAGE_MODEL_NAMES)
    assert not (repository / MODEL_NAME / "1" / "model.py").exists()  # no code: an ensemble
    assert (repository / MODEL_NAME / "1").is_dir()  # the version Triton looks for
    assert [(i.name, i.data_type) for i in ensemble.input] == [("IMAGE", 13)]  # TYPE_STRING
    assert [o.name for o in ensemble.output] == ["EMBEDDING", "MODEL_INFO"]

    preprocess, encoder = (read(repository / m / "config.pbtxt") for m in STAGE_MODEL_NAMES)
    assert [(g.kind, g.count) for g in preprocess.instance_group] == [(KIND.KIND_CPU, 5)]
    # two encoders per GPU: one's CPU work overlaps the other's forward pass
    assert [(g.kind, g.count) for g in encoder.instance_group] == [(KIND.KIND_GPU, 2)]
    assert encoder.instance_group[0].count == ENCODERS_PER_GPU  # as the shm arithmetic counts
    # Both steps queue with priorities (probes first) and drop what waited too long.
    for step in (preprocess, encoder):
        assert step.max_batch_size >= ensemble.max_batch_size
        assert step.dynamic_batching.priority_levels == 2
        assert step.dynamic_batching.default_queue_policy.max_queue_size == 9
    # What crosses between the steps is what each side declares.
    [first, second] = ensemble.ensemble_scheduling.step
    produced = {o.name: (o.data_type, list(o.dims)) for o in preprocess.output}
    consumed = {i.name: (i.data_type, list(i.dims)) for i in encoder.input}
    assert set(first.output_map) == set(produced) and set(second.input_map) == set(consumed)
    assert produced == consumed


def test_iei_triton_instances_sets_the_encoders_per_gpu_and_the_single_layout_keeps_one(tmp_path):
    one = LauncherSettings(triton_layout="split", triton_instances=1)
    repository = one.render(tmp_path / "one", gpus=1, layout="split")
    encoder = read(repository / STAGE_MODEL_NAMES[1] / "config.pbtxt")
    assert [(g.kind, g.count) for g in encoder.instance_group] == [(KIND.KIND_GPU, 1)]
    single = render_model_repository(SHIPPED, tmp_path / "single", gpus=1, instances=None)
    model = read(single / MODEL_NAME / "config.pbtxt")
    assert [(g.kind, g.count) for g in model.instance_group] == [(KIND.KIND_GPU, 1)]


def test_the_split_render_on_a_cpu_host_counts_preprocessing_from_the_cores(tmp_path):
    settings = LauncherSettings(triton_layout="split", triton_instances=2)
    repository = settings.render(tmp_path / "repo", gpus=0, layout="split")
    preprocess, encoder = (read(repository / m / "config.pbtxt") for m in STAGE_MODEL_NAMES)
    assert [g.kind for g in encoder.instance_group] == [KIND.KIND_CPU]
    assert [g.count for g in encoder.instance_group] == [2]
    assert preprocess.instance_group[0].count >= 1


def test_the_single_render_leaves_the_split_models_out(tmp_path):
    repository = render_model_repository(SHIPPED, tmp_path / "repo", gpus=0, instances=None)
    assert read(repository / MODEL_NAME / "config.pbtxt").backend == "python"
    assert (repository / MODEL_NAME / "1" / "model.py").is_file()
    for name in STAGE_MODEL_NAMES:
        assert not (repository / name).exists()
    assert not (repository / MODEL_NAME / "configs").exists()


def test_a_repository_without_the_split_layout_is_refused_by_name(tmp_path):
    source = tmp_path / "source"
    (source / MODEL_NAME / "1").mkdir(parents=True)
    (source / MODEL_NAME / "config.pbtxt").write_text('name: "iei"\nbackend: "python"\n')
    with pytest.raises(TritonStartupError, match="IEI_TRITON_LAYOUT=split"):
        render_model_repository(source, tmp_path / "repo", gpus=0, instances=None, layout="split")


def test_layout_settings_are_checked_by_name():
    with pytest.raises(ValueError, match="triton_layout"):
        LauncherSettings(triton_layout="sideways")
    with pytest.raises(ValueError, match="jpeg_decoder"):
        LauncherSettings(jpeg_decoder="libjpeg")


def test_on_a_cpu_the_batcher_prefers_whole_forward_passes(tmp_path):
    from fake_pb_utils import load_model_module
    from iei.launcher.repository import CPU_FORWARD_BATCH

    load_model_module()  # iei_runtime on sys.path
    from iei_runtime.settings import FORWARD_BATCH_AUTO

    assert FORWARD_BATCH_AUTO["cpu"] == CPU_FORWARD_BATCH
    cpu = render_model_repository(SHIPPED, tmp_path / "cpu", gpus=0, instances=None)
    batching = read(cpu / MODEL_NAME / "config.pbtxt").dynamic_batching
    assert list(batching.preferred_batch_size) == [8, 16, 24, 32, 40, 48, 56, 64]
    gpu = render_model_repository(SHIPPED, tmp_path / "gpu", gpus=1, instances=None)
    assert not read(gpu / MODEL_NAME / "config.pbtxt").dynamic_batching.preferred_batch_size
    chosen = LauncherSettings(forward_batch_size="16").render(tmp_path / "chosen", gpus=1)
    batching = read(chosen / MODEL_NAME / "config.pbtxt").dynamic_batching
    assert list(batching.preferred_batch_size) == [16, 32, 48, 64]


def test_preprocessing_defaults_to_a_process_per_core_within_a_cap_per_gpu(monkeypatch):
    from iei.launcher import repository

    monkeypatch.setattr(repository, "available_cores", lambda _: 96)
    assert repository.default_preprocess_instances(SHIPPED, gpus=1) == 16
    assert repository.default_preprocess_instances(SHIPPED, gpus=4) == 64
    assert repository.default_preprocess_instances(SHIPPED, gpus=0) == 16
    monkeypatch.setattr(repository, "available_cores", lambda _: 8)
    assert repository.default_preprocess_instances(SHIPPED, gpus=1) == 6  # less its 2 encoders
    monkeypatch.setattr(repository, "available_cores", lambda _: 1)
    assert repository.default_preprocess_instances(SHIPPED, gpus=1) == 1
