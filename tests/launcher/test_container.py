"""`iei triton`: the container command renders the repository and execs Triton with the
arguments `iei serve` uses. Nothing here starts tritonserver: exec is replaced by a recorder."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from google.protobuf import text_format
from iei import cli
from iei.launcher import container
from iei.launcher.settings import LauncherSettings
from iei.launcher.triton_process import triton_arguments, triton_command
from tritonclient.grpc import model_config_pb2

KIND = model_config_pb2.ModelInstanceGroup

CONTAINER_ENV = {
    "IEI_TRITON_HOST": "0.0.0.0",
    "IEI_TRITON_HTTP_PORT": "8000",
    "IEI_TRITON_GRPC_PORT": "8001",
    "IEI_TRITON_METRICS_PORT": "8002",
}


class Exec:
    """Stands in for os.execvpe: records the call instead of replacing the test process."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str], dict[str, str]]] = []

    def __call__(self, file: str, argv: list[str], env: dict[str, str]) -> None:
        self.calls.append((file, list(argv), dict(env)))


@pytest.fixture(autouse=True)
def temporary_folders_in_tmp_path(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the rendered copy goes


@pytest.fixture
def exec_recorder(monkeypatch):
    recorder = Exec()
    monkeypatch.setattr(container.os, "execvpe", recorder)
    return recorder


def argument(argv: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    assert len(values) == 1, f"--{name} given {len(values)} times in {argv}"
    return values[0]


def test_the_command_is_tritonserver_with_the_shared_arguments(tmp_path):
    settings = LauncherSettings(
        **{k.removeprefix("IEI_").lower(): v for k, v in CONTAINER_ENV.items()}
    )
    argv = triton_command(settings, tmp_path)
    assert argv[0] == "tritonserver"
    assert argv[1:] == triton_arguments(
        model_repository=str(tmp_path),
        host="0.0.0.0",
        http_port=8000,
        grpc_port=8001,
        metrics_port=8002,
    )


def test_iei_triton_execs_triton_on_a_rendered_cpu_repository(monkeypatch, exec_recorder):
    for name, value in CONTAINER_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")  # as the CPU compose variant sets it
    monkeypatch.setenv("IEI_TRITON_INSTANCES", "3")
    monkeypatch.setenv("IEI_DTYPE", "bfloat16")

    assert cli.main(["triton"]) == 127  # only reached because exec was replaced

    [(file, argv, env)] = exec_recorder.calls
    assert file == argv[0] == "tritonserver"
    assert argument(argv, "http-address") == "0.0.0.0"
    assert argument(argv, "http-port") == "8000"
    assert argument(argv, "grpc-port") == "8001"
    assert argument(argv, "metrics-port") == "8002"
    repository = Path(argument(argv, "model-repository"))
    config_text = (repository / "iei" / "config.pbtxt").read_text()
    config = text_format.Parse(config_text, model_config_pb2.ModelConfig())
    assert [(g.kind, g.count) for g in config.instance_group] == [(KIND.KIND_CPU, 3)]
    assert (repository / "iei" / "1" / "model.py").is_file()
    # model.py reads its settings from Triton's environment
    assert env["IEI_DTYPE"] == "bfloat16"
    assert env["IMAGE_EMBEDDING_MODEL"] == "google/vit-base-patch16-224"


def test_iei_triton_refuses_a_repository_without_the_model(monkeypatch, tmp_path, exec_recorder):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("IEI_MODEL_REPOSITORY", str(tmp_path / "empty"))
    assert cli.main(["triton"]) == 1
    assert exec_recorder.calls == []


def test_iei_triton_without_tritonserver_fails_with_127(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert cli.main(["triton"]) == 127
