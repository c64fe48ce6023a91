"""The one seam to aiohttp's private API: every private name the sidecar uses is imported or touched
here, and `missing()` lists what an aiohttp release renamed or removed, so that
tests/test_aiohttp_private.py fails with a clear message instead of a listener or the transport breaking
in production. pyproject bounds aiohttp below the next minor version; raising that bound means running
that test first.

    server side (proxy/guard.py, proxy/server.py)
      ErrInfo, EMPTY_PAYLOAD         how RequestHandler queues a request the parser refused
      HANDLER_STATE                  RequestHandler attributes the guarded protocol reads and sets
      new_response()                 StreamResponse(_real_headers=) without a copy of the headers, and
                                     _send_headers_immediately: the head leaves with the first bytes
      answer_in_version()            answer a refused request in the version its request line gave
      server_settings()              a web.Server's own keyword settings
    client side (transport/)
      ResponseHandler, StreamWriter  aiohttp's client protocol and writer, used without ClientSession
      serialize_headers              aiohttp's C header serializer (rejects CR/LF in values)
    takeover (proxy/takeover.py)
      take_server_tail()             RequestHandler._message_tail: bytes read past an upgrade/CONNECT head
      take_client_tail()             ResponseHandler._tail and _drop_timeout: bytes after a 101, timer off
"""
from __future__ import annotations

import asyncio
import inspect
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.client_proto import ResponseHandler
from aiohttp.http import HttpVersion, StreamWriter
from aiohttp.http_writer import _serialize_headers as serialize_headers
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_protocol import _ErrInfo as ErrInfo
from multidict import CIMultiDict

__all__ = ["EMPTY_PAYLOAD", "ErrInfo", "HANDLER_STATE", "RequestHandler", "ResponseHandler", "StreamWriter",
           "answer_in_version", "missing", "new_response", "serialize_headers", "server_settings",
           "take_client_tail", "take_server_tail"]

# RequestHandler instance attributes proxy/guard.py's GuardedRequestHandler reads or sets.
HANDLER_STATE = ("_messages", "_request_count", "_waiter", "_force_close", "_close", "_upgraded",
                 "_payload_parser", "_loop", "_message_tail")


def answer_in_version(request: web.BaseRequest, version: HttpVersion) -> None:
    """aiohttp answers a request its parser refused as HTTP/1.0 (its placeholder message's version);
    the refusal should speak the version the request line gave when it was read."""
    request._version = version
    request._cache.pop("version", None)      # `version` is a cached (reify) property


class _CoalescedResponse(web.StreamResponse):
    """Headers leave with the first body bytes in one send(), as aiohttp's own `web.Response` does,
    instead of in a write of their own: one syscall less per answer."""
    _send_headers_immediately = False


def new_response(status: int, headers: CIMultiDict[str], *, coalesce: bool) -> web.StreamResponse:
    """A response that takes `headers` as they are (no copy, as aiohttp's own `Response` does with this
    private parameter). `coalesce` (the length is known): the head waits for the first body bytes; a
    stream of unknown length (SSE, chunked) shows its head at once."""
    cls = _CoalescedResponse if coalesce else web.StreamResponse
    return cls(status=status, _real_headers=headers)


def take_server_tail(protocol: RequestHandler) -> bytes:
    """What the app sent after a request head that aiohttp read but did not parse; cleared here."""
    tail: bytes = protocol._message_tail
    protocol._message_tail = b""
    return tail


def take_client_tail(proto: ResponseHandler) -> bytes:
    """What the upstream sent after a `101` head; cleared, and the protocol's read timeout stopped (the
    socket is no longer its to time out)."""
    proto._drop_timeout()
    tail: bytes = proto._tail
    proto._tail = b""
    return tail


def server_settings(server: web.Server) -> dict[str, Any]:
    """The keyword settings a `web.Server` hands to each connection's RequestHandler."""
    return dict(server._kwargs)


def missing() -> list[str]:
    """What of the above this aiohttp no longer has (empty when the seam holds). Call it with an event
    loop running: the protocol objects it inspects need one."""
    loop = asyncio.get_running_loop()
    gone: list[str] = []
    handler = RequestHandler(web.Server(_never_called), loop=loop)
    gone += [f"RequestHandler.{name}" for name in HANDLER_STATE if not hasattr(handler, name)]
    if "_real_headers" not in inspect.signature(web.StreamResponse.__init__).parameters:
        gone.append("StreamResponse(_real_headers=...)")
    if not hasattr(web.StreamResponse, "_send_headers_immediately"):
        gone.append("StreamResponse._send_headers_immediately")
    if not {"status", "exc", "message"} <= set(inspect.signature(ErrInfo).parameters):
        gone.append("_ErrInfo(status, exc, message)")
    request = _request()
    if not hasattr(request, "_version") or not isinstance(getattr(request, "_cache", None), dict):
        gone.append("BaseRequest._version and its reify _cache")
    else:
        answer_in_version(request, HttpVersion(1, 0))
        if request.version != HttpVersion(1, 0):
            gone.append("BaseRequest.version read from _version")
    if not hasattr(web.Server(_never_called), "_kwargs"):
        gone.append("web.Server._kwargs")
    for name in ("_tail", "_drop_timeout"):
        if not hasattr(ResponseHandler(loop), name):
            gone.append(f"client_proto.ResponseHandler.{name}")
    if not callable(serialize_headers):
        gone.append("http_writer._serialize_headers")
    return [f"{name} (aiohttp {aiohttp.__version__})" for name in gone]


async def _never_called(request: web.BaseRequest) -> web.StreamResponse:
    raise AssertionError("not a real server")


def _request() -> web.BaseRequest:
    from aiohttp.test_utils import make_mocked_request
    return make_mocked_request("GET", "/")
