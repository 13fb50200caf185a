"""`iei serve` as a person runs it: clear start-up failures, clean stops."""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from stack import IEI, Stack, free_port

pytestmark = pytest.mark.integration


def serve_output(model: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        **os.environ,
        "IMAGE_EMBEDDING_MODEL": model,
        "IEI_BIND": f"127.0.0.1:{free_port()}",
        "IEI_TRITON_HTTP_PORT": str(free_port()),
        "IEI_TRITON_GRPC_PORT": str(free_port()),
        "IEI_TRITON_METRICS_PORT": str(free_port()),
        "HF_HUB_OFFLINE": "1",
        **env,
    }
    return subprocess.run(
        [str(IEI), "serve"], env=environment, capture_output=True, text=True, timeout=timeout
    )


def assert_one_clear_line(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if "cannot start" in line]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_a_missing_model_folder_fails_at_once(tmp_path):
    result = serve_output(str(tmp_path / "no-such-model"), timeout=20)
    assert_one_clear_line(result, "no-such-model", "no such folder")


def test_a_folder_that_is_no_model_fails_with_one_line(tmp_path):
    result = serve_output(str(tmp_path))
    assert_one_clear_line(result, "IEI cannot load model", str(tmp_path), "model_type")


def test_a_model_that_fails_in_its_own_code_says_why_and_keeps_triton_s_log(model_dirs):
    """The reason is the model's exception, not Triton's harmless NVML warning; the log that the
    first lines name is still there afterwards."""
    result = serve_output(str(model_dirs["convnext"]), IEI_POOLING="cls")
    assert_one_clear_line(result, "IEI cannot load model", "no CLS token", "IEI_POOLING")
    assert "NVML" not in result.stderr.split("cannot start")[1].splitlines()[0]
    [named] = re.findall(r"log: (\S+triton\.log)", result.stderr)
    assert Path(named).is_file() and "no CLS token" in Path(named).read_text()
    assert f"Triton's log is kept: {named}" in result.stderr
    Path(named).unlink()


def test_an_unreachable_hub_model_fails_with_one_line():
    result = serve_output("example-org/no-such-model")
    assert_one_clear_line(result, "IEI cannot load model 'example-org/no-such-model'")


def test_a_model_slower_to_load_than_the_startup_timeout_fails_with_one_line(model_dirs):
    """Loading a model takes seconds (torch import, weights, warm-up); 1 s cannot be enough."""
    triton_port = free_port()
    result = serve_output(
        str(model_dirs["vit"]),
        timeout=60,
        IEI_STARTUP_TIMEOUT="1",
        IEI_TRITON_HTTP_PORT=str(triton_port),
    )
    assert_one_clear_line(result, "not ready after 1 s", "IEI_STARTUP_TIMEOUT")
    with pytest.raises(httpx.ConnectError):  # the Triton it started is gone with it
        httpx.get(f"http://127.0.0.1:{triton_port}/v2/health/live", timeout=2)


def test_invalid_settings_are_named():
    result = serve_output("x", timeout=20, IEI_WORKERS="0", IEI_DTYPE="float8")
    assert result.returncode == 2
    assert "IEI_WORKERS" in result.stderr
    assert "IEI_DTYPE" in result.stderr
    assert "Traceback" not in result.stderr


def test_sigint_stops_triton_and_the_frontend(model_dirs, tmp_path):
    stack = Stack(model_dirs["vit"], tmp_path / "serve.log", IEI_WORKERS="auto").start()
    assert httpx.get(f"{stack.url}/health").status_code == 200
    # the workers counted from the host, and said: 2 where no GPU is visible
    assert re.search(
        r"frontend: (2 worker\(s\) \(auto: no GPU|\d+ worker\(s\) \(auto: \d+ GPU)", stack.log()
    )
    assert stack.stop(signal.SIGINT) == 0  # raises if any process is left behind
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{stack.url}/health")
    leftovers = [p for p in os.listdir("/dev/shm") if p.startswith(f"iei-{stack.process.pid}-")]
    assert not leftovers


def test_version():
    result = subprocess.run([str(IEI), "--version"], capture_output=True, text=True)
    assert result.returncode == 0
    assert result.stdout.startswith("iei ")


def run_example(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run an example script as a user would; it must succeed."""
    command = [sys.executable, script, *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.parametrize(
    "example",
    ["request_example_batch.py", "request_example_concurrent.py"],
)
def test_http_examples_run(vit_stack, example):
    result = run_example(f"examples/{example}", "--url", vit_stack.url)
    assert "embedded 5 images" in result.stdout


@pytest.mark.parametrize(
    "example",
    ["request_example_batch.py", "request_example_concurrent.py", "python_client_example.py",
     "openai_client_example.py", "text_search_example.py"],
)  # fmt: skip
def test_http_examples_say_in_one_line_that_the_service_is_down(example):
    down = f"http://127.0.0.1:{free_port()}"
    command = [sys.executable, f"examples/{example}", "--url", down]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_python_client_example_runs(vit_stack):
    result = run_example("examples/python_client_example.py", "--url", vit_stack.url)
    assert "embedded 6 images -> (6, 32) float32" in result.stdout
    ranking = result.stdout.splitlines()[1:]
    assert ranking[0].split() == ["1.000", "astronaut.jpg"]  # the query itself comes first


def test_openai_client_example_runs(vit_stack):
    result = run_example("examples/openai_client_example.py", "--url", vit_stack.url)
    assert result.stdout.count("norm 1.000") == 4
    assert "embedded 4 images with model" in result.stdout


def test_text_search_example_indexes_and_searches_by_text_and_image(clip_stack, tmp_path):
    from iei.client import IEIClient

    index = tmp_path / "photos.faiss"
    query = "a photo of a cat"
    result = run_example("examples/text_search_example.py", "--url", clip_stack.url,
                         "--query", query, "--index", str(index))  # fmt: skip
    lines = result.stdout.splitlines()
    assert lines[0] == f"indexed 5 images (16 dimensions) in {index}"
    assert index.is_file() and index.with_suffix(".names.json").is_file()
    by_text, by_image = lines[2:5], lines[6:9]
    # FAISS's ranking is the exact cosine ranking of the service's vectors.
    photos = sorted(p for p in Path("examples/images").iterdir() if p.suffix in {".jpg", ".png"})
    with IEIClient(clip_stack.url) as client:
        images, text = client.embed(photos), client.embed_texts([query])[0]
    best = np.argsort(-(images @ text))[:3]
    assert [line.split()[1] for line in by_text] == [photos[i].name for i in best]
    assert [float(line.split()[0]) for line in by_text] == pytest.approx(
        (images @ text)[best], abs=1e-3
    )
    assert by_image[0].split() == ["1.000", "astronaut.jpg"]  # the query image itself first


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_triton_client_example_runs(vit_stack, protocol):
    url = vit_stack.triton_grpc if protocol == "grpc" else vit_stack.triton_http
    result = run_example("examples/triton_client_example.py", "--protocol", protocol, "--url", url)
    assert "4 images -> embeddings of shape (4, 32)" in result.stdout


def test_the_frontend_without_triton_answers_503_json(tmp_path):
    """The real frontend process, with Triton unreachable: clear 503s, never a hang or a 500."""
    port = free_port()
    env = {**os.environ, "IEI_TRITON_URL": f"127.0.0.1:{free_port()}", "IEI_REQUEST_TIMEOUT": "5"}
    command = [sys.executable, "-m", "uvicorn", "iei.server.app:create_app", "--factory",
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    process = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60  # its imports and start-up, on a loaded machine
        while True:
            assert process.poll() is None, "the frontend exited"
            try:
                health = httpx.get(f"{url}/health", timeout=10)
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline, "the frontend never listened"
                time.sleep(0.1)
        assert health.status_code == 503
        assert health.json()["error_type"] == "Unhealthy"
        image = base64.b64encode((Path("examples/images/coffee.jpg")).read_bytes()).decode()
        embed = httpx.post(f"{url}/embed", json={"inputs": image}, timeout=10)
        assert embed.status_code == 503
        assert embed.json()["error_type"] == "Unhealthy"
        openai = httpx.post(f"{url}/v1/embeddings", json={"input": image}, timeout=10)
        assert openai.status_code == 503
        assert openai.json()["error"]["code"] == "Unhealthy"
        assert httpx.get(f"{url}/info").json()["triton"]["ready"] is False
    finally:
        process.terminate()
        process.wait(10)
