"""Where a connection is taken from aiohttp's protocols and handed to the relay.

aiohttp has no public API for "this socket is no longer HTTP": its server protocol keeps the bytes it
read past an upgrade (or CONNECT) head, its client protocol keeps what followed a `101`. Both are
private, so they are read through sidecar/aiohttp_private.py (the one seam to aiohttp's internals),
and tests/proxy/test_takeover_seam.py fails loudly if an aiohttp release renames them.
"""
from __future__ import annotations

import asyncio
from asyncio import sslproto   # start_tls cannot take bytes already read: its protocol, set up by hand

from aiohttp import web

from sidecar.aiohttp_private import ResponseHandler, take_client_tail, take_server_tail


def app_tail(request: web.BaseRequest) -> bytes:
    """What the app sent after the request head that aiohttp read but did not parse (the first bytes
    of the tunnel or of the upgraded protocol)."""
    return take_server_tail(request.protocol)


def app_transport(request: web.BaseRequest) -> asyncio.Transport:
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the app closed its connection")
    return transport


def app_released(request: web.BaseRequest) -> web.StreamResponse:
    """After the relay: tell aiohttp's protocol its connection is gone (it no longer owns the socket),
    and give its handler loop a response that it will find nothing to write to."""
    request.protocol.connection_lost(None)
    return web.Response()


def upstream_takeover(proto: ResponseHandler) -> tuple[asyncio.Transport, bytes]:
    """The upgraded upstream connection and the bytes that came after the `101` head."""
    transport = proto.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the upstream closed its connection after the 101")
    tail = take_client_tail(proto)       # and its read timeout, which must not fire on a socket it gave away
    proto.transport = None               # so a later close() of the protocol leaves the socket alone
    return transport, tail


class _Secured(asyncio.Protocol):
    """The TLS layer's first app protocol: once the handshake is done, hands over to `choose(...)`.
    Also the handle `serve_tls` returns: `raw` (the socket's transport), `transport` (the decrypted
    one, once chosen) and `ended` (resolves when the connection is over, whichever protocol served it)."""

    def __init__(self, choose, raw: asyncio.Transport) -> None:
        self.choose = choose
        self.raw = raw
        self.transport: asyncio.Transport | None = None
        self.ended: asyncio.Future = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport
        protocol = self.choose(transport)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)

    def data_received(self, data: bytes) -> None:   # pragma: no cover - replaced before any data
        raise RuntimeError("data before the TLS app protocol was chosen")

    def connection_lost(self, exc) -> None:
        pass


class _ServerTLS(sslproto.SSLProtocol):
    """asyncio's TLS protocol, telling `secured.ended` when the socket under it is gone: the app
    protocol chosen after the handshake (HTTP/1.1 or HTTP/2) may not say so itself."""

    def __init__(self, secured: _Secured, context, ready: asyncio.Future, handshake_timeout: float) -> None:
        super().__init__(asyncio.get_running_loop(), secured, context, ready, server_side=True,
                         call_connection_made=True, ssl_handshake_timeout=handshake_timeout)
        self.secured = secured

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.secured.ended.done():
            self.secured.ended.set_result(None)


def serve_tls(transport: asyncio.Transport, context, first: bytes, choose, ready: asyncio.Future, *,
              handshake_timeout: float) -> _Secured:
    """Be the TLS server on a connection already accepted (and maybe already read from: `first` holds
    the ClientHello a sniffer took). asyncio's `start_tls` cannot be handed bytes already read, so its
    SSLProtocol is set up here the way `start_tls` does it, with `first` fed in before reading resumes.
    `ready` resolves when the handshake is done (or fails); then `choose(tls_transport)` gives the
    protocol for the decrypted stream. Close the connection with `.transport.close()` (TLS close_notify)
    or, before the handshake completed, the returned object's raw transport; `.ended` resolves when
    the connection is over."""
    secured = _Secured(choose, transport)
    tls = _ServerTLS(secured, context, ready, handshake_timeout)
    transport.set_protocol(tls)
    tls.connection_made(transport)
    view = memoryview(first)
    while view:
        buf = tls.get_buffer(len(view))
        n = min(len(buf), len(view))
        buf[:n] = view[:n]
        tls.buffer_updated(n)
        view = view[n:]
    transport.resume_reading()
    return secured
