"""Per-route state that outlives a request and, when the route's name and upstream are unchanged,
a policy reload: retry budget, breakers (one per route and target upstream), concurrency, rate limit.
Upstream health (from active checks) is per upstream and shared by every route."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from sidecar.core.breaker import CircuitBreaker
from sidecar.core.budget import RetryBudget
from sidecar.core.clock import Clock
from sidecar.core.concurrency import ConcurrencyLimit
from sidecar.core.tokenwindow import TokenAdmission
from sidecar.policy.model import BreakerPolicy, RateLimitPolicy, Route

if TYPE_CHECKING:
    from sidecar.exchange.types import Call, Exchange, Reply

# Passthrough routes get a breaker per original destination: bounded so that a scan of many hosts
# cannot grow memory without limit (least recently used are forgotten).
MAX_BREAKERS_PER_ROUTE = 1024


class Limiter(Protocol):
    """A route's `rate_limit.per_second` limiter (sidecar/fleet/ratelimit.py: local buckets, or GCRA in Redis)."""
    async def acquire(self, key: str, cost: float = 1.0) -> Any: ...
    async def charge(self, key: str, cost: float) -> None: ...
    def stats(self) -> dict[str, Any]: ...


class TokenLimiter(Protocol):
    """A route's `rate_limit.tokens_per_minute` limiter (sidecar/fleet/tokenlimit.py: sliding windows
    per key value here, or a token bucket per key value in Redis)."""
    limit: int
    async def admit(self, key: str, max_tokens: int | None) -> TokenAdmission: ...
    def stats(self) -> dict[str, Any]: ...


class LimiterFactory(Protocol):
    """(route name, its rate_limit) -> its limiters. Injected by the runtime (fleet/limits.py), so this
    bottom package needs nothing of Redis."""
    def requests(self, route: str, policy: RateLimitPolicy) -> Limiter: ...
    def tokens(self, route: str, policy: RateLimitPolicy) -> TokenLimiter: ...


def _token_shape(limit: RateLimitPolicy | None) -> tuple[object, ...] | None:
    """What a token limiter is built from: it is kept across a reload that changes none of it."""
    if limit is None:
        return None
    return limit.tokens_per_minute, limit.key, limit.store, limit.max_keys


class RouteCache(Protocol):
    """A route's response cache (sidecar/cache/route.py), as the layers and the runtime use it."""
    def handle(self, ex: Exchange, call: Call,
               next: Callable[[Exchange, Call], Awaitable[Reply]]) -> Awaitable[Reply]: ...
    def stale_reply(self, ex: Exchange) -> Awaitable[Reply | None]: ...
    def retire(self) -> None: ...
    def close(self) -> Awaitable[None]: ...
    def stats(self) -> dict[str, Any]: ...
    def entries(self) -> int: ...


class RouteState:
    __slots__ = ("name", "upstream", "route", "clock", "budget", "concurrency", "limiter", "tokens", "breakers",
                 "cache", "limiters")

    def __init__(self, route: Route, clock: Clock, limiters: LimiterFactory) -> None:
        self.name = route.name
        self.limiters = limiters
        self.upstream = route.upstream
        self.clock = clock
        self.breakers: OrderedDict[str, CircuitBreaker] = OrderedDict()
        self.route = route
        self.budget: RetryBudget | None = None
        self.concurrency: ConcurrencyLimit | None = None
        self.limiter: Limiter | None = None  # rate_limit.per_second: local buckets, or GCRA in Redis
        self.tokens: TokenLimiter | None = None   # rate_limit.tokens_per_minute: windows, or a bucket in Redis
        self.cache: RouteCache | None = None   # set by the cache layer for routes with `cache:`
        self.apply(route)

    def apply(self, route: Route) -> None:
        """Take a (possibly reloaded) route's policy, keeping live state where the policy allows."""
        old = self.route
        self.route = route
        retry = route.retry
        if retry is None or retry.budget is None:
            self.budget = None
        elif self.budget is None or old.retry is None or old.retry.budget != retry.budget:
            self.budget = RetryBudget(retry.budget, self.clock)
        if route.concurrency is None:
            self.concurrency = None
        elif self.concurrency is None or self.concurrency.max != route.concurrency.max:
            # In-flight requests release into the limiter they acquired from.
            self.concurrency = ConcurrencyLimit(route.concurrency.max)
        limit = route.rate_limit
        if limit is None or limit.per_second is None:
            self.limiter = None
        elif self.limiter is None or old.rate_limit != limit:
            self.limiter = self.limiters.requests(route.name, limit)
        if limit is None or limit.tokens_per_minute is None:
            self.tokens = None
        elif self.tokens is None or _token_shape(old.rate_limit) != _token_shape(limit):
            self.tokens = self.limiters.tokens(route.name, limit)
        if route.cache is None and self.cache is not None:
            self.cache.retire()              # a reload dropped `cache:` (attach_cache binds it otherwise)
            self.cache = None
        if route.breaker is None:
            self.breakers.clear()
        else:
            for breaker in self.breakers.values():
                breaker.policy = route.breaker

    def breaker(self, target: str, policy: BreakerPolicy | None = None) -> CircuitBreaker | None:
        policy = policy or self.route.breaker
        if policy is None:
            return None
        br = self.breakers.get(target)
        if br is None:
            br = self.breakers[target] = CircuitBreaker(policy, self.clock)
            if len(self.breakers) > MAX_BREAKERS_PER_ROUTE:
                self.breakers.popitem(last=False)
        else:
            self.breakers.move_to_end(target)   # recently used: a scan of new hosts evicts idle ones first
        return br


StateKey = tuple[str, "str | None"]          # (route name, upstream): state survives while both stay


class Binding:
    """The route states a new policy will run with, prepared without touching live state (Envoy's
    snapshot, built aside): a route whose name and upstream are unchanged keeps its live `RouteState`,
    which takes the new policy only at `commit()`; a new route gets a fresh one, live at `commit()`.
    Dropped (`discard()` or never committed), it leaves everything as it was."""

    def __init__(self, registry: StateRegistry, routes: list[Route]) -> None:
        self._registry = registry
        self._fresh: dict[StateKey, RouteState] = {}
        self._updates: list[tuple[RouteState, Route]] = []
        self.states: dict[str, RouteState] = {}
        for route in routes:
            key = (route.name, route.upstream)
            state = registry._states.get(key)
            if state is None:
                state = RouteState(route, registry.clock, registry.limiters)   # not yet reachable from a live generation
            else:
                self._updates.append((state, route))
            self._fresh[key] = state
            self.states[route.name] = state
        self._on_commit: list[Callable[[], None]] = []

    def on_commit(self, step: Callable[[], None]) -> None:
        """Run `step` at commit (after the states took the new policy): cache swaps, warm loops."""
        self._on_commit.append(step)

    def commit(self) -> None:
        """Synchronous: the states change in one step of the event loop, with the generation swap."""
        for state, route in self._updates:
            state.apply(route)
        self._registry._states = self._fresh
        for step in self._on_commit:
            step()


class StateRegistry:
    """Finds the live state for each route of a newly loaded policy."""

    def __init__(self, clock: Clock, limiters: LimiterFactory) -> None:
        self.clock = clock
        self.limiters = limiters             # rate limiters: local, or one limit in Redis for the fleet
        self._states: dict[StateKey, RouteState] = {}

    def prepare(self, routes: list[Route]) -> Binding:
        """The states for `routes`, to be made live by `Binding.commit()`; nothing changes before."""
        return Binding(self, routes)

    def all(self) -> list[RouteState]:
        return list(self._states.values())
