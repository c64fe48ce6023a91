"""One delivery attempt of a stored write: rebuild the request, send it once, classify the answer.

The request is rebuilt from the *current* policy: a reload that moved the upstream's url or rotated its
API key applies to writes already waiting. Each attempt becomes a span in the original request's trace
(its parent is the span of the request that was answered `202`), with one CLIENT try under it.

A balanced upstream's attempt goes to one endpoint its set picks now (ejection, health, cooldowns and
panic as for a live try), with that endpoint's Host and own headers, and what came back is reported to
the set as the live path does (pipeline/balance.py): a dead replica is ejected, not retried forever, and
a failure of one endpoint while another answers well is no verdict for the route's breaker.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

from multidict import CIMultiDict
from yarl import URL

from typing import NamedTuple, cast

from sidecar.core.breaker import CircuitBreaker, Transition, transition_decision
from sidecar.core.decisions import Decision, DecisionRecord
from sidecar.core.endpoints import (ALL_UNHEALTHY, NONE_USABLE, EndpointEvent, EndpointSet, EndpointState,
                                    cooling_reason)
from sidecar.core.retry import parse_retry_after
from sidecar.exchange.calls import MIN_READ_IDLE, host_header, record_url, upstream_url
from sidecar.exchange.context import Context, Target
from sidecar.exchange.records import request_record
from sidecar.exchange.types import record_decision
from sidecar.policy.conditions import Outcome as Condition
from sidecar.policy.model import Policy, Route, Upstream
from sidecar.queue.store import Item
from sidecar.telemetry.records import RequestRecord, TryRecord
from sidecar.telemetry.tracecontext import format_traceparent, new_span_id, new_trace_id
from sidecar.transport.endpoints import EndpointTarget
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
    # False: no verdict on the upstream for the breaker -- nothing was sent (no endpoint to send to),
    # or one endpoint failed while another in rotation answers well (outlier detection's business).
    counted: bool = True

    @property
    def upstream_ok(self) -> bool:
        """What the breaker is told: as in the data plane, only 5xx and transport failures count."""
        return self.status is not None and self.status < 500


def judge(breaker: CircuitBreaker, outcome: Outcome) -> Transition | None:
    """Tell the route's breaker (which admitted this attempt) what the attempt says of the upstream."""
    if not outcome.counted:
        breaker.release()
        return None
    return breaker.record(outcome.upstream_ok, outcome.elapsed)


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


class Unsent(NamedTuple):
    """Why a balanced upstream's attempt has no endpoint to go to, and when one may be ready."""
    kind: Condition
    reason: str
    wait: float | None = None


# A decision the pick made for this attempt, recorded on the attempt's record (its span) as the live
# path records it on the request's: (decision, reason, breaker state or None).
Note = tuple[Decision, str, str | None]


def choose(ctx: Context, up: Upstream, eset: EndpointSet) -> tuple[EndpointState | Unsent, list[Note]]:
    """This attempt's endpoint, as `EndpointSet.pick` gives it for a first try, and the decisions the
    pick made (panic, every endpoint out, every endpoint cooling down) -- the live path's, from
    pipeline/balance.py. Ejections that ended go out as background decisions."""
    if not eset.endpoints:
        return Unsent(Condition.CONNECT_FAILURE, f"no endpoints known for {up.name} (DNS gave none yet)"), []
    now = ctx.clock.monotonic()
    pick = eset.pick(now, ctx.rng)
    for event in pick.restored:
        ctx.endpoints.background(up.name, event, ctx.policy.digest)
    if pick.all_unhealthy:
        return (Unsent(Condition.UPSTREAM_UNHEALTHY, f"every endpoint of {up.name} fails its health check"),
                [(Decision.UPSTREAM_UNHEALTHY, ALL_UNHEALTHY, "open")])
    notes: list[Note] = []
    if pick.none_usable:
        notes.append((Decision.UPSTREAM_UNHEALTHY, NONE_USABLE, None))
    if pick.panic:
        notes.append((Decision.BALANCER_PANIC, eset.panic_reason(), None))
    if pick.endpoint is None:
        wait = max(0.001, (pick.cooled_until or now) - now)
        notes.append((Decision.ENDPOINT_COOLDOWN, cooling_reason(wait), None))
        return (Unsent(Condition.RATE_LIMITED,
                       f"every endpoint of {up.name} is cooling down for another {wait:.1f}s", wait), notes)
    return pick.endpoint, notes


async def attempt(ctx: Context, item: Item, request: Request, route: Route | None,
                  resend_count: int) -> tuple[Outcome, RequestRecord]:
    """Send `item` once under `route`'s timeouts (None: the route left the policy). Never raises for
    an upstream failure: the outcome says what happened."""
    timeout = DEFAULT_TIMEOUT
    if route is not None:
        timeout = route.per_try_timeout if route.per_try_timeout is not None else route.timeout
    up = request.upstream
    target: Target | None = up
    url, headers, hostname = request.url, request.headers, request.server_hostname
    group = ctx.endpoints.get(up.name) if up is not None and up.balanced else None
    eset: EndpointSet | None = None
    ep: EndpointState | None = None
    notes: list[Note] = []
    if group is not None:
        eset = group.set
        if not eset.endpoints:
            await group.first_answer(timeout)    # a just-started sidecar: DNS's first answer
        chosen, notes = choose(ctx, cast(Upstream, up), eset)
        if isinstance(chosen, Unsent):
            return _unsent(ctx, item, url, chosen, notes)
        ep = chosen
        ept = cast(EndpointTarget, ep.target)    # opaque to core; transport/endpoints.py builds every set
        target, url, hostname = ept, ept.url(item.path), ept.server_hostname
        headers = ept.with_headers(headers)      # its Host and own headers: secrets from the policy
    try_rec = TryRecord(span_id=new_span_id(), upstream=item.target, method=item.method,
                        url=record_url(url), server_address=url.host or "", server_port=url.port or 0,
                        start_ns=time.time_ns(), resend_count=resend_count,
                        endpoint=None if ep is None else ep.key)
    record = request_record(ctx, route=item.route, listener="queue", method=item.method, url=try_rec.url,
                            parent=(item.trace_id or new_trace_id(), item.span_id, True),
                            upstream=item.target, tries=[try_rec], start_ns=try_rec.start_ns)
    record.attempts = 1
    _note(ctx, record, item.target, notes)
    headers["traceparent"] = format_traceparent(record.trace_id, try_rec.span_id, record.sampled)
    clock = ctx.clock
    started = clock.monotonic()
    # A write to its original destination keeps the egress guard it had when accepted (a name that
    # resolves to metadata or to the sidecar must not get through later, from the queue).
    guard = ctx.own_ports if request.upstream is None and not (
        route is not None and route.allow_internal) else None
    if eset is not None and ep is not None:
        eset.start(ep)                           # in flight until `_settle` (or cancelled) below
    try:
        resp = await ctx.transport.send(
            target, item.method, url, headers, item.body, timeout=timeout,
            read_idle=max(timeout, MIN_READ_IDLE), server_hostname=hostname, guard=guard)
    except UpstreamFailure as failure:
        try_rec.error_type = record.error_type = failure.kind.value
        outcome = Outcome(False, None, failure.kind, elapsed=clock.monotonic() - started)
    except BaseException:
        if eset is not None and ep is not None:
            eset.finish(ep, None, None, clock.monotonic())    # cancelled (shutdown): no verdict
        raise
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
    if eset is not None and ep is not None:
        outcome = _settle(ctx, item, eset, ep, outcome)
    try_rec.end_ns = record.end_ns = time.time_ns()
    return outcome, record


def _settle(ctx: Context, item: Item, eset: EndpointSet, ep: EndpointState, outcome: Outcome) -> Outcome:
    """Report the attempt to the endpoint set (latency and in-flight for the balancer, failures for
    outlier ejection, a 429's Retry-After for that endpoint's cooldown); returns the outcome as the
    queue and the breaker should take it."""
    now = ctx.clock.monotonic()
    status = outcome.status
    event: EndpointEvent | None
    if status is None:
        event = eset.finish(ep, False, outcome.elapsed, now)
    else:
        hinted = outcome.retry_after if status == 429 else None
        event = eset.answered(ep, status, outcome.elapsed, now, hinted)
    if event is not None:
        ctx.endpoints.background(item.target, event, ctx.policy.digest)
    if outcome.upstream_ok:
        if status == 429 and outcome.retry_after and eset.others_ready(ep, now):
            # Retry-After spoke for this endpoint alone: the next attempt may go to another one.
            outcome = replace(outcome, retry_after=None)
        return outcome
    return replace(outcome, counted=eset.counts_for_breaker(ep))


def _unsent(ctx: Context, item: Item, url: URL, unsent: Unsent,
            notes: list[Note]) -> tuple[Outcome, RequestRecord]:
    """An attempt with no endpoint to go to: a failed attempt that sent nothing (its record has no
    try; its URL is the upstream's own), tried again with the queue's backoff (not before a cooldown
    ends), and no verdict for the breaker."""
    record = request_record(ctx, route=item.route, listener="queue", method=item.method, url=record_url(url),
                            parent=(item.trace_id or new_trace_id(), item.span_id, True), upstream=item.target)
    _note(ctx, record, item.target, notes)
    record.error_type = unsent.kind.value
    record.end_ns = time.time_ns()
    return Outcome(False, None, unsent.reason, unsent.wait, counted=False), record


def _note(ctx: Context, record: RequestRecord, upstream: str, notes: list[Note]) -> None:
    for decision, reason, breaker_state in notes:
        record_decision(ctx.sink, record, decision, reason, upstream=upstream, breaker_state=breaker_state)
