"""The one place requests leave for upstreams: pools per upstream and a single `send`.

One pool per named upstream, sized by `max_connections` and dialled with its `connect_timeout` and TLS
settings; one shared pool for requests that go to their original destination (and one more, resolving
through the egress guard, for the proxy listener's). Redirects are not followed and bodies are not
decompressed: the app sees what the upstream sent. Pools survive a policy reload when the upstream's
connection settings did not change.

The request is written here (RFC 9112: origin-form target, `Host`, `Content-Length` or chunked
framing) and the response read with aiohttp's client protocol and C parser (`pool.py` says why not
`ClientSession`). As aiohttp's client does, a request that finds a reused keep-alive connection
closed under it (RFC 9112 §9.3.1) is sent once more on a new one when it is idempotent and its
body can be sent again; that is the transport's own, not a policy retry.
"""
from __future__ import annotations

import asyncio
import functools
import ssl
from dataclasses import dataclass
from typing import AsyncIterable, Iterable

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from sidecar.exchange.context import Target
from sidecar.aiohttp_private import ResponseHandler, StreamWriter, serialize_headers
from sidecar.policy.conditions import Outcome
from sidecar.policy.model import Upstream
from sidecar.transport.egress import GuardedResolver
from sidecar.transport.errors import UpstreamFailure, translate
from sidecar.transport.h2client import H2Pool, NotH2
from sidecar.transport.h2client import Response as H2Response
from sidecar.transport.pool import Origin, Pool

PASSTHROUGH_CONNECT_TIMEOUT = 5.0
PASSTHROUGH_MAX_CONNECTIONS = 1000
READ_BUFSIZE = 64 * 1024
MAX_LINE = MAX_FIELD = 8190                  # response status line and header field limits (aiohttp's)
COALESCE = 16 * 1024                         # a body this small leaves in the same send() as the head

NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})     # RFC 9110 §9.2.2
STALE_CONNECTION = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)


@dataclass(frozen=True, slots=True)
class PoolKey:
    name: str | None
    origin: str
    connect_timeout: float
    max_connections: int
    ca_file: str | None
    verify: bool
    # Resolves through the egress guard refusing these own ports (proxy listener); one such pool per
    # set of ports, which changes only when a reload moves a listener.
    guard: frozenset[int] | None = None

    @property
    def guarded(self) -> bool:
        return self.guard is not None


def _key(up: Target | None, guard: frozenset[int] | None = None) -> PoolKey:
    if up is None:
        return PoolKey(None, "", PASSTHROUGH_CONNECT_TIMEOUT, PASSTHROUGH_MAX_CONNECTIONS, None, True, guard)
    return PoolKey(up.name, up.origin, up.connect_timeout, up.max_connections, up.tls.ca_file, up.tls.verify)


def _ssl_context(key: PoolKey) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=key.ca_file) if key.ca_file else ssl.create_default_context()
    if not key.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Response:
    """Status and headers of an upstream's answer; `content` streams its body. `release()` gives the
    connection back to the pool when the body was read to its end, and closes it otherwise."""

    __slots__ = ("status", "reason", "headers", "content", "_pool", "_origin", "_proto", "_writer", "_done")

    def __init__(self, status: int, reason: str, headers: CIMultiDictProxy, content: aiohttp.StreamReader,
                 pool: Pool, origin: Origin, proto: ResponseHandler, writer: asyncio.Task | None) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content = content
        self._pool = pool
        self._origin = origin
        self._proto = proto
        self._writer = writer
        self._done = False
        if not content.is_eof():
            _fail_body_on_close(content, proto)

    @property
    def protocol(self) -> ResponseHandler:
        """The connection's protocol: after a 101, proxy/takeover.py takes its socket over."""
        return self._proto

    def release(self) -> None:
        if self._done:
            return
        self._done = True
        writer = self._writer
        content = self.content
        reusable = content.is_eof() and content.exception() is None and (writer is None or writer.done())
        if writer is not None and not writer.done():
            writer.cancel()                  # the upstream answered before taking the whole body
        self._pool.release(self._origin, self._proto, reusable)

    def __del__(self) -> None:
        # A safety net like aiohttp's ClientResponse.__del__: a response dropped unreleased must not
        # hold its connection and its pool slot forever.
        if not self._done:
            self._done = True
            try:
                self._pool.release(self._origin, self._proto, False)
            except Exception:  # noqa: BLE001 - at interpreter exit the loop may be gone
                pass


def _fail_body_on_close(content: aiohttp.StreamReader, proto: ResponseHandler) -> None:
    """Work around an aiohttp (3.14) hang: a framing error in a response body (a bad chunk size) makes
    the client parser drop the body's stream without an error or EOF and close the connection, so a
    reader waits forever. When the connection closes under a body that has neither ended nor failed,
    fail it: the relay sees a cut stream, the app a cut connection."""
    closed = proto.closed
    if closed is None or closed.done():
        return

    def lost(_: asyncio.Future) -> None:
        if not content.is_eof() and content.exception() is None:
            content.set_exception(aiohttp.ClientPayloadError("upstream connection closed mid-body"))
    closed.add_done_callback(lost)
    content.on_eof(lambda: closed.remove_done_callback(lost))   # pooled connections: no pile-up


class Transport:
    """Owns every outbound connection. `send` returns once response headers arrived."""

    def __init__(self) -> None:
        self._pools: dict[PoolKey, Pool] = {}
        self._h2_pools: dict[PoolKey, H2Pool] = {}
        self._keys: dict[int, tuple[Target, PoolKey]] = {}

    def _pool(self, key: PoolKey) -> Pool:
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = Pool(
                key.max_connections, key.connect_timeout, functools.partial(_ssl_context, key),
                resolver=GuardedResolver(key.guard) if key.guard is not None else None,
                cache_dns=key.guard is None)
        return pool

    async def send(self, target: Target | None, method: str, url: URL, headers: CIMultiDict,
                   body: bytes | AsyncIterable[bytes] | None, *, timeout: float, read_idle: float,
                   server_hostname: str | None = None, guard: frozenset[int] | None = None) -> Response:
        """Send one request; raise `UpstreamFailure` unless response headers arrive within `timeout`.

        `guard`: the request came from the proxy listener on a route without `allow_internal`; a
        request to its original destination then resolves through the egress guard refusing these
        own ports (egress.py). Named upstreams are the operator's and are not guarded."""
        if target is None:
            key = _key(None, guard)
        else:
            # Hoisted to once per target object (a policy load, an endpoint): hashing the frozen
            # record per request cost more than the rest of this method.
            cached = self._keys.get(id(target))
            if cached is None or cached[0] is not target:
                cached = self._keys[id(target)] = (target, _key(target))
            key = cached[1]
        if timeout <= 0:
            raise UpstreamFailure(Outcome.TIMEOUT, "no time left for this try")
        origin = (url.scheme, url.raw_host or "", url.port or 80, server_hostname)
        alpn = _h2_alpn(target, url, headers)
        if alpn is not None and origin not in self._h2_pool(key).h1_origins:
            try:
                return await self._send_h2(key, method, url, headers, body, timeout, origin, alpn)
            except NotH2:
                pass                         # `auto` over TLS and the upstream chose HTTP/1.1
        pool = self._pool(key)
        streamed = body is not None and not isinstance(body, (bytes, bytearray))
        head, chunked = _head(method, url, headers, body, streamed)
        again = method in IDEMPOTENT and not streamed
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        fresh = False
        resp: Response | None = None
        try:
            while resp is None:
                # The common case, an idle keep-alive connection, takes no await and no timer; a new
                # connection or a wait for a pool slot is bounded by the try's deadline.
                proto = None if fresh else pool.idle(origin)
                reused = proto is not None
                if proto is None:
                    async with asyncio.timeout_at(deadline):
                        proto, reused = await pool.acquire(origin, fresh=fresh)
                try:
                    resp = await _exchange(loop, pool, origin, proto, method, head, body, streamed, chunked,
                                           read_idle, deadline)
                except STALE_CONNECTION:
                    if not (reused and again):
                        raise
                    again, fresh = False, True           # once, on a new connection
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - translated in one place, re-raised from the cause
            raise translate(exc) from exc
        return resp

    def _h2_pool(self, key: PoolKey) -> H2Pool:
        pool = self._h2_pools.get(key)
        if pool is None:
            pool = self._h2_pools[key] = H2Pool(
                key.max_connections, key.connect_timeout, functools.partial(_ssl_context, key),
                resolver=GuardedResolver() if key.guarded else None)
        return pool

    async def _send_h2(self, key: PoolKey, method: str, url: URL, headers: CIMultiDict, body,
                       timeout: float, origin, alpn: tuple[str, ...]) -> H2Response:
        if "expect" in headers:
            del headers["expect"]
        if url.raw_user is not None and "authorization" not in headers:
            headers["Authorization"] = aiohttp.BasicAuth.from_url(url).encode()
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            return await self._h2_pool(key).send(method, url, headers, body, deadline=deadline,
                                                 origin=origin, alpn=alpn or None)
        except (asyncio.CancelledError, NotH2):
            raise
        except BaseException as exc:  # noqa: BLE001 - translated in one place, re-raised from the cause
            raise translate(exc) from exc

    def stats(self) -> dict[str, dict]:
        """Each pool's connections, by upstream name (`passthrough` for original destinations);
        an upstream spoken to in HTTP/2 shows its connections and streams under `h2`."""
        out: dict[str, dict] = {}
        for key, pool in self._pools.items():
            name = key.name or ("passthrough (egress-guarded)" if key.guarded else "passthrough")
            out[name] = pool.stats()
        for key, h2pool in self._h2_pools.items():
            name = key.name or ("passthrough (egress-guarded)" if key.guarded else "passthrough")
            out.setdefault(name, {})["h2"] = h2pool.stats()
        return out

    async def retain(self, upstreams: dict[str, Upstream], endpoints: Iterable = ()) -> None:
        """After a reload: close pools no upstream (or balanced upstream's endpoint) uses any more."""
        self._keys.clear()                   # the old policy's Upstream records are gone
        keep = {_key(u) for u in upstreams.values()} | {_key(t) for t in endpoints}
        for key in [k for k in self._pools if k.name is not None and k not in keep]:   # passthrough stays
            pool = self._pools.pop(key)
            asyncio.get_running_loop().call_later(60, pool.close)
        for key in [k for k in self._h2_pools if k not in keep]:
            asyncio.get_running_loop().call_later(60, self._h2_pools.pop(key).close)

    def retire(self, target, after: float) -> None:
        """An endpoint left its upstream's set: its pool takes no new request and closes after `after`
        seconds, so requests in flight on it finish (a connection released after that is closed)."""
        self._keys.pop(id(target), None)
        key = _key(target)
        for pool in (self._pools.pop(key, None), self._h2_pools.pop(key, None)):
            if pool is not None:
                asyncio.get_running_loop().call_later(after, pool.close)

    async def close(self) -> None:
        for pool in [*self._pools.values(), *self._h2_pools.values()]:
            pool.close()
        self._pools.clear()
        self._h2_pools.clear()


def _h2_alpn(target: Target | None, url: URL, headers: CIMultiDict) -> tuple[str, ...] | None:
    """How to speak to this upstream: None for HTTP/1.1, else HTTP/2 with these ALPN offers (empty
    for h2c, prior knowledge). `auto` (and an original destination): on TLS whatever ALPN picks; in
    clear text HTTP/1.1, except for gRPC, which exists only over HTTP/2."""
    protocol = "auto" if target is None else target.protocol
    if protocol == "http1":
        return None
    if protocol == "h2c":
        return ()
    if protocol == "h2":
        return ("h2",)
    if url.scheme == "https":
        return ("h2", "http/1.1")
    if headers.get("content-type", "").startswith("application/grpc"):
        return ()
    return None


def _head(method: str, url: URL, headers: CIMultiDict, body, streamed: bool) -> tuple[bytes, bool]:
    """The request line and headers, with the framing the body needs (RFC 9112 §6)."""
    if "host" not in headers:
        headers["Host"] = url.host_port_subcomponent or ""
    if "expect" in headers:              # the app's 100-continue was answered by our own server (Envoy does the same)
        del headers["expect"]
    if url.raw_user is not None and "authorization" not in headers:
        headers["Authorization"] = aiohttp.BasicAuth.from_url(url).encode()
    if body is None:
        if method not in NO_BODY_METHODS and "content-length" not in headers:
            headers["Content-Length"] = "0"
    elif streamed:
        if "content-length" not in headers:
            headers["Transfer-Encoding"] = "chunked"
            return serialize_headers(f"{method} {url.raw_path_qs or '/'} HTTP/1.1", headers), True
    elif "content-length" not in headers:
        headers["Content-Length"] = str(len(body))
    return serialize_headers(f"{method} {url.raw_path_qs or '/'} HTTP/1.1", headers), False


async def _exchange(loop: asyncio.AbstractEventLoop, pool: Pool, origin: Origin, proto: ResponseHandler,
                    method: str, head: bytes, body, streamed: bool, chunked: bool, read_idle: float,
                    deadline: float) -> Response:
    """Write the request on `proto` and wait for the response head until `deadline`; the connection
    goes back to the pool (or is closed) when this fails, else when the `Response` is released."""
    writer: asyncio.Task | None = None
    # The head's deadline is a timer that fails the protocol's read (no asyncio.timeout frame per
    # request); once the head is in, the body is bounded by the protocol's idle `read_timeout`.
    timer = loop.call_at(deadline, _head_deadline, proto)
    try:
        proto.set_response_params(skip_payload=method == "HEAD", read_until_eof=True, auto_decompress=False,
                                  read_timeout=read_idle, read_bufsize=READ_BUFSIZE,
                                  max_line_size=MAX_LINE, max_field_size=MAX_FIELD)
        transport = proto.transport
        if transport is None:
            raise aiohttp.ServerDisconnectedError()
        if body is None:
            transport.write(head)
        elif not streamed:
            if len(body) <= COALESCE:
                transport.write(head + body)
            else:
                transport.writelines((head, body))
        else:
            transport.write(head)
            writer = asyncio.ensure_future(_write_body(proto, body, chunked))
        message, payload = await proto.read()
        while 100 <= message.code < 200 and message.code != 101:      # interim answers (RFC 9110 §15.2)
            message, payload = await proto.read()
    except BaseException:
        timer.cancel()
        if writer is not None:
            writer.cancel()
        pool.release(origin, proto, False)
        raise
    timer.cancel()
    return Response(message.code, message.reason, message.headers, payload, pool, origin, proto, writer)


def _head_deadline(proto: ResponseHandler) -> None:
    proto.set_exception(TimeoutError("no response headers in time"))


async def _write_body(proto: ResponseHandler, body: AsyncIterable[bytes], chunked: bool) -> None:
    """Stream a request body with flow control; a body that breaks off cuts the connection, so the
    upstream never takes a truncated request for a whole one."""
    writer = StreamWriter(proto, asyncio.get_running_loop())
    if chunked:
        writer.enable_chunking()
    try:
        async for chunk in body:
            await writer.write(chunk)
        await writer.write_eof()
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - the app's body or the upstream's socket failed
        proto.set_exception(aiohttp.ClientOSError(f"request body could not be sent: {exc}"))
        transport = proto.transport
        if transport is not None:
            transport.abort()
        return
