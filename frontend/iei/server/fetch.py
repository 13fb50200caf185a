"""Fetch image URLs without becoming a proxy into the server's own network.

Every host is resolved first and every address it resolves to is checked; the connection then goes
to the checked address (so a second, different DNS answer cannot redirect it: DNS rebinding), with
the original name in the Host header and TLS SNI. Redirects are followed by hand and checked again.

No connection is kept alive: the client's pool knows a connection by its address alone, so a
connection opened (and its certificate verified) for one name would serve the next URL of another
name on the same address, whose certificate nobody then checked. Each fetch (each hop of its
redirects) opens its own connection and verifies it for its own name.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, suppress
from typing import Any, NoReturn
from urllib.parse import SplitResult, urljoin, urlsplit, urlunsplit

import httpx
import idna

from .errors import ApiError, ErrorType
from .inputs import InputFailed, InvalidInput
from .limits import Capacity
from .logs import printable

log = logging.getLogger("iei")

ALLOWED_SCHEMES = ("http", "https")
# The longest a DNS name can be.
MAX_HOST_CHARS = 253
_REDIRECTS = (301, 302, 303, 307, 308)
# Connections a worker's fetches hold at once (httpx's default), and the longest a fetch waits
# for one to come free before it is refused as overloaded (429).
MAX_CONNECTIONS = 100
POOL_WAIT = 1.0
# DNS lookups a worker runs at once, in threads of their own: a lookup blocks its thread until
# the resolver gives up (tens of seconds for a name whose servers never answer), and no timeout
# can stop it. In asyncio's default pool (6 threads on 2 cores) one request of such names held
# up every URL of the worker; here a lookup waits at most POOL_WAIT for a thread, then is a 429.
MAX_LOOKUPS = 16


Address = ipaddress.IPv4Address | ipaddress.IPv6Address
# Prefixes whose last 32 bits are an IPv4 address: NAT64's well-known prefix (RFC 6052, /96
# only), SIIT's IPv4-translated form ::ffff:0:a.b.c.d (RFC 2765), and the deprecated
# IPv4-compatible form ::a.b.c.d.
_NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")
_IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
# NAT64's local-use prefix (RFC 8215): an operator takes a prefix of 48, 56, 64 or 96 bits in it,
# and RFC 6052 puts the IPv4 address at a different place for each (bits 64-71 are skipped; a
# translator ignores the suffix). Which one a network uses is unknown here, so every place counts.
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_RFC6052_BYTES = ((6, 7, 9, 10), (7, 9, 10, 11), (9, 10, 11, 12), (12, 13, 14, 15))


def embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address may lead to: IPv4-mapped, IPv4-translated (SIIT),
    NAT64 (well-known and local-use prefixes), 6to4, Teredo (server and client),
    IPv4-compatible; empty for a plain IPv6 address."""
    if address.ipv4_mapped:
        return [address.ipv4_mapped]
    if address.sixtofour:
        return [address.sixtofour]
    if address.teredo:
        return list(address.teredo)
    if address in _NAT64_LOCAL:
        packed = address.packed
        return [ipaddress.IPv4Address(bytes(packed[i] for i in at)) for at in _RFC6052_BYTES]
    low_bits = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _NAT64_WELL_KNOWN or address in _IPV4_TRANSLATED:
        return [low_bits]
    if address in _IPV4_COMPATIBLE and int(address) > 1:  # not :: or ::1, judged as they are
        return [low_bits]
    return []


def is_public(address: Address) -> bool:
    """Routable on the internet: not loopback, private, link-local, multicast or reserved. An IPv6
    address with an IPv4 address inside is judged by that IPv4 address too."""
    inside = embedded_ipv4(address) if isinstance(address, ipaddress.IPv6Address) else []
    if inside:
        return all(is_public(v4) for v4 in inside)
    # site-local (fec0::/10): deprecated, yet a network may still route it inside; Python 3.11's
    # is_global counts it as global
    site_local = isinstance(address, ipaddress.IPv6Address) and address.is_site_local
    return address.is_global and not address.is_multicast and not site_local


def ascii_host(host: str) -> str:
    """`host` as DNS, TLS (SNI) and the Host header know it: a name in Unicode IDNA-encoded as
    browsers encode it (UTS #46 over IDNA 2008: bücher.example is xn--bcher-kva.example, and
    faß.example xn--fa-hia.example, not the standard library's fass.example); an ASCII name or an
    address as it is. Raises a `UnicodeError` for a name IDNA cannot encode."""
    return host if host.isascii() else idna.encode(host, uts46=True).decode("ascii")


def parse_url(url: str) -> SplitResult:
    """An http(s) URL's parts, or an `InvalidInput` that says what is wrong with it."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a port that is not a number in 0..65535
        host = parts.hostname
    except ValueError as exc:  # "Invalid IPv6 URL", "Port out of range 0-65535", ...
        raise InvalidInput(f"malformed URL: {printable(str(exc))}") from None
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        raise InvalidInput(
            f"URL scheme '{printable(parts.scheme)}' is not allowed (only http, https)"
        )
    if not host:
        raise InvalidInput("URL without a host")
    if len(host) > MAX_HOST_CHARS:  # not a name: neither logged nor answered in full
        raise InvalidInput(f"malformed URL: a host name of over {MAX_HOST_CHARS} characters")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise InvalidInput("URLs with credentials are not fetched")
    if port == 0:
        raise InvalidInput("malformed URL: port 0")
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise InvalidInput("malformed URL: it contains white space or control characters")
    try:
        ascii_host(host)
    except UnicodeError:  # idna's errors are ones
        raise InvalidInput(f"malformed URL: host {host!r} is not a valid name") from None
    return parts


class RequestBytes:
    """The bytes one request's URL fetches hold, within its own limit and the worker's budget;
    all given back by `release` when the request's work has ended."""

    def __init__(self, worker: Capacity, limit: int) -> None:
        self.worker = worker
        self.limit = limit
        self.used = 0

    def take(self, count: int) -> None:
        if self.used + count > self.limit:
            raise InvalidInput(
                f"the URLs of this request hold more than {self.limit} bytes together "
                "(IEI_URL_REQUEST_MAX_BYTES)"
            )
        if not self.worker.try_take(count):
            raise ApiError(
                ErrorType.OVERLOADED,
                "too many URL downloads in flight (IEI_URL_WORKER_MAX_BYTES); retry later",
                headers={"Retry-After": "1"},
            )
        self.used += count

    def release(self) -> None:
        self.worker.give_back(self.used)
        self.used = 0


class Lookups:
    """getaddrinfo in at most `threads` threads; a thread counts as taken until its lookup has
    ended, whether or not the request that asked still waits for it."""

    def __init__(self, threads: int, wait: float) -> None:
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="iei-dns")
        self.free = asyncio.Semaphore(threads)
        self.wait = wait

    async def getaddrinfo(self, host: str, port: int) -> list[tuple[Any, ...]]:
        try:
            async with asyncio.timeout(self.wait):
                await self.free.acquire()
        except TimeoutError:
            raise InputFailed(
                ErrorType.OVERLOADED,
                "too many DNS lookups in flight in this worker: none came free within "
                f"{self.wait:g} s; retry later",
                headers={"Retry-After": "1"},
            ) from None
        loop = asyncio.get_running_loop()

        def ended(_: Future[Any]) -> None:
            with suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(self.free.release)

        try:
            lookup = self.pool.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
        except RuntimeError:  # shut down
            self.free.release()
            raise
        lookup.add_done_callback(ended)
        return await asyncio.wrap_future(lookup)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class UrlFetcher:
    """One shared async HTTP client per worker; `fetch` returns the file's bytes."""

    def __init__(
        self,
        *,
        allow_private: bool,
        timeout: float,
        max_bytes: int,
        max_redirects: int,
        worker_max_bytes: int | None = None,
        max_connections: int = MAX_CONNECTIONS,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """`tls` verifies the URLs' servers (None: httpx's default, certifi's authorities)."""
        self.allow_private = allow_private
        self.budget = Capacity(worker_max_bytes or sys.maxsize)  # None: no limit per worker
        self.max_bytes = max_bytes
        self.max_redirects = max_redirects
        self.timeout = timeout
        # The pool wait ends before the fetch's own timeout, so that a full pool reads as such.
        pool_wait = min(POOL_WAIT, timeout / 2)
        self.lookups = Lookups(MAX_LOOKUPS, pool_wait)
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0), pool=pool_wait),
            # No keep-alive (see the module's note): the pool only bounds the connections open.
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=0),
            follow_redirects=False,  # each hop is checked here
            trust_env=False,  # no proxy from the environment may bypass the address checks
            verify=tls or True,
            # identity: a compressed body could decode to far more than IEI_URL_MAX_BYTES.
            # close: the server and the client both end the connection after its one response.
            headers={
                "User-Agent": "iei-image-fetcher",
                "Accept": "image/*",
                "Accept-Encoding": "identity",
                "Connection": "close",
            },
        )

    async def close(self) -> None:
        await self.client.aclose()
        self.lookups.close()

    def request_budget(self, limit: int) -> RequestBytes:
        """What the URL fetches of one request may hold; `release()` it when the request ends."""
        return RequestBytes(self.budget, limit)

    async def fetch(self, url: str, budget: RequestBytes | None = None) -> bytes:
        """The file at `url`, its bytes taken from `budget` (a budget of its own if None).

        A bad URL or what it serves (not 200, too large, compressed) is an `InvalidInput` (422);
        what is nobody's fault in the request is an `InputFailed`: no connection free in this
        worker (429 Overloaded), the URL's server too slow (504 Timeout), unreachable, broken
        off or failing with a 5xx (502 Upstream)."""
        own = budget is None
        budget = budget or self.request_budget(self.max_bytes)
        try:
            async with asyncio.timeout(self.timeout):
                return await self._fetch(url, budget)
        except (InvalidInput, ApiError):
            raise
        except httpx.PoolTimeout:
            raise InputFailed(
                ErrorType.OVERLOADED,
                "too many URL downloads in flight in this worker: no connection came free "
                f"within {self.client.timeout.pool:g} s; retry later",
                headers={"Retry-After": "1"},
            ) from None
        except (TimeoutError, httpx.TimeoutException):
            raise InputFailed(
                ErrorType.TIMEOUT,
                f"fetching the URL took longer than {self.timeout:g} s (IEI_URL_TIMEOUT)",
            ) from None
        except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            raise InputFailed(
                ErrorType.UPSTREAM, f"cannot fetch the URL: {describe(exc)}"
            ) from None
        except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:  # UnicodeError included
            raise InvalidInput(f"cannot fetch the URL: {describe(exc)}") from None
        finally:
            if own:
                budget.release()

    async def _fetch(self, url: str, budget: RequestBytes) -> bytes:
        parts = parse_url(url)
        for _ in range(self.max_redirects + 1):
            address = await self._resolve(parts)
            async with self._open(parts, address) as response:
                if response.status_code in _REDIRECTS and "location" in response.headers:
                    try:
                        url = urljoin(url, response.headers["location"])
                        parts = parse_url(url)
                    except ValueError as exc:  # InvalidInput is one
                        raise InvalidInput(f"the URL redirects to a bad target: {exc}") from None
                    continue
                if response.status_code >= 500:  # the remote failed, not the request
                    raise InputFailed(
                        ErrorType.UPSTREAM, f"the URL answered HTTP {response.status_code}"
                    )
                if response.status_code != 200:
                    raise InvalidInput(f"the URL answered HTTP {response.status_code}")
                return await self._read_capped(response, budget)
        raise InvalidInput(f"more than {self.max_redirects} redirects")

    async def _resolve(self, parts: SplitResult) -> str:
        """The address to connect to, after checking every address the name resolves to."""
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        try:
            infos = await self.lookups.getaddrinfo(ascii_host(host), port)
            addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
        except (socket.gaierror, UnicodeError) as exc:
            self._refuse_host(host, f"cannot resolve it: {exc}")
        if not addresses:
            self._refuse_host(host, "it resolves to no address")
        if not self.allow_private and not all(is_public(a) for a in addresses):
            self._refuse_host(host, f"it resolves to {', '.join(map(str, addresses))}")
        return str(addresses[0])

    def _refuse_host(self, host: str, detail: str) -> NoReturn:
        """One answer whether a name does not resolve or resolves to an address refused here,
        so that the answers tell nothing of the names inside the network; the log says which."""
        log.info("URL host %r refused: %s", host, detail)
        if self.allow_private:  # every address is allowed: there is nothing to hide
            raise InvalidInput(f"cannot resolve host {host!r}")
        raise InvalidInput(
            f"host {host!r} does not resolve to public addresses only; names that do not "
            "resolve and URLs on loopback, private, link-local, multicast or reserved "
            "addresses are refused"
        )

    def _open(
        self, parts: SplitResult, address: str
    ) -> AbstractAsyncContextManager[httpx.Response]:
        def bracketed(host: str) -> str:  # an IPv6 address in a URL or a Host header
            return f"[{host}]" if ":" in host else host

        netloc = f"{bracketed(address)}:{parts.port}" if parts.port else bracketed(address)
        target = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        # The name that was resolved, in ASCII (header values are ASCII; bücher.example was sent
        # as it is written and refused by httpx), with the URL's port if it names one.
        host = ascii_host(parts.hostname or "")
        host_header = f"{bracketed(host)}:{parts.port}" if parts.port else bracketed(host)
        return self.client.stream(
            "GET",
            target,
            headers={"Host": host_header},
            extensions={"sni_hostname": host},
        )

    async def _read_capped(self, response: httpx.Response, budget: RequestBytes) -> bytes:
        encoding = response.headers.get("content-encoding", "").strip().lower()
        if encoding not in ("", "identity"):  # a compression bomb would be decoded whole
            raise InvalidInput(
                f"the URL's server sent the file with Content-Encoding {encoding[:40]!r}, "
                "although only identity was accepted: compressed files are not decoded"
            )
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise InvalidInput(f"the file is larger than {self.max_bytes} bytes")
        chunks, size = [], 0
        async for chunk in response.aiter_raw():  # as sent: httpx decodes nothing
            size += len(chunk)
            if size > self.max_bytes:
                raise InvalidInput(f"the file is larger than {self.max_bytes} bytes")
            budget.take(len(chunk))
            chunks.append(chunk)
        return b"".join(chunks)


def describe(error: Exception) -> str:
    """An exception as one short line: its type and the first line of its message."""
    reason = str(error).splitlines()[0][:200] if str(error) else ""
    return f"{type(error).__name__} {reason}".strip()
