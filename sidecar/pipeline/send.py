"""The innermost layer: one physical try to one target, recorded for the trace. A balanced upstream's
try goes to the endpoint pipeline/balance.py chooses for it, and what came back is reported there.

Returns as soon as response headers arrive; the body stays unread in `Reply.stream` so that it is
streamed to the app, never buffered. `traceparent` is set per try to that try's own span id.
"""
from __future__ import annotations

import time
from typing import AsyncIterator

from multidict import CIMultiDict
from yarl import URL

from sidecar.grpc_rules import format_timeout, is_grpc
from sidecar.exchange.calls import MIN_READ_IDLE, record_url
from sidecar.exchange.headers import end_to_end
from sidecar.exchange.types import Call, Exchange, Reply
from sidecar.llm.usage import AnswerScanner, LlmCall, request_shape, scan_body
from sidecar.pipeline.grpc import reply_code
from sidecar.telemetry.records import TryRecord
from sidecar.telemetry.tracecontext import format_traceparent, new_span_id
from sidecar.exchange.context import Target, UpstreamResponse
from sidecar.pipeline import balance
from sidecar.transport.errors import UpstreamFailure, translate


async def send(ex: Exchange, call: Call) -> Reply:
    route = ex.route
    timeout = ex.remaining()
    if route.per_try_timeout is not None and route.per_try_timeout < timeout:
        timeout = route.per_try_timeout
    up = call.upstream
    target: Target | None = up
    url, headers, hostname = call.url, call.headers, call.server_hostname
    ep = eset = None
    started = 0.0
    if up is not None and up.balanced:
        group = ex.ctx.endpoints.get(up.name)
        if group is not None:                    # pipeline/balance.py: this try's endpoint
            eset = group.set
            if not eset.endpoints:
                await group.first_answer(ex.remaining())   # a just-started sidecar: DNS's first answer
            ep, target, url, headers, started = balance.choose(ex, call, up, eset)
            hostname = target.server_hostname
    rec = TryRecord(span_id=new_span_id(), upstream=call.name, method=call.method, url=record_url(url),
                    server_address=url.host or "", server_port=url.port or 0, start_ns=time.time_ns(),
                    resend_count=call.tries, fallback_target=call.fallback_target,
                    endpoint=None if ep is None else ep.key)
    call.tries += 1
    ex.attempts += 1
    ex.record.tries.append(rec)
    headers["traceparent"] = format_traceparent(ex.record.trace_id, rec.span_id, ex.record.sampled)
    if ex.record.tracestate:
        headers["tracestate"] = ex.record.tracestate
    rec.llm = _llm_shape(ex, call, url)    # a non-LLM path costs one str.endswith()
    if "grpc-timeout" in headers or is_grpc(headers.get("content-type")):
        headers["grpc-timeout"] = format_timeout(timeout)   # the deadline left, for the upstream
    payload = call.body.payload()
    try:
        resp = await ex.ctx.transport.send(
            target, call.method, url, headers, payload, timeout=timeout,
            read_idle=max(route.timeout, MIN_READ_IDLE), server_hostname=hostname, guard=ex.egress_guard)
    except BaseException as failure:
        if isinstance(failure, UpstreamFailure):
            rec.end_ns = time.time_ns()
            rec.error_type = failure.kind.value
        if eset is not None and ep is not None:
            balance.failed(ex, call.name, eset, ep, started, failure)
        raise
    rec.status = resp.status
    if resp.status == 101:               # switched protocols: the listener takes the connection over
        rec.end_ns = time.time_ns()
        reply = Reply(status=101, headers=CIMultiDict(resp.headers), upstream=call.name, body=b"",
                      release_cb=resp.release, upgraded=resp)
        if eset is not None and ep is not None:
            balance.answered(ex, call.name, eset, ep, started, reply)
        return reply
    if resp.status >= 500:
        rec.error_type = str(resp.status)
    content = resp.content
    streamed = False
    if call.method == "HEAD" or resp.status in (204, 304):
        body = b""
    elif content.is_eof() and content.exception() is None:
        # The whole body came with the head (a small answer): take it now and free the connection
        # for the next request, instead of relaying it chunk by chunk.
        body = content.read_nowait()
    else:
        body, streamed = None, True
    if not streamed:
        resp.release()
    reply = Reply(status=resp.status, headers=end_to_end(resp.headers), upstream=call.name, body=body,
                  release_cb=resp.release if streamed else None,
                  trailers=getattr(content, "trailers", None))    # HTTP/2 (gRPC status) when whole
    llm = rec.llm if resp.status < 300 else None
    if streamed:
        stream = _relay(resp, reply)
        if llm is not None:
            sse = "text/event-stream" in resp.headers.get("content-type", "")
            stream = _scanned(stream, AnswerScanner(llm, sse=sse))
        reply.stream = stream
    elif llm is not None and body:
        scan_body(llm, body)

    def _ended(ok: bool | None, rec: TryRecord = rec) -> None:
        rec.end_ns = time.time_ns()
        if ok is False:
            rec.cut = True
            if rec.error_type is None:
                rec.error_type = "reset"
        code = reply_code(reply)                 # from the trailers, once the stream ended
        if code is not None:
            rec.grpc_status = int(code)
    reply.on_done.append(_ended)
    if eset is not None and ep is not None:
        balance.answered(ex, call.name, eset, ep, started, reply)
    return reply


def _llm_shape(ex: Exchange, call: Call, url: URL) -> LlmCall | None:
    if call.method != "POST":              # every LLM API call is a POST
        return None
    llm = request_shape(url.path, call.body.data)
    if llm is None:
        return None
    record = ex.record
    if record.llm_model is None:           # the app's model, before any json_map or translation
        app = request_shape(ex.url.path, ex.body.data) if call.body is not ex.body else llm
        record.llm_model = app.request_model if app is not None else None
    llm.prices = ex.ctx.policy.llm
    return llm


async def _scanned(stream: AsyncIterator[bytes], scanner: AnswerScanner) -> AsyncIterator[bytes]:
    """The stream unchanged; each chunk is read by the scanner after it has been handed on. A consumer
    that stops after the last chunk (closing this generator at its `yield`) still has it read."""
    pending: bytes | None = None
    at = 0
    try:
        async for chunk in stream:
            at = time.time_ns()
            pending = chunk
            yield chunk
            pending = None
            scanner.feed(chunk, at)
    finally:
        if pending is not None:
            scanner.feed(pending, at)
        scanner.close()


async def _relay(resp: UpstreamResponse, reply: Reply) -> AsyncIterator[bytes]:
    """The upstream body, as it arrives. A cut is raised as `UpstreamFailure(Outcome.RESET)`. HTTP/2
    trailers are on the reply once the body ended."""
    content = resp.content
    try:
        while True:
            chunk = await content.readany()
            if not chunk:
                break
            yield chunk
        reply.trailers = getattr(content, "trailers", None)
    except UpstreamFailure:
        raise
    except Exception as exc:  # noqa: BLE001 - translated in one place
        raise translate(exc) from exc
    finally:
        resp.release()
