"""A policy generation: the typed `Context` every request under one policy load runs with.

Built, then committed (Envoy's snapshot swap): `build_generation` makes the context from the policy,
the process's long-lived services and the registry of live route state without changing anything live;
a build that fails leaves every breaker, budget, cache and warm loop as it was. `Binding.commit()`
then moves the live state over (breakers and budgets kept where name and upstream are unchanged, caches
kept or swapped, warm loops restarted) in the same step of the event loop in which the runtime swaps
the generation in. A request keeps the context it started with.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

from sidecar.exchange.context import Context, Services
from sidecar.exchange.state import Binding, StateRegistry
from sidecar.pipeline.build import build, replay_limit
from sidecar.pipeline.cache import attach_cache
from sidecar.policy.model import Policy


def build_generation(policy: Policy, services: Services, registry: StateRegistry,
                     current: Callable[[], Context] | None = None, *,
                     interceptors: Mapping[str, object] | None = None) -> tuple[Context, Binding]:
    """The context for `policy`, and the binding whose `commit()` makes its route states live. With
    `current` (the running generation, read later), routes with `cache.warm` warm from the commit on."""
    routes = list(policy.all_routes)
    binding = registry.prepare(routes)
    states = binding.states
    for route in routes:
        if route.cache is not None:
            attach_cache(binding, states[route.name], route, current)
    return Context(policy, services, states=states, handlers={r.name: build(r) for r in routes},
                   upgrade_handlers={r.name: build(r, upgrade=True) for r in routes},
                   replay_limits={r.name: replay_limit(r) for r in routes},
                   interceptors=interceptors or {}), binding
