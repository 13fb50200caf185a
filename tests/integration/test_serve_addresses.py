"""`iei serve` with Triton on IPv6 and behind a proxy of the environment."""

from __future__ import annotations

import base64
import socket

import httpx
import pytest
from sample_images import photos
from stack import Stack, free_port

pytestmark = pytest.mark.integration


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback (::1) on this machine")
def test_triton_on_the_ipv6_wildcard_behind_a_dead_proxy(model_dirs, tmp_path):
    """IEI_TRITON_HOST=:: binds Triton on IPv6 (dialled on ::1); every proxy variable points at
    a dead port, and the launcher's and the frontend's loopback calls must not use it."""
    dead = f"http://127.0.0.1:{free_port()}"
    proxies = {name: dead for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")}
    stack = Stack(
        model_dirs["vit"], tmp_path / "serve.log", IEI_TRITON_HOST="::", NO_PROXY="",
        no_proxy="", **proxies,
    )  # fmt: skip
    stack.start()  # raises with the log if Triton is never seen ready
    try:
        with httpx.Client(timeout=30, trust_env=False) as client:
            image = base64.b64encode(next(iter(photos().values()))).decode()
            answer = client.post(f"{stack.url}/embed", json={"inputs": [image]})
            assert answer.status_code == 200, answer.text
            ready = f"http://[::1]:{stack.triton_http_port}/v2/health/ready"
            assert client.get(ready).status_code == 200
        assert f"Triton HTTP [::1]:{stack.triton_http_port}" in stack.log()
    finally:
        assert stack.stop() == 0
