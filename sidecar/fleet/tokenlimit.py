"""LLM tokens per minute (`rate_limit.tokens_per_minute: N`), per route and per `key:` value.

    LocalTokenLimiter   sliding one-minute windows in this process (core/tokenwindow.py), one per key
                        value, at most `max_keys` (least recently used dropped). A call is admitted
                        while the window's tokens, in-flight estimates included, plus its own estimate
                        stay within N; no minute ever holds more than N (bar one call on an empty one).
    RedisTokenLimiter   one token bucket per key value in Redis, shared by every replica: the GCRA
                        bucket of fleet/ratelimit.py, N tokens deep, refilled at N/60 per second. A
                        call reserves its estimate (capped at N: one call always fits a full bucket)
                        and is refused while it does not fit; when its usage is known the difference is
                        charged (the bucket may go into debt, which refuses calls until it is paid back)
                        or refunded.

Why a bucket and not the same sliding window in Redis: GCRA is one key and one round trip per call,
already batched and already failing over (fleet/ratelimit.py); a shared sliding window would need 60
slots per key. The price, said in the README: a bucket holds N/min on average but not in every
minute: a full bucket spent at once and then a minute of refill let up to ~2N through in the worst
60 s, where the local window never passes N.

Redis down, slow or backing off: this pod's windows decide (they keep this pod's share of the spending
all along, so they start from its recent pace) and the admission says why (`local_reason`). A charge
Redis does not take is lost for the fleet (this pod's windows still count it).
"""
from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

from sidecar.core.clock import Clock
from sidecar.core.ratelimit import ALLOW, Verdict
from sidecar.core.tokenwindow import KeyedTokenWindows, TokenAdmission
from sidecar.fleet.link import Links, RedisLink
from sidecar.fleet.ratelimit import LocalLimiter, RedisLimiter
from sidecar.policy.model import RateLimitPolicy

NAMESPACE = "sidecar-tpm"                  # Redis keys: sidecar-tpm:ROUTE:HASH-OF-KEY-VALUE


def make_token_limiter(route: str, policy: RateLimitPolicy, clock: Clock,
                       links: Links) -> LocalTokenLimiter | RedisTokenLimiter:
    local = LocalTokenLimiter(policy, clock)
    if policy.store == "local":
        return local
    return RedisTokenLimiter(route, policy, links.get(policy.store), local, clock)


class LocalTokenLimiter:
    def __init__(self, policy: RateLimitPolicy, clock: Clock) -> None:
        if policy.tokens_per_minute is None:
            raise ValueError("a token limiter needs tokens_per_minute")
        self.policy = policy
        self.limit = policy.tokens_per_minute
        self.windows = KeyedTokenWindows(self.limit, policy.max_keys, clock)

    async def admit(self, key: str, max_tokens: int | None) -> TokenAdmission:
        return self.decide(key, max_tokens)

    def decide(self, key: str, max_tokens: int | None, local_reason: str | None = None) -> TokenAdmission:
        window = self.windows.window(key)
        reservation, retry_after = window.try_spend(window.estimate(max_tokens))
        if reservation is None:
            return TokenAdmission(Verdict(False, retry_after, local_reason), window.spent())
        verdict = ALLOW if local_reason is None else Verdict(True, 0.0, local_reason)
        return TokenAdmission(verdict, window.spent(), partial(window.settle, reservation))

    def stats(self) -> dict[str, Any]:
        """`spent`: the tokens this process's windows hold (answers' usage plus in-flight estimates)."""
        out: dict[str, Any] = {"limit": self.limit, "spent": sum(self.windows.spent().values())}
        if self.policy.key is not None:
            out.update(keys=len(self.windows), evictions=self.windows.evictions)
        return out


class RedisTokenLimiter:
    def __init__(self, route: str, policy: RateLimitPolicy, link: RedisLink, local: LocalTokenLimiter,
                 clock: Clock) -> None:
        self.limit = local.limit
        self.local = local
        bucket = RateLimitPolicy(per_second=self.limit / 60, burst=self.limit, key=policy.key,
                                 store=policy.store, max_keys=policy.max_keys)
        self.bucket = RedisLimiter(route, bucket, link, LocalLimiter(bucket, clock), NAMESPACE)
        self._charges: set[asyncio.Task] = set()

    async def admit(self, key: str, max_tokens: int | None) -> TokenAdmission:
        estimate = self.local.windows.window(key).estimate(max_tokens)
        reserved = min(estimate, self.limit)
        verdict = await self.bucket.acquire(key, reserved)
        if verdict.decided_locally:
            return self.local.decide(key, max_tokens, verdict.local_reason)
        if not verdict.allowed:
            return TokenAdmission(verdict)
        here = self.local.windows.window(key)        # this pod's share, whatever its window holds
        reservation, _ = here.try_spend(estimate, force=True)
        assert reservation is not None

        def settle(tokens: int) -> None:
            here.settle(reservation, tokens)
            if tokens != reserved:
                self._charge(key, tokens - reserved)
        return TokenAdmission(ALLOW, None, settle)

    def _charge(self, key: str, tokens: int) -> None:
        """Called from a reply's on_done (synchronous): the round trip runs as a task of its own."""
        task = asyncio.get_running_loop().create_task(self.bucket.charge(key, tokens))
        self._charges.add(task)
        task.add_done_callback(self._charges.discard)

    def stats(self) -> dict[str, Any]:
        """`spent` is this pod's share; the fleet's is in Redis. `charges_pending`: usage not yet
        written to Redis (more than a few means Redis is slow)."""
        shared = self.bucket.stats()
        return {**self.local.stats(), "store": shared["store"], "available": shared["available"],
                "fallbacks": shared["fallbacks"], "charges_pending": len(self._charges)}
