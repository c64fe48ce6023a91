"""What the route states build their limiters with (exchange/state.py's LimiterFactory): requests per
second (fleet/ratelimit.py) and LLM tokens per minute (fleet/tokenlimit.py), local or in Redis, over one
`Links` per runtime so every route naming a Redis URL shares its connections."""
from __future__ import annotations

from sidecar.core.clock import Clock
from sidecar.fleet.link import Links
from sidecar.fleet.ratelimit import Limiter, make_limiter
from sidecar.fleet.tokenlimit import LocalTokenLimiter, RedisTokenLimiter, make_token_limiter
from sidecar.policy.model import RateLimitPolicy


class Limiters:
    def __init__(self, clock: Clock, links: Links | None = None) -> None:
        self.clock = clock
        self.links = links if links is not None else Links(clock)

    def requests(self, route: str, policy: RateLimitPolicy) -> Limiter:
        return make_limiter(route, policy, self.clock, self.links)

    def tokens(self, route: str, policy: RateLimitPolicy) -> LocalTokenLimiter | RedisTokenLimiter:
        return make_token_limiter(route, policy, self.clock, self.links)


def limiter_factory(clock: Clock, links: Links | None = None) -> Limiters:
    return Limiters(clock, links)
