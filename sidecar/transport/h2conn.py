"""What the HTTP/2 listener and the HTTP/2 upstream client share: an asyncio protocol driving the `h2`
package (sans-I/O: bytes in, events out, as h11 is for HTTP/1.1), flow-controlled sending, and a
receive buffer whose flow-control credit is returned only as the reader consumes it.

    H2Peer        the connection: feeds `h2`, flushes what it wants sent, pauses for the socket
    FlowBody      one stream's received body; `readany()` hands a chunk over and re-opens the window
                  by that much, so a peer can never have more than its window in flight (constant
                  memory however large the body and however slow the reader)

The frame parser, HPACK, the stream state machine and the flow-control windows are `h2`'s; this module
only moves bytes and waits. `h2` is bounded `<5` in pyproject.toml: only its public API is used.
"""
from __future__ import annotations

import asyncio
import collections
from typing import AsyncIterable, Callable

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from multidict import CIMultiDict

# RFC 9113 §8.2.2: connection-specific fields are never sent in HTTP/2 (`te` only as "trailers").
CONNECTION_SPECIFIC = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding",
                                 "upgrade", "te", "host", "http2-settings"})


class StreamGone(ConnectionError):
    """The stream was reset or the connection closed while we were sending or reading."""


def decode(value: bytes) -> str:
    # As aiohttp decodes HTTP/1.1 fields: bytes that are not UTF-8 survive the round trip.
    return value.decode("utf-8", "surrogateescape")


def encode(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape")


def fields(headers: CIMultiDict, drop: frozenset[str] = CONNECTION_SPECIFIC) -> list[tuple[bytes, bytes]]:
    """Regular header fields for an HTTP/2 HEADERS frame: lower-case names (§8.2.1), no
    connection-specific ones."""
    out = []
    for name, value in headers.items():
        low = name.lower()
        if low in drop or low.startswith(":"):
            continue
        out.append((encode(low), encode(value)))
    return out


class FlowBody:
    """The body of one received stream. `feed` is called by the connection, `readany` by the reader.

    Also what the relay and the request-body reader expect of aiohttp's `StreamReader`
    (`readany`, `is_eof`, `exception`, `read_nowait`), plus the trailers that ended the stream."""

    __slots__ = ("_chunks", "_eof", "_exc", "_waiter", "_ack", "trailers", "size")

    def __init__(self, ack: Callable[[int], None]) -> None:
        self._chunks: collections.deque[tuple[bytes, int]] = collections.deque()
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future | None = None
        self._ack = ack                      # returns flow-control credit for consumed bytes
        self.trailers: CIMultiDict | None = None
        self.size = 0                        # bytes buffered, not yet read

    def feed(self, data: bytes, flow_length: int) -> None:
        if self._eof or self._exc is not None:
            self._ack(flow_length)
            return
        self._chunks.append((data, flow_length))
        self.size += len(data)
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def set_exception(self, exc: BaseException) -> None:
        if self._eof and not self._chunks:
            return
        self._exc = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def is_eof(self) -> bool:
        """The stream ended (END_STREAM came), whether or not all of it was read -- aiohttp's
        `StreamReader.is_eof`: a body whole at its head is then taken at once (pipeline/send.py)."""
        return self._eof

    def exception(self) -> BaseException | None:
        return self._exc

    def read_nowait(self) -> bytes:
        parts = []
        while self._chunks:
            data, flow = self._chunks.popleft()
            self._ack(flow)
            parts.append(data)
        self.size = 0
        return b"".join(parts)

    async def readany(self) -> bytes:
        while True:
            if self._exc is not None:
                raise self._exc
            if self._chunks:
                data, flow = self._chunks.popleft()
                self.size -= len(data)
                self._ack(flow)
                if data:
                    return data
                continue
            if self._eof:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def read(self) -> bytes:
        parts = []
        while chunk := await self.readany():
            parts.append(chunk)
        return b"".join(parts)


class H2Peer(asyncio.Protocol):
    """One HTTP/2 connection, either side. Subclasses handle the events (`on_event`)."""

    def __init__(self, config: h2.config.H2Configuration) -> None:
        self.conn = h2.connection.H2Connection(config=config)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._paused: asyncio.Future | None = None          # the socket's write buffer is full
        self._window: dict[int, asyncio.Future] = {}       # senders waiting for flow-control credit
        # The loop it was made in, kept: `asyncio.get_running_loop()` costs a getpid() syscall on
        # Python 3.11, and the request path would ask for it several times per stream.
        self.loop = asyncio.get_running_loop()
        self.lost: asyncio.Future = self.loop.create_future()

    # -- asyncio.Protocol ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport           # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            # `h2` has queued the GOAWAY with the error's code (PROTOCOL_ERROR, FLOW_CONTROL_ERROR,
            # ENHANCE_YOUR_CALM for a CONTINUATION flood or a header-list bomb...): send it, hang up.
            self.on_protocol_error(exc)
            self.flush()
            self.close()
            return
        for event in events:
            self.on_event(event)
            if self.closed:
                return
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.lost.done():
            self.lost.set_result(None)
        for fut in [self._paused, *self._window.values()]:
            if fut is not None and not fut.done():
                fut.set_exception(StreamGone("connection closed"))
        self._window.clear()
        self.on_lost(exc)

    def pause_writing(self) -> None:
        if self._paused is None:
            self._paused = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        paused, self._paused = self._paused, None
        if paused is not None and not paused.done():
            paused.set_result(None)

    # -- for subclasses -----------------------------------------------------------------------------
    def on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.WindowUpdated):
            self._credit(event.stream_id)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._credit(0)                  # SETTINGS_INITIAL_WINDOW_SIZE changes every stream's

    def on_protocol_error(self, exc: h2.exceptions.ProtocolError) -> None:
        pass

    def on_lost(self, exc: Exception | None) -> None:
        pass

    # -- sending ------------------------------------------------------------------------------------
    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _credit(self, stream_id: int) -> None:
        if stream_id == 0:                   # the connection's window: every waiting sender may go on
            waiting, self._window = self._window, {}
        else:
            fut = self._window.pop(stream_id, None)
            waiting = {stream_id: fut} if fut is not None else {}
        for fut in waiting.values():
            if not fut.done():
                fut.set_result(None)

    def wake_stream(self, stream_id: int, exc: BaseException) -> None:
        """A stream was reset: its sender, if waiting for credit, gives up."""
        fut = self._window.pop(stream_id, None)
        if fut is not None and not fut.done():
            fut.set_exception(exc)

    async def drain(self) -> None:
        paused = self._paused
        if paused is not None:
            await paused

    async def send_data(self, stream_id: int, data: bytes, end_stream: bool = False, flush: bool = True) -> None:
        """Send `data` as the peer's flow-control windows allow; waits for credit (RFC 9113 §5.2).
        `flush=False`: the last frame stays queued for the caller's next frame (trailers) to go in
        the same write; anything queued still goes out before a wait for credit."""
        view = memoryview(data)
        while True:
            if self.closed:
                raise StreamGone("connection closed")
            try:
                window = self.conn.local_flow_control_window(stream_id)
            except h2.exceptions.StreamClosedError as exc:
                raise StreamGone("stream closed") from exc
            if window <= 0 and len(view):
                self.flush()                 # what is queued (this stream's HEADERS) goes before the wait
                fut = self._window.get(stream_id)
                if fut is None:
                    fut = self._window[stream_id] = asyncio.get_running_loop().create_future()
                await fut
                continue
            size = min(window, len(view), self.conn.max_outbound_frame_size)
            last = size == len(view)
            try:
                self.conn.send_data(stream_id, view[:size].tobytes(), end_stream=end_stream and last)
            except h2.exceptions.StreamClosedError as exc:
                raise StreamGone("stream closed") from exc
            if flush or not last:
                self.flush()
            view = view[size:]
            await self.drain()
            if last:
                return

    async def send_body(self, stream_id: int, body: AsyncIterable[bytes]) -> None:
        async for chunk in body:
            if chunk:
                await self.send_data(stream_id, chunk)

    def send_headers(self, stream_id: int, headers: list[tuple[bytes, bytes]], end_stream: bool = False,
                     flush: bool = True) -> None:
        """`flush=False`: the frame stays queued for the DATA that follows, so that a small answer
        leaves in one write (one syscall) instead of one per frame."""
        try:
            self.conn.send_headers(stream_id, headers, end_stream=end_stream)
        except h2.exceptions.StreamClosedError as exc:
            raise StreamGone("stream closed") from exc
        if flush:
            self.flush()

    def end_stream(self, stream_id: int) -> None:
        try:
            self.conn.end_stream(stream_id)
        except h2.exceptions.StreamClosedError as exc:
            raise StreamGone("stream closed") from exc
        self.flush()

    def reset(self, stream_id: int, code: int) -> None:
        try:
            self.conn.reset_stream(stream_id, error_code=code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return                           # already closed both ways: nothing to reset
        self.flush()
