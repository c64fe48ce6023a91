"""Store-and-forward layer: a write the upstream cannot take now is stored and answered 202.

    write (POST, PUT, PATCH, DELETE) ──fails as queue.when says──> stored, 202 Accepted + Location
                                                                   (delivered later: sidecar/queue)

Sits under the fallback layer and over rate limits, concurrency, retries and the breaker, so a write
refused by any of them (`rate-limited`, `breaker-open`, `retries-exhausted`, ...) is queued, and the
queue is asked before any fallback target: a write is better delivered late than answered by a stand-in.
When the queue cannot take it (full, or its store is down) the failure goes on up to the fallback chain
unchanged. Reads pass through untouched. A gRPC call that is stored gets OK with an empty message and
`x-sidecar-queued` metadata instead of the 202 (pipeline/grpc.py `accepted`).
"""
from __future__ import annotations

from sidecar.exchange.context import Handler, WriteQueue
from sidecar.exchange.types import Call, Degraded, Exchange, Reply
from sidecar.pipeline.failure import Failure, reply_failure
from sidecar.pipeline.grpc import accepted, is_grpc_request
from sidecar.transport.errors import UpstreamFailure

WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


async def queue_layer(ex: Exchange, call: Call, next: Handler) -> Reply:
    queue = ex.route.queue
    store = ex.ctx.queue
    if queue is None or store is None or ex.method not in WRITES:
        return await next(ex, call)
    try:
        reply = await next(ex, call)
    except (Degraded, UpstreamFailure) as exc:
        failure = Failure.of(exc)
        if failure.matches(queue.when, ex):
            answer = await _store(ex, store, failure)
            if answer is not None:
                return answer
        raise
    failed = await reply_failure(ex, reply, queue.when)
    if failed is not None and failed.matches(queue.when, ex):
        answer = await _store(ex, store, failed)
        if answer is not None:
            return failed.replaced_by(answer)
    return reply


async def _store(ex: Exchange, store: WriteQueue, failure: Failure) -> Reply | None:
    answer = await store.accept(ex, failure.reason)
    if answer is not None and is_grpc_request(ex.headers):
        return accepted(answer)
    return answer
