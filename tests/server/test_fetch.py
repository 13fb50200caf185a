"""Which addresses a URL may lead to, and which URLs are refused before any connection."""

from __future__ import annotations

import ipaddress

import pytest
from iei.server.errors import ApiError
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
        # An IPv4 address inside an IPv6 one is judged by that IPv4 address.
        ("64:ff9b::7f00:1", False),  # NAT64 (well-known prefix) to 127.0.0.1
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 to the cloud metadata address
        ("64:ff9b::5db8:d822", True),  # NAT64 to a public address
        ("64:ff9b:1::c0a8:101", False),  # NAT64 (local-use prefix) to 192.168.1.1
        ("2002:c0a8:101::1", False),  # 6to4 of 192.168.1.1
        ("2002:5db8:d822::1", True),  # 6to4 of a public address
        ("2001:0:5db8:d822:0:ffff:80ff:fffe", False),  # Teredo; client 127.0.0.1 (inverted)
        ("::7f00:1", False),  # IPv4-compatible 127.0.0.1
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
        ("http://example.com:99999/x.jpg", "malformed URL: Port out of range"),
        ("http://example.com:abc/x.jpg", "malformed URL"),
        ("http://[::1/x.jpg", "malformed URL: Invalid IPv6 URL"),
        ("http://:80/x.jpg", "without a host"),
        ("http://@example.com/x.jpg", "credentials"),
        ("http://example.com:0/x.jpg", "port 0"),
        ("http://exa mple.com/x.jpg", "white space"),
        ("http://[64:ff9b::7f00:1]:9/x.jpg", "non-public address"),
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
def redirecting_server():
    """`/to/<n>` redirects to BAD_TARGETS[n], a Location that is no valid URL."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", BAD_TARGETS[int(self.path.removeprefix("/to/"))])
            self.send_header("Content-Length", "0")
            self.end_headers()

    with local_http_server(Handler) as url:
        yield url


BAD_TARGETS = ["http://example.com:99999/x.jpg", "http://[::1/x.jpg", "ftp://x/y", "http://:1/"]


@pytest.mark.parametrize("target", range(len(BAD_TARGETS)), ids=BAD_TARGETS)
async def test_a_bad_redirect_target_is_refused_with_the_reason(redirecting_server, target):
    fetcher = UrlFetcher(allow_private=True, timeout=5, max_bytes=1024, max_redirects=2)
    try:
        # httpx itself refuses some Locations before we see them ("Invalid URL in location
        # header"): a 422 that says so either way.
        with pytest.raises(InvalidInput, match=r"redirects to a bad target|location header"):
            await fetcher.fetch(f"{redirecting_server}/to/{target}")
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


async def test_the_fetches_of_a_request_share_its_byte_budget(local_server):
    fetcher = UrlFetcher(allow_private=True, timeout=5, max_bytes=1 << 20, max_redirects=2)
    try:
        budget = fetcher.request_budget(8000)
        assert await fetcher.fetch(local_server + "/file", budget) == b"x" * 5000
        with pytest.raises(InvalidInput, match="more than 8000 bytes together"):
            await fetcher.fetch(local_server + "/file", budget)  # 10000 > 8000 for the request
        budget.release()
        assert fetcher.budget.used == 0  # every byte is given back when the request ends
    finally:
        await fetcher.close()


async def test_the_fetches_of_a_worker_share_its_byte_budget(local_server):
    fetcher = UrlFetcher(
        allow_private=True, timeout=5, max_bytes=1 << 20, max_redirects=2, worker_max_bytes=6000
    )
    try:
        first, second = fetcher.request_budget(8000), fetcher.request_budget(8000)
        await fetcher.fetch(local_server + "/file", first)  # held until the request ends
        with pytest.raises(ApiError) as refused:  # 5000 + 5000 > 6000 for the worker
            await fetcher.fetch(local_server + "/file", second)
        assert refused.value.status == 429
        first.release()
        second.release()
        assert fetcher.budget.used == 0
        assert await fetcher.fetch(local_server + "/file", fetcher.request_budget(8000))
    finally:
        await fetcher.close()
