"""`cache.warm: [{path: /v1/models, every: 5m}]`: paths fetched at start and on schedule.

Each fetch goes through the route's whole stack (breaker, retries, fallbacks, then the cache layer that
stores it) as a GET with `Cache-Control: no-cache`, so it refreshes the entry even while it is fresh.
It is keyed like an app request through a reverse listener: the upstream's origin plus the path, with no
request headers (a `header:NAME` key part is empty). Routes without an `upstream` have no origin to warm
and are skipped. The loop reads the runtime's current generation on every round, so a reload applies.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from multidict import CIMultiDict
from yarl import URL

from sidecar.exchange.body import RequestBody
from sidecar.exchange.calls import make_call
from sidecar.exchange.context import Context
from sidecar.exchange.records import request_record
from sidecar.exchange.types import Degraded, Exchange
from sidecar.policy.model import Route
from sidecar.transport.errors import UpstreamFailure

log = logging.getLogger("sidecar.cache")

MIN_PAUSE = 0.05                           # never spin, whatever the schedule says


def _current_route(current: Callable[[], Context], name: str) -> tuple[Context, Route | None]:
    gen = current()
    for route in gen.policy.routes:
        if route.name == name:
            return gen, route
    return gen, None


async def warm_loop(current: Callable[[], Context], route_name: str, cache: object) -> None:
    """Fetch every warm path now, then each again `every` seconds later, while `cache` is the route's."""
    due: dict[str, float] = {}
    while True:
        gen, route = _current_route(current, route_name)
        state = gen.states.get(route_name)
        if route is None or route.cache is None or not route.cache.warm \
                or state is None or state.cache is not cache:
            return                           # the route, its warm list or this cache is gone
        for warm in route.cache.warm:
            if due.get(warm.path, 0.0) <= gen.clock.monotonic():
                due[warm.path] = gen.clock.monotonic() + warm.every
                await warm_once(gen, route, warm.path)
        wake = min(due.get(w.path, 0.0) for w in route.cache.warm)
        await gen.sleep(max(wake - gen.clock.monotonic(), MIN_PAUSE))


async def warm_once(gen: Context, route: Route, path: str) -> bool:
    """One fetch of `path` through the route's stack; True when an answer came back whole."""
    upstream = gen.policy.upstreams.get(route.upstream) if route.upstream else None
    if upstream is None:
        log.debug("route %s: cache.warm needs an upstream to know the origin; skipped", route.name)
        return False
    url = URL(f"{upstream.origin}{path}", encoded=True)
    record = request_record(gen, route=route.name, listener="cache-warm", method="GET", url=str(url))
    ex = Exchange(route=route, state=gen.states[route.name], ctx=gen, method="GET", url=url,
                  headers=CIMultiDict({"Cache-Control": "no-cache"}), body=RequestBody.EMPTY,
                  deadline=gen.clock.monotonic() + route.timeout, record=record)
    try:
        async with asyncio.timeout(route.timeout + 1.0):
            reply = await gen.handlers[route.name](ex, make_call(ex, upstream))
            try:
                if reply.stream is not None:
                    async for _ in reply.stream:
                        pass
            except UpstreamFailure:
                reply.finish(False)          # cut mid-body: the breaker counts it, nothing is stored
                raise
            reply.finish(True)               # the cache layer stores it now
    except (Degraded, UpstreamFailure, TimeoutError, OSError) as exc:
        log.info("route %s: warming %s failed: %s", route.name, path, exc)
        return False
    return 200 <= reply.status < 300
