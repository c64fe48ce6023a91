"""HTTP/2 to upstreams (`protocol: h2c | h2 | auto`): multiplexed connections with the HTTP/1.1
transport's contract (`send` returns once the response head arrived; the body streams from
`Response.content`; `release()` ends the stream).

    H2Client   one connection: a stream per request; GOAWAY drains it (in-flight streams finish, no
               new ones), PING keep-alive (a peer that stops answering is dropped), RST_STREAM
               (CANCEL) when a request is abandoned before its answer was read to the end
    H2Pool     the connections of one pool key per origin: a request takes a stream on a connection
               with room under the peer's SETTINGS_MAX_CONCURRENT_STREAMS, else another connection
               is opened (up to `max_connections`), else it waits for a stream to end

A stream the peer never processed (above a GOAWAY's last stream id, or refused with REFUSED_STREAM)
is sent again on another connection, whatever its method (RFC 9113 §8.7), when its body can be.
"""
from __future__ import annotations

import asyncio
import collections
import os
import socket
import ssl
from typing import Callable

import h2.config
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from aiohttp.resolver import DefaultResolver
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from sidecar.core.authority import authority
from sidecar.transport.errors import UpstreamFailure, connect_failure
from sidecar.transport.h2conn import FlowBody, H2Peer, StreamGone, decode, encode, fields
from sidecar.policy.conditions import Outcome

PING_INTERVAL = 30.0            # an idle-or-busy connection is pinged this often; no ACK by the next: dropped
CONN_WINDOW = 4 * 1024 * 1024   # our receive window for the whole connection (streams: h2's default 64 KiB)
UNPROCESSED_RESENDS = 2         # how often a stream the peer never processed is sent again

Origin = tuple[str, str, int, str | None]      # scheme, host, port, TLS server name


class Unprocessed(Exception):
    """The peer did not process the stream: it may be sent again anywhere (RFC 9113 §8.7)."""


class NotH2(Exception):
    """`auto`: TLS with ALPN settled on HTTP/1.1; the request goes to the HTTP/1.1 pool."""


class Response:
    """An upstream's answer on one stream; the body streams from `content` (a `FlowBody`, whose
    `trailers` are set when the stream ends)."""

    __slots__ = ("status", "reason", "headers", "content", "_client", "_sid", "_done")

    def __init__(self, status: int, headers: CIMultiDictProxy, content: FlowBody, client: "H2Client",
                 sid: int) -> None:
        self.status = status
        self.reason = ""
        self.headers = headers
        self.content = content
        self._client = client
        self._sid = sid
        self._done = False

    def release(self) -> None:
        if self._done:
            return
        self._done = True
        self._client.finish(self._sid, whole=self.content.is_eof() and self.content.exception() is None)

    def __del__(self) -> None:
        if not self._done:
            try:
                self.release()
            except Exception:  # noqa: BLE001 - at interpreter exit the loop may be gone
                pass


class _Stream:
    __slots__ = ("head", "body", "writer")

    def __init__(self, head: asyncio.Future, body: FlowBody) -> None:
        self.head = head
        self.body = body
        self.writer: asyncio.Task | None = None


class H2Client(H2Peer):
    def __init__(self, on_change: Callable[["H2Client"], None]) -> None:
        super().__init__(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self._on_change = on_change          # the pool: a stream ended, settings or GOAWAY arrived
        self.streams: dict[int, _Stream] = {}
        self.draining = False                # GOAWAY received (or sent): no new streams
        self.settled: asyncio.Future = asyncio.get_running_loop().create_future()   # peer's SETTINGS
        self._ping: asyncio.TimerHandle | None = None
        self._ping_out = False

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.selected_alpn_protocol() != "h2":
            return                           # TLS without h2: not a byte of HTTP/2 (the pool falls back)
        self.conn.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 0,      # no pushed or peer-opened streams
        })
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(CONN_WINDOW - 65535)
        self.flush()
        self._ping = asyncio.get_running_loop().call_later(PING_INTERVAL, self._keepalive)

    # -- capacity -----------------------------------------------------------------------------------
    @property
    def room(self) -> int:
        """Streams this connection may still open under the peer's limit."""
        if self.closed or self.draining or not self.settled.done():
            return 0
        limit = self.conn.remote_settings.max_concurrent_streams
        left = limit - len(self.streams)
        if self.conn.highest_outbound_stream_id and self.conn.highest_outbound_stream_id > 2 ** 31 - 1000:
            return 0                         # stream ids nearly spent: a new connection takes over
        return max(0, left)

    # -- events -------------------------------------------------------------------------------------
    def on_event(self, event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None and not stream.head.done():
                stream.head.set_result(event.headers)
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            else:
                stream.body.feed(event.data, event.flow_controlled_length)
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.body.trailers = CIMultiDict((decode(k), decode(v)) for k, v in event.headers)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.body.feed_eof()
        elif isinstance(event, h2.events.StreamReset):
            self._fail(event.stream_id, event.error_code)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._goaway(event.error_code, event.last_stream_id)
        elif isinstance(event, h2.events.PingAckReceived):
            self._ping_out = False
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            super().on_event(event)
            if not self.settled.done():
                self.settled.set_result(None)
            self._on_change(self)
        else:
            super().on_event(event)

    def _fail(self, sid: int, code: int) -> None:
        stream = self.streams.get(sid)
        if stream is None:
            return
        if not stream.head.done():
            if code == h2.errors.ErrorCodes.REFUSED_STREAM:
                stream.head.set_exception(Unprocessed("stream refused"))
            else:
                stream.head.set_exception(UpstreamFailure(Outcome.RESET, f"stream reset by the upstream ({_code(code)})"))
        stream.body.set_exception(UpstreamFailure(Outcome.RESET, f"stream reset by the upstream ({_code(code)})"))
        if stream.writer is not None:
            stream.writer.cancel()
        self.wake_stream(sid, StreamGone("stream reset"))

    def _goaway(self, code: int, last_stream_id: int | None) -> None:
        self.draining = True
        last = last_stream_id if last_stream_id is not None else 2 ** 31
        for sid, stream in list(self.streams.items()):
            if sid > last and not stream.head.done():
                stream.head.set_exception(Unprocessed("above the GOAWAY's last stream id"))
                self.streams.pop(sid)
            elif code:
                self._fail(sid, code)
        if not self.streams or code:
            self.close()
        else:
            # A graceful GOAWAY: the streams it kept may still finish (RFC 9113 §6.8). `h2` closes its
            # state machine on any GOAWAY and would refuse their frames (python-hyper/h2#1181), so it
            # is put back to CLIENT_OPEN; `draining` keeps this side from opening streams.
            self.conn.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
        self._on_change(self)

    def on_protocol_error(self, exc: h2.exceptions.ProtocolError) -> None:
        self.draining = True

    def on_lost(self, exc: Exception | None) -> None:
        self.draining = True
        if self._ping is not None:
            self._ping.cancel()
        if not self.settled.done():
            self.settled.set_exception(UpstreamFailure(Outcome.PROTOCOL_ERROR, "the upstream closed before its HTTP/2 SETTINGS"))
            self.settled.exception()         # retrieved: nobody may be waiting
        for sid, stream in list(self.streams.items()):
            if not stream.head.done():
                stream.head.set_exception(UpstreamFailure(Outcome.RESET, "upstream connection closed"))
            stream.body.set_exception(UpstreamFailure(Outcome.RESET, "upstream connection closed mid-body"))
            if stream.writer is not None:
                stream.writer.cancel()
        self.streams.clear()
        self._on_change(self)

    def _keepalive(self) -> None:
        if self.closed:
            return
        if self._ping_out:                   # the last PING went unanswered for a whole interval
            self.draining = True
            self.abort()
            return
        self._ping_out = True
        self.conn.ping(os.urandom(8))
        self.flush()
        self._ping = asyncio.get_running_loop().call_later(PING_INTERVAL, self._keepalive)

    # -- requests -----------------------------------------------------------------------------------
    async def request(self, method: str, url: URL, headers: CIMultiDict, body, streamed: bool,
                      deadline: float) -> Response:
        sid = self.conn.get_next_available_stream_id()
        authority = headers.get("host") or url.raw_authority
        head = [(b":method", method.encode()), (b":scheme", url.scheme.encode()),
                (b":authority", encode(authority)), (b":path", encode(url.raw_path_qs or "/")),
                *fields(headers)]
        if headers.get("content-type", "").startswith("application/grpc"):
            head.append((b"te", b"trailers"))  # gRPC over HTTP/2 requires it (PROTOCOL-HTTP2.md)
        loop = self.loop
        stream = _Stream(loop.create_future(), FlowBody(lambda n: self._ack(sid, n)))
        self.streams[sid] = stream
        try:
            self.send_headers(sid, head, end_stream=body is None)
        except h2.exceptions.ProtocolError as exc:
            self.streams.pop(sid, None)
            raise Unprocessed(str(exc)) from exc
        if body is not None:
            stream.writer = loop.create_task(self._write(sid, body, streamed))
        try:
            async with asyncio.timeout_at(deadline):
                raw = await stream.head
        except BaseException:
            self.finish(sid, whole=False)
            raise
        status = 0
        out: CIMultiDict = CIMultiDict()
        for name, value in raw:
            if name == b":status":
                status = int(value)
            elif not name.startswith(b":"):
                out.add(decode(name), decode(value))
        return Response(status, CIMultiDictProxy(out), stream.body, self, sid)

    async def _write(self, sid: int, body, streamed: bool) -> None:
        try:
            if streamed:
                await self.send_body(sid, body)
                self.end_stream(sid)
            else:
                await self.send_data(sid, bytes(body), end_stream=True)
        except (StreamGone, asyncio.CancelledError):
            return
        except Exception:  # noqa: BLE001 - the app's body broke off: the upstream must not take it as whole
            self.reset(sid, h2.errors.ErrorCodes.CANCEL)

    def _ack(self, sid: int, n: int) -> None:
        if n and not self.closed:
            self.conn.acknowledge_received_data(n, sid)
            self.flush()

    def finish(self, sid: int, whole: bool) -> None:
        """The request is done with this stream: reset it (CANCEL) unless both sides ended it."""
        stream = self.streams.pop(sid, None)
        if stream is None:
            return
        writer = stream.writer
        if not whole or (writer is not None and not writer.done()):
            if writer is not None:
                writer.cancel()
            stream.body.set_exception(StreamGone("stream cancelled"))
            stream.body.read_nowait()       # credit back for what arrived unread
            self.reset(sid, h2.errors.ErrorCodes.CANCEL)
        else:
            stream.body.read_nowait()       # ended both ways: credit back for anything left unread
        if self.draining and not self.streams:
            self.close()
        self._on_change(self)


def _code(code) -> str:
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return str(code)


class H2Pool:
    """HTTP/2 connections of one pool key, per origin; at most `limit` connections in all."""

    def __init__(self, limit: int, connect_timeout: float, tls: Callable[[], ssl.SSLContext],
                 resolver=None) -> None:
        self.limit = limit
        self.connect_timeout = connect_timeout
        self._make_tls = tls
        self._tls: ssl.SSLContext | None = None
        self._resolver = resolver or DefaultResolver()
        self._conns: dict[Origin, list[H2Client]] = {}
        self._connecting: dict[Origin, asyncio.Future] = {}
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self.h1_origins: set[Origin] = set()          # `auto` origins whose ALPN said HTTP/1.1
        self._closed = False

    def stats(self) -> dict:
        conns = [c for cs in self._conns.values() for c in cs]
        return {"protocol": "h2", "open": len(conns), "streams": sum(len(c.streams) for c in conns),
                "draining": sum(1 for c in conns if c.draining),
                "waiting": sum(1 for w in self._waiters if not w.done()), "max": self.limit}

    def _changed(self, client: H2Client) -> None:
        if client.closed or (client.draining and not client.streams):
            for origin, conns in list(self._conns.items()):
                if client in conns:
                    conns.remove(client)
                    if not conns:
                        del self._conns[origin]
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    async def send(self, method: str, url: URL, headers: CIMultiDict, body, *, deadline: float,
                   origin: Origin, alpn: tuple[str, ...] | None) -> Response:
        streamed = body is not None and not isinstance(body, (bytes, bytearray))
        resends = 0
        while True:
            client = await self._acquire(origin, alpn)
            try:
                return await client.request(method, url, headers, body, streamed, deadline)
            except Unprocessed:
                resends += 1
                if streamed or resends > UNPROCESSED_RESENDS:
                    raise UpstreamFailure(Outcome.RESET, "the upstream refused the stream (GOAWAY or REFUSED_STREAM)") from None

    async def _acquire(self, origin: Origin, alpn) -> H2Client:
        while True:
            if self._closed:
                raise UpstreamFailure(Outcome.CONNECT_FAILURE, "the pool was closed")
            conns = self._conns.get(origin, ())
            best = max(conns, key=lambda c: c.room, default=None)
            if best is not None and best.room > 0:
                return best
            pending = self._connecting.get(origin)
            if pending is not None:
                await asyncio.shield(pending)
                continue
            if sum(len(cs) for cs in self._conns.values()) < self.limit:
                fut = self._connecting[origin] = asyncio.get_running_loop().create_future()
                try:
                    client = await self._connect(origin, alpn)
                    self._conns.setdefault(origin, []).append(client)
                finally:
                    del self._connecting[origin]
                    fut.set_result(None)
                    self._changed_any()
                continue
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter

    def _changed_any(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    async def _connect(self, origin: Origin, alpn) -> H2Client:
        scheme, host, port, server_name = origin
        tls = None
        if scheme == "https":
            if self._tls is None:
                self._tls = self._make_tls()
                self._tls.set_alpn_protocols(list(alpn or ("h2",)))
            tls = self._tls
        loop = asyncio.get_running_loop()
        try:
            found = await self._resolver.resolve(host, port, family=socket.AF_UNSPEC)
        except OSError as exc:
            raise connect_failure(exc, f"cannot resolve {host}") from exc
        error: UpstreamFailure | None = None
        for address in dict.fromkeys(entry["host"] for entry in found):
            try:
                async with asyncio.timeout(self.connect_timeout):
                    transport, client = await loop.create_connection(
                        lambda: H2Client(self._changed), address, port, ssl=tls,
                        server_hostname=(server_name or host) if tls is not None else None)
                    if tls is not None:
                        chosen = transport.get_extra_info("ssl_object").selected_alpn_protocol()
                        if chosen != "h2":
                            transport.close()
                            if alpn and "http/1.1" in alpn:
                                self.h1_origins.add(origin)
                                raise NotH2()
                            raise UpstreamFailure(Outcome.CONNECT_FAILURE,
                                                  f"{authority(host, port)} did not agree to h2 by ALPN")
                    await client.settled       # the peer's SETTINGS: it speaks HTTP/2, and its limits
                return client
            except TimeoutError as exc:
                error = UpstreamFailure(Outcome.CONNECT_FAILURE, f"connect timeout to {authority(host, port)}")
                error.__cause__ = exc
            except (OSError, ssl.SSLError, ssl.CertificateError) as exc:
                error = connect_failure(exc, f"cannot connect to {authority(host, port)}")
        raise error or UpstreamFailure(Outcome.CONNECT_FAILURE, f"{host} resolved to no address")

    def close(self) -> None:
        self._closed = True
        for conns in self._conns.values():
            for client in conns:
                client.close()
        self._conns.clear()
        self._changed_any()

