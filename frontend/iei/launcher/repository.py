"""The model repository Triton loads: where IEI's copy is, and its rendering for this machine."""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from ..contract import MODEL_NAME
from .errors import TritonStartupError

# The package's folder, frontend/iei in a checkout, site-packages/iei in a wheel install.
_PACKAGE = Path(__file__).resolve().parents[1]


def shipped_model_repository() -> Path:
    """The repository IEI ships: inside the package in a wheel (pyproject.toml maps it there),
    the checkout's `model_repository/` in an editable install or a checkout."""
    packaged = _PACKAGE / "model_repository"
    return packaged if packaged.is_dir() else _PACKAGE.parents[1] / "model_repository"


def gpu_count() -> int:
    """GPUs this process may use, without importing CUDA libraries."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "none", "void"):
        return 0
    devices = len(glob.glob("/dev/nvidia[0-9]*"))
    if visible:
        return min(devices, len(visible.split(",")))
    return devices


def render_model_repository(
    source: Path, target: Path, *, gpus: int, instances: int | None
) -> Path:
    """Copy the model repository, with instance groups for this machine in every model's
    config (`iei`, `iei_text`, ...).

    The committed configs are GPU deployments; without a GPU Triton would refuse them, so the
    copy runs their instances on the CPU.
    """
    if not (source / MODEL_NAME / "config.pbtxt").is_file():
        raise TritonStartupError(f"no {MODEL_NAME}/config.pbtxt in model repository {source}")
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    for config_path in sorted(target.glob("*/config.pbtxt")):
        config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
        if gpus == 0:
            del config.instance_group[:]
            config.instance_group.add(
                count=instances or 1, kind=model_config_pb2.ModelInstanceGroup.KIND_CPU
            )
        elif instances:
            for group in config.instance_group:
                group.count = instances
        config_path.write_text(text_format.MessageToString(config))
    return target
