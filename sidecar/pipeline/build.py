"""The route's stack, written down once, outermost first (linkerd2-proxy's route.rs style).

A request enters at the top; each layer may answer, degrade (raise `Degraded`) or pass it on. Only the
layers a route configures are composed, once per policy load, so an unused feature costs nothing.
"""
from __future__ import annotations

import functools
from collections.abc import Coroutine
from typing import Any, Protocol

from sidecar.pipeline.breaker import breaker_layer
from sidecar.pipeline.cache import cache_layer
from sidecar.exchange.context import Handler
from sidecar.exchange.types import Call, Exchange, Reply
from sidecar.pipeline.fallback import fallback_layer
from sidecar.pipeline.guards import concurrency_layer, fault_layer, rate_limit_layer
from sidecar.pipeline.hedge import hedge_layer
from sidecar.pipeline.retry import retries, retry_layer
from sidecar.pipeline.send import send
from sidecar.pipeline.storeforward import queue_layer
from sidecar.policy.model import Route


class Layer(Protocol):
    """One layer: the request, its target's call, and what is under the layer (bound by `build`)."""
    def __call__(self, ex: Exchange, call: Call, next: Handler) -> Coroutine[Any, Any, Reply]: ...


def layers_for(route: Route, upgrade: bool = False) -> list[Layer]:
    """`upgrade`: the stack of an upgrade handshake (proxy/upgrade.py), with no cache (an upgraded
    connection is never stored, nor shared by coalescing) and no hedge (one connection, not two)."""
    stack: list[Layer] = []
    if route.cache is not None and not upgrade:
        stack.append(cache_layer)         # a fresh hit answers here; misses coalesce; answers are stored
    if route.fallback is not None:
        stack.append(fallback_layer)         # the primary failed: walk the targets
    if route.queue is not None:
        stack.append(queue_layer)            # a write that failed: stored, 202, delivered later
    if route.rate_limit is not None:
        stack.append(rate_limit_layer)       # token bucket, LLM tokens/min: 429 (or the fallback chain)
    if route.concurrency is not None:
        stack.append(concurrency_layer)      # over the limit: concurrency_full at once, no queueing
    if route.fault is not None:
        stack.append(fault_layer)            # rehearsed outages: delay or abort before the upstream
    if retries(route):
        stack.append(retry_layer)            # tries again under the budget, with backoff
    if route.hedge is not None and not upgrade:
        stack.append(hedge_layer)            # a slow try races another
    stack.append(breaker_layer)              # per (route, upstream): open rejects; health checks too
    # ... then `send`: one try, to one endpoint of a balanced upstream (pipeline/balance.py)
    return stack


def build(route: Route, upgrade: bool = False) -> Handler:
    handler: Handler = send                  # one physical try, with the per-try timeout
    for layer in reversed(layers_for(route, upgrade)):
        handler = functools.partial(layer, next=handler)
    return handler


# A route that no feature needs to replay streams its body from the first byte.
NO_REPLAY_LIMIT = 0
DEFAULT_REPLAY_LIMIT = 64 * 1024


def replay_limit(route: Route) -> int:
    if route.retry is not None:
        return route.retry.max_body
    if route.fallback is not None or route.hedge is not None or route.queue is not None \
            or (route.cache is not None and "body" in route.cache.key) \
            or (route.rate_limit is not None and route.rate_limit.tokens_per_minute is not None):
        return DEFAULT_REPLAY_LIMIT
    return NO_REPLAY_LIMIT
