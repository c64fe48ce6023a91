"""The listeners' front door: what happens before a request reaches `ListenerHandler`.

aiohttp's llhttp parser already refuses, with a 400 and a closed connection: `Content-Length` with
`Transfer-Encoding`, duplicate or list-valued `Content-Length`, a duplicate `Host` (and a missing one
on HTTP/1.1), broken chunked framing, obs-fold, bare CR/LF, control characters in a target or a header,
invalid methods and versions, lines over `max_line_size`, more than `max_headers` headers. This module
adds what it does not do (nginx's names in brackets):

    header timeout   a request's line and headers must arrive within HEADER_TIMEOUT of its first byte,
                     or of the connection's opening; else 408 and close   [client_header_timeout]
    header size      line + headers over MAX_HEADER_BYTES in total: 431 and close; aiohttp bounds
                     each line, not their sum        [large_client_header_buffers]
    idle timeout     a keep-alive connection with no request for IDLE_TIMEOUT is closed
                     (aiohttp's `keepalive_timeout`, whose default is an hour)   [keepalive_timeout]
    precise status   a request line too long: 414 (RFC 9112 §3); a header too long or too many: 431
                     (RFC 6585 §5); aiohttp answers 400 to both
    no echo          aiohttp's error body and its ERROR log quote the offending raw line, which may be
                     an `Authorization` header: the body here is the JSON error of every listener
                     answer, naming the fault only, and the log line is one rate-limited warning
    version          HTTP/0.9 (`GET /`, no version) and HTTP/2.0 on an HTTP/1 port: 505; llhttp takes both
    Host             an invalid `Host` (`a@evil`, `a b`): 400 (RFC 9112 §3.2); llhttp lets it pass
    HTTP/1.0 + TE    `Transfer-Encoding` in an HTTP/1.0 request: 400 and close (RFC 9112 §6.1: the
                     framing is faulty), as a front server and the upstream may disagree on it

The hooks are `web.Server`'s protocol factory (`GuardedServer.__call__`) and `RequestHandler`'s
`data_received` / `handle_error`: aiohttp has no header-read timeout of its own.
"""
from __future__ import annotations

import json
import logging
import re
import time

from aiohttp import web
from aiohttp.http import HttpVersion, HttpVersion10, HttpVersion11
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong

from sidecar.aiohttp_private import (
    EMPTY_PAYLOAD,
    ErrInfo,
    RequestHandler,
    answer_in_version,
    server_settings,
)
from sidecar.exchange.replies import JSON, error_body
from sidecar.telemetry.redact import redact

log = logging.getLogger("sidecar.guard")

# aiohttp's request parser limits (RFC 9110 gives none; nginx's defaults are 8 KiB lines).
SERVER_LIMITS = dict(max_line_size=8190, max_field_size=8190, max_headers=128)
HEADER_TIMEOUT = 10.0
IDLE_TIMEOUT = 75.0
MAX_HEADER_BYTES = 64 * 1024
LOG_PER_SECOND = 10                   # refused-request warnings; more in one second are counted, not logged
LINGER = 2.0                          # after a refusal: read and discard for this long before closing


class HeaderTimeout(BadHttpMessage):
    code = 408


class HeadersTooLarge(BadHttpMessage):
    code = 431


class _LogBudget:
    """At most LOG_PER_SECOND lines a second: a hostile client cannot flood the log."""

    def __init__(self) -> None:
        self.second = 0
        self.count = 0
        self.suppressed = 0

    def take(self) -> tuple[bool, int]:
        now = int(time.monotonic())
        if now != self.second:
            self.second, self.count = now, 0
        self.count += 1
        if self.count > LOG_PER_SECOND:
            self.suppressed += 1
            return False, 0
        dropped, self.suppressed = self.suppressed, 0
        return True, dropped


_budget = _LogBudget()


def fault_status(exc: BaseException | None, status: int) -> int:
    """The status for a request the parser refused. A line too long was told apart when it was read
    (`GuardedRequestHandler._settle_refusal`): 414 for the request line, 431 for a header line."""
    if isinstance(exc, LineTooLong):
        return status if status in (414, 431) else 431
    if isinstance(exc, BadHttpMessage) and str(exc.message).startswith("Too many headers"):
        return 431
    if isinstance(exc, HttpProcessingError) and 400 <= (exc.code or 0) < 500:
        return exc.code
    return status


def fault_reason(exc: BaseException | None, status: int) -> str:
    """What was wrong, without the raw bytes aiohttp quotes after the colon."""
    if status == 414:
        return "request line too long"
    if status == 431:
        return "request header fields too large"
    message = str(getattr(exc, "message", "") or "") if exc is not None else ""
    first = message.strip().splitlines()[0] if message.strip() else ""
    first = first.split(":", 1)[0].strip(" .'\"")
    if len(first) < 4 or "\\x" in first:
        first = "malformed request"
    return redact(first)[:120]


def error_response(status: int, reason: str) -> web.Response:
    resp = web.Response(status=status, body=error_body(reason), content_type=JSON)
    resp.force_close()
    return resp


def _head_size(message) -> int:
    return len(message.method) + len(message.path) + 12 + sum(len(k) + len(v) + 4 for k, v in message.raw_headers)


class GuardedRequestHandler(RequestHandler):
    """aiohttp's HTTP/1 protocol, plus a header-read deadline, a header-size cap and quiet errors."""

    accepted_at: float | None = None      # set by the sniffer (sniff.py): the first deadline counts from here

    def __init__(self, manager: "GuardedServer", *, header_timeout: float, max_header_bytes: int,
                 **kwargs) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._max_header_bytes = max_header_bytes
        self._header_timer = None
        self._header_bytes = 0            # of the request being read (line + headers)
        self._line_bytes = 0              # of its request line, until the first LF
        self._line_done = False
        self._line_tail = b""             # the end of the request line read so far (its version)
        self._body = None                 # payload of the last request whose headers completed
        self._refused_version: HttpVersion | None = None   # the refused request's, when its line was read
        self._linger = None               # the timer that ends a lingering close

    # -- reading --------------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm(self.accepted_at)       # the first request's line must come in time too

    def connection_lost(self, exc) -> None:
        self._disarm()
        if self._linger is not None:
            self._linger.cancel()
        super().connection_lost(exc)
        body = self._body
        if body is not None and not body.is_eof() and body.exception() is None:
            # No handler is reading it (aiohttp fails the body of a request still being handled):
            # this is aiohttp's lingering read of a body left unread after the answer, which does not
            # notice the connection is gone and would wait out lingering_time (10 s) on a dead socket.
            body.feed_eof()

    def data_received(self, data: bytes) -> None:
        if self._force_close or self._close:
            return
        in_body = self._body is not None and not self._body.is_eof()
        if not in_body and not self._upgraded and self._payload_parser is None:
            self._count_header_bytes(data)
        before, queued = self._request_count, len(self._messages)
        super().data_received(data)
        if self._request_count != before:          # a request's headers completed (or it was refused)
            if in_body or self._header_bytes > self._max_header_bytes:
                self._cap_completed(queued)         # else every head in this read is under the cap
            self._settle_refusal(queued)
            self._body = self._messages[-1][1] if self._messages else None
            self._header_bytes = self._line_bytes = 0
            self._line_done = False
            self._line_tail = b""
            self._disarm()
        elif data and not in_body and not self._upgraded:
            if self._header_bytes > self._max_header_bytes:
                self._refuse(HeadersTooLarge("request header fields too large"), 431)
            elif self._header_timer is None:
                self._arm()

    def _settle_refusal(self, first: int) -> None:
        """A request the parser refused in this read gets its status and version now, from what this
        read measured, and nothing after it is parsed: a later read (more of the same long header)
        must not be taken for a new request line and turn a 431 into a 414 before the answer is out."""
        for i in range(first, len(self._messages)):
            message, payload = self._messages[i]
            if not isinstance(message, ErrInfo):
                continue
            line_read = self._line_done and self._line_bytes <= self.max_line_size
            if isinstance(message.exc, LineTooLong):
                status = 431 if line_read else 414
                self._messages[i] = (ErrInfo(status=status, exc=message.exc, message=message.message), payload)
            self._refused_version = self._line_version() if line_read else None
            while len(self._messages) > i + 1:     # a deque
                self._messages.pop()
            self._close = True            # data_received reads nothing more; the refusal closes
            return

    def _line_version(self) -> HttpVersion | None:
        tail = self._line_tail.rstrip(b"\r")
        if tail.endswith(b" HTTP/1.1"):
            return HttpVersion11
        if tail.endswith(b" HTTP/1.0"):
            return HttpVersion10
        return None

    def _cap_completed(self, first: int) -> None:
        """A head that arrived in one read is measured whole: over the cap, it becomes a 431."""
        for i in range(first, len(self._messages)):
            message, _ = self._messages[i]
            if isinstance(message, ErrInfo) or _head_size(message) <= self._max_header_bytes:
                continue
            exc = HeadersTooLarge("request header fields too large")
            self._messages[i] = (ErrInfo(status=431, exc=exc, message=exc.message), EMPTY_PAYLOAD)
            self._refused_version = message.version
            while len(self._messages) > i + 1:     # nothing after it is served: the connection closes
                self._messages.pop()
            self._close = True
            return

    def _count_header_bytes(self, data: bytes) -> None:
        self._header_bytes += len(data)
        if self._line_done:
            return
        if self._line_bytes == 0:
            data = data.lstrip(b"\r\n")   # RFC 9112 §2.2: empty lines before a request are ignored
        end = data.find(b"\n")
        if end < 0:
            self._line_bytes += len(data)
            self._line_tail = (self._line_tail + data[-16:])[-16:]
        else:
            self._line_bytes += end
            self._line_tail = (self._line_tail + data[max(0, end - 16):end])[-16:]
            self._line_done = True

    def _arm(self, since: float | None = None) -> None:
        self._disarm()
        if self._header_timeout > 0:
            delay = self._header_timeout if since is None else self._header_timeout - (self._loop.time() - since)
            self._header_timer = self._loop.call_later(max(delay, 0.0), self._header_deadline)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline(self) -> None:
        self._header_timer = None
        if self.transport is None or self._force_close or self._upgraded:
            return
        self._refuse(HeaderTimeout("request headers not received in time"), 408)

    def _refuse(self, exc: BadHttpMessage, status: int) -> None:
        """Answer `status` once the handler is idle, then close; read nothing more."""
        self._disarm()
        idle = self._waiter is not None and not self._waiter.done()
        self._close = True                # data_received ignores anything further
        if not idle:
            return                        # a pipelined response is being written: close after it
        if self._line_done and self._line_bytes <= self.max_line_size:
            self._refused_version = self._line_version()
        self._messages.append((ErrInfo(status=status, exc=exc, message=str(exc.message)), EMPTY_PAYLOAD))
        self._request_count += 1
        self._waiter.set_result(None)

    # -- answering ------------------------------------------------------------------------------
    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if isinstance(exc, ConnectionError):  # the app went away: nothing to answer, nothing to log
            raise ConnectionError("the client went away") from exc
        if status >= 500 and not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)   # a handler bug: aiohttp's 500
        if request.writer.output_size > 0:
            raise ConnectionError("response already started, cannot send the error")
        status = fault_status(exc, status)
        reason = fault_reason(exc, status)
        if self._refused_version is not None:
            answer_in_version(request, self._refused_version)   # else HTTP/1.0: the line was not read
        ok, dropped = _budget.take()
        if ok:
            peer = self.peername[0] if isinstance(self.peername, tuple) else self.peername
            more = f" ({dropped} more not logged)" if dropped else ""
            log.warning("refused a request from %s: %d %s%s", peer, status, reason, more)
        # Lingering close (as nginx): closing a socket with unread input sends an RST, which makes the
        # client drop our answer unread. So: stop parsing, answer, shut our side, discard what still
        # comes, close on the client's EOF or after LINGER. aiohttp would close at once.
        self._force_close = True          # aiohttp's loop then leaves the transport to us
        self._linger = self._loop.call_later(LINGER + 30.0, self._end_linger)   # backstop
        self.finish_response = self._finish_lingering
        return error_response(status, reason)

    async def _finish_lingering(self, request, resp, start_time):
        """`finish_response` of a connection being refused (set by `handle_error`, so the requests
        that are answered normally pay for no wrapper): flush the answer, then linger."""
        result = await RequestHandler.finish_response(self, request, resp, start_time)
        transport = self.transport
        if self._linger is not None and transport is not None and not transport.is_closing():
            self._linger.cancel()
            if transport.can_write_eof():
                transport.write_eof()     # the answer is flushed first, then our FIN
            self._linger = self._loop.call_later(LINGER, self._end_linger)
        return result

    def _end_linger(self) -> None:
        self._linger = None
        if self.transport is not None:
            self.transport.close()


class GuardedServer(web.Server):
    """`web.Server` whose connections get `GuardedRequestHandler` and whose requests pass `check`."""

    def __init__(self, handler, *, header_timeout: float | None = None, max_header_bytes: int | None = None,
                 **kwargs) -> None:
        kwargs.setdefault("keepalive_timeout", IDLE_TIMEOUT)
        super().__init__(_checked(handler), **kwargs)
        self.header_timeout = HEADER_TIMEOUT if header_timeout is None else header_timeout
        self.max_header_bytes = MAX_HEADER_BYTES if max_header_bytes is None else max_header_bytes

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, header_timeout=self.header_timeout,
                                     max_header_bytes=self.max_header_bytes, **server_settings(self))


# RFC 3986 §3.2.2 host (IP-literal or reg-name, no userinfo) and an optional port; empty is allowed.
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~%!$&'()*+,;=-]*)(?::[0-9]{0,5})?")


def check(request: web.BaseRequest) -> web.Response | None:
    """Refusals that need the parsed request: None when it may go on."""
    if not HttpVersion10 <= request.version <= HttpVersion11:
        return error_response(505, "HTTP/1.0 or HTTP/1.1 required")
    if request.version < HttpVersion11 and "Transfer-Encoding" in request.headers:
        return error_response(400, "Transfer-Encoding in an HTTP/1.0 request")
    host = request.headers.get("Host")
    if host is not None and not _HOST.fullmatch(host):   # RFC 9112 §3.2: an invalid Host is a 400
        return error_response(400, "invalid Host header")
    return None


def refusal(request: web.BaseRequest) -> web.Response | None:
    """`check`, with the refusal logged (rate-limited): the answer to send, or None."""
    refused = check(request)
    if refused is not None:
        ok, _ = _budget.take()
        if ok:
            log.warning("refused a request from %s: %d %s", request.remote, refused.status,
                        json.loads(refused.body)["error"])
    return refused


def _checked(handler):
    """`handler` behind `refusal`; a handler that says `checks_requests` calls it itself (one
    coroutine frame less per request on the data plane)."""
    if getattr(handler, "checks_requests", False):
        return handler

    async def guarded(request: web.BaseRequest) -> web.StreamResponse:
        refused = refusal(request)
        if refused is not None:
            return refused
        return await handler(request)
    return guarded


class GuardedAppRunner(web.AppRunner):
    """`web.AppRunner` for the admin and health ports: the same front door as the listeners (the
    health port faces the pod network, where a slow or hostile client must not starve the kubelet)."""

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        return GuardedServer(plain.request_handler, request_factory=plain.request_factory,
                             handler_cancellation=plain.handler_cancellation,
                             **server_settings(plain))
