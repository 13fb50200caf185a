"""Where `iei serve` binds and dials Triton and the frontend (IPv4, IPv6, wildcards), and that its
own loopback calls never go through a proxy of the environment."""

from __future__ import annotations

import asyncio
import http.server
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from iei import settings as table
from iei.launcher.frontend import Frontend
from iei.launcher.settings import LauncherSettings
from iei.launcher.triton_process import TritonServer, triton_arguments
from pydantic import ValidationError


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in list(os.environ):
        if name.startswith("IEI_") or name == "IMAGE_EMBEDDING_MODEL":
            monkeypatch.delenv(name)


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again: nothing answers there


@pytest.fixture
def dead_proxy(monkeypatch):
    """Every proxy variable points at a port where nothing listens."""
    proxy = f"http://127.0.0.1:{dead_port()}"
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY",
                 "all_proxy"):  # fmt: skip
        monkeypatch.setenv(name, proxy)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)


class AlwaysReady(http.server.BaseHTTPRequestHandler):
    """Triton's readiness and inference routes, and the frontend's /health: all 200."""

    def do_GET(self) -> None:
        self._ok()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._ok()

    def _ok(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def ready_server(host: str) -> Iterator[int]:
    """AlwaysReady on `host` (IPv4 or IPv6), on a free port; the port."""

    class Server(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    server = Server((host, 0), AlwaysReady)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback (::1) here")


@pytest.mark.parametrize(
    ("host", "endpoint", "http_address", "grpc_address"),
    [
        ("127.0.0.1", "127.0.0.1:8100", "127.0.0.1", "127.0.0.1"),
        ("0.0.0.0", "127.0.0.1:8100", "0.0.0.0", "0.0.0.0"),
        ("192.0.2.7", "192.0.2.7:8100", "192.0.2.7", "192.0.2.7"),  # an interface: dialled
        ("::", "[::1]:8100", "ipv6:::", "[::]"),
        ("::1", "[::1]:8100", "ipv6:::1", "[::1]"),
        ("[::1]", "[::1]:8100", "ipv6:::1", "[::1]"),
        ("fd00::2", "[fd00::2]:8100", "ipv6:fd00::2", "[fd00::2]"),
    ],
)  # fmt: skip
def test_triton_is_bound_as_its_flags_take_the_address_and_dialled_where_it_listens(
    tmp_path, host, endpoint, http_address, grpc_address
):
    settings = LauncherSettings(triton_host=host, triton_metrics_port=8102)
    assert settings.triton_endpoint == endpoint  # what the frontend is given
    assert settings.triton_metrics_endpoint == endpoint.replace(":8100", ":8102")
    assert TritonServer(settings, tmp_path).url == f"http://{endpoint}"
    flags = triton_arguments(
        model_repository="/r", host=settings.triton_host, http_port=1, grpc_port=2, metrics_port=3
    )
    assert f"--http-address={http_address}" in flags
    assert f"--metrics-address={http_address}" in flags
    assert f"--grpc-address={grpc_address}" in flags


def test_a_triton_url_still_wins_over_the_host():
    settings = LauncherSettings(triton_host="::", triton_url="triton:8000")
    assert settings.triton_endpoint == "triton:8000"
    assert settings.triton_metrics_endpoint is None  # someone else's: IEI_TRITON_METRICS_URL


@pytest.mark.parametrize("host", ["localhost", "triton.internal", "fe80::1%eth0", "[::1]:8100"])
def test_a_triton_host_that_triton_cannot_bind_is_refused_with_one_line(monkeypatch, caplog, host):
    """Triton reads a name as IPv4 and binds 255.255.255.255: refused before anything starts."""
    monkeypatch.setenv("IEI_TRITON_HOST", host)
    with pytest.raises(ValidationError):
        LauncherSettings()
    with pytest.raises(SystemExit):
        table.load(LauncherSettings)
    [line] = caplog.messages
    assert line.startswith("invalid setting IEI_TRITON_HOST: ")


@pytest.mark.parametrize(
    ("bind", "url"),
    [("0.0.0.0:8000", "http://127.0.0.1:8000"), ("[::]:8000", "http://[::1]:8000"),
     ("[::1]:8000", "http://[::1]:8000"), ("192.0.2.7:8000", "http://192.0.2.7:8000")],
)  # fmt: skip
def test_the_frontend_is_dialled_where_it_listens(tmp_path, bind, url):
    frontend = Frontend(LauncherSettings(bind=bind), "127.0.0.1:1", tmp_path)
    assert frontend.local_url == url


@pytest.mark.parametrize(
    ("bound", "listening"),
    [("127.0.0.1", "127.0.0.1"), pytest.param("::", "::1", marks=needs_ipv6)],
)
def test_readiness_and_probes_ignore_the_proxy_variables(
    tmp_path, monkeypatch, dead_proxy, bound, listening
):
    """Behind a corporate proxy (HTTP_PROXY set, loopback not in NO_PROXY) the launcher still
    sees Triton ready and its probes answered."""
    with ready_server(listening) as port:
        settings = LauncherSettings(triton_host=bound, triton_http_port=port)
        triton = TritonServer(settings, tmp_path)
        monkeypatch.setattr(triton, "running", lambda: True)
        triton.wait_ready(timeout=5.0)
        assert triton.probe() is None


def test_the_frontend_s_health_is_polled_without_the_proxy(tmp_path, monkeypatch, dead_proxy):
    with ready_server("127.0.0.1") as port:
        frontend = Frontend(LauncherSettings(bind=f"127.0.0.1:{port}"), "127.0.0.1:1", tmp_path)
        monkeypatch.setattr(frontend, "running", lambda: True)
        frontend.wait_healthy(5.0, lambda: False)


def test_the_frontend_s_triton_client_ignores_the_proxy_variables(dead_proxy):
    """tritonclient's aio client (aiohttp) does not read them; kept so by this test."""
    from iei.server.triton_client import TritonClient

    async def ready(port: int) -> bool:
        client = TritonClient(f"127.0.0.1:{port}", concurrency_level=1, timeout=5.0)
        await client.open()
        try:
            return bool(await client.server.is_server_ready())
        finally:
            await client.close()

    with ready_server("127.0.0.1") as port:
        assert asyncio.run(ready(port))


@pytest.mark.parametrize(
    ("bind", "triton_host", "clash"),
    [("0.0.0.0:8100", "127.0.0.1", True), ("127.0.0.1:8100", "0.0.0.0", True),
     ("[::]:8100", "127.0.0.1", True), ("localhost:8100", "127.0.0.1", True),
     ("127.0.0.1:8100", "127.0.0.1", True), ("127.0.0.2:8100", "127.0.0.1", False),
     ("[::1]:8100", "127.0.0.1", False), ("127.0.0.1:8000", "127.0.0.1", False)],
)  # fmt: skip
def test_the_frontend_clashes_with_triton_only_where_both_would_listen(bind, triton_host, clash):
    """Equal port numbers on two addresses of this host are two listeners, not a clash."""
    settings = LauncherSettings(bind=bind, triton_host=triton_host)
    assert (settings.frontend_port_clash() is not None) == clash


@contextmanager
def answering(body: bytes, content_type: str = "application/json") -> Iterator[tuple[int, list]]:
    """A server on 127.0.0.1 that answers every GET and POST 200 with `body`; its port and the
    paths asked."""
    asked: list[str] = []

    class Handler(AlwaysReady):
        def _ok(self) -> None:
            asked.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield int(server.server_address[1]), asked
    finally:
        server.shutdown()
        server.server_close()


class IdleTriton:
    """What the idle unloader needs of the launcher's TritonServer."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.plans = ()

    def watch_stubs(self, ready: set[str]) -> None:
        pass


def test_the_idle_unloader_reaches_triton_without_the_proxy(dead_proxy):
    """IEI_MODEL_IDLE_UNLOAD and IEI_MAX_LOADED_MODELS went through HTTP_PROXY: behind a
    corporate proxy nothing was ever unloaded (a debug line said so)."""
    from iei.launcher.idle import IdleUnloader

    with answering(b"[]") as (port, asked):
        IdleUnloader(IdleTriton(port), 60.0).check()  # type: ignore[arg-type]
    assert asked == ["/v2/repository/index"]


def test_an_answer_that_is_not_triton_s_does_not_stop_the_stack(caplog):
    """A proxy's HTML page (or anything else that is no JSON) raised out of the check, and out of
    `iei serve`'s loop, which stopped the stack."""
    from iei.launcher.idle import IdleUnloader

    with answering(b"<html>a proxy's page</html>", "text/html") as (port, asked):
        IdleUnloader(IdleTriton(port), 60.0).check()  # type: ignore[arg-type]
    assert asked == ["/v2/repository/index"]
    assert "idle check skipped: Triton's answer could not be read" in caplog.text


def test_the_frontend_reads_triton_s_metrics_without_the_proxy(dead_proxy):
    """/health's evidence of a long execution (Triton's metrics page) went through HTTP_PROXY."""
    from iei.server.triton_client import TritonClient

    page = b'iei_execution_seconds{model="iei",instance="iei_0_0"} 12\n'

    async def executions(port: int):
        client = TritonClient(
            "127.0.0.1:1", concurrency_level=1, timeout=5.0, metrics_endpoint=f"127.0.0.1:{port}"
        )
        await client.open()
        try:
            return await client._executions("iei")
        finally:
            await client.close()

    with answering(page, "text/plain") as (port, asked):
        read = asyncio.run(executions(port))
    assert asked == ["/metrics"]
    assert read is not None and read[1] == {"iei_0_0": (12.0, 0.0)}
