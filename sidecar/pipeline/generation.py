"""A policy generation: the typed `Context` every request under one policy load runs with.

Built from the policy, the process's long-lived services and the registry of live route state; the
runtime swaps it in with one assignment, and a request keeps the context it started with.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

from sidecar.exchange.context import Context, Services
from sidecar.exchange.state import StateRegistry
from sidecar.pipeline.build import build, replay_limit
from sidecar.pipeline.cache import attach_cache
from sidecar.policy.model import Policy


def build_generation(policy: Policy, services: Services, registry: StateRegistry,
                     current: Callable[[], Context] | None = None, *,
                     interceptors: Mapping[str, object] | None = None) -> Context:
    """The context for `policy`. With `current` (the running generation, read later), routes with
    `cache.warm` start warming."""
    routes = list(policy.all_routes)
    states = registry.bind(routes)
    for route in routes:
        if route.cache is not None:
            attach_cache(states[route.name], route, current)
    balanced = any(u.balanced for u in policy.upstreams.values())
    return Context(policy, services, states=states, handlers={r.name: build(r, balanced) for r in routes},
                   upgrade_handlers={r.name: build(r, balanced, upgrade=True) for r in routes},
                   replay_limits={r.name: replay_limit(r) for r in routes}, interceptors=interceptors or {})
