"""Balance layer: each try to a balanced upstream goes to one endpoint, chosen per try.

Sits under retry and hedge and over the breaker, so every retry or hedged try picks again -- an endpoint
this request has not tried yet when there is one (Envoy's previous_hosts) -- and the breaker sees which
endpoint a failure came from. What each answer teaches goes back to the endpoint set: latency and
in-flight for the balancer, failures for outlier ejection, a 429's Retry-After for that endpoint's
cooldown. An upstream with a single endpoint passes straight through.
"""
from __future__ import annotations

import asyncio
from typing import cast

from sidecar.core.decisions import Decision
from sidecar.core.endpoints import EndpointEvent, EndpointSet, EndpointState
from sidecar.core.retry import parse_retry_after
from sidecar.exchange.context import Handler
from sidecar.exchange.types import Call, Degraded, Exchange, Reply
from sidecar.policy.conditions import Outcome
from sidecar.transport.endpoints import EndpointTarget
from sidecar.transport.errors import UpstreamFailure


async def balance_layer(ex: Exchange, call: Call, next: Handler) -> Reply:
    up = call.upstream
    ctx = ex.ctx
    group = None if up is None else ctx.endpoints.get(up.name)   # only balanced upstreams have one
    if group is None:
        return await next(ex, call)
    assert up is not None                # a group is found by the upstream's name
    eset = group.set
    clock = ctx.clock
    if not eset.endpoints and group.discovery is not None and not group.discovery.resolved.is_set():
        await _first_answer(ex, group.discovery.resolved)
    if not eset.endpoints:
        raise UpstreamFailure(Outcome.CONNECT_FAILURE, f"no endpoints known for {up.name} (DNS gave none yet)")
    now = clock.monotonic()
    tried = call.tried
    ep = None if tried else eset.pick_steady(now, ctx.rng)
    if ep is None:
        ep = _pick(ex, call, eset, now)
    target = cast(EndpointTarget, ep.target)   # opaque to core; transport/endpoints.py builds every set
    headers = call.headers
    if target.headers or headers.get("Host") != target.host_header:
        # This endpoint's own Host or headers (an API key): on a copy, so that a retry or a hedged
        # try to another endpoint does not carry them. Otherwise the tries share the request's.
        headers = headers.copy()
        headers["Host"] = target.host_header
        for key, value in target.headers:
            headers[key] = value
    path_qs = call.url.raw_path_qs[len(up.base_path):] or "/"
    # The endpoint stands in for the Upstream: the transport reads only fields both have (name, origin,
    # connect_timeout, max_connections, tls, protocol); Call.upstream does not say so yet.
    attempt = Call(upstream=target,  # type: ignore[arg-type]
                   name=call.name, method=call.method, url=target.url(path_qs), headers=headers,
                   body=call.body, server_hostname=target.server_hostname, fallback_target=call.fallback_target,
                   tries=call.tries, endpoint=ep)
    call.tries += 1                      # the resend count the next try of this target reports
    if tried is None:
        call.tried = {ep.key}
    else:
        tried.add(ep.key)
    eset.start(ep)
    started = now
    try:
        reply = await next(ex, attempt)
    except UpstreamFailure:
        now = clock.monotonic()
        _note(ex, up.name, eset.finish(ep, False, now - started, now))
        raise
    except BaseException:
        eset.finish(ep, None, None, clock.monotonic())
        raise
    now = clock.monotonic()
    status = reply.status
    reply.endpoint = ep.key
    # A streamed answer (SSE, a long download) stays in flight for least-request and EWMA until its
    # body ends; the latency sample is the time to its head, as tower's PeakEwma takes it.
    streamed = reply.stream is not None
    if streamed:
        reply.on_done.append(lambda ok: eset.done(ep))
    if status >= 500:
        _note(ex, up.name, eset.finish(ep, False, now - started, now, done=not streamed))
    elif status == 429:
        eset.finish(ep, None, now - started, now, done=not streamed)
        header = reply.headers.get("retry-after")
        hinted = parse_retry_after(header, clock.time()) if header else None
        if hinted is not None and hinted > 0:
            _note(ex, up.name, eset.cool_down(ep, hinted, now))
            # Retry-After speaks for this endpoint alone: a retry may go to another one at once.
            reply.elsewhere = eset.others_ready(ep, now)
    else:
        eset.finish(ep, True, now - started, now, done=not streamed)
    return reply


def _pick(ex: Exchange, call: Call, eset: EndpointSet, now: float) -> EndpointState:
    """A retry, or a set with endpoints out of rotation: restores, panic, health and cooldowns."""
    ctx = ex.ctx
    up = call.upstream
    assert up is not None
    pick = eset.pick(now, ctx.rng, call.tried or ())
    for event in pick.restored:
        ctx.endpoints.background(up.name, event, ex.record.policy_version)
    if pick.all_unhealthy:
        ex.decide(Decision.UPSTREAM_UNHEALTHY, "every endpoint fails its active health check",
                  upstream=up.name, breaker_state="open")
        if ex.enforce:
            raise Degraded(Outcome.UPSTREAM_UNHEALTHY, f"every endpoint of {up.name} is unhealthy",
                           upstream=up.name)
        pick = eset.pick(now, ctx.rng, call.tried or (), ignore_health=True)   # shadow: as if no policy
    if pick.none_usable:
        ex.decide(Decision.UPSTREAM_UNHEALTHY, "every endpoint is ejected or failing its health check",
                  upstream=up.name)
    if pick.panic:
        ex.decide(Decision.BALANCER_PANIC,
                  f"more than {up.outlier.max_ejected:g}% of {len(eset)} endpoints out: balancing over all",
                  upstream=up.name)
    ep = pick.endpoint
    if ep is None:
        wait = max(0.001, (pick.cooled_until or now) - now)
        ex.decide(Decision.ENDPOINT_COOLDOWN, f"every endpoint is cooling down for another {wait:.1f}s",
                  upstream=up.name)
        raise Degraded(Outcome.RATE_LIMITED, f"every endpoint of {up.name} is rate limited", status=429,
                       retry_after=wait, upstream=up.name)
    return ep


def _note(ex: Exchange, upstream: str, event: EndpointEvent | None) -> None:
    if event is not None:
        ex.decide(event.decision, f"{event.endpoint}: {event.reason}", upstream=upstream)


async def _first_answer(ex: Exchange, resolved: asyncio.Event) -> None:
    """A just-started sidecar: wait (within the request's time) for DNS's first answer."""
    try:
        async with asyncio.timeout(max(0.0, ex.remaining())):
            await resolved.wait()
    except TimeoutError:
        pass
