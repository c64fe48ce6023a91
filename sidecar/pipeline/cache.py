"""The cache layer, outermost in a route's stack: answers from the cache, or forwards and stores.

    fresh copy                    -> answered here: `cache_hit`, 0 attempts, `Cache-Status: sidecar; hit`
    stale, within s-w-revalidate  -> the stale copy now (`cache_revalidate`), ONE background refresh per key
    miss (or stale past that)     -> forwarded; concurrent misses for one key share one upstream call
    the answer                    -> teed to the app as it streams; stored once it ended whole, if storable
    forward failed, copy within stale_if_error -> the stale copy (`cache_stale`), RFC 5861 §4

Only GET and HEAD are cached (RFC 9111 §2), plus POST when `body` is part of the route's `cache.key`:
an extension beyond RFC 9111 for APIs (LLM completions, search) where POST carries a read. A HEAD is
answered from the GET entry and never stored itself.

The app may opt out per request: `Cache-Control: no-store` (neither read nor write) or `no-cache` /
`max-age=0` / `Pragma: no-cache` (forward and store the fresh answer; RFC 9111 §5.2.1). `only-if-cached`
gets a 504 on a miss (§5.2.1.7). The stale-if-error safety net applies even to `no-cache` requests:
the operator's policy is the out-of-band permission RFC 9111 §4.2.4 allows, and the app learns it from
`Cache-Status` and `x-sidecar-degraded`.
"""
from __future__ import annotations

from collections.abc import Callable

from sidecar.cache.route import RouteCache
from sidecar.exchange.context import Context, Handler
from sidecar.exchange.state import Binding, RouteState
from sidecar.exchange.types import Call, Exchange, Reply
from sidecar.policy.model import Route


def attach_cache(binding: Binding, state: RouteState, route: Route,
                 current: Callable[[], Context] | None = None) -> None:
    """Bind a RouteCache to the route's state when `binding` commits; entries survive a reload that
    keeps `store` and `key`. Nothing live changes before the commit: a new cache is built aside, the
    old one is retired (and warm loops restarted) only by the commit.

    With `current` (the running generation, read on each round), the route's `cache.warm` paths are
    fetched too.
    """
    policy = route.cache
    assert policy is not None
    cache = state.cache
    if isinstance(cache, RouteCache) and cache.policy.store == policy.store and cache.policy.key == policy.key:
        kept = cache
        warm_changed = kept.policy.warm != policy.warm

        def keep() -> None:
            kept.update(policy)
            if current is not None and (warm_changed or not kept.warming):
                kept.start_warming(current)
        binding.on_commit(keep)
        return
    fresh = RouteCache(route.name, policy, state.clock)

    def swap() -> None:
        if state.cache is not None:
            state.cache.retire()
        state.cache = fresh
        if current is not None:
            fresh.start_warming(current)
    binding.on_commit(swap)


async def cache_layer(ex: Exchange, call: Call, next: Handler) -> Reply:
    cache = ex.state.cache
    if cache is None:                        # a state built without the cache feature
        return await next(ex, call)
    return await cache.handle(ex, call, next)
