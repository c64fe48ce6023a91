"""The listeners: how an app request becomes an Exchange, and how its Reply is written back.

    proxy        absolute-form requests (HTTP_PROXY); CONNECT tunnels with connect-level policy only
    reverse      every request goes to the listener's upstream
    transparent  iptables REDIRECT; the original destination comes from SO_ORIGINAL_DST

Whatever happens below, the app gets an answer: the reply, or a JSON error naming the route, the reason
and the decisions. Never a bare 500, a traceback or a hang.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiohttp import web
from aiohttp.http import HttpVersion11
from yarl import URL

from sidecar.core.authority import bracketed
from sidecar.core.decisions import Decision
from sidecar.aiohttp_private import new_response
from sidecar.grpc_rules import parse_timeout
from sidecar.exchange.body import read_body
from sidecar.exchange.calls import make_call, record_url, url_of
from sidecar.exchange.context import Context
from sidecar.exchange.headers import end_to_end
from sidecar.exchange.records import request_record
from sidecar.exchange.replies import json_error
from sidecar.exchange.types import Degraded, Exchange, Reply, record_decision
from sidecar.pipeline.failure import Failure
from sidecar.pipeline.grpc import as_grpc, is_grpc_request, reply_code
from sidecar.policy.model import Listener, Route
from sidecar.proxy.guard import refusal
from sidecar.proxy.original_dst import original_destination
from sidecar.proxy.tunnel import tunnel
from sidecar.proxy.upgrade import relay_upgraded, request_headers, upgrade_token
from sidecar.telemetry.records import RequestRecord
from sidecar.telemetry.tracecontext import parse_traceparent
from sidecar.transport.egress import refused_target
from sidecar.transport.errors import UpstreamFailure

log = logging.getLogger("sidecar.proxy")

class ListenerHandler:
    """One per listener; reads the running generation (`current()`) for every request."""

    checks_requests = True               # GuardedServer: `refusal` is called here, not wrapped around

    def __init__(self, current: Callable[[], Context], listener: Listener) -> None:
        self.current = current
        self.listener = listener

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        refused = refusal(request)
        if refused is not None:
            return refused
        return await self.serve(request)

    async def serve(self, request) -> web.StreamResponse:
        """One request: an aiohttp request, or an HTTP/2 stream (proxy/h2server.py's `H2Request`)."""
        try:
            return await self._handle(request)
        except asyncio.CancelledError:
            raise
        except (ConnectionResetError, ConnectionError):
            raise
        except Exception:  # noqa: BLE001 - last line of defence: the app always gets JSON, never a traceback
            log.exception("unexpected error on listener %s", self.listener.name)
            reply = json_error(502, "internal proxy error", None, [])
            return await self._write_plain(request, reply)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        gen = self.current()
        mode = self.listener.mode
        if request.method == "CONNECT":
            if mode != "proxy":
                return await self._write_plain(request, json_error(405, "CONNECT only on proxy listeners", None, []))
            return await tunnel(gen, request, self.listener)
        target = self._target(gen, request)
        if isinstance(target, Reply):
            return await self._write_plain(request, target)
        url, upstream_name, connect_to = target
        host = url.host or ""
        if mode == "reverse":
            up = gen.policy.upstreams[upstream_name]
            host = up.host
        route = gen.router.match(request.method, host, url.path, request.headers)
        if route is None:
            if gen.policy.unmatched == "deny":
                return await self._deny(gen, request, url)
            route = gen.policy.defaults
        guard = None
        if mode == "proxy" and not route.allow_internal:
            internal = refused_target(url.host or "", url.port, gen.own_ports)
            if internal is not None:
                return await self._write_plain(request, json_error(
                    403, f"{internal}; a route must allow_internal", route.name, []))
            guard = gen.own_ports            # host names: checked again on every DNS answer
        return await self._exchange(gen, request, route, url, upstream_name, connect_to, guard)

    def _target(self, gen: Context, request: web.BaseRequest) -> tuple[URL, str | None, tuple | None] | Reply:
        """(URL as the app meant it, reverse listener's upstream, transparent mode's original destination)."""
        mode = self.listener.mode
        if mode == "proxy":
            try:                             # absolute-form: the raw request target is the URL
                msg_url = url_of(request.raw_path)
            except ValueError:
                msg_url = URL()
            if not msg_url.absolute or msg_url.scheme not in ("http", "https") or not msg_url.host:
                return json_error(400, "the proxy listener expects absolute-form requests "
                                       "(http://host/path); set HTTP_PROXY", None, [])
            return msg_url, None, None
        path_qs = _origin_form(request.raw_path)
        if mode == "reverse":
            up = gen.policy.upstreams[self.listener.upstream]
            return url_of(f"{up.origin}{path_qs}"), up.name, None
        dst = original_destination(request.transport)
        if dst is None:
            return json_error(502, "original destination unavailable (not redirected by iptables?)", None, [])
        host_header = request.headers.get("host", "")
        host = (host_header[:host_header.find("]") + 1] if host_header.startswith("[")   # [v6]:port
                else host_header.rsplit(":", 1)[0]) or bracketed(dst[0])   # no Host: the address
        authority = f"{host}:{dst[1]}"
        try:
            return url_of(f"http://{authority}{path_qs}"), None, dst
        except ValueError:
            return json_error(400, "bad Host header", None, [])

    async def _deny(self, gen: Context, request, url: URL) -> web.StreamResponse:
        rec = _record(gen, request, "unmatched", self.listener.name, url)
        record_decision(gen.sink, rec, Decision.UNMATCHED_DENIED,
                        f"no route matches {request.method} {url.host}{url.path}")
        reply = json_error(403, "no route matches this request and unmatched is deny", None,
                           ["unmatched_denied"])
        rec.status = 403
        rec.end_ns = time.time_ns()
        gen.sink.request_finished(rec)
        return await self._write_plain(request, reply)

    async def _exchange(self, gen: Context, request: web.BaseRequest, route: Route, url: URL,
                        upstream_name: str | None, connect_to: tuple | None,
                        guard: frozenset[int] | None) -> web.StreamResponse:
        state = gen.states[route.name]
        name = route.upstream or upstream_name          # the route's, else the reverse listener's
        if route.split:                                 # a weighted traffic split: one upstream per request
            name = split_pick(route.split, gen.rng)
        upstream = gen.policy.upstreams.get(name) if name else None
        if request.body_exists and request.version >= HttpVersion11 \
                and request.headers.get("expect", "").lower() == "100-continue":
            await _continue(request)
        try:
            body = await read_body(request.content, has_body=request.body_exists,
                                   limit=gen.replay_limits[route.name], length=request.content_length)
        except Exception:  # noqa: BLE001 - the app's body broke off: a 400, nothing to forward
            return await self._write_plain(request, json_error(400, "request body could not be read",
                                                               route.name, []))
        record = _record(gen, request, route.name, self.listener.name, url)
        token = upgrade_token(request)       # WebSocket and other upgrades: proxy/upgrade.py
        headers = end_to_end(request.headers)
        if token is not None:
            request_headers(headers, token)
        timeout = route.timeout
        if is_grpc_request(request.headers):         # the caller's deadline caps the route's
            caller = parse_timeout(request.headers.get("grpc-timeout"))
            if caller is not None and caller < timeout:
                timeout = caller
        ex = Exchange(route=route, state=state, ctx=gen, method=request.method, url=url,
                      headers=headers, body=body,
                      deadline=gen.clock.monotonic() + timeout, record=record, egress_guard=guard)
        ex.connect_to = connect_to
        call = make_call(ex, upstream)
        handler = (gen.handlers if token is None else gen.upgrade_handlers)[route.name]
        # No timer around the stack: every layer that waits bounds the wait by `ex.deadline` (a try's
        # timeout, a backoff, a hedge delay, a fault delay), which spares a timer per request.
        try:
            reply = await handler(ex, call)
        except (Degraded, UpstreamFailure) as exc:
            reply = self._failure_reply(ex, Failure.of(exc))
        if reply.upgraded is not None:
            if token is not None:
                return await relay_upgraded(gen, self.listener, request, ex, reply, token)
            reply.release()                  # a 101 nobody asked for: the upstream is broken
            reply = json_error(502, "the upstream switched protocols unasked", route.name, [])
        return await self._write(request, ex, reply)

    def _failure_reply(self, ex: Exchange, failure: Failure) -> Reply:
        status = failure.status
        if ex.remaining() <= 0 and status != 429:
            status = 504
        reply = json_error(status, failure.reason, ex.route.name, [d.decision.value for d in ex.record.decisions])
        reply.upstream = failure.label
        if failure.retry_after is not None:
            reply.headers["retry-after"] = str(max(1, round(failure.retry_after + 0.499)))
        ex.record.error_type = failure.label
        if is_grpc_request(ex.headers):               # a gRPC status, not an HTTP error page
            reply = as_grpc(reply, failure.label, failure.reason)
        return reply

    async def _write(self, request: web.BaseRequest, ex: Exchange, reply: Reply) -> web.StreamResponse:
        record = ex.record
        headers = reply.headers
        headers["x-sidecar-route"] = ex.route.name
        headers["x-sidecar-upstream"] = reply.upstream
        headers["x-sidecar-attempts"] = str(ex.attempts)
        if reply.endpoint is not None:
            headers["x-sidecar-endpoint"] = reply.endpoint
        degraded = ex.degraded_names() if ex.enforce else []   # shadow: the app sees no policy
        if degraded:
            headers["x-sidecar-degraded"] = ",".join(degraded)
            headers["x-sidecar-trace-id"] = record.trace_id
        if reply.cache_status:
            headers["cache-status"] = reply.cache_status
        record.status = reply.status
        record.upstream = reply.upstream
        record.attempts = ex.attempts
        ok: bool | None = False
        try:
            resp = await _send_reply(request, reply)
            ok = True
            return resp
        except UpstreamFailure as exc:       # the upstream cut the stream after the first byte
            record.error_type = exc.kind
            record.cut = True
            _abort(request)
            return web.StreamResponse()
        except (ConnectionError, asyncio.CancelledError):
            ok = None                        # the app went away: no verdict on the upstream
            reply.release()                  # close the upstream's half-read body now, not at GC
            raise
        finally:
            reply.finish(ok)
            if is_grpc_request(ex.headers):
                code = reply_code(reply)
                record.grpc_status = int(code) if code is not None else None
            record.end_ns = time.time_ns()
            ex.ctx.sink.request_finished(record)

    async def _write_plain(self, request: web.BaseRequest, reply: Reply) -> web.StreamResponse:
        if is_grpc_request(request.headers) and reply.upstream == "sidecar":
            reply = as_grpc(reply, None)
        return await _send_reply(request, reply)


def split_pick(split, rng) -> str:
    """A route's `split`: each request's upstream drawn by weight."""
    x = rng.random() * sum(t.weight for t in split)
    for t in split:
        x -= t.weight
        if x < 0:
            return t.upstream
    return next(t.upstream for t in reversed(split) if t.weight > 0)


def _origin_form(raw: str) -> str:
    """The path and query of a request target; absolute-form is accepted too (RFC 9112 §3.2.2)."""
    if raw.startswith("/"):
        return raw
    try:
        url = URL(raw, encoded=True)
    except ValueError:
        return "/"
    return (url.raw_path_qs or "/") if url.absolute else "/"


_H2_DONE = web.StreamResponse()             # what `serve` returns for an HTTP/2 stream (unused)


async def _send_reply(request: web.BaseRequest, reply: Reply) -> web.StreamResponse:
    if not isinstance(request, web.BaseRequest):     # an HTTP/2 stream writes its own frames
        await request.send_reply(reply)
        return _H2_DONE
    known_length = reply.body is not None or "content-length" in reply.headers
    # The reply's headers are ours alone by now: handed over, not copied.
    resp = new_response(reply.status, reply.headers, coalesce=known_length)
    if reply.body is not None:
        resp.content_length = len(reply.body)
        await resp.prepare(request)
        # The head, the whole body and the answer's end in one call (and one send()).
        await resp.write_eof(reply.body if request.method != "HEAD" else b"")
        return resp
    await resp.prepare(request)
    async for chunk in reply.stream:
        await resp.write(chunk)
    await resp.write_eof()
    return resp


async def _continue(request: web.BaseRequest) -> None:
    """RFC 9110 §10.1.1: the app waits for a 100 before sending its body (curl for a second). The
    sidecar answers it itself, as aiohttp's application router and Envoy do, and does not forward the
    `Expect` upstream (the transport sends the body at once)."""
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0       # the answer proper has not started


def _abort(request: web.BaseRequest) -> None:
    """Close the app's connection mid-body so it sees a truncated response, not a complete one."""
    if not isinstance(request, web.BaseRequest):     # HTTP/2: reset that stream, not the connection
        request.abort()
        return
    transport = request.transport
    if transport is not None:
        transport.abort()


def _record(gen: Context, request: web.BaseRequest, route: str, listener: str, url: URL) -> RequestRecord:
    return request_record(gen, route=route, listener=listener, method=request.method, url=record_url(url),
                          parent=parse_traceparent(request.headers.get("traceparent", "")),
                          tracestate=request.headers.get("tracestate"))
