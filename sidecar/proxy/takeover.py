"""The one seam where a connection is taken from aiohttp's protocols and handed to the relay.

aiohttp has no public API for "this socket is no longer HTTP": its server protocol keeps the bytes it
read past an upgrade (or CONNECT) head in `_message_tail`, its client protocol keeps what followed a
`101` in `_tail`. Both are private, so they are read here and nowhere else, and
tests/proxy/test_takeover_seam.py fails loudly if an aiohttp release renames them (pyproject bounds
aiohttp below the next minor version).
"""
from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.client_proto import ResponseHandler
from aiohttp.web_protocol import RequestHandler


def app_tail(request: web.BaseRequest) -> bytes:
    """What the app sent after the request head that aiohttp read but did not parse (the first bytes
    of the tunnel or of the upgraded protocol)."""
    protocol: RequestHandler = request.protocol
    tail, protocol._message_tail = protocol._message_tail, b""
    return tail


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
    proto._drop_timeout()                # its read timeout must not fire on a socket it gave away
    tail, proto._tail = proto._tail, b""
    proto.transport = None               # so a later close() of the protocol leaves the socket alone
    return transport, tail
