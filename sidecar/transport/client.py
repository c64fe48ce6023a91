"""The one place aiohttp's client is used: connection pools and a single `send`.

One pool (ClientSession + TCPConnector) per named upstream, sized by `max_connections` and dialled with
its `connect_timeout` and TLS settings; one shared pool for requests that go to their original
destination. Redirects are not followed and bodies are not decompressed: the app sees what the upstream
sent. Pools survive a policy reload when the upstream's connection settings did not change.
"""
from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import AsyncIterable

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from sidecar.policy.model import Upstream
from sidecar.transport.egress import EGRESS_GUARD, GuardedResolver
from sidecar.transport.errors import UpstreamFailure, translate

PASSTHROUGH_CONNECT_TIMEOUT = 5.0
PASSTHROUGH_MAX_CONNECTIONS = 1000


@dataclass(frozen=True, slots=True)
class PoolKey:
    name: str | None
    origin: str
    connect_timeout: float
    max_connections: int
    ca_file: str | None
    verify: bool
    guarded: bool = False                  # resolves through the egress guard (proxy listener)


def _key(up: Upstream | None, guarded: bool = False) -> PoolKey:
    if up is None:
        return PoolKey(None, "", PASSTHROUGH_CONNECT_TIMEOUT, PASSTHROUGH_MAX_CONNECTIONS, None, True, guarded)
    return PoolKey(up.name, up.origin, up.connect_timeout, up.max_connections, up.tls.ca_file, up.tls.verify)


def _ssl_context(key: PoolKey) -> ssl.SSLContext | bool:
    if not key.verify:
        return False
    ctx = ssl.create_default_context(cafile=key.ca_file) if key.ca_file else ssl.create_default_context()
    return ctx


def _fail_body_on_close(resp: aiohttp.ClientResponse) -> None:
    """Work around an aiohttp (3.14) hang: a framing error in a response body (a bad chunk size) makes
    the client parser drop the body's stream without an error or EOF and close the connection, so a
    reader waits forever (sock_read is dropped too). When the connection closes under a body that has
    neither ended nor failed, fail it: the relay sees a cut stream, the app a cut connection."""
    content = resp.content
    conn = resp.connection
    protocol = conn.protocol if conn is not None else None
    closed = protocol.closed if protocol is not None else None
    if closed is None or closed.done() or content.is_eof():
        return

    def lost(_: asyncio.Future) -> None:
        if not content.is_eof() and content.exception() is None:
            content.set_exception(aiohttp.ClientPayloadError("upstream connection closed mid-body"))
    closed.add_done_callback(lost)
    content.on_eof(lambda: closed.remove_done_callback(lost))   # pooled connections: no pile-up


class Transport:
    """Owns every outbound connection. `send` returns once response headers arrived."""

    def __init__(self) -> None:
        self._pools: dict[PoolKey, aiohttp.ClientSession] = {}
        self._timeouts: dict[PoolKey, aiohttp.ClientTimeout] = {}
        self._keys: dict[int, tuple[Upstream, PoolKey]] = {}
        self._read_timeouts: dict[tuple[float, float], aiohttp.ClientTimeout] = {}

    def _session(self, key: PoolKey) -> aiohttp.ClientSession:
        session = self._pools.get(key)
        if session is None:
            connector = aiohttp.TCPConnector(
                limit=key.max_connections, limit_per_host=0, ssl=_ssl_context(key),
                ttl_dns_cache=10, enable_cleanup_closed=False, force_close=False,
                resolver=GuardedResolver() if key.guarded else None)
            session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                raise_for_status=False)
            self._pools[key] = session
            self._timeouts[key] = aiohttp.ClientTimeout(total=None, sock_connect=key.connect_timeout)
        return session

    async def send(self, upstream: Upstream | None, method: str, url: URL, headers: CIMultiDict,
                   body: bytes | AsyncIterable[bytes] | None, *, timeout: float, read_idle: float,
                   server_hostname: str | None = None) -> aiohttp.ClientResponse:
        """Send one request; raise `UpstreamFailure` unless response headers arrive within `timeout`."""
        # A request to its original destination from the proxy listener resolves through the guard.
        if upstream is None:
            key = _key(None, guarded=EGRESS_GUARD.get() is not None)
        else:
            # Hoisted to once per Upstream object (a policy load): hashing the frozen record per
            # request cost more than the rest of this method.
            cached = self._keys.get(id(upstream))
            if cached is None or cached[0] is not upstream:
                cached = self._keys[id(upstream)] = (upstream, _key(upstream))
            key = cached[1]
        session = self._session(key)
        client_timeout = self._read_timeouts.get((key.connect_timeout, read_idle))
        if client_timeout is None:           # policy values only, so this stays a handful of entries
            client_timeout = self._read_timeouts[(key.connect_timeout, read_idle)] = aiohttp.ClientTimeout(
                total=None, sock_connect=key.connect_timeout, sock_read=read_idle)
        if timeout <= 0:
            raise UpstreamFailure("timeout", "no time left for this try")
        try:
            async with asyncio.timeout(timeout):
                resp = await session._request(  # noqa: SLF001 - avoids the context-manager wrapper's cost
                    method, url, headers=headers, data=body, allow_redirects=False,
                    timeout=client_timeout, compress=None, chunked=None,
                    server_hostname=server_hostname or None)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - translated in one place, re-raised from the cause
            raise translate(exc) from exc
        _fail_body_on_close(resp)
        return resp

    async def retain(self, upstreams: dict[str, Upstream]) -> None:
        """After a reload: close pools no upstream uses any more (idle connections only linger)."""
        self._keys.clear()                   # the old policy's Upstream records are gone
        keep = {_key(u) for u in upstreams.values()} | {_key(None), _key(None, guarded=True)}
        for key in [k for k in self._pools if k not in keep]:
            session = self._pools.pop(key)
            self._timeouts.pop(key, None)
            asyncio.get_running_loop().call_later(60, lambda s=session: asyncio.ensure_future(s.close()))

    async def close(self) -> None:
        for session in self._pools.values():
            await session.close()
        self._pools.clear()
