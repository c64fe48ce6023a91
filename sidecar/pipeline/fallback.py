"""The degradation chain: when the primary cannot answer, the route's targets are tried in order.

    primary failure ──matches fallback.when?──> upstream targets (own breaker, rewrite) -> stale cache
                                                -> static answer
    write + queue.when ────────────────────────> 202, stored and delivered later (store-and-forward)

Every target runs within the route's remaining `timeout`; one with no time left is skipped, so local
answers (stale cache, static) still come back when the primary ate the whole budget. With
`fallback.hedge`, a primary that is merely slow races the first upstream target.
"""
from __future__ import annotations

import asyncio
import functools
import json
from typing import Awaitable

from multidict import CIMultiDict

from sidecar.core.decisions import Decision
from sidecar.pipeline.balance import balance_layer
from sidecar.pipeline.breaker import breaker_layer
from sidecar.pipeline.calls import rewritten_call
from sidecar.exchange.types import Call, Degraded, Exchange, Reply
from sidecar.grpc_rules import GrpcCode
from sidecar.pipeline.grpc import reply_code
from sidecar.pipeline.hedge import may_send_twice, race
from sidecar.pipeline.retry import retries_exhausted
from sidecar.pipeline.send import send
from sidecar.pipeline.translate import call_translated
from sidecar.policy.conditions import TRANSPORT_FAILURES, Conditions, Outcome
from sidecar.policy.model import FallbackTarget
from sidecar.transport.errors import UpstreamFailure

# A fallback upstream is called once, through its own breaker (so a dead fallback is skipped fast),
# to one of its endpoints when it has several.
target_stack = functools.partial(balance_layer, next=functools.partial(breaker_layer, next=send))


class Failure:
    """What went wrong with the primary, as `when:` conditions see it: an `outcome` (a layer refused,
    the transport failed), or an answer (`reply`) whose status, gRPC status or JSON body matched a
    condition."""
    __slots__ = ("outcome", "status", "reason", "retry_after", "reply", "json", "grpc")

    def __init__(self, outcome: Outcome | None, status: int, reason: str, retry_after: float | None = None,
                 reply: Reply | None = None, json: bool = False, grpc: GrpcCode | None = None) -> None:
        self.outcome = outcome
        self.status = status
        self.reason = reason
        self.retry_after = retry_after
        self.reply = reply
        self.json = json                     # a body condition of `fallback.when` matched
        self.grpc = grpc                     # the answer's gRPC status, when a condition lists gRPC ones

    @classmethod
    def of(cls, exc: BaseException) -> "Failure":
        if isinstance(exc, Degraded):
            return cls(exc.outcome, exc.status, exc.reason, exc.retry_after)
        assert isinstance(exc, UpstreamFailure)
        return cls(exc.kind, TRANSPORT_FAILURES.get(exc.kind, 502), f"{exc.kind}: {exc.detail}")

    @property
    def label(self) -> str:
        """The failure's name for `x-sidecar-upstream` and the trace's error type."""
        return self.outcome.value if self.outcome is not None else str(self.status)

    def matches(self, when: Conditions, ex: Exchange) -> bool:
        if self.json:                        # a body condition of `when` already matched
            return bool(when.json)
        if self.outcome is not None and when.has(self.outcome):
            return True
        if when.has(Outcome.RETRIES_EXHAUSTED):
            if self.reply is not None and retries_exhausted(ex, self.reply):
                return True                  # a failed answer that no retry followed
            if ex.retries_exhausted or self.outcome in TRANSPORT_FAILURES:
                return True                  # a failed try that no retry followed
        return when.matches_answer(self.status, self.grpc) and self.outcome is not Outcome.RATE_LIMITED

    def raise_(self) -> None:
        assert self.outcome is not None, "an answer is returned, not raised"
        raise Degraded(self.outcome, self.reason, status=self.status, retry_after=self.retry_after)


def _json_condition(when: Conditions, reply: Reply) -> bool:
    """`{json: "error.type", equals: ...}` on a buffered JSON body (APIs that answer errors with 200)."""
    if not when.json or reply.body is None:
        return False
    try:
        doc = json.loads(reply.body)
    except (ValueError, UnicodeDecodeError):
        return False
    for cond in when.json:
        node = doc
        for part in cond.path:
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None and node == cond.equals:
            return True
    return False


async def fallback_layer(ex: Exchange, call: Call, next) -> Reply:
    route = ex.route
    fb = route.fallback
    try:
        if fb is not None and fb.hedge is not None and may_send_twice(ex, call):
            reply = await _hedged_primary(ex, call, next, fb)
        else:
            reply = await next(ex, call)
        ex.primary_status = reply.status
        failure = await _reply_failure(ex, reply)
        if failure is None:
            return reply
    except (Degraded, UpstreamFailure) as exc:
        failure = Failure.of(exc)
    queue = route.queue
    if queue is not None and ex.ctx.queue is not None and ex.method in ("POST", "PUT", "PATCH", "DELETE") \
            and failure.matches(queue.when, ex):
        answer = await ex.ctx.queue.accept(ex, failure.reason)
        if answer is not None:
            return _discard(failure, answer)
    if fb is not None and failure.matches(fb.when, ex):
        if not ex.enforce:
            ex.decide(Decision.FALLBACK, f"would fall back: {failure.reason}")
        else:
            answer = await _run_targets(ex, fb.targets, failure)
            if answer is not None:
                return _discard(failure, answer)
    if failure.reply is not None:
        return failure.reply
    failure.raise_()


def _discard(failure: Failure, answer: Reply) -> Reply:
    if failure.reply is not None:
        failure.reply.release()
    return answer


async def _reply_failure(ex: Exchange, reply: Reply) -> Failure | None:
    fb = ex.route.fallback
    conditions = [c for c in (fb.when if fb else None, ex.route.queue.when if ex.route.queue else None) if c]
    if not conditions:
        return None
    code = reply_code(reply) if any(c.grpc for c in conditions) else None
    if any(c.matches_grpc(code) for c in conditions):
        assert code is not None
        return Failure(None, reply.status, f"{code.condition} from {reply.upstream}", reply=reply, grpc=code)
    if reply.status >= 400 and any(c.matches_status(reply.status) for c in conditions) \
            or (any(c.has(Outcome.RETRIES_EXHAUSTED) for c in conditions) and retries_exhausted(ex, reply)):
        return Failure(None, reply.status, f"{reply.status} from {reply.upstream}", reply=reply, grpc=code)
    if fb is not None and fb.when.json and reply.status < 300:
        await _buffer_small(ex, reply)
        if _json_condition(fb.when, reply):
            return Failure(None, reply.status, f"error in the {reply.upstream} response body", reply=reply,
                           json=True)
    return None


async def _buffer_small(ex: Exchange, reply: Reply) -> None:
    """Read a body up to `retry.max_body` so a JSON condition can look at it (larger ones stream on)."""
    if reply.stream is None:
        return
    limit = ex.route.retry.max_body if ex.route.retry else 64 * 1024
    length = reply.headers.get("content-length")
    if length is None or not length.isdigit() or int(length) > limit:
        return
    parts = [chunk async for chunk in reply.stream]
    reply.body = b"".join(parts)
    reply.stream = None


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


def _send_to_target(ex: Exchange, target: FallbackTarget) -> Awaitable[Reply]:
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
    headers = CIMultiDict(static.headers)
    if static.content_type and "content-type" not in headers:
        headers["content-type"] = static.content_type
    ex.decide(Decision.STATIC_RESPONSE, f"{failure.reason}; static answer {static.status}",
              upstream="static", fallback_target="static")
    return Reply(status=static.status, headers=headers, upstream="static", body=static.body)


async def _hedged_primary(ex: Exchange, call: Call, next, fb) -> Reply:
    """Primary and, once it is `fb.hedge` slow, the first upstream target in parallel."""
    first_upstream = None
    for target in fb.targets:
        if target.kind == "upstream":
            first_upstream = target
            break
    loop = asyncio.get_running_loop()
    primary = loop.create_task(next(ex, call))
    if first_upstream is None:
        return await primary

    def start_backup() -> asyncio.Task:
        ex.decide(Decision.FALLBACK, f"{call.name} slow: racing {first_upstream.upstream}"
                  f"{_translated(first_upstream)}", upstream=first_upstream.upstream,
                  fallback_target=first_upstream.label)
        return loop.create_task(_send_to_target(ex, first_upstream))
    return await race(ex, primary, start_backup, [fb.hedge], f"racing {first_upstream.upstream}")
