"""HTTP/2 on the reverse and transparent listeners: each stream is one request through the same
`ListenerHandler` (route match, pipeline, reply) as an HTTP/1.1 request. One pipeline, two codecs.

    H2Request        one stream, shaped as the handler reads a request (method, target, headers, body)
                     and able to write its reply as HEADERS / DATA / trailing HEADERS frames
    H2Server         the connection (an `H2Peer`): opens a task per stream, feeds bodies, resets
    serve_sniffed    proxy/sniff.py's HTTP/2 hook: a connection that opened with the preface (RFC 9113
                     §3.4, prior knowledge, as gRPC clients send it) becomes an `H2Server`

Hostile input (RFC 9113 §10.5, CVE-2023-44487): `h2` itself refuses malformed frames, header lists
over MAX_HEADER_LIST (an HPACK bomb decodes past it), CONTINUATION floods and window overflows with a
GOAWAY. Here: at most MAX_STREAMS streams at once (more: the stream is refused), request bodies held
to the stream's window (the credit goes back only as the upstream takes the bytes), and a client that
resets most streams it opens right away (rapid reset) is sent GOAWAY ENHANCE_YOUR_CALM.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import weakref
from typing import Callable

import h2.config
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from aiohttp.http import HttpVersion
from hyperframe.frame import GoAwayFrame
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.proxy import sniff
from sidecar.proxy.sniff import Sniffed
from sidecar.transport.h2conn import FlowBody, H2Peer, StreamGone, decode, fields

log = logging.getLogger("sidecar.h2")

MAX_STREAMS = 128                  # SETTINGS_MAX_CONCURRENT_STREAMS we announce
MAX_HEADER_LIST = 64 * 1024        # SETTINGS_MAX_HEADER_LIST_SIZE (decoded size, HPACK bombs included)
CONN_WINDOW = 1024 * 1024          # connection receive window: all streams' unread request bytes
# Rapid reset (CVE-2023-44487), as Envoy judges it: once a connection opened PREMATURE_MIN streams, it
# is closed when half or more of them were reset by the client before their answer was complete or
# within PREMATURE_LIFETIME of opening.
PREMATURE_MIN = 100
PREMATURE_LIFETIME = 1.0
IDLE_TIMEOUT = 75.0                # no stream for this long: GOAWAY and close (as the HTTP/1 guard)
VERSION_2 = HttpVersion(2, 0)


class H2Request:
    """One HTTP/2 stream, with the attributes of aiohttp's request that `ListenerHandler` reads."""

    version = VERSION_2
    __slots__ = ("method", "raw_path", "headers", "content", "body_exists", "content_length",
                 "transport", "stream_id", "_peer")

    def __init__(self, peer: "H2Server", stream_id: int, method: str, raw_path: str,
                 headers: CIMultiDictProxy, content: FlowBody, body_exists: bool) -> None:
        self._peer = peer
        self.stream_id = stream_id
        self.method = method
        self.raw_path = raw_path
        self.headers = headers
        self.content = content
        self.body_exists = body_exists
        self.transport = peer.transport      # transparent mode reads SO_ORIGINAL_DST from its socket
        length = headers.get("content-length")
        self.content_length = int(length) if length is not None and length.isdigit() else None

    async def send_reply(self, reply) -> None:
        await self._peer.respond(self, reply)

    def abort(self) -> None:
        """The answer broke off mid-body: reset the stream, so the app sees it cut, not complete."""
        self._peer.reset(self.stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)


class H2Server(H2Peer):
    """One HTTP/2 connection from an app. `serve(request)` is the listener's handler entry."""

    def __init__(self, serve: Callable[[H2Request], object]) -> None:
        super().__init__(h2.config.H2Configuration(client_side=False, header_encoding=None))
        self._serve = serve
        self.tasks: dict[int, asyncio.Task] = {}
        self.bodies: dict[int, FlowBody] = {}
        self._opened = 0                     # streams opened on this connection
        self._premature = 0                  # of those, reset by the client early (rapid reset)
        self._recent: collections.OrderedDict[int, float] = collections.OrderedDict()   # sid -> opened at
        self._goaway = False
        self._idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.conn.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
        })
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(CONN_WINDOW - 65535)
        self.flush()
        self._arm_idle()

    # -- events -------------------------------------------------------------------------------------
    def on_event(self, event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._start(event)
        elif isinstance(event, h2.events.DataReceived):
            body = self.bodies.get(event.stream_id)
            if body is None:                 # a stream we no longer read: give the credit back at once
                self._ack(event.stream_id, event.flow_controlled_length)
            else:
                body.feed(event.data, event.flow_controlled_length)
        elif isinstance(event, h2.events.StreamEnded):
            body = self.bodies.get(event.stream_id)
            if body is not None:
                body.feed_eof()
        elif isinstance(event, h2.events.TrailersReceived):
            body = self.bodies.get(event.stream_id)
            if body is not None:             # request trailers are not forwarded (gRPC sends none)
                body.trailers = CIMultiDict((decode(k), decode(v)) for k, v in event.headers)
        elif isinstance(event, h2.events.StreamReset):
            self._reset_by_peer(event.stream_id)
        elif isinstance(event, h2.events.ConnectionTerminated):
            # The app's GOAWAY (h2load ends each run with one, streams still in flight). `h2` closes its
            # connection state on it and refuses to send anything more, the answers of those streams
            # included, so they end as if the app had reset them: their work is cancelled, and the
            # breaker takes no verdict on the upstream from them (a send failing here would count).
            self._shutdown()
        else:
            super().on_event(event)

    def _start(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        if self._goaway or len(self.tasks) >= MAX_STREAMS:
            # h2 counts open streams; a reset stream whose handler still unwinds counts here too
            self.reset(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        pseudo: dict[bytes, bytes] = {}
        headers: CIMultiDict = CIMultiDict()
        cookies = []
        for name, value in event.headers:
            if name.startswith(b":"):
                pseudo[name] = value
            elif name == b"cookie":          # RFC 9113 §8.2.3: crumbs are joined for HTTP/1.1
                cookies.append(decode(value))
            else:
                headers.add(decode(name), decode(value))
        if cookies:
            headers["cookie"] = "; ".join(cookies)
        authority = pseudo.get(b":authority")
        if authority and "host" not in headers:
            headers["host"] = decode(authority)
        method = decode(pseudo.get(b":method", b"GET"))
        headers.popall("expect", None)       # no 100-continue dance in HTTP/2: the body just flows
        body = FlowBody(lambda n, sid=sid: self._ack(sid, n))
        ended = event.stream_ended is not None
        if ended:
            body.feed_eof()
        self.bodies[sid] = body
        request = H2Request(self, sid, method, decode(pseudo.get(b":path", b"/")), CIMultiDictProxy(headers),
                            body, not ended)
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        loop = self.loop
        self._opened += 1
        self._recent[sid] = loop.time()
        if len(self._recent) > 2 * MAX_STREAMS:
            self._recent.popitem(last=False)
        self.tasks[sid] = loop.create_task(self._run(request))

    async def _run(self, request: H2Request) -> None:
        sid = request.stream_id
        try:
            await self._serve(request)
        except (asyncio.CancelledError, StreamGone, ConnectionError):
            pass                             # reset by the app, or the connection went away
        except Exception:  # noqa: BLE001 - the handler answers every error itself; this is a bug
            log.exception("HTTP/2 stream %d failed", sid)
            self.reset(sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
        finally:
            self.tasks.pop(sid, None)
            body = self.bodies.pop(sid, None)
            if body is not None:             # what the route did not read: credit back, stream done
                body.set_exception(StreamGone("stream finished"))
                body.read_nowait()
            if not self.tasks:
                if self._goaway:
                    self.close()
                else:
                    self._arm_idle()

    def _reset_by_peer(self, sid: int) -> None:
        opened = self._recent.pop(sid, None)
        task = self.tasks.get(sid)
        if task is not None or (opened is not None
                                and asyncio.get_running_loop().time() - opened < PREMATURE_LIFETIME):
            self._premature += 1
        if task is not None:
            task.cancel()
            body = self.bodies.get(sid)
            if body is not None:
                body.set_exception(StreamGone("stream reset by the app"))
            self.wake_stream(sid, StreamGone("stream reset by the app"))
        if self._opened >= PREMATURE_MIN and 2 * self._premature >= self._opened and not self.closed:
            log.warning("HTTP/2 client resets streams faster than they complete: GOAWAY")
            self.conn.close_connection(error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM,
                                       additional_data=b"too many resets")
            self.flush()
            self._shutdown()

    def _ack(self, sid: int, n: int) -> None:
        if n and not self.closed:
            self.conn.acknowledge_received_data(n, sid)
            self.flush()

    def on_protocol_error(self, exc: h2.exceptions.ProtocolError) -> None:
        log.info("HTTP/2 protocol error from a client: %s", type(exc).__name__)

    def on_lost(self, exc: Exception | None) -> None:
        self._shutdown()

    def _shutdown(self) -> None:
        self.closed = True
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        for task in self.tasks.values():
            task.cancel()
        for body in self.bodies.values():
            body.set_exception(StreamGone("connection closed"))
        if self.transport is not None:
            self.transport.close()

    def _arm_idle(self) -> None:
        if self._idle is None and not self.closed:
            self._idle = asyncio.get_running_loop().call_later(IDLE_TIMEOUT, self._idle_out)

    def _idle_out(self) -> None:
        self._idle = None
        if not self.tasks and not self.closed:
            self.conn.close_connection()
            self.flush()
            self._shutdown()

    def goaway(self) -> None:
        """Drain: no new streams (GOAWAY with the last stream seen); in-flight ones finish."""
        if self.closed or self._goaway:
            return
        self._goaway = True
        # Written as a frame of its own: h2's close_connection() would also close its state machine,
        # and the streams in flight could not answer. New streams are refused here (`_start`).
        frame = GoAwayFrame(0)
        frame.last_stream_id = max(self.tasks, default=0)
        self.flush()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame.serialize())
        if not self.tasks:
            self._shutdown()

    # -- answering ----------------------------------------------------------------------------------
    async def respond(self, request: H2Request, reply) -> None:
        """A reply as HEADERS, DATA under flow control, then trailers or END_STREAM."""
        sid = request.stream_id
        head = [(b":status", str(reply.status).encode()), *fields(reply.headers)]
        no_body = request.method == "HEAD" or reply.status in (204, 304)
        if reply.body is not None:
            body = b"" if no_body else reply.body
            trailers = getattr(reply, "trailers", None)
            if not no_body and not any(k == b"content-length" for k, _ in head) and not trailers:
                head.append((b"content-length", str(len(body)).encode()))
            if not body and not trailers:
                self.send_headers(sid, head, end_stream=True)    # gRPC trailers-only answers too
                return
            # HEADERS, DATA and trailers of a whole answer in one write, as far as the window allows
            self.send_headers(sid, head, flush=not body)
            if body:
                await self.send_data(sid, body, end_stream=not trailers, flush=not trailers)
            if trailers:
                self.send_headers(sid, fields(trailers), end_stream=True)
            return
        self.send_headers(sid, head)
        if reply.stream is not None:
            async for chunk in reply.stream:
                if chunk and not no_body:
                    await self.send_data(sid, chunk)
        trailers = getattr(reply, "trailers", None)
        if trailers:
            self.send_headers(sid, fields(trailers), end_stream=True)
        else:
            self.end_stream(sid)


def serve_sniffed(conn: Sniffed) -> H2Server:
    """proxy/sniff.py's HTTP/2 hook: the connection's streams go to its listener's handler."""
    from sidecar.proxy.intercept import InterceptedHandler   # these import the pipeline; h2server stays light
    from sidecar.proxy.server import ListenerHandler
    host = conn.host
    if conn.alpn == "h2" and conn.server_name:   # intercepted HTTPS: requests mean https://HOST:PORT
        handler: ListenerHandler = InterceptedHandler(host, conn.listener, conn.server_name,
                                                      conn.server_port or 443)
    else:
        handler = ListenerHandler(host.current, conn.listener)
    h2 = H2Server(handler.serve)
    host.h2_connections.add(h2)              # for drain
    return h2


def install() -> None:
    """HTTP/2 on every listener: prior knowledge on cleartext, and `h2` offered by ALPN on intercepted
    TLS (sniff.register_h2 puts it first)."""
    sniff.register_h2(serve_sniffed)


async def drain(connections: "weakref.WeakSet[H2Server]", timeout: float) -> None:
    """SIGTERM: GOAWAY on every HTTP/2 connection; wait (bounded) for their streams to finish."""
    conns = [c for c in connections if not c.closed]
    for conn in conns:
        conn.goaway()
    pending = [c.lost for c in conns if not c.lost.done()]
    if pending:
        await asyncio.wait(pending, timeout=timeout)
    for conn in conns:
        if not conn.closed:
            conn.abort()
