"""Which addresses a URL may lead to, and which URLs are refused before any connection."""

from __future__ import annotations

import ipaddress

import pytest
from iei.server.fetch import UrlFetcher, is_public
from iei.server.inputs import InvalidInput
from stack import local_http_server

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.216.34", True),
        ("2606:2800:220:1:248:1893:25c8:1946", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("240.0.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
        ("::ffff:93.184.216.34", True),
    ],
)
def test_is_public(address, public):
    assert is_public(ipaddress.ip_address(address)) is public


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.org/a.jpg", "scheme 'ftp' is not allowed"),
        ("file:///etc/passwd", "scheme 'file' is not allowed"),
        ("http:///nohost", "without a host"),
        ("http://user:secret@example.org/a.jpg", "credentials"),
        ("http://127.0.0.1:9/a.jpg", "non-public address"),
        ("http://[::1]:9/a.jpg", "non-public address"),
        ("http://localhost:9/a.jpg", "non-public address"),
        ("http://no-such-host.invalid/a.jpg", "cannot resolve"),
    ],
)
async def test_refused_before_connecting(url, message):
    fetcher = UrlFetcher(allow_private=False, timeout=5, max_bytes=1024, max_redirects=2)
    try:
        with pytest.raises(InvalidInput, match=message):
            await fetcher.fetch(url)
    finally:
        await fetcher.close()


@pytest.fixture(scope="module")
def local_server():
    """Redirect loops, a slow answer and a large file on 127.0.0.1."""
    import http.server
    import time

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/loop"):
                self.send_response(302)
                self.send_header("Location", f"/loop{len(self.path)}")
                self.end_headers()
            elif self.path == "/slow":
                time.sleep(2)
                self.send_response(200)
                self.end_headers()
            else:
                body = b"x" * 5000
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

    with local_http_server(Handler) as url:
        yield url


@pytest.mark.parametrize(
    ("path", "options", "message"),
    [
        ("/loop", {"max_redirects": 2}, "more than 2 redirects"),
        ("/slow", {"timeout": 0.5}, "longer than 0.5 s"),
        ("/file", {"max_bytes": 4096}, "larger than 4096 bytes"),
    ],
)
async def test_limits_of_a_fetch(local_server, path, options, message):
    settings = {"allow_private": True, "timeout": 5.0, "max_bytes": 1 << 20, "max_redirects": 5}
    fetcher = UrlFetcher(**{**settings, **options})
    try:
        with pytest.raises(InvalidInput, match=message):
            await fetcher.fetch(local_server + path)
        if path == "/file":
            fetcher.max_bytes = 5000
            assert await fetcher.fetch(local_server + path) == b"x" * 5000
    finally:
        await fetcher.close()
