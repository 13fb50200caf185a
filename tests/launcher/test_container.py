"""`iei triton`: the container command renders the repository and runs Triton, supervised, with
the arguments `iei serve` uses. A stand-in `tritonserver` on PATH records how it was started
(the real Triton under `iei triton` is in tests/integration/test_compose_topology.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import text_format
from iei.launcher.settings import LauncherSettings
from iei.launcher.triton_process import triton_arguments, triton_command
from stack import IEI
from tritonclient.grpc import model_config_pb2

KIND = model_config_pb2.ModelInstanceGroup

CONTAINER_ENV = {
    "IEI_TRITON_HOST": "0.0.0.0",
    "IEI_TRITON_HTTP_PORT": "8000",
    "IEI_TRITON_GRPC_PORT": "8001",
    "IEI_TRITON_METRICS_PORT": "8002",
}
# Records its argv and environment, prints what a real Triton prints on a CPU host, and fails
# the way a model that cannot load makes it fail.
STAND_IN = """#!{python}
import json, os, sys
with open({record!r}, "w") as f:
    json.dump({{"argv": sys.argv, "env": dict(os.environ)}}, f)
print("Error: Failed to initialize NVML")
print('E1128 18:38:17.348727 1 model_lifecycle.cc:642] "failed to load \\'iei\\' version 1: '
      'Internal: ValueError: the stand-in cannot load\\\\n\\\\nAt:"')
sys.exit(1)
"""


@pytest.fixture
def stand_in(tmp_path) -> Path:
    """A `tritonserver` on PATH (as in the NGC image); the file it writes its start into."""
    bin_dir, record = tmp_path / "bin", tmp_path / "started.json"
    bin_dir.mkdir()
    binary = bin_dir / "tritonserver"
    binary.write_text(STAND_IN.format(python=sys.executable, record=str(record)))
    binary.chmod(0o755)
    return record


def iei_triton(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith("IEI_")},
        **CONTAINER_ENV,
        "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "CUDA_VISIBLE_DEVICES": "-1",  # as the CPU compose variant sets it
        "TMPDIR": str(tmp_path),
        **env,
    }
    return subprocess.run(
        [str(IEI), "triton"], env=environment, capture_output=True, text=True, timeout=60
    )


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


def argument(argv: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    assert len(values) == 1, f"--{name} given {len(values)} times in {argv}"
    return values[0]


def test_iei_triton_runs_triton_on_a_rendered_cpu_repository_and_says_why_it_failed(
    tmp_path, stand_in
):
    result = iei_triton(tmp_path, IEI_TRITON_INSTANCES="3", IEI_DTYPE="bfloat16")
    started = json.loads(stand_in.read_text())
    argv, env = started["argv"], started["env"]
    assert argument(argv, "http-address") == "0.0.0.0"
    assert argument(argv, "http-port") == "8000"
    assert argument(argv, "grpc-port") == "8001"
    assert argument(argv, "metrics-port") == "8002"
    assert argument(argv, "model-control-mode") == "explicit"
    assert argument(argv, "load-model") == "iei"
    # model.py reads its settings from Triton's environment
    assert env["IEI_DTYPE"] == "bfloat16"
    assert env["IMAGE_EMBEDDING_MODEL"] == "google/vit-base-patch16-224"
    # Triton's output reaches the container's log, and the one line says why it stopped.
    assert "Failed to initialize NVML" in result.stdout
    assert result.returncode == 1
    [line] = [line for line in result.stderr.splitlines() if "cannot start" in line]
    assert "model 'iei' failed to load: ValueError: the stand-in cannot load" in line


def test_the_rendered_repository_runs_on_the_cpu_with_the_queue_policy(tmp_path):
    settings = LauncherSettings(triton_instances=3, request_timeout=7, triton_max_queue_size=9)
    repository = settings.render(tmp_path / "repo", gpus=0)
    config = text_format.Parse(
        (repository / "iei" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    assert [(g.kind, g.count) for g in config.instance_group] == [(KIND.KIND_CPU, 3)]
    assert (repository / "iei" / "1" / "model.py").is_file()
    assert (repository / "iei_runtime" / "embedder.py").is_file()
    batching = config.dynamic_batching
    assert (batching.priority_levels, batching.default_priority_level) == (2, 2)
    policy = batching.default_queue_policy
    assert policy.default_timeout_microseconds == 7_000_000
    assert policy.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT
    assert policy.max_queue_size == 9


def test_iei_triton_refuses_a_repository_without_the_model(tmp_path, stand_in):
    (tmp_path / "empty").mkdir()
    result = iei_triton(tmp_path, IEI_MODEL_REPOSITORY=str(tmp_path / "empty"))
    assert result.returncode == 1
    assert "no iei/config.pbtxt" in result.stderr
    assert not stand_in.exists()
