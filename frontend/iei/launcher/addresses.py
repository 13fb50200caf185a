"""Addresses the launcher binds and dials: IPv4 and IPv6 literals, wildcards, and its own HTTP
client for them.

Triton binds its HTTP and metrics services through libevhtp, which reads a bare address as IPv4
(`::1` or `localhost` silently became 255.255.255.255) and wants `ipv6:` before an IPv6 one;
its gRPC service wants `[::1]`. The launcher then dials what Triton was bound to: loopback of
the same family for a wildcard, the address itself otherwise.
"""

from __future__ import annotations

import ipaddress
import socket

import httpx

# A wildcard is bound on every interface; the launcher reaches it on loopback of its family.
_LOOPBACK_OF = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104 (a mapping, not a bind)


def check_listen_address(value: str) -> str:
    """An IP address Triton can bind (brackets around IPv6 allowed), in its plain form; else a
    ValueError of one line."""
    plain = value.strip()
    if plain.startswith("[") and plain.endswith("]"):
        plain = plain[1:-1]
    try:
        address = ipaddress.ip_address(plain)
    except ValueError:
        raise ValueError(
            f"expected an IP address (Triton binds addresses, not names), e.g. 127.0.0.1, "
            f"0.0.0.0, ::1 or ::, got {value!r}"
        ) from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        raise ValueError(f"an address with a zone (%{address.scope_id}) cannot be bound by Triton")
    return str(address)


def check_bind(value: str) -> str:
    """IEI_BIND, `host:port` as uvicorn binds it (an IPv6 host in brackets); else a ValueError
    of one line. An IPv6 address without brackets was split at its last colon: `::1` read as
    host `:`, port 1."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, e.g. 0.0.0.0:8000 or [::1]:8000, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        check_listen_address(host)
        if ":" not in host:
            raise ValueError(f"brackets are for an IPv6 address, got {value!r}")
    elif ":" in host or "[" in host or "]" in host:
        raise ValueError(f"an IPv6 host goes in brackets, e.g. [::1]:8000, got {value!r}")
    return value


def may_share_port(a: str, b: str) -> bool:
    """Whether listeners on hosts `a` and `b` would take the same port: the same address, a
    wildcard of the family (`::` of both, dual-stack as Linux binds it), or a name, which may
    resolve to either. 127.0.0.1 and 127.0.0.2 do not."""
    try:
        first, second = ipaddress.ip_address(a), ipaddress.ip_address(b)
    except ValueError:
        return True
    if first == second or "::" in (str(first), str(second)):
        return True
    return first.version == second.version and (first.is_unspecified or second.is_unspecified)


def bind_problem(host: str, port: int) -> str | None:
    """Why nothing can listen on `host`:`port` now (the port in use, an address not of this
    host, a privileged port), or None: found before the model loads, not minutes later."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as trial:
            trial.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
            trial.bind((host, port))
    except OSError as exc:  # socket.gaierror too: a host name that does not resolve
        return exc.strerror or str(exc)
    return None


def dial_host(bound: str) -> str:
    """The host to call a service on that is bound to `bound`."""
    return _LOOPBACK_OF.get(bound, bound or "127.0.0.1")


def url_host(host: str) -> str:
    """`host` as it stands in a URL: an IPv6 literal in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def dial_endpoint(bound: str, port: int) -> str:
    """`host:port` to call a service bound to `bound` on `port` (tritonclient's endpoint form)."""
    return f"{url_host(dial_host(bound))}:{port}"


def triton_addresses(host: str) -> tuple[str, str]:
    """(HTTP and metrics address, gRPC address) as Triton's flags take `host`."""
    if ":" in host:
        return f"ipv6:{host}", f"[{host}]"
    return host, host


def local_client(timeout: float) -> httpx.Client:
    """The launcher's client for its own children (Triton, the frontend) on this machine: never
    through a proxy of the environment (HTTP_PROXY would take loopback calls elsewhere)."""
    return httpx.Client(timeout=timeout, trust_env=False)
