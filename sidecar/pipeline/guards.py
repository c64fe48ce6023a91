"""Route guards that answer before the upstream is touched: rate limit, concurrency, fault injection.

Each raises `Degraded` (so the fallback chain can answer) or, in shadow mode, records and lets the
request through.
"""
from __future__ import annotations

from sidecar.core.decisions import Decision
from sidecar.core.faults import decide_fault
from sidecar.exchange.context import Handler
from sidecar.exchange.replies import json_error
from sidecar.exchange.types import Call, Degraded, Exchange, Reply
from sidecar.fleet.ratelimit import key_for
from sidecar.llm.usage import request_shape
from sidecar.policy.conditions import Outcome
from sidecar.policy.model import FaultPolicy


async def rate_limit_layer(ex: Exchange, call: Call, next: Handler) -> Reply:
    limit = ex.route.rate_limit
    assert limit is not None                 # layers_for stacks this layer only on a rate-limited route
    key = key_for(limit, ex.headers)
    per = f" per {limit.key}" if limit.key else ""
    limiter = ex.state.limiter
    if limiter is not None:
        verdict = await limiter.acquire(key)
        if verdict.local_reason is not None:     # the shared store did not answer: this pod's bucket did
            ex.decide(Decision.RATE_LIMIT_LOCAL, verdict.local_reason)
        if not verdict.allowed:
            scope = "global" if limit.store != "local" and not verdict.decided_locally else "local"
            ex.decide(Decision.RATE_LIMITED, f"over the {scope} limit of {limit.per_second:g}/s{per} "
                                             f"(burst {limit.burst})")
            if ex.enforce:
                raise Degraded(Outcome.RATE_LIMITED, f"{scope} rate limit exceeded", status=429,
                               retry_after=max(verdict.retry_after, 0.001))
    tokens = ex.state.tokens
    if tokens is None:
        return await next(ex, call)
    shape = request_shape(ex.url.path, ex.body.data)
    admission = await tokens.admit(key, shape.max_tokens if shape else None)
    verdict = admission.verdict
    if verdict.local_reason is not None:
        ex.decide(Decision.RATE_LIMIT_LOCAL, verdict.local_reason)
    if not verdict.allowed or admission.settle is None:
        held = ("the fleet's bucket is spent" if admission.spent is None
                else f"{admission.spent} spent or in flight")
        ex.decide(Decision.RATE_LIMITED, f"over {tokens.limit} tokens/min{per} ({held})")
        if ex.enforce:
            raise Degraded(Outcome.RATE_LIMITED, "LLM tokens per minute exceeded", status=429,
                           retry_after=max(verdict.retry_after, 0.001))
        return await next(ex, call)
    settle = admission.settle
    # The usage is read while the answer streams to the app: settled when it is done (or failed).
    try:
        reply = await next(ex, call)
    except BaseException:
        settle(_tokens_spent(ex))
        raise
    reply.on_done.append(lambda ok: settle(_tokens_spent(ex)))
    return reply


def _tokens_spent(ex: Exchange) -> int:
    """Input plus output tokens of every try of this request whose answer carried usage."""
    total = 0
    for t in ex.record.tries:
        llm = t.llm
        if llm is not None and llm.has_usage:
            total += (llm.input_tokens or 0) + (llm.output_tokens or 0)
    return total


async def concurrency_layer(ex: Exchange, call: Call, next: Handler) -> Reply:
    limit = ex.state.concurrency
    assert limit is not None                 # RouteState builds one for every route with `concurrency`
    if not limit.try_acquire():
        ex.decide(Decision.CONCURRENCY_FULL, f"{limit.in_flight} requests in flight (max {limit.max})")
        if ex.enforce:
            raise Degraded(Outcome.CONCURRENCY_FULL, "too many requests in flight on this route")
        return await next(ex, call)
    try:
        reply = await next(ex, call)
    except BaseException:
        limit.release()
        raise
    reply.on_done.append(lambda ok: limit.release())
    return reply


def _fault_applies(ex: Exchange, fault: FaultPolicy) -> bool:
    header = fault.header
    if header is None:
        return True
    value = ex.headers.get(header[0])
    return value is not None and (header[1] is None or value == header[1])


async def fault_layer(ex: Exchange, call: Call, next: Handler) -> Reply:
    fault = ex.route.fault
    assert fault is not None                 # layers_for stacks this layer only on a route with `fault`
    if not _fault_applies(ex, fault):
        return await next(ex, call)
    delay, abort = decide_fault(fault, ex.ctx.rng)
    if delay > 0:
        ex.decide(Decision.FAULT_INJECTED, f"delay {delay * 1000:.0f}ms")
        if ex.enforce:
            await ex.ctx.sleep(min(delay, max(ex.remaining(), 0.0)))
    if abort is not None:
        ex.decide(Decision.FAULT_INJECTED, f"abort with {abort}")
        if ex.enforce:
            return json_error(abort, "fault injected", ex.route.name,
                              [d.decision.value for d in ex.record.decisions], upstream="fault")
    return await next(ex, call)
