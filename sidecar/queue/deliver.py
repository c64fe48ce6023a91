"""One delivery attempt of a stored write: rebuild the request, send it once, classify the answer.

The request is rebuilt from the *current* policy: a reload that moved the upstream's url or rotated its
API key applies to writes already waiting. Each attempt becomes a span in the original request's trace
(its parent is the span of the request that was answered `202`), with one CLIENT try under it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from multidict import CIMultiDict
from yarl import URL

from sidecar.core.breaker import CircuitBreaker, transition_decision
from sidecar.core.decisions import DecisionRecord
from sidecar.core.retry import parse_retry_after
from sidecar.exchange.calls import MIN_READ_IDLE, host_header, redact_url, upstream_url
from sidecar.exchange.context import Context
from sidecar.exchange.records import request_record
from sidecar.policy.model import Policy, Route, Upstream
from sidecar.queue.store import Item
from sidecar.telemetry.records import RequestRecord, TryRecord
from sidecar.telemetry.tracecontext import format_traceparent, new_span_id, new_trace_id
from sidecar.transport.errors import UpstreamFailure

# 408 and 429 say "not now" rather than "never": the write is tried again. Any other 4xx is the
# upstream's final word on this write (retrying an invalid request forever would block the route).
NOT_NOW = frozenset({408, 429})
DEFAULT_TIMEOUT = 15.0


@dataclass(frozen=True, slots=True)
class Outcome:
    delivered: bool                        # the upstream took it, or refused it for good (4xx): done
    status: int | None
    error: str | None                      # failure kind or status, when not delivered
    retry_after: float | None = None
    elapsed: float = 0.0

    @property
    def upstream_ok(self) -> bool:
        """What the breaker is told: as in the data plane, only 5xx and transport failures count."""
        return self.status is not None and self.status < 500


def finished(status: int) -> bool:
    """Is this answer the end of the write's journey (delivered, or rejected for good)?"""
    return status < 500 and status not in NOT_NOW


def route_breaker(ctx: Context, route: str, target: str) -> CircuitBreaker | None:
    state = ctx.states.get(route)
    return state.breaker(target) if state is not None else None


def blocked(ctx: Context, route: str, target: str, next_at: float) -> str | None:
    """Why a stored write to `target` may not be sent now, or None. Admitting through the breaker goes
    last: it takes a half-open probe slot, which the caller then always gives back (record or release)."""
    if ctx.clock.monotonic() < next_at:
        return "backoff after a failed attempt"
    health = ctx.health.get(target)
    if health is not None and not health.healthy:
        return f"upstream {target} failing its health check"
    breaker = route_breaker(ctx, route, target)
    if breaker is not None:
        admitted, transition = breaker.admit()
        if transition is not None:
            ctx.sink.decision(DecisionRecord(
                decision=transition_decision(transition), route=route, upstream=target,
                reason=f"{transition.reason} (queue delivery)", at=time.time(),
                breaker_state=transition.new.value, policy_version=ctx.policy.digest))
        if not admitted:
            return f"circuit breaker for {target} is {breaker.state.value}"
    return None


@dataclass(frozen=True, slots=True)
class Request:
    upstream: Upstream | None
    url: URL
    headers: CIMultiDict
    server_hostname: str | None


def build_request(policy: Policy, item: Item) -> Request | None:
    """The request to send for `item` now; None when its named upstream left the policy (it waits)."""
    headers = CIMultiDict(item.headers)
    if item.upstream is None:
        up, url, hostname = None, URL(item.url, encoded=True), None
    else:
        up = policy.upstreams.get(item.upstream)
        if up is None:
            return None
        url = upstream_url(up, item.path)
        headers["Host"] = host_header(up)
        for name, value in up.headers:          # secrets from the policy, never from the store
            headers[name] = value
        hostname = up.tls.server_name
    headers["Idempotency-Key"] = item.idempotency_key
    return Request(up, url, headers, hostname)


async def attempt(ctx: Context, item: Item, request: Request, route: Route | None,
                  resend_count: int) -> tuple[Outcome, RequestRecord]:
    """Send `item` once under `route`'s timeouts (None: the route left the policy). Never raises for
    an upstream failure: the outcome says what happened."""
    timeout = DEFAULT_TIMEOUT
    if route is not None:
        timeout = route.per_try_timeout if route.per_try_timeout is not None else route.timeout
    url = request.url
    try_rec = TryRecord(span_id=new_span_id(), upstream=item.target, method=item.method,
                        url=redact_url(url), server_address=url.host or "", server_port=url.port or 0,
                        start_ns=time.time_ns(), resend_count=resend_count)
    record = request_record(ctx, route=item.route, listener="queue", method=item.method, url=try_rec.url,
                            parent=(item.trace_id or new_trace_id(), item.span_id, True),
                            upstream=item.target, tries=[try_rec], start_ns=try_rec.start_ns)
    record.attempts = 1
    headers = request.headers
    headers["traceparent"] = format_traceparent(record.trace_id, try_rec.span_id, record.sampled)
    clock = ctx.clock
    started = clock.monotonic()
    # A write to its original destination keeps the egress guard it had when accepted (a name that
    # resolves to metadata or to the sidecar must not get through later, from the queue).
    guard = ctx.own_ports if request.upstream is None and not (
        route is not None and route.allow_internal) else None
    try:
        resp = await ctx.transport.send(
            request.upstream, item.method, url, headers, item.body, timeout=timeout,
            read_idle=max(timeout, MIN_READ_IDLE), server_hostname=request.server_hostname, guard=guard)
    except UpstreamFailure as failure:
        try_rec.error_type = record.error_type = failure.kind.value
        outcome = Outcome(False, None, failure.kind, elapsed=clock.monotonic() - started)
    else:
        status = resp.status
        retry_after = None
        if status in (429, 503) and "retry-after" in resp.headers:
            retry_after = parse_retry_after(resp.headers["retry-after"], clock.time())
        resp.release()                          # the answer's body is nobody's to read
        try_rec.status = record.status = status
        if status >= 400:
            try_rec.error_type = str(status)
        done = finished(status)
        outcome = Outcome(done, status, None if done else str(status), retry_after,
                          clock.monotonic() - started)
    try_rec.end_ns = record.end_ns = time.time_ns()
    return outcome, record

