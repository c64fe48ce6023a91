"""Balancing: each try to a balanced upstream goes to one endpoint, chosen per try.

Not a layer of its own: `send` (the innermost step, under retry, hedge and the breaker) asks `choose`
before a try to a balanced upstream and tells `answered` / `failed` what came back. So every retry or
hedged try picks again -- an endpoint this request has not tried yet when there is one (Envoy's
previous_hosts) -- and a try costs no coroutine frame nor request record of its own. What each answer
teaches goes back to the endpoint set: latency and in-flight for the balancer, failures for outlier
ejection, a 429's Retry-After for that endpoint's cooldown. The breaker above learns which endpoint
failed from the reply's `endpoint` or the failure's, and leaves one bad endpoint to outlier detection.
"""
from __future__ import annotations

from typing import cast

from multidict import CIMultiDict
from yarl import URL

from sidecar.core.decisions import Decision
from sidecar.core.endpoints import (ALL_UNHEALTHY, NONE_USABLE, EndpointEvent, EndpointSet, EndpointState,
                                    cooling_reason)
from sidecar.core.retry import parse_retry_after
from sidecar.exchange.types import Call, Degraded, Exchange, Reply
from sidecar.policy.conditions import Outcome
from sidecar.policy.model import Upstream
from sidecar.transport.endpoints import EndpointTarget
from sidecar.transport.errors import UpstreamFailure


def choose(ex: Exchange, call: Call, up: Upstream, eset: EndpointSet
           ) -> tuple[EndpointState, EndpointTarget, URL, CIMultiDict[str], float]:
    """This try's endpoint, where it goes, the headers it carries, and when it started (the clock's
    monotonic time); the endpoint is in flight from here until `answered` or `failed`."""
    if not eset.endpoints:
        raise UpstreamFailure(Outcome.CONNECT_FAILURE, f"no endpoints known for {up.name} (DNS gave none yet)")
    ctx = ex.ctx
    now = ctx.clock.monotonic()
    tried = call.tried
    ep = None if tried else eset.pick_steady(now, ctx.rng)
    if ep is None:
        ep = _pick(ex, up, eset, tried, now)
    target = cast(EndpointTarget, ep.target)   # opaque to core; transport/endpoints.py builds every set
    # On a copy when this endpoint has its own Host or headers, so that a retry or a hedged try to
    # another endpoint does not carry them.
    headers = target.with_headers(call.headers)
    if tried is None:
        call.tried = {ep.key}
    else:
        tried.add(ep.key)
    eset.start(ep)
    return ep, target, target.url(call.path_qs), headers, now


def failed(ex: Exchange, up: str, eset: EndpointSet, ep: EndpointState, started: float,
           failure: BaseException) -> None:
    """The try raised: a transport failure counts against the endpoint; anything else (cancelled, a
    losing hedge) leaves no verdict."""
    now = ex.ctx.clock.monotonic()
    if isinstance(failure, UpstreamFailure):
        failure.endpoint = ep.key
        _note(ex, up, eset.finish(ep, False, now - started, now))
    else:
        eset.finish(ep, None, None, now)


def answered(ex: Exchange, up: str, eset: EndpointSet, ep: EndpointState, started: float, reply: Reply) -> None:
    clock = ex.ctx.clock
    now = clock.monotonic()
    status = reply.status
    reply.endpoint = ep.key
    if status < 429 and reply.stream is None:
        eset.finish(ep, True, now - started, now)          # a whole, good answer: nothing to report
        return
    # A streamed answer (SSE, a long download) stays in flight for least-request and EWMA until its
    # body ends; the latency sample is the time to its head, as tower's PeakEwma takes it.
    streamed = reply.stream is not None
    if streamed:
        reply.on_done.append(lambda ok: eset.done(ep))
    hinted = None
    if status == 429:
        header = reply.headers.get("retry-after")
        hinted = parse_retry_after(header, clock.time()) if header else None
    event = eset.answered(ep, status, now - started, now, hinted, done=not streamed)
    if event is not None:
        _note(ex, up, event)
        if event.decision is Decision.ENDPOINT_COOLDOWN:
            # Retry-After speaks for this endpoint alone: a retry may go to another one at once.
            reply.elsewhere = eset.others_ready(ep, now)


def _pick(ex: Exchange, up: Upstream, eset: EndpointSet, tried: set[str] | None, now: float) -> EndpointState:
    """A retry, or a set with endpoints out of rotation: restores, panic, health and cooldowns."""
    ctx = ex.ctx
    pick = eset.pick(now, ctx.rng, tried or ())
    for event in pick.restored:
        ctx.endpoints.background(up.name, event, ex.record.policy_version)
    if pick.all_unhealthy:
        ex.decide(Decision.UPSTREAM_UNHEALTHY, ALL_UNHEALTHY, upstream=up.name, breaker_state="open")
        if ex.enforce:
            raise Degraded(Outcome.UPSTREAM_UNHEALTHY, f"every endpoint of {up.name} is unhealthy",
                           upstream=up.name)
        pick = eset.pick(now, ctx.rng, tried or (), ignore_health=True)   # shadow: as if no policy
    if pick.none_usable:
        ex.decide(Decision.UPSTREAM_UNHEALTHY, NONE_USABLE, upstream=up.name)
    if pick.panic:
        ex.decide(Decision.BALANCER_PANIC, eset.panic_reason(), upstream=up.name)
    ep = pick.endpoint
    if ep is None:
        wait = max(0.001, (pick.cooled_until or now) - now)
        ex.decide(Decision.ENDPOINT_COOLDOWN, cooling_reason(wait), upstream=up.name)
        raise Degraded(Outcome.RATE_LIMITED, f"every endpoint of {up.name} is rate limited", status=429,
                       retry_after=wait, upstream=up.name)
    return ep


def _note(ex: Exchange, upstream: str, event: EndpointEvent | None) -> None:
    if event is not None:
        ex.decide(event.decision, f"{event.endpoint}: {event.reason}", upstream=upstream)
