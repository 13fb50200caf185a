"""The model's memory and threads have bounds that do not depend on what a request carries."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import httpx
import pytest
from PIL import Image
from stack import Stack, descendants

pytestmark = pytest.mark.integration


def status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise KeyError(key)


def stub_pid(stack: Stack) -> int:
    [pid] = [
        p for p in descendants(stack.process.pid)
        if b"triton_python_backend_stub" in Path(f"/proc/{p}/cmdline").read_bytes()
    ]  # fmt: skip
    return pid


def test_sixteen_flat_49_megapixel_pngs_stay_within_the_decoding_budget(model_dirs, tmp_path):
    """16 flat 7000x7000 PNGs (2.5 MB of base64 in one request, each under the 50 MP limit)
    drove the model's process 6 GB up when the whole batch was decoded at full size first.
    With each image shrunk right after decoding and a budget of 100 MP decoded at once, the
    peak grows by about 8 bytes a budgeted pixel at most."""
    buffer = io.BytesIO()
    Image.new("RGB", (7000, 7000), (120, 30, 200)).save(buffer, format="PNG", compress_level=1)
    image = base64.b64encode(buffer.getvalue()).decode()
    stack = Stack(
        model_dirs["vit"], tmp_path / "serve.log", IEI_DECODE_PIXEL_BUDGET="100000000"
    ).start()
    try:
        stub = stub_pid(stack)
        before = status(stub, "VmHWM")  # KiB: the peak resident size so far
        response = httpx.post(f"{stack.url}/embed", json={"inputs": [image] * 16}, timeout=300)
        assert response.status_code == 200, response.text
        grown_mib = (status(stub, "VmHWM") - before) / 1024
        assert grown_mib < 8 * 100 + 200, f"the model's peak grew by {grown_mib:.0f} MiB"
        print(f"16 x 49 MP PNGs: the model's peak resident size grew by {grown_mib:.0f} MiB")  # noqa: T201
        # Threads: a decode thread each and one torch team for the forward pass, per core
        # (each decode thread running a torch team of its own made it threads x cores).
        cores = len(os.sched_getaffinity(0))
        assert status(stub, "Threads") <= 2 * cores + 12, status(stub, "Threads")
    finally:
        assert stack.stop() == 0, stack.log()
