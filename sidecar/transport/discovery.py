"""DNS discovery: every A/AAAA record of an upstream's host, re-resolved every `refresh`.

A headless Kubernetes Service answers with one record per ready pod, so the answer is the endpoint set.
The resolver is aiohttp's `AsyncResolver` (c-ares through `aiodns`), pointed at `resolver.servers` when
the policy names them (tests use a real DNS server on loopback), else at the system's. A failed or empty
answer keeps the last good set -- a DNS outage must not take every pod away -- and is logged once until
an answer comes back.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from typing import Awaitable, Callable

from aiohttp.resolver import AsyncResolver

from sidecar.policy.model import Upstream

log = logging.getLogger("sidecar.discovery")

RESOLVE_TIMEOUT = 2.0


def make_resolver(servers: tuple[str, ...]) -> AsyncResolver:
    kwargs: dict = {"timeout": RESOLVE_TIMEOUT, "tries": 1}
    if servers:
        kwargs["nameservers"] = list(servers)     # c-ares takes "ip", "ip:port" and "[v6]:port"
    return AsyncResolver(**kwargs)


def _literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


class DnsDiscovery:
    """Resolves one upstream's host in a loop and hands each changed answer to `on_answer`."""

    def __init__(self, up: Upstream, on_answer: Callable[[list[str]], Awaitable[None] | None]) -> None:
        self.up = up
        self.on_answer = on_answer
        self.resolver = make_resolver(up.resolver)
        self.addresses: list[str] = []
        self.resolved = asyncio.Event()            # set after the first answer (or the first failure)
        self.failing = False
        self.last_error: str | None = None

    async def resolve(self) -> list[str]:
        host = self.up.host.strip("[]")
        literal = _literal(host)
        if literal is not None:
            return [literal]
        found = await self.resolver.resolve(host, self.up.port, family=socket.AF_UNSPEC)
        return sorted(dict.fromkeys(entry["host"] for entry in found), key=_sort_key)

    async def refresh(self) -> None:
        """One resolution; a failure keeps the last good set (logged once per outage)."""
        try:
            addresses = await self.resolve()
            if not addresses:
                raise OSError("no A/AAAA records")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - c-ares, timeouts, NXDOMAIN: all "keep the last set"
            self.last_error = str(exc) or type(exc).__name__
            if not self.failing:
                self.failing = True
                log.warning("upstream %s: resolving %s failed (%s); keeping the last %d endpoint(s)",
                            self.up.name, self.up.host, self.last_error, len(self.addresses))
            return
        finally:
            self.resolved.set()
        if self.failing:
            self.failing = False
            self.last_error = None
            log.info("upstream %s: %s resolves again (%d endpoint(s))", self.up.name, self.up.host, len(addresses))
        if addresses != self.addresses:
            self.addresses = addresses
            result = self.on_answer(addresses)
            if result is not None:
                await result

    async def run(self) -> None:
        try:
            while True:
                await self.refresh()
                await asyncio.sleep(self.up.refresh)
        finally:
            await self.resolver.close()


def _sort_key(address: str) -> tuple[int, bytes]:
    ip = ipaddress.ip_address(address)
    return ip.version, ip.packed
