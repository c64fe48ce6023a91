"""Bytes both ways between the app's connection and an upstream's: one relay for CONNECT tunnels,
upgraded connections (WebSocket and any other `Upgrade`) and transparent TLS/TCP passthrough.

Two protocols, one per side, each writing what it receives to the other transport:

    app side   ----data---->  upstream transport        bytes_up
    upstream   ----data---->  app transport             bytes_down

Half-close (RFC 9293 §3.6): an EOF from one side is passed on as `write_eof()` to the other, which may
go on sending. Once both sides have sent their EOF, or either connection is lost, the relay closes both
transports at once (a close flushes what is buffered first). The seed's tunnel kept the app's socket
open when the app half-closed first and the upstream then closed: nothing ever closed it, and SIGTERM
waited out the whole drain. A transport that cannot half-close (TLS in asyncio) closes instead.

Flow control: when one side's write buffer is over its high-water mark, the other side stops reading
until it drains (asyncio's `pause_writing`/`resume_writing`), so a fast sender cannot fill memory.
An idle timeout closes a relay with no byte either way for `idle_timeout` seconds.

SIGTERM reaches live relays through `Relays.drain`: a relay with an `on_drain` hook (a WebSocket's close
frames, upgrade.py) runs it; a side's `boundary` filter sees its bytes first, so a goodbye can be placed
between two frames.
"""
from __future__ import annotations

import asyncio
from typing import Callable

IDLE_TIMEOUT = 3600.0             # a relayed connection with no byte either way for this long is closed


class _Side(asyncio.Protocol):
    """One connection of the relay. Writes made before its transport exists are held until it does."""

    __slots__ = ("relay", "peer", "transport", "eof", "lost", "pending", "eof_pending", "count", "boundary")

    def __init__(self, relay: "Relay") -> None:
        self.relay = relay
        self.peer: _Side | None = None
        self.transport: asyncio.Transport | None = None
        self.eof = False                  # this side sent its EOF (half-close)
        self.lost = False
        self.pending: list[bytes] = []
        self.eof_pending = False          # the peer half-closed before this side was connected
        self.count = 0                    # bytes received from this side
        self.boundary: Callable[[bytes], bytes] | None = None   # filters the bytes this side receives

    # -- asyncio.Protocol --------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.pending:
            transport.writelines(self.pending)
            self.pending = []
        if self.relay.done:               # closed while this side was still connecting
            transport.close()
        elif self.eof_pending and not self.write_eof():
            self.relay.close()

    def data_received(self, data: bytes) -> None:
        self.count += len(data)
        self.relay.touch()
        if self.boundary is not None:
            data = self.boundary(data)   # may hold bytes back, or say goodbye first (upgrade.py)
            if not data:
                return
        self.peer.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        self.relay.touch()
        peer = self.peer
        if peer.eof or peer.lost:
            self.relay.close()            # both directions done: nothing more can pass
            return True
        if not peer.write_eof():
            self.relay.close()            # the peer cannot half-close (TLS): close both
        return True                       # keep our side open: the peer may still answer

    def connection_lost(self, exc) -> None:
        self.lost = True
        self.relay.close()

    def pause_writing(self) -> None:      # our buffer is full: stop reading the peer
        peer = self.peer.transport
        if peer is not None and not peer.is_closing():
            peer.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer.transport
        if peer is not None and not peer.is_closing():
            peer.resume_reading()

    # -- used by the peer --------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None:
            self.pending.append(data)
        elif not transport.is_closing():
            transport.write(data)

    def write_eof(self) -> bool:
        transport = self.transport
        if transport is None:
            self.eof_pending = True       # passed on once connected
            return True
        if transport.is_closing() or not transport.can_write_eof():
            return False
        transport.write_eof()
        return True

    def close(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()


class Relay:
    """The app's transport and an upstream's, joined. `await relay.wait()` returns once both closed."""

    def __init__(self, *, idle_timeout: float = IDLE_TIMEOUT) -> None:
        self._loop = asyncio.get_running_loop()
        self.app = _Side(self)
        self.upstream = _Side(self)
        self.app.peer, self.upstream.peer = self.upstream, self.app
        self.idle_timeout = idle_timeout
        self._last = self._loop.time()
        self._idle = self._loop.call_later(idle_timeout, self._check_idle) if idle_timeout > 0 else None
        self._done = self._loop.create_future()
        self.closed_by: str | None = None   # "idle", or None (a side closed)
        self.on_drain: Callable[[], None] | None = None   # what SIGTERM does to this relay (Relays.drain)

    @property
    def bytes_up(self) -> int:
        """Bytes the app sent (relayed to the upstream)."""
        return self.app.count

    @property
    def bytes_down(self) -> int:
        return self.upstream.count

    def attach_app(self, transport: asyncio.Transport, first: bytes = b"") -> None:
        """Take the app's connection over from whatever protocol read it so far; `first` is what that
        protocol had read past its own message (sent upstream ahead of anything else)."""
        transport.set_protocol(self.app)
        self.app.connection_made(transport)
        if first:
            self.app.data_received(first)
        transport.resume_reading()

    def upstream_protocol(self) -> _Side:
        """The protocol factory's product for `loop.create_connection` (a failed attempt leaves it
        unattached, so the same side serves the next address)."""
        return self.upstream

    def attach_upstream(self, transport: asyncio.Transport, first: bytes = b"") -> None:
        """An upstream connection already open under another protocol (the transport's pool)."""
        transport.set_protocol(self.upstream)
        self.upstream.connection_made(transport)
        if first:
            self.upstream.data_received(first)
        transport.resume_reading()

    def touch(self) -> None:
        self._last = self._loop.time()

    def _check_idle(self) -> None:
        idle_for = self._loop.time() - self._last
        if idle_for >= self.idle_timeout:
            self.closed_by = self.closed_by or "idle"
            self.close()
        else:
            self._idle = self._loop.call_later(self.idle_timeout - idle_for, self._check_idle)

    def close_later(self, delay: float) -> None:
        """Close in `delay` seconds unless both sides closed first (a goodbye being flushed)."""
        self._loop.call_later(delay, self.close)

    def close(self) -> None:
        """Close both transports (each flushes what it holds first); `wait()` returns."""
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self.app.close()
        self.upstream.close()
        if not self._done.done():
            self._done.set_result(None)

    def abort(self) -> None:
        """Drop both connections now, unflushed (a cancelled drain)."""
        for side in (self.app, self.upstream):
            if side.transport is not None:
                side.transport.abort()
        self.close()

    async def wait(self) -> None:
        try:
            await asyncio.shield(self._done)
        except asyncio.CancelledError:
            self.abort()
            raise

    @property
    def done(self) -> bool:
        return self._done.done()


class Relays:
    """The relays alive in this process, so SIGTERM can reach them (owned by the Runtime)."""

    def __init__(self) -> None:
        self.live: set[Relay] = set()

    async def run(self, relay: Relay) -> None:
        self.live.add(relay)
        try:
            await relay.wait()
        finally:
            self.live.discard(relay)

    def drain(self) -> None:
        """SIGTERM: each relay with a drain hook (a WebSocket's `1001 going away`) runs it now; the
        others are relayed on until they close or the drain timeout cancels them."""
        for relay in list(self.live):
            if relay.on_drain is not None:
                relay.on_drain()
