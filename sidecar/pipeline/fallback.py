"""The degradation chain: when the primary cannot answer, the route's targets are tried in order.

    primary failure ──matches fallback.when?──> upstream targets (own breaker, rewrite) -> stale cache
                                                -> static answer

A write that `queue.when` matches never gets here as a failure: the store-and-forward layer below
(pipeline/storeforward.py) has answered it 202 already.

Every target runs within the route's remaining `timeout`; one with no time left is skipped, so local
answers (stale cache, static) still come back when the primary ate the whole budget. With
`fallback.hedge`, a primary that is merely slow races the first upstream target.
"""
from __future__ import annotations

import asyncio
import functools
from collections.abc import Coroutine
from typing import Any

from multidict import CIMultiDict

from sidecar.core.decisions import Decision
from sidecar.pipeline.breaker import breaker_layer
from sidecar.pipeline.calls import rewritten_call
from sidecar.exchange.context import Handler
from sidecar.pipeline.failure import Failure, reply_failure
from sidecar.exchange.types import Call, Degraded, Exchange, Reply
from sidecar.pipeline.grpc import reply_code
from sidecar.pipeline.hedge import may_send_twice, race
from sidecar.pipeline.send import send
from sidecar.pipeline.translate import call_translated
from sidecar.policy.model import FallbackPolicy, FallbackTarget
from sidecar.transport.errors import UpstreamFailure

# A fallback upstream is called once, through its own breaker (so a dead fallback is skipped fast),
# to one of its endpoints when it has several.
target_stack = functools.partial(breaker_layer, next=send)


async def fallback_layer(ex: Exchange, call: Call, next: Handler) -> Reply:
    fb = ex.route.fallback
    assert fb is not None                    # composed only for routes with `fallback` (build.py)
    try:
        if fb.hedge is not None and may_send_twice(ex, call):
            reply = await _hedged_primary(ex, call, next, fb)
        else:
            reply = await next(ex, call)
        ex.primary_status = reply.status
        failure = await reply_failure(ex, reply, fb.when)
        if failure is None:
            return reply
    except (Degraded, UpstreamFailure) as exc:
        failure = Failure.of(exc)
    if failure.matches(fb.when, ex):
        if not ex.enforce:
            ex.decide(Decision.FALLBACK, f"would fall back: {failure.reason}")
        else:
            answer = await _run_targets(ex, fb.targets, failure)
            if answer is not None:
                return failure.replaced_by(answer)
    if failure.reply is not None:
        return failure.reply
    failure.raise_()


async def _run_targets(ex: Exchange, targets: tuple[FallbackTarget, ...], failure: Failure) -> Reply | None:
    for target in targets:
        if target.kind == "upstream":
            reply = await _call_upstream_target(ex, target, failure)
        elif target.kind == "cache":
            reply = await _stale_target(ex, failure)
        else:
            reply = _static_target(ex, target, failure)
        if reply is not None:
            return reply
    return None


async def _call_upstream_target(ex: Exchange, target: FallbackTarget, failure: Failure) -> Reply | None:
    label = target.label
    if not ex.body.replayable:
        ex.decide(Decision.FALLBACK, "request body too large to replay: upstream target skipped",
                  upstream=target.upstream, fallback_target=label)
        return None
    if ex.remaining() <= 0:
        ex.decide(Decision.FALLBACK, "no time left: upstream target skipped", upstream=target.upstream,
                  fallback_target=label)
        return None
    ex.decide(Decision.FALLBACK, f"{failure.reason}; trying {target.upstream}{_translated(target)}",
              upstream=target.upstream, fallback_target=label)
    try:
        reply = await _send_to_target(ex, target)
    except (Degraded, UpstreamFailure):
        return None
    fb = ex.route.fallback
    if reply.status >= 500 or (fb is not None and fb.when.grpc and fb.when.matches_grpc(reply_code(reply))):
        reply.release()                      # this target failed as the primary did: try the next one
        return None
    return reply


def _translated(target: FallbackTarget) -> str:
    rewrite = target.rewrite
    return f" (translated {rewrite.translate})" if rewrite is not None and rewrite.translate else ""


def _send_to_target(ex: Exchange, target: FallbackTarget) -> Coroutine[Any, Any, Reply]:
    assert target.upstream is not None       # an upstream target names its upstream (the schema requires it)
    upstream = ex.ctx.upstream(target.upstream)
    rewrite = target.rewrite
    if rewrite is not None and rewrite.translate is not None:
        return call_translated(ex, upstream, rewrite, target.label, target_stack)
    return target_stack(ex, rewritten_call(ex, upstream, rewrite, target.label))


async def _stale_target(ex: Exchange, failure: Failure) -> Reply | None:
    cache = ex.state.cache
    if cache is None:
        return None
    reply = await cache.stale_reply(ex)
    if reply is not None:
        ex.decide(Decision.CACHE_STALE, f"{failure.reason}; serving a stale copy", upstream="cache",
                  fallback_target="cache:stale")
    return reply


def _static_target(ex: Exchange, target: FallbackTarget, failure: Failure) -> Reply:
    static = target.static
    assert static is not None                # a static target carries its answer (policy/build.py)
    headers = CIMultiDict(static.headers)
    if static.content_type and "content-type" not in headers:
        headers["content-type"] = static.content_type
    ex.decide(Decision.STATIC_RESPONSE, f"{failure.reason}; static answer {static.status}",
              upstream="static", fallback_target="static")
    return Reply(status=static.status, headers=headers, upstream="static", body=static.body)


async def _hedged_primary(ex: Exchange, call: Call, next: Handler, fb: FallbackPolicy) -> Reply:
    """Primary and, once it is `fb.hedge` slow, the first upstream target in parallel."""
    assert fb.hedge is not None              # the caller hedges only when `fallback.hedge` is set
    first_upstream = None
    for target in fb.targets:
        if target.kind == "upstream":
            first_upstream = target
            break
    loop = asyncio.get_running_loop()
    primary = loop.create_task(next(ex, call))
    if first_upstream is None:
        return await primary

    def start_backup() -> asyncio.Task[Reply]:
        ex.decide(Decision.FALLBACK, f"{call.name} slow: racing {first_upstream.upstream}"
                  f"{_translated(first_upstream)}", upstream=first_upstream.upstream,
                  fallback_target=first_upstream.label)
        return loop.create_task(_send_to_target(ex, first_upstream))
    return await race(ex, primary, start_backup, [fb.hedge], f"racing {first_upstream.upstream}")
