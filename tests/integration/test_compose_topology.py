"""The containers' topology on one machine: `iei triton` (Triton supervised, as in its container)
and the frontend alone with IEI_TRITON_URL (as in its container). Triton heals there too."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from iei.launcher.repository import shipped_model_repository
from polling import wait_for
from sample_images import photos
from stack import IEI, descendants, free_port

pytestmark = pytest.mark.integration

FAULT_MODEL = Path(__file__).resolve().parents[1] / "fault_model"
IMAGE = base64.b64encode(photos()["coffee.jpg"]).decode()


def break_trigger() -> str:
    """A valid PNG that carries b"BREAK" (in a text chunk): the sticky fault model's trigger."""
    import io

    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("fault", "BREAK")
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode()


TRIGGER = break_trigger()


@contextmanager
def containers(tmp_path: Path, model: Path, **env: str) -> Iterator[tuple[str, Path, int]]:
    """`iei triton` and a uvicorn frontend; the frontend's URL, Triton's output file and the pid
    of `iei triton`."""
    triton_port, frontend_port = free_port(), free_port()
    environment = {
        **os.environ,
        "IMAGE_EMBEDDING_MODEL": str(model),
        "IEI_DTYPE": "float32",
        "IEI_TRITON_HTTP_PORT": str(triton_port),
        "IEI_TRITON_GRPC_PORT": str(free_port()),
        "IEI_TRITON_METRICS_PORT": str(free_port()),
        "HF_HUB_OFFLINE": "1",
        "IEI_CACHE_MB": "0",  # the probes' load repeats its images: every request reaches Triton
        **env,
    }
    output = tmp_path / "triton.out"
    with open(output, "wb") as out:
        triton = subprocess.Popen(
            [str(IEI), "triton"], env=environment, stdout=out, stderr=subprocess.STDOUT
        )
    frontend = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "iei.server.app:create_app", "--factory",
         "--host", "127.0.0.1", "--port", str(frontend_port)],
        env={**environment, "IEI_TRITON_URL": f"127.0.0.1:{triton_port}"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{frontend_port}"
    tree = descendants(triton.pid)
    try:
        wait_for(lambda: healthy(url), "healthy", 180, every=0.5, log=output.read_text)
        # The frontend may see the model ready a moment before `iei triton` does and starts
        # watching it: the faults below are for a supervised Triton.
        wait_for(lambda: "IEI serving" in output.read_text(), "serving", 30, log=output.read_text)
        tree = descendants(triton.pid)
        yield url, output, triton.pid
    finally:
        frontend.terminate()
        triton.send_signal(signal.SIGTERM)
        assert triton.wait(60) == 0, output.read_text()
        frontend.wait(30)
        assert not [p for p in tree if Path(f"/proc/{p}").exists()], "left behind"


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def embed(url: str, image: str = IMAGE) -> httpx.Response:
    return httpx.post(f"{url}/embed", json={"inputs": [image]}, timeout=30)


def serves(url: str) -> bool:
    return embed(url).status_code == 200


def stub_of(iei_triton: int) -> int:
    [pid] = [
        p for p in descendants(iei_triton)
        if b"triton_python_backend_stub" in Path(f"/proc/{p}/cmdline").read_bytes()
    ]  # fmt: skip
    return pid


def test_iei_triton_restarts_triton_when_the_model_stub_dies(model_dirs, tmp_path):
    with containers(tmp_path, model_dirs["vit"]) as (url, output, iei_triton):
        assert embed(url).status_code == 200
        os.kill(stub_of(iei_triton), signal.SIGKILL)
        killed = time.monotonic()
        down = embed(url)
        assert down.status_code == 503 and down.json()["error_type"] == "Unhealthy"
        wait_for(lambda: serves(url), "served", 60, every=0.5, log=output.read_text)
        back = time.monotonic() - killed
        wait_for(
            lambda: "Triton is serving again" in output.read_text(), "serving again", 10,
            log=output.read_text,
        )  # fmt: skip
        log = output.read_text()
        restart = [line for line in log.splitlines() if "restarting Triton" in line]
        assert restart and "Python stub" in restart[0], log
        print(f"stub killed under iei triton: served again {back:.1f} s later")  # noqa: T201


def test_a_model_stuck_in_errors_is_restarted_within_a_minute(tmp_path):
    model = tmp_path / "unused-model"
    model.mkdir()
    with containers(
        tmp_path,
        model,
        IEI_MODEL_REPOSITORY=str(FAULT_MODEL),
        IEI_TEST_BEHAVIOUR="sticky",
        IEI_TEST_RUNTIME=str(shipped_model_repository()),
    ) as (url, output, _):
        assert embed(url).status_code == 200
        embed(url, TRIGGER)
        broke = time.monotonic()
        broken = embed(url)
        assert broken.status_code == 503, broken.text  # the model fails its probe too
        assert httpx.get(f"{url}/health", timeout=5).status_code == 503
        wait_for(lambda: serves(url), "served", 60, every=0.5, log=output.read_text)
        log = output.read_text()
        assert "probes in a row" in log and "illegal memory access" in log, log
        print(f"sticky model errors: served again {time.monotonic() - broke:.1f} s later")  # noqa: T201
