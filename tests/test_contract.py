"""The names Triton, the model and the frontend share are the same everywhere."""

from __future__ import annotations

import re

import pytest
from fake_pb_utils import install
from google.protobuf import text_format
from iei import contract
from iei.launcher.repository import shipped_model_repository
from iei.launcher.settings import LauncherSettings
from tritonclient.grpc import model_config_pb2

DEFAULT_MODEL_REPOSITORY = shipped_model_repository()

CONFIG = DEFAULT_MODEL_REPOSITORY / "iei" / "config.pbtxt"


def committed_config(model: str = contract.MODEL_NAME) -> model_config_pb2.ModelConfig:
    path = DEFAULT_MODEL_REPOSITORY / model / "config.pbtxt"
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


TYPES = model_config_pb2
# model -> its input, and its outputs as (name, type, dims): what the frontend and users rely on.
CONTRACT = {
    contract.MODEL_NAME: (
        contract.INPUT_NAME,
        [(contract.OUTPUT_NAME, TYPES.TYPE_FP32, [-1]),
         (contract.INFO_OUTPUT_NAME, TYPES.TYPE_STRING, [1])],
    ),
    contract.TEXT_MODEL_NAME: (
        contract.TEXT_INPUT_NAME,
        [(contract.OUTPUT_NAME, TYPES.TYPE_FP32, [-1]),
         (contract.TOKENS_OUTPUT_NAME, TYPES.TYPE_INT32, [1])],
    ),
}  # fmt: skip


@pytest.mark.parametrize("model", sorted(CONTRACT))
def test_config_pbtxt_matches_the_contract(model):
    config = committed_config(model)
    input_name, outputs = CONTRACT[model]
    assert config.name == model
    assert config.backend == "python"
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        (input_name, TYPES.TYPE_STRING, [1])
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == outputs
    assert config.max_batch_size >= 1
    assert config.HasField("dynamic_batching")


@pytest.mark.parametrize("model", [contract.MODEL_NAME, contract.TEXT_MODEL_NAME])
def test_committed_configs_are_gpu_deployments(model):
    kinds = {g.kind for g in committed_config(model).instance_group}
    assert kinds == {model_config_pb2.ModelInstanceGroup.KIND_GPU}


def test_both_sides_parse_the_models_input_errors():
    install()
    from iei_runtime import triton

    pattern = re.compile(contract.INVALID_INPUT_PATTERN)
    for name in (triton.INPUT_NAME, triton.TEXT_INPUT_NAME):
        found = pattern.fullmatch(f"{name}[12]: empty text")
        assert found and found.groups() == ("12", "empty text")
    assert not pattern.search("OTHER[1]: no")


def test_the_model_uses_the_same_names_and_formats():
    install()
    from iei_runtime import images, triton

    assert triton.INPUT_NAME == contract.INPUT_NAME
    assert triton.OUTPUT_NAME == contract.OUTPUT_NAME
    assert triton.INFO_OUTPUT_NAME == contract.INFO_OUTPUT_NAME
    assert triton.TEXT_INPUT_NAME == contract.TEXT_INPUT_NAME
    assert triton.TOKENS_OUTPUT_NAME == contract.TOKENS_OUTPUT_NAME
    assert images.IMAGE_FORMATS == contract.IMAGE_FORMATS


def test_both_sides_agree_on_the_execution_clocks():
    install()
    from iei_runtime import executions

    assert executions.CLOCKS_ENV == contract.EXECUTION_CLOCKS_ENV
    assert executions.CLOCK_FORMAT == contract.EXECUTION_CLOCK_FORMAT
    assert executions.SECONDS_METRIC == contract.EXECUTION_SECONDS_METRIC
    assert executions.CORES_METRIC == contract.EXECUTION_CORES_METRIC


def test_both_sides_agree_on_the_restarts_shown_on_tritons_metrics_port():
    install()
    from iei_runtime import triton

    assert triton.RESTARTS_ENV == contract.TRITON_RESTARTS_ENV
    assert triton.RESTARTS_METRIC == contract.RESTARTS_METRIC
    assert (contract.MODEL_NAME, contract.STAGE_MODEL_NAMES[0]) == triton.RESTARTS_SHOWN_BY


@pytest.mark.parametrize("model", [contract.MODEL_NAME, contract.TEXT_MODEL_NAME])
def test_config_defaults_match_the_frontends(model):
    parameters = {k: v.string_value for k, v in committed_config(model).parameters.items()}
    defaults = LauncherSettings.model_fields
    assert parameters["model_id"] == defaults["embedding_model"].default
    assert parameters["dtype"] == defaults["dtype"].default
    assert parameters["forward_batch_size"] == defaults["forward_batch_size"].default
    if model == contract.MODEL_NAME:
        assert parameters["pooling"] == defaults["pooling"].default
        assert int(parameters["max_image_pixels"]) == defaults["max_image_pixels"].default
    else:
        assert int(parameters["max_text_chars"]) == defaults["max_text_chars"].default


def test_the_frontend_never_imports_torch():
    """The request path stays slim: its workers start in a second and its image has no torch."""
    import subprocess
    import sys

    code = "import sys, iei.server.app, iei.cli; "
    code += "print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_model_repository_never_imports_the_frontend():
    for path in DEFAULT_MODEL_REPOSITORY.rglob("*.py"):
        source = path.read_text()
        assert not re.search(r"^\s*(import iei\b|from iei\b)", source, re.M), path
