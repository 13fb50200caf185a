"""Fetch image URLs without becoming a proxy into the server's own network.

Every host is resolved first and every address it resolves to is checked; the connection then goes
to the checked address (so a second, different DNS answer cannot redirect it: DNS rebinding), with
the original name in the Host header and TLS SNI. Redirects are followed by hand and checked again.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from contextlib import AbstractAsyncContextManager
from urllib.parse import SplitResult, urljoin, urlsplit, urlunsplit

import httpx

from .inputs import InvalidInput

ALLOWED_SCHEMES = ("http", "https")
_REDIRECTS = (301, 302, 303, 307, 308)


def is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Routable on the internet: not loopback, private, link-local, multicast or reserved."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


class UrlFetcher:
    """One shared async HTTP client per worker; `fetch` returns the file's bytes."""

    def __init__(
        self, *, allow_private: bool, timeout: float, max_bytes: int, max_redirects: int
    ) -> None:
        self.allow_private = allow_private
        self.max_bytes = max_bytes
        self.max_redirects = max_redirects
        self.timeout = timeout
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            follow_redirects=False,  # each hop is checked here
            trust_env=False,  # no proxy from the environment may bypass the address checks
            headers={"User-Agent": "iei-image-fetcher", "Accept": "image/*"},
        )

    async def close(self) -> None:
        await self.client.aclose()

    async def fetch(self, url: str) -> bytes:
        try:
            async with asyncio.timeout(self.timeout):
                return await self._fetch(url)
        except TimeoutError:
            raise InvalidInput(f"fetching the URL took longer than {self.timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise InvalidInput(f"cannot fetch the URL: {type(exc).__name__}") from None

    async def _fetch(self, url: str) -> bytes:
        for _ in range(self.max_redirects + 1):
            parts = self._check_url(url)
            address = await self._resolve(parts)
            async with self._open(parts, address) as response:
                if response.status_code in _REDIRECTS and "location" in response.headers:
                    url = urljoin(url, response.headers["location"])
                    continue
                if response.status_code != 200:
                    raise InvalidInput(f"the URL answered HTTP {response.status_code}")
                return await self._read_capped(response)
        raise InvalidInput(f"more than {self.max_redirects} redirects")

    def _check_url(self, url: str) -> SplitResult:
        parts = urlsplit(url)
        if parts.scheme.lower() not in ALLOWED_SCHEMES:
            raise InvalidInput(f"URL scheme {parts.scheme!r} is not allowed (only http, https)")
        if not parts.hostname:
            raise InvalidInput("URL without a host")
        if parts.username or parts.password:
            raise InvalidInput("URLs with credentials are not fetched")
        return parts

    async def _resolve(self, parts: SplitResult) -> str:
        """The address to connect to, after checking every address the name resolves to."""
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except (socket.gaierror, UnicodeError):
            raise InvalidInput(f"cannot resolve host {host!r}") from None
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
        if not addresses:
            raise InvalidInput(f"cannot resolve host {host!r}")
        if not self.allow_private and not all(is_public(a) for a in addresses):
            raise InvalidInput(
                f"host {host!r} resolves to a non-public address; URLs on loopback, private, "
                "link-local, multicast or reserved addresses are refused"
            )
        return str(addresses[0])

    def _open(
        self, parts: SplitResult, address: str
    ) -> AbstractAsyncContextManager[httpx.Response]:
        literal = f"[{address}]" if ":" in address else address
        netloc = f"{literal}:{parts.port}" if parts.port else literal
        target = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        host_header = parts.netloc.rsplit("@", 1)[-1]
        return self.client.stream(
            "GET",
            target,
            headers={"Host": host_header},
            extensions={"sni_hostname": parts.hostname},
        )

    async def _read_capped(self, response: httpx.Response) -> bytes:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise InvalidInput(f"the file is larger than {self.max_bytes} bytes")
        chunks, size = [], 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > self.max_bytes:
                raise InvalidInput(f"the file is larger than {self.max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
