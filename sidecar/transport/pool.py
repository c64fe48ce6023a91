"""Connection pools: keep-alive HTTP/1.1 connections to upstreams, bounded, reused last-in first-out.

One `Pool` per pool key (a named upstream's connection settings, or the shared passthrough pool); a
pool holds idle connections per origin (scheme, host, port, TLS server name) and at most
`max_connections` open connections in all. A request that finds the pool full waits for a slot (its
own deadline bounds the wait). Idle connections are closed after `KEEPALIVE` seconds, and one the
peer closed while idle is never handed out.

Connections are aiohttp's client protocol (`ResponseHandler`: its C response parser, read timeout and
flow control); what aiohttp's `ClientSession` adds on top of it (cookies, redirects, auth, tracing
signals, per-request `ClientRequest` objects) a proxy does not use, and it cost two thirds of the time
of a pass-through request, so the pool and the request writing are ours (`client.py`).
"""
from __future__ import annotations

import asyncio
import collections
import ipaddress
import socket
import ssl
from typing import Callable, Protocol

from aiohttp.resolver import DefaultResolver

from sidecar.aiohttp_private import ResponseHandler
from sidecar.core.authority import authority
from sidecar.transport.errors import UpstreamFailure, connect_failure
from sidecar.policy.conditions import Outcome

KEEPALIVE = 15.0                 # idle seconds before a pooled connection is closed (aiohttp's default)
DNS_TTL = 10.0                   # seconds a resolved name is reused for new connections
DNS_CACHE_MAX = 1024             # names remembered per pool

Origin = tuple[str, str, int, str | None]      # scheme, host, port, TLS server name


class Resolver(Protocol):
    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = ...) -> list[dict]: ...


def _literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class Pool:
    """The connections of one pool key."""

    def __init__(self, limit: int, connect_timeout: float, tls: Callable[[], ssl.SSLContext],
                 resolver: Resolver | None = None, cache_dns: bool = True) -> None:
        self.limit = limit
        self.connect_timeout = connect_timeout
        self._make_tls = tls                     # called on the first https connection (loads the CAs)
        self._tls: ssl.SSLContext | None = None
        self._resolver = resolver or DefaultResolver()
        self._cache_dns = cache_dns              # a guarded resolver checks every answer: no cache
        self._dns: dict[tuple[str, int], tuple[float, list[str]]] = {}
        self._idle: dict[Origin, list[tuple[ResponseHandler, float]]] = {}
        self._open = 0                           # connections counted against `limit`
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._expiry: asyncio.TimerHandle | None = None
        self._closed = False
        self._loop = asyncio.get_running_loop()

    def stats(self) -> dict:
        """For /status: connections open (idle ones included), idle, and requests waiting for one."""
        return {"open": self._open, "idle": sum(len(v) for v in self._idle.values()),
                "waiting": sum(1 for w in self._waiters if not w.done()), "max": self.limit}

    def idle(self, origin: Origin) -> ResponseHandler | None:
        """An idle keep-alive connection to `origin`, if one is still good (the common case: no await)."""
        idle = self._idle.get(origin)
        while idle:
            proto, since = idle.pop()
            if proto.is_connected() and not proto.should_close and self._loop.time() - since < KEEPALIVE:
                return proto
            self._discard(proto)
        return None

    async def acquire(self, origin: Origin, *, fresh: bool = False) -> tuple[ResponseHandler, bool]:
        """A connection to `origin` and whether it was reused from the idle list."""
        if not fresh:
            proto = self.idle(origin)
            if proto is not None:
                return proto, True
        while self._open >= self.limit:
            if self._close_any_idle():
                break
            waiter = self._loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif not waiter.cancelled():
                    self._wake()                  # pass the slot this waiter was given on
                raise
            if not fresh:
                proto = self.idle(origin)
                if proto is not None:
                    return proto, True
        self._open += 1
        try:
            return await self._connect(origin), False
        except BaseException:
            self._open -= 1
            self._wake()
            raise

    def release(self, origin: Origin, proto: ResponseHandler, reusable: bool) -> None:
        """Give a connection back: kept idle when it can carry another request, else closed."""
        if reusable and not self._closed and proto.is_connected() and not proto.should_close:
            self._idle.setdefault(origin, []).append((proto, self._loop.time()))
            if self._expiry is None:
                self._expiry = self._loop.call_later(KEEPALIVE, self._expire)
            self._wake()
            return
        if reusable:
            proto.close()
        else:
            proto.abort()                         # mid-body: no graceful close, the peer sees a cut
        self._open -= 1
        self._wake()

    def _discard(self, proto: ResponseHandler) -> None:
        proto.close()
        self._open -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _close_any_idle(self) -> bool:
        """At the limit with idle connections to other origins: close the oldest to make room."""
        oldest = None
        for origin, idle in self._idle.items():
            if idle and (oldest is None or idle[0][1] < self._idle[oldest][0][1]):
                oldest = origin
        if oldest is None:
            return False
        proto, _ = self._idle[oldest].pop(0)
        proto.close()
        self._open -= 1
        return True

    def _expire(self) -> None:
        self._expiry = None
        cutoff = self._loop.time() - KEEPALIVE
        remaining = False
        for origin in list(self._idle):
            idle = self._idle[origin]
            keep = []
            for proto, since in idle:
                if since > cutoff and proto.is_connected():
                    keep.append((proto, since))
                else:
                    proto.close()
                    self._open -= 1
            if keep:
                self._idle[origin] = keep
                remaining = True
            else:
                del self._idle[origin]
        if remaining and not self._closed:
            self._expiry = self._loop.call_later(KEEPALIVE / 2, self._expire)
        self._wake()

    async def _addresses(self, host: str, port: int) -> list[str]:
        if _literal(host):
            return [host]
        now = self._loop.time()
        if self._cache_dns:
            hit = self._dns.get((host, port))
            if hit is not None and hit[0] > now:
                return hit[1]
        try:
            found = await self._resolver.resolve(host, port, family=socket.AF_UNSPEC)
        except OSError as exc:
            raise connect_failure(exc, f"cannot resolve {host}") from exc
        addresses = list(dict.fromkeys(entry["host"] for entry in found))
        if self._cache_dns:
            if len(self._dns) >= DNS_CACHE_MAX:
                self._dns.clear()                 # a pool that met this many names: start over
            self._dns[(host, port)] = (now + DNS_TTL, addresses)
        return addresses

    async def _connect(self, origin: Origin) -> ResponseHandler:
        scheme, host, port, server_name = origin
        tls = None
        if scheme == "https":
            if self._tls is None:
                self._tls = self._make_tls()
            tls = self._tls
        loop = self._loop
        error: BaseException | None = None
        for address in await self._addresses(host, port):
            try:
                async with asyncio.timeout(self.connect_timeout):
                    _, proto = await loop.create_connection(
                        lambda: ResponseHandler(loop), address, port, ssl=tls,
                        server_hostname=(server_name or host) if tls is not None else None)
                return proto
            except TimeoutError as exc:
                error = UpstreamFailure(Outcome.CONNECT_FAILURE, f"connect timeout to {authority(host, port)}")
                error.__cause__ = exc
            except (OSError, ssl.SSLError, ssl.CertificateError) as exc:
                error = connect_failure(exc, f"cannot connect to {authority(host, port)}")
        if isinstance(error, UpstreamFailure):
            raise error
        raise UpstreamFailure(Outcome.CONNECT_FAILURE, f"{host} resolved to no address")

    def close(self) -> None:
        self._closed = True
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        for idle in self._idle.values():
            for proto, _ in idle:
                proto.close()
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(UpstreamFailure(Outcome.CONNECT_FAILURE, "the pool was closed"))
        self._waiters.clear()
