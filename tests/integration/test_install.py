"""Installs as users make them: the client alone from the wheel into a fresh environment, and
the whole wheel without `-e`, serving from another folder."""

from __future__ import annotations

import base64
import subprocess

import httpx
import numpy as np
import pytest
from iei.client import IEIClient
from sample_images import PHOTOS_DIR
from stack import Stack
from wheels import build_wheel, constraints_of_this_environment, fresh_environment, pip_install

pytestmark = pytest.mark.integration

PHOTOS = sorted(p for p in PHOTOS_DIR.iterdir() if p.suffix in {".jpg", ".png"})


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def test_the_client_alone_installs_and_embeds_against_the_stack(wheel, vit_stack, tmp_path):
    python = fresh_environment(tmp_path / "venv")
    pip_install(python, "-c", str(constraints_of_this_environment(tmp_path / "c.txt")), str(wheel))
    iei = python.parent / "iei"

    # The base install has none of the server's packages: they cannot be imported at all.
    code = "import importlib.util as u; print([m for m in ('fastapi', 'tritonclient', 'torch', "
    code += "'pydantic', 'uvicorn') if u.find_spec(m)])"
    assert subprocess.run([python, "-c", code], capture_output=True, text=True).stdout == "[]\n"

    out = tmp_path / "photos.jsonl"
    embed = subprocess.run(
        [iei, "embed", str(PHOTOS_DIR), "--out", str(out), "--url", vit_stack.url,
         "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert embed.returncode == 0, embed.stderr
    with IEIClient(vit_stack.url) as client:  # this environment's client, same stack
        expected = dict(zip(map(str, PHOTOS), client.embed(PHOTOS), strict=True))
    written = {
        record["path"]: np.asarray(record["embedding"], dtype=np.float32)
        for record in map(__import__("json").loads, out.read_text().splitlines())
    }
    assert set(written) == set(expected)
    for path, vector in written.items():
        np.testing.assert_allclose(vector, expected[path], atol=1e-6)

    serve = subprocess.run([iei, "serve"], capture_output=True, text=True, timeout=60)
    assert serve.returncode == 2
    assert "needs the serve extra" in serve.stderr and "pip install 'iei[serve]'" in serve.stderr
    assert "Traceback" not in serve.stderr


def test_the_whole_wheel_without_e_serves_from_another_folder(
    wheel, model_dirs, vit_stack, tmp_path
):
    python = fresh_environment(tmp_path / "venv", borrow_packages=True)
    pip_install(python, "--no-deps", str(wheel))
    where = subprocess.run(
        [python, "-c", "import iei.launcher.repository as r; print(r.shipped_model_repository())"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert where.startswith(str(tmp_path / "venv")), where  # the wheel's copy, not this checkout's

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    stack = Stack(
        model_dirs["vit"], tmp_path / "serve.log", iei=python.parent / "iei", cwd=elsewhere
    ).start()
    try:
        image = base64.b64encode(PHOTOS[0].read_bytes()).decode()
        response = httpx.post(f"{stack.url}/embed", json={"inputs": [image]}, timeout=60)
        assert response.status_code == 200, response.text
        reference = httpx.post(f"{vit_stack.url}/embed", json={"inputs": [image]}, timeout=60)
        np.testing.assert_allclose(response.json(), reference.json(), atol=1e-5)
    finally:
        assert stack.stop() == 0, stack.log()
