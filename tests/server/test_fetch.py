"""Which addresses a URL may lead to, and which URLs are refused before any connection."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import ssl
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import httpx
import pytest
from iei.server.errors import ApiError
from iei.server.fetch import MAX_LOOKUPS, UrlFetcher, is_public
from iei.server.inputs import InputFailed, InvalidInput
from PIL import Image
from sample_images import encode
from stack import free_port, local_http_server

try:
    import brotli
except ImportError:  # not a dependency of ours
    brotli = None

pytestmark = pytest.mark.anyio

PNG = base64.b64encode(encode(Image.new("RGB", (2, 2)), "PNG")).decode()


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
        # The local-use prefix puts the IPv4 address where the operator's prefix length says
        # (48, 56, 64 or 96 bits): each place counts. Here 10.0.0.1 behind a /48, 8.8.8.8 last.
        ("64:ff9b:1:a00:0:100:808:808", False),
        ("64:ff9b:1::808:808", False),  # a /48 translator reads 0.0.0.0 here
        ("64:ff9b:1:808:808:808:808:808", True),  # 8.8.8.8 at every place
        ("::ffff:0:7f00:1", False),  # SIIT's IPv4-translated form of 127.0.0.1
        ("::ffff:0:a9fe:a9fe", False),  # ... of the cloud metadata address
        ("::ffff:0:5db8:d822", True),  # ... of a public address
        ("2002:c0a8:101::1", False),  # 6to4 of 192.168.1.1
        ("2002:5db8:d822::1", True),  # 6to4 of a public address
        ("2001:0:5db8:d822:0:ffff:80ff:fffe", False),  # Teredo; client 127.0.0.1 (inverted)
        ("::7f00:1", False),  # IPv4-compatible 127.0.0.1
        ("fec0::1", False),  # site-local (deprecated; Python 3.11's is_global says global)
        ("feff::1", False),
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
        ("http://127.0.0.1:9/a.jpg", "does not resolve to public addresses only"),
        ("http://[::1]:9/a.jpg", "does not resolve to public addresses only"),
        ("http://localhost:9/a.jpg", "does not resolve to public addresses only"),
        ("http://no-such-host.invalid/a.jpg", "does not resolve to public addresses only"),
        ("http://[::ffff:0:7f00:1]:9/a.jpg", "does not resolve to public addresses only"),
        ("http://[64:ff9b:1:a00:0:100:808:808]:9/a.jpg", "does not resolve to public addresses"),
        ("http://example.com:99999/x.jpg", "malformed URL: Port out of range"),
        ("http://example.com:abc/x.jpg", "malformed URL"),
        ("http://[::1/x.jpg", "malformed URL: Invalid IPv6 URL"),
        ("http://:80/x.jpg", "without a host"),
        ("http://@example.com/x.jpg", "credentials"),
        ("http://example.com:0/x.jpg", "port 0"),
        ("http://exa mple.com/x.jpg", "white space"),
        ("http://[64:ff9b::7f00:1]:9/x.jpg", "does not resolve to public addresses only"),
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


async def test_a_name_that_does_not_resolve_reads_as_one_that_resolves_inside(caplog):
    """No oracle for the names of the server's own network: the client reads one answer, the
    log says which it was."""
    fetcher = UrlFetcher(allow_private=False, timeout=5, max_bytes=1024, max_redirects=2)
    answers = {}
    try:
        with caplog.at_level("INFO", logger="iei"):
            for host in ("localhost", "no-such-host.invalid"):
                with pytest.raises(InvalidInput) as refused:
                    await fetcher.fetch(f"http://{host}/a.jpg")
                answers[host] = str(refused.value).replace(repr(host), "HOST")
    finally:
        await fetcher.close()
    assert answers["localhost"] == answers["no-such-host.invalid"]
    logged = caplog.text
    assert "'localhost' refused: it resolves to 127.0.0.1" in logged
    assert "'no-such-host.invalid' refused: cannot resolve it" in logged


@pytest.mark.parametrize(
    "url",
    [
        "http://" + "a." * 500_000 + "com/x.png",  # no DNS name is over 253 characters
        "x" * 1_000_000 + "://example.com/x.png",
        "http://example.com:" + "9" * 1_000_000 + "/x.png",
    ],
    ids=["host", "scheme", "port"],
)
async def test_a_huge_url_part_is_neither_logged_nor_answered_in_full(url, caplog):
    """One request of eight such URLs once wrote 9 MB to the log and answered 1 MB."""
    fetcher = UrlFetcher(allow_private=False, timeout=5, max_bytes=1024, max_redirects=2)
    try:
        with caplog.at_level("INFO", logger="iei"), pytest.raises(InvalidInput) as refused:
            await fetcher.fetch(url)
    finally:
        await fetcher.close()
    assert "malformed URL" in str(refused.value) or "not allowed" in str(refused.value)
    assert len(str(refused.value)) < 1000
    assert len(caplog.text) < 2000


# --- compression bombs ------------------------------------------------------------------------


def compression_bomb(encoding: str, size: int) -> bytes:
    """`size` zero bytes compressed with `encoding`: a few KiB on the wire."""
    zeros = bytes(1 << 20)
    if encoding == "br":
        compressor = brotli.Compressor()
        parts = [compressor.process(zeros) for _ in range(size >> 20)]
        return b"".join([*parts, compressor.finish()])
    import zlib

    wbits = {"gzip": 31, "deflate": 15}[encoding]  # deflate is the zlib format (RFC 9110)
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
    return b"".join([*(packer.compress(zeros) for _ in range(size >> 20)), packer.flush()])


@pytest.fixture(scope="module")
def bomb_server():
    """`/<encoding>`: 32 MiB of zeros compressed with it, sent whatever the client accepts
    (`/identity`: a few bytes as they are); it keeps the Accept-Encoding headers it was sent."""
    import http.server

    bombs = {e: compression_bomb(e, 32 << 20) for e in ("gzip", "deflate")}
    bombs["identity"] = b"0" * 100
    if brotli is not None:  # httpx decodes br when brotli is installed (it is in our venv)
        bombs["br"] = compression_bomb("br", 32 << 20)
    accepted: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            accepted.append(self.headers.get("Accept-Encoding"))
            body = bombs[self.path.removeprefix("/")]
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Encoding", self.path.removeprefix("/"))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with suppress(ConnectionError):  # the fetcher stops reading at the headers
                self.wfile.write(body)

    with local_http_server(Handler) as url:
        yield url, bombs, accepted


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
async def test_a_compression_bomb_is_refused_without_decoding_it(bomb_server, encoding):
    """The fetcher asks for identity; a server that compresses anyway is refused from its
    headers, and what the fetch allocates stays under the per-URL limit (it grew by the whole
    32 MiB when httpx decoded a network chunk at once)."""
    import tracemalloc

    from iei.server.inputs import fetch_urls

    url, bombs, accepted = bomb_server
    if encoding not in bombs:
        pytest.skip("brotli is not installed")
    assert len(bombs[encoding]) < 64 * 1024  # small on the wire
    limit = 1 << 20
    fetcher = UrlFetcher(allow_private=True, timeout=5, max_bytes=limit, max_redirects=2)
    budget = fetcher.request_budget(4 * limit)
    tracemalloc.start()
    try:
        await fetcher.fetch(f"{url}/identity")  # what a first fetch imports is not counted
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        with pytest.raises(InvalidInput) as refused:
            await fetch_urls([PNG, f"{url}/{encoding}"], fetcher, budget)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
        budget.release()
        await fetcher.close()
    assert accepted[-1] == "identity"
    assert str(refused.value).startswith(
        f"inputs[1]: the URL's server sent the file with Content-Encoding '{encoding}'"
    )
    assert refused.value.error_type == "Validation"  # a 422
    assert peak < limit, f"the fetch allocated {peak} bytes (limit {limit})"


# --- TLS: every connection verified for the name it serves -----------------------------------


@pytest.fixture
def example_names(monkeypatch):
    """Every name under .example resolves to 127.0.0.1; the names asked are kept."""
    import socket

    asked: list[str] = []
    resolve = socket.getaddrinfo

    def fake(host, port, *args, **kwargs):
        asked.append(host)
        if str(host).endswith(".example"):
            return resolve("127.0.0.1", port, *args, **kwargs)
        return resolve(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return asked


def certificate_authority(names: list[str]) -> tuple[bytes, bytes, bytes]:
    """A new authority's certificate, and a certificate it signed for `names` with that
    certificate's key (all PEM; valid for a day, as strict verification wants them)."""
    import datetime
    import inspect

    from cryptography import x509  # the dev extra's: a missing one fails, never skips
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    now = datetime.datetime.now(datetime.UTC)
    flags = inspect.signature(x509.KeyUsage).parameters  # each is given, True or False

    def issue(subject, key, issuer, issuer_key, usage, *extensions):
        cn = x509.NameOID.COMMON_NAME
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(cn, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(cn, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
            )
            .add_extension(x509.KeyUsage(**{f: f in usage for f in flags}), True)
            .add_extension(x509.BasicConstraints(ca=key is issuer_key, path_length=None), True)
        )
        for extension in extensions:
            builder = builder.add_extension(extension, False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    authority = "iei test authority"
    ca = issue(authority, ca_key, authority, ca_key, ("key_cert_sign", "crl_sign"))
    san = x509.SubjectAlternativeName([x509.DNSName(name) for name in names])
    leaf = issue(names[0], key, authority, ca_key, ("digital_signature",), san)
    pem = serialization.Encoding.PEM
    private = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ca.public_bytes(pem), leaf.public_bytes(pem), private


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """An HTTPS server on 127.0.0.1 that keeps connections alive, with a certificate for
    a.example and bücher.example only; `/to-b` redirects to b.example on the same port. Yields
    its port, a client context that trusts its authority, and the SNI names of the handshakes
    it saw."""
    import http.server
    import ssl

    ca, certificate, key = certificate_authority(["a.example", "xn--bcher-kva.example"])
    folder = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(certificate)
    (folder / "key.pem").write_bytes(key)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    handshakes: list[str | None] = []
    server_context.sni_callback = lambda _socket, name, _context: handshakes.append(name)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive unless the client says close

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            if self.path == "/to-b":
                port = self.server.server_address[1]
                self.send_response(302)
                self.send_header("Location", f"https://b.example:{port}/x.png")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

    class Server(http.server.ThreadingHTTPServer):
        def get_request(self):
            connection, address = super().get_request()
            return server_context.wrap_socket(connection, server_side=True), address

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], ssl.create_default_context(cadata=ca.decode()), handshakes
    finally:
        server.shutdown()
        server.server_close()


@asynccontextmanager
async def local_fetcher(tls: ssl.SSLContext | None = None) -> AsyncIterator[UrlFetcher]:
    """A fetcher of local test servers (private addresses allowed), closed after use."""
    fetcher = UrlFetcher(allow_private=True, timeout=5, max_bytes=1024, max_redirects=2, tls=tls)
    try:
        yield fetcher
    finally:
        await fetcher.close()


@pytest.mark.parametrize("second", ["b.example:{port}/x.png", "a.example:{port}/to-b"])
async def test_a_connection_verified_for_one_name_never_serves_another(
    tls_server, example_names, second
):
    """Two names on one address, a certificate for one of them: the other is refused right
    after the first was fetched, and when the first redirects to it. A kept-alive connection
    verified for a.example once served b.example (the pool knows a connection by its address)."""
    port, client_context, handshakes = tls_server
    handshakes.clear()
    async with local_fetcher(client_context) as fetcher:
        assert await fetcher.fetch(f"https://a.example:{port}/x.png") == b"ok"
        with pytest.raises(InputFailed, match=r"certificate verify failed.*'b\.example'"):
            await fetcher.fetch("https://" + second.format(port=port))
        assert await fetcher.fetch(f"https://a.example:{port}/x.png") == b"ok"
    hops = ["b.example"] if second.startswith("b.") else ["a.example", "b.example"]
    assert handshakes == ["a.example", *hops, "a.example"]  # one connection per hop


@pytest.fixture(scope="module")
def host_server():
    """Answers every GET with "ok" and keeps the Host headers it was sent."""
    import http.server

    hosts: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hosts.append(self.headers.get("Host"))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

    with local_http_server(Handler) as url:
        yield int(url.rsplit(":", 1)[1]), hosts


@pytest.mark.parametrize(
    ("host", "encoded"),
    [
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.Example", "xn--bcher-kva.example"),
        ("faß.example", "xn--fa-hia.example"),  # as browsers have it (IDNA 2008), not fass
        ("plain.example", "plain.example"),
    ],
)
async def test_a_host_name_in_unicode_is_resolved_and_sent_idna_encoded(
    host_server, example_names, host, encoded
):
    """A URL of bücher.example was always refused: its Host header went out as written, and
    httpx encodes header values as ASCII."""
    port, hosts = host_server
    async with local_fetcher() as fetcher:
        assert await fetcher.fetch(f"http://{host}:{port}/x.png") == b"ok"
    assert hosts[-1] == f"{encoded}:{port}"
    assert example_names[-1] == encoded


async def test_a_host_name_in_unicode_is_verified_by_its_idna_name(tls_server, example_names):
    port, client_context, handshakes = tls_server
    handshakes.clear()
    async with local_fetcher(client_context) as fetcher:
        assert await fetcher.fetch(f"https://bücher.example:{port}/x.png") == b"ok"
    assert handshakes == ["xn--bcher-kva.example"]


async def test_a_host_name_that_idna_cannot_encode_is_refused_before_resolving(example_names):
    async with local_fetcher() as fetcher:
        with pytest.raises(InvalidInput, match=r"malformed URL: host '.*' is not a valid name"):
            await fetcher.fetch("http://bü--cher.example/x.png")  # "--" at 3 and 4: reserved
    assert example_names == []


# --- what the client is told when it is not its fault ----------------------------------------


@pytest.fixture(scope="module")
def remote_server():
    """A slow server, a failing one, a missing file and a file that is no image; `/slower`
    sets SLOWER_STARTED when its request has come."""
    import http.server
    import time

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/slow":
                time.sleep(1.5)
            elif self.path == "/slower":
                SLOWER_STARTED.set()
                time.sleep(3)
            status = {"/fail": 503, "/bad-gateway": 502, "/missing": 404}.get(self.path, 200)
            body = b"not an image" if status == 200 else b""
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with local_http_server(Handler) as url:
        yield url


SLOWER_STARTED = threading.Event()


@asynccontextmanager
async def embed_client(**settings):
    """The app (Triton unreachable: URLs are fetched before Triton is asked) and a client."""
    from iei.server.app import create_app
    from iei.server.settings import ServerSettings

    options = {"triton_url": "127.0.0.1:1", "allow_private_urls": True, "url_timeout": 0.5}
    app = create_app(ServerSettings(**{**options, **settings}))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://iei") as client:
            yield app, client


@pytest.mark.parametrize(
    ("path", "status", "error_type", "message"),
    [
        ("/slow", 504, "Timeout", "inputs[1]: fetching the URL took longer than 0.5 s"),
        ("/fail", 502, "Upstream", "inputs[1]: the URL answered HTTP 503"),
        ("/bad-gateway", 502, "Upstream", "inputs[1]: the URL answered HTTP 502"),
        ("closed port", 502, "Upstream", "inputs[1]: cannot fetch the URL: ConnectError"),
        ("/missing", 422, "Validation", "inputs[1]: the URL answered HTTP 404"),
        ("/image.png", 422, "Validation", "inputs[1]: not an image"),  # the client's URL
    ],
)
async def test_a_failing_remote_is_not_the_clients_fault(
    remote_server, path, status, error_type, message
):
    url = f"http://127.0.0.1:{free_port()}/x.png" if path == "closed port" else remote_server + path
    async with embed_client() as (_, client):
        response = await client.post("/embed", json={"inputs": [PNG, url]})
    assert response.status_code == status, response.text
    assert response.json()["error_type"] == error_type
    assert response.json()["error"].startswith(message)


async def test_a_full_connection_pool_is_overloaded_not_a_bad_url(remote_server):
    async with embed_client(url_timeout=5) as (app, client):
        app.state.services.fetcher = UrlFetcher(
            allow_private=True, timeout=5, max_bytes=1 << 20, max_redirects=2, max_connections=1
        )
        try:
            SLOWER_STARTED.clear()
            busy = asyncio.create_task(
                client.post("/embed", json={"inputs": [f"{remote_server}/slower"]})
            )
            # the one connection is held by the slow fetch (3 s; the pool wait is 1 s)
            assert await asyncio.to_thread(SLOWER_STARTED.wait, 5)
            response = await client.post(
                "/embed", json={"inputs": [PNG, f"{remote_server}/missing"]}
            )
            assert response.status_code == 429, response.text
            assert response.json()["error_type"] == "Overloaded"
            assert response.json()["error"].startswith(
                "inputs[1]: too many URL downloads in flight in this worker"
            )
            assert response.headers["retry-after"] == "1"
            assert (await busy).status_code == 422  # the slow one still ends: not an image
        finally:
            await app.state.services.fetcher.close()


async def test_lookups_that_never_end_hold_only_their_own_threads(local_server, monkeypatch):
    """A name whose DNS servers never answer holds its lookup's thread until the resolver gives
    up (no timeout stops it). One request of such names held up every URL of the worker when
    the lookups shared asyncio's default pool (6 threads on 2 cores): a good URL timed out
    behind them. Now they hold their own threads (MAX_LOOKUPS), and once all are taken a lookup
    is refused as overloaded, a 429 within the pool wait, not a 504."""
    import socket

    answer = threading.Event()
    resolve = socket.getaddrinfo

    def black_holed(host, port, *args, **kwargs):
        if str(host).endswith(".slow"):
            answer.wait(30)
            raise socket.gaierror("Temporary failure in name resolution")
        return resolve(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", black_holed)
    fetcher = UrlFetcher(allow_private=True, timeout=2, max_bytes=1 << 20, max_redirects=2)
    stuck: list[asyncio.Task[bytes]] = []
    try:
        for i in range(MAX_LOOKUPS - 1):
            stuck.append(asyncio.create_task(fetcher.fetch(f"http://n{i}.slow/x.png")))
        await asyncio.sleep(0.2)
        assert await fetcher.fetch(local_server + "/file") == b"x" * 5000  # a thread is free
        stuck.append(asyncio.create_task(fetcher.fetch("http://last.slow/x.png")))
        await asyncio.sleep(0.2)
        with pytest.raises(InputFailed) as busy:
            await fetcher.fetch(local_server + "/file")
        assert busy.value.error_type == "Overloaded"  # a 429
        assert str(busy.value).startswith("too many DNS lookups in flight in this worker")
        assert busy.value.headers == {"Retry-After": "1"}
        for refused in await asyncio.gather(*stuck, return_exceptions=True):
            assert isinstance(refused, InputFailed), refused
            assert refused.error_type == "Timeout", refused  # their requests are answered (504)
        # but their threads stay taken until the lookups end
        with pytest.raises(InputFailed, match="too many DNS lookups"):
            await fetcher.fetch(local_server + "/file")
        answer.set()
        await asyncio.sleep(0.2)
        assert await fetcher.fetch(local_server + "/file") == b"x" * 5000
    finally:
        answer.set()
        await fetcher.close()
