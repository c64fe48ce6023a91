"""Where the proxy listener may not send a request (SSRF guard), unless a route says `allow_internal`.

    link-local / cloud metadata   169.254.0.0/16, fd00:ec2::254 (also as IPv4-mapped IPv6)
    the sidecar itself            any of its own ports on a loopback, unspecified or local address

Checked twice: on the request target as written (`refused_target`, so the app gets a 403 at once),
and on every address a host name resolves to (`GuardedResolver`, in the passthrough pool that proxy
requests use), so that `metadata.example` -> 169.254.169.254, `0xa9.0xfe.0xa9.0xfe` or a DNS answer that
changes between the two checks (rebinding) cannot slip through.

Whether a request is guarded travels with it (`Exchange.egress_guard`, handed to `Transport.send` as
`guard`): the sidecar's own ports, or `None` for unguarded.
"""
from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import socket

from aiohttp.abc import AbstractResolver
from aiohttp.resolver import DefaultResolver

from sidecar.core.authority import authority

METADATA_NETS = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fd00:ec2::254/128"))

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_address(host: str) -> Address | None:
    """An IP literal in any form a resolver would accept (`169.254.169.254`, `[::ffff:a9fe:a9fe]`,
    `0xa9.0xfe.0xa9.0xfe`, `2852039166`, `127.1`), IPv4-mapped IPv6 unwrapped; None for a name."""
    host = host.strip("[]").rstrip(".")
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        try:                              # inet_aton takes the legacy forms getaddrinfo also takes
            addr = ipaddress.IPv4Address(socket.inet_aton(host))
        except (OSError, ValueError):
            return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr


@functools.lru_cache(maxsize=256)
def _is_local(addr: Address) -> bool:
    """Is `addr` one of this host's own addresses (the pod IP, ...)? Binding to it succeeds only then."""
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((str(addr), 0))
        return True
    except OSError:
        return False


def refused_address(addr: Address, port: int | None, own_ports: frozenset[int] | set[int]) -> str | None:
    """Why a connection to `addr:port` is refused, or None."""
    if any(addr in net for net in METADATA_NETS):
        return f"{addr} is link-local (cloud metadata)"
    if port in own_ports and (addr.is_loopback or addr.is_unspecified or _is_local(addr)):
        return f"{authority(str(addr), port)} is the sidecar itself"
    return None


def refused_target(host: str, port: int | None, own_ports: frozenset[int] | set[int]) -> str | None:
    """Why the request target `host:port` is refused as written, or None (names are left to DNS)."""
    addr = parse_address(host)
    if addr is not None:
        return refused_address(addr, port, own_ports)
    name = host.rstrip(".").lower()
    if (name == "localhost" or name.endswith(".localhost")) and port in own_ports:   # RFC 6761 §6.3
        return f"{host}:{port} is the sidecar itself"
    return None


class EgressRefused(OSError):
    """A host name resolved to an address the proxy listener may not reach."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EACCES, message)   # aiohttp quotes `strerror` in its connect error


class GuardedResolver(AbstractResolver):
    """The default resolver, refusing a name any of whose addresses is refused (metadata, or one of
    `own_ports` on a local address). The pool using it caches no answer, so each is checked."""

    def __init__(self, own_ports: frozenset[int]) -> None:
        self._inner = DefaultResolver()
        self._own_ports = own_ports

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):
        found = await self._inner.resolve(host, port, family)
        own_ports = self._own_ports
        for entry in found:
            addr = parse_address(entry["host"])
            reason = refused_address(addr, port, own_ports) if addr is not None else None
            if reason is not None:
                raise EgressRefused(f"{host} resolves to {reason}; a route must allow_internal")
        return found

    async def close(self) -> None:
        await self._inner.close()


async def resolve_checked(host: str, port: int, own_ports: frozenset[int] | set[int]) -> list[str]:
    """The addresses of `host`, each checked; raises `EgressRefused` if any is refused (CONNECT)."""
    addr = parse_address(host)
    if addr is not None:
        reason = refused_address(addr, port, own_ports)
        if reason is not None:
            raise EgressRefused(f"{reason}; a route must allow_internal")
        return [str(addr)]
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    found: list[str] = []
    for *_, sockaddr in infos:
        resolved = parse_address(sockaddr[0])
        reason = refused_address(resolved, port, own_ports) if resolved is not None else None
        if reason is not None:
            raise EgressRefused(f"{host} resolves to {reason}; a route must allow_internal")
        if sockaddr[0] not in found:
            found.append(sockaddr[0])
    return found
