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
import time

from multidict import CIMultiDict
from yarl import URL

from sidecar.pipeline.body import RequestBody
from sidecar.pipeline.calls import make_call
from sidecar.pipeline.exchange import Degraded, Exchange
from sidecar.telemetry.records import RequestRecord
from sidecar.telemetry.tracecontext import new_span_id, new_trace_id
from sidecar.transport.errors import UpstreamFailure

log = logging.getLogger("sidecar.cache")

MIN_PAUSE = 0.05                           # never spin, whatever the schedule says


def _current_route(runtime, name: str):
    gen = runtime.gen
    for route in gen.policy.routes:
        if route.name == name:
            return gen, route
    return gen, None


async def warm_loop(runtime, route_name: str, cache) -> None:
    """Fetch every warm path now, then each again `every` seconds later, while `cache` is the route's."""
    due: dict[str, float] = {}
    while True:
        gen, route = _current_route(runtime, route_name)
        state = gen.states.get(route_name)
        if route is None or route.cache is None or not route.cache.warm \
                or state is None or state.cache is not cache:
            return                           # the route, its warm list or this cache is gone
        for warm in route.cache.warm:
            if due.get(warm.path, 0.0) <= gen.clock.monotonic():
                due[warm.path] = gen.clock.monotonic() + warm.every
                await warm_once(gen, route, warm.path)
        wake = min(due.get(w.path, 0.0) for w in route.cache.warm)
        await runtime.sleep(max(wake - gen.clock.monotonic(), MIN_PAUSE))


async def warm_once(gen, route, path: str) -> bool:
    """One fetch of `path` through the route's stack; True when an answer came back whole."""
    upstream = gen.policy.upstreams.get(route.upstream) if route.upstream else None
    if upstream is None:
        log.debug("route %s: cache.warm needs an upstream to know the origin; skipped", route.name)
        return False
    url = URL(f"{upstream.origin}{path}", encoded=True)
    trace_id = new_trace_id()
    record = RequestRecord(
        trace_id=trace_id, span_id=new_span_id(), parent_span_id=None, caller_sampled=False,
        tracestate=None, route=route.name, upstream=None, method="GET", url=str(url), listener="cache-warm",
        policy_version=gen.policy.digest, start_ns=time.time_ns(),
        sampled=gen.head_sampler(trace_id, None, False))
    ex = Exchange(route=route, state=gen.states[route.name], runtime=gen, method="GET", url=url,
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
