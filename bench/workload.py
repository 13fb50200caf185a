"""What the benchmark runs on: models built from configs, JPEGs made at bench time, the stack."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "examples" / "images"
REPOSITORY = ROOT / "model_repository"
# `iei serve` by this interpreter: the GPU bundle runs the bench with the host's Python, the
# repository on PYTHONPATH, where no `iei` script was installed beside it.
IEI_SERVE = [sys.executable, "-m", "iei.cli", "serve"]

# google/vit-base-patch16-224's preprocessor_config.json (the hub is not reachable here).
VIT_PROCESSOR = {
    "image_processor_type": "ViTImageProcessor",
    "do_resize": True,
    "size": {"height": 224, "width": 224},
    "resample": 2,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}
# ViTConfig() defaults are ViT-B/16 at 224 px: the real model's cost, with random weights.
MODELS: dict[str, dict[str, int]] = {
    "vit-base": {},
    # Small enough that the forward pass is noise: what is left is the stack's own cost (32 px
    # patches: 49 tokens, a tenth of a millisecond per image on one core).
    "vit-tiny": {
        "patch_size": 32,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    },
}
SIZES = ((500, 375), (1000, 750), (2000, 1500), (4000, 3000))


def build_model(name: str, folder: Path) -> Path:
    """A loadable model folder (config, random weights, the hub's processor settings)."""
    import torch
    from transformers import ViTConfig, ViTModel

    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    model = ViTModel(ViTConfig(**MODELS[name]), add_pooling_layer=False)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(VIT_PROCESSOR, indent=2))
    return folder


def make_jpegs(size: tuple[int, int], seed: int = 0) -> list[bytes]:
    """The sample photos at `size`, as a camera would save them: resized, with sensor-like
    noise (a plain upscale compresses far better than a real photo), quality 90."""
    rng = np.random.default_rng(seed)
    files = []
    for path in sorted(PHOTOS.glob("*.jpg")):
        image = Image.open(path).convert("RGB").resize(size, Image.Resampling.BICUBIC)
        pixels = np.asarray(image, dtype=np.float32)
        pixels += rng.normal(0, 3, pixels.shape).astype(np.float32)
        noisy = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        buffer = io.BytesIO()
        noisy.save(buffer, "JPEG", quality=90)
        files.append(buffer.getvalue())
    return files


def load_model_module() -> Any:
    """The model repository's code (`iei_runtime`) in this process: its decoder, settings and
    Embedder, as the `iei` model runs them.

    Only the Triton wiring touches Triton's utils; an empty stand-in satisfies the import.
    """
    sys.modules.setdefault("triton_python_backend_utils", types.ModuleType("pb_utils"))
    if str(REPOSITORY) not in sys.path:
        sys.path.insert(0, str(REPOSITORY))
    from iei_runtime import embedder, images, loading, resources, settings

    return types.SimpleNamespace(
        stack=embedder.stack,
        read_settings=settings.read_settings,
        resolve_dtype=settings.resolve_dtype,
        cpu_has_native_bf16=settings.cpu_has_native_bf16,
        load_embedder=loading.load_embedder,
        available_cores=resources.available_cores,
        decode_image=images.decode_image,
        draft_side=images.draft_side,
    )


def device() -> Any:
    """Where the service would run the model here: the first GPU, else the CPU."""
    import torch

    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def embedder_for(mm: Any, model_dir: Path, dtype: str) -> Any:
    settings = mm.read_settings({}, {"IMAGE_EMBEDDING_MODEL": str(model_dir), "IEI_DTYPE": dtype})
    return mm.load_embedder(settings, device(), os.cpu_count() or 1)


def preprocessed(mm: Any, embedder: Any, files: list[bytes]) -> Any:
    """The processor's tensors for `files`, batched (what one execution's forward pass gets)."""
    return mm.stack(embedder.prepare(files))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_queue_delay(source: Path, target: Path, delay_us: int) -> Path:
    """A copy of the model repository whose dynamic batcher waits `delay_us`."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    config = target / "iei" / "config.pbtxt"
    text, found = re.subn(
        r"max_queue_delay_microseconds: \d+",
        f"max_queue_delay_microseconds: {delay_us}",
        config.read_text(),
    )
    if found != 1:
        raise RuntimeError(f"no max_queue_delay_microseconds in {config}")
    config.write_text(text)
    return target


class ServedStack:
    """`iei serve` on free loopback ports, as users start it (default settings unless given)."""

    def __init__(self, model_dir: Path, log_path: Path, **env: str) -> None:
        self.port = free_port()
        self.grpc_port = free_port()
        self.log_path = log_path
        self.env = {
            **os.environ,
            "IMAGE_EMBEDDING_MODEL": str(model_dir),
            "IEI_BIND": f"127.0.0.1:{self.port}",
            "IEI_TRITON_HTTP_PORT": str(free_port()),
            "IEI_TRITON_GRPC_PORT": str(self.grpc_port),
            "IEI_TRITON_METRICS_PORT": str(free_port()),
            "HF_HUB_OFFLINE": "1",
            # The bench sends the same photos again and again: it measures the stack's and the
            # model's work, not the content cache's hits.
            "IEI_CACHE_MB": "0",
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def __enter__(self) -> ServedStack:
        command = list(IEI_SERVE)
        self.process = start_server("iei serve", command, self.env, self.log_path, self.url, 300)
        return self

    def __exit__(self, *_: object) -> None:
        stop_server(self.process, 60)


def start_server(
    name: str,
    command: list[str],
    env: dict[str, str],
    log_path: Path,
    url: str,
    timeout: float,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start a server process (output to `log_path`) and wait until `url`/health answers 200;
    raise with the log's path if it exits or stays unhealthy for `timeout` seconds."""
    import httpx

    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited; its log: {log_path}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(process, 10)
    raise RuntimeError(f"{name} not healthy after {timeout:.0f} s; its log: {log_path}")


def stop_server(process: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds."""
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
