"""Hedging: when a try has not answered after `delay`, start another; the first good answer wins.

Only for requests that may be sent twice (idempotent, or opted in by `retry.methods`, or carrying
`Idempotency-Key`) with a replayable body. Losing tries are cancelled and their connections freed.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable

from sidecar.core.decisions import Decision
from sidecar.core.retry import method_retryable
from sidecar.exchange.context import Handler
from sidecar.exchange.types import Call, Exchange, Reply
from sidecar.policy.conditions import Outcome
from sidecar.pipeline.retry import DEFAULT_RETRY
from sidecar.transport.errors import UpstreamFailure

def may_send_twice(ex: Exchange, call: Call) -> bool:
    return call.body.replayable and method_retryable(
        ex.route.retry or DEFAULT_RETRY, call.method, "idempotency-key" in ex.headers)


async def race(ex: Exchange, first: asyncio.Task[Reply], start_next: Callable[[], asyncio.Task[Reply]],
               delays: list[float], label: str) -> Reply:
    """Run `first`; after each delay with no good answer, start one more task. First good reply wins."""
    pending = {first}
    last_reply: Reply | None = None
    last_exc: BaseException | None = None
    try:
        while pending:
            timeout = delays[0] if delays else None
            if timeout is not None:
                timeout = max(0.0, min(timeout, ex.remaining()))
            done, pending = await asyncio.wait(pending, timeout=timeout,
                                               return_when=asyncio.FIRST_COMPLETED)
            if not done:
                if ex.remaining() <= 0:
                    break
                assert timeout is not None   # nothing done: the wait timed out
                delays.pop(0)
                ex.decide(Decision.HEDGE, f"no answer after {timeout * 1000:.0f}ms; {label}")
                if ex.enforce:
                    pending.add(start_next())
                continue
            for task in done:
                if task.exception() is not None:
                    last_exc = task.exception()
                    continue
                reply = task.result()
                if reply.status < 500:
                    if last_reply is not None:
                        last_reply.release()
                    return reply
                if last_reply is not None:
                    last_reply.release()
                last_reply = reply
    finally:
        for task in pending:
            task.cancel()
        for task in pending:
            task.add_done_callback(_release_late)
    if last_reply is not None:
        return last_reply
    if last_exc is not None:
        raise last_exc
    raise UpstreamFailure(Outcome.TIMEOUT, "no answer before the route's timeout")


def _release_late(task: asyncio.Task[Reply]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().release()


async def hedge_layer(ex: Exchange, call: Call, next: Handler) -> Reply:
    policy = ex.route.hedge
    assert policy is not None                # layers_for stacks this layer only on a route that hedges
    if not may_send_twice(ex, call):
        return await next(ex, call)
    loop = asyncio.get_running_loop()
    first = loop.create_task(next(ex, call))
    return await race(ex, first, lambda: loop.create_task(next(ex, call)),
                      [policy.delay] * policy.max_extra, f"hedging to {call.name}")
