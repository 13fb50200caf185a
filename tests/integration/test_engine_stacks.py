"""Engines through the real stack: int8 on ONNX Runtime, the export cached across restarts, and a
choice the machine cannot run refused at start with one line."""

from __future__ import annotations

import base64
import os
import subprocess

import httpx
import numpy as np
import pytest
from reference import Reference, cosine_rows
from sample_images import photos
from stack import IEI, Stack, free_port

pytestmark = pytest.mark.integration


def embed(stack: Stack, files: list[bytes]) -> np.ndarray:
    inputs = [base64.b64encode(f).decode() for f in files]
    response = httpx.post(f"{stack.url}/embed", json={"inputs": inputs}, timeout=120)
    assert response.status_code == 200, response.text
    return np.asarray(response.json())


def test_int8_serves_vectors_near_float32_and_a_restart_reuses_the_export(model_dirs, tmp_path):
    files = list(photos().values())
    cache = tmp_path / "cache"
    env = {"IEI_DTYPE": "int8", "IEI_ENGINE_CACHE": str(cache)}
    stack = Stack(model_dirs["vit"], tmp_path / "first.log", **env).start()
    try:
        info = httpx.get(f"{stack.url}/info", timeout=30).json()
        assert (info["engine"], info["dtype"]) == ("onnxruntime", "int8")
        vectors = embed(stack, files)
    finally:
        assert stack.stop() == 0, stack.log()
    expected = Reference(model_dirs["vit"]).embed(files)
    assert cosine_rows(vectors, expected).min() >= 0.99

    [entry] = [p for p in cache.rglob("image-onnxruntime-int8-*") if p.is_dir()]
    exported_at = (entry / "done").stat().st_mtime_ns
    again = Stack(model_dirs["vit"], tmp_path / "second.log", **env).start()
    try:
        np.testing.assert_allclose(embed(again, files), vectors, atol=1e-5)
    finally:
        assert again.stop() == 0, again.log()
    assert (entry / "done").stat().st_mtime_ns == exported_at  # not exported again
    assert [p for p in cache.rglob("image-onnxruntime-int8-*") if p.is_dir()] == [entry]


def test_a_choice_the_machine_cannot_run_stops_start_up_with_one_line(model_dirs):
    environment = {
        **os.environ,
        "IMAGE_EMBEDDING_MODEL": str(model_dirs["vit"]),
        "IEI_ENGINE": "onnxruntime",
        "IEI_DTYPE": "bfloat16",
        "IEI_BIND": f"127.0.0.1:{free_port()}",
        "IEI_TRITON_HTTP_PORT": str(free_port()),
        "IEI_TRITON_GRPC_PORT": str(free_port()),
        "IEI_TRITON_METRICS_PORT": str(free_port()),
        "HF_HUB_OFFLINE": "1",
    }
    result = subprocess.run(
        [str(IEI), "serve"], env=environment, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    [line] = [line for line in result.stderr.splitlines() if "cannot start" in line]
    assert "IEI_ENGINE=onnxruntime IEI_DTYPE=bfloat16" in line and "no bfloat16 kernels" in line
    assert "Traceback" not in result.stderr
