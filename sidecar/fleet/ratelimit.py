"""Route rate limiters: the local token buckets, or one limit across every replica in Redis.

The interface is one coroutine, `acquire(key, cost=1) -> Verdict`, plus `charge(key, cost)`:

    LocalLimiter   KeyedBuckets in this process (core/ratelimit.py); never waits
    RedisLimiter   GCRA in a Lua script (one EVALSHA round trip per request; Redis's own clock, so
                   replicas' clocks do not matter); when Redis is down, slow (> link.OP_TIMEOUT) or
                   backing off, the same request is decided by a LocalLimiter and the verdict says why
                   (`local_reason`): fail open to a per-pod limit, never a hang, never an error

Keys: `key_for(policy, headers)` gives the bucket's key ("" when the route has no `key:` or the request
lacks the header: those requests share one bucket, so leaving the header out is no way around the
limit). In Redis the value is hashed into the key name (a tenant's API key never lands in Redis or in a
log) and each bucket expires once it is full again, so idle keys cost nothing; locally at most
`max_keys` buckets are kept (least recently used dropped).

Another limit rides on the same bucket: LLM `tokens_per_minute` (fleet/tokenlimit.py) is a RedisLimiter
in its own namespace with rate = tokens/60 per second and burst = the allowance; it acquires a call's
estimate, then `charge`s the difference once the answer's usage is known (forced: may go into debt;
negative: a refund, never past a full bucket). The GCRA script takes `cost` and `force` for exactly
that. The route states get their limiters from fleet/limits.py.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Protocol

from sidecar.core.clock import Clock
from sidecar.core.ratelimit import ALLOW, KeyedBuckets, Verdict
from sidecar.fleet.link import OP_TIMEOUT, Links, RedisLink, RedisUnavailable
from sidecar.policy.model import RateLimitPolicy

log = logging.getLogger("sidecar.fleet")

# GCRA (the generic cell rate algorithm, as redis-cell and Envoy's ratelimit service use): one number
# per bucket, the "theoretical arrival time" (TAT) in microseconds of Redis's clock. A request of `cost`
# is allowed when TAT + cost*interval - now <= burst*interval; allowing it moves TAT on. The key expires
# when TAT is reached (the bucket is full again), so Redis holds only buckets in use.
# KEYS[1] bucket; ARGV: interval (µs per unit), burst (units), cost (units; negative: a refund),
# force ("1": debit anyway) -> {1, 0} allowed, or {0, µs until it would be}
GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = interval * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local debit = interval * tonumber(ARGV[3])
local new_tat = tat + debit
if new_tat < now then new_tat = now end
-- relative to now first: µs since 1970 (~1.7e15) would round away a cost that exactly fills the bucket
local over = (tat - now) + debit - tolerance
if over > 0 and ARGV[4] ~= '1' then
  return {0, math.ceil(over)}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.floor((new_tat - now) / 1000) + 1)
return {1, 0}
"""

NAMESPACE = "sidecar-rl"                   # request limits; tokens per minute use their own


class Limiter(Protocol):
    async def acquire(self, key: str, cost: float = 1.0) -> Verdict: ...

    async def charge(self, key: str, cost: float) -> None: ...

    def stats(self) -> dict: ...


def key_for(policy: RateLimitPolicy, headers) -> str:
    if policy.key is None:
        return ""
    return headers.get(policy.key, "")


def make_limiter(route: str, policy: RateLimitPolicy, clock: Clock, links: Links) -> Limiter:
    local = LocalLimiter(policy, clock)
    if policy.store == "local":
        return local
    return RedisLimiter(route, policy, links.get(policy.store), local)


class LocalLimiter:
    def __init__(self, policy: RateLimitPolicy, clock: Clock) -> None:
        self.policy = policy
        self.buckets = KeyedBuckets(policy.per_second, policy.burst, policy.max_keys, clock)

    async def acquire(self, key: str, cost: float = 1.0) -> Verdict:
        return self.take(key, cost)

    def take(self, key: str, cost: float = 1.0, local_reason: str | None = None) -> Verdict:
        allowed, retry_after = self.buckets.try_take(key, cost)
        if allowed and local_reason is None:
            return ALLOW
        return Verdict(allowed, retry_after, local_reason)

    async def charge(self, key: str, cost: float) -> None:
        self.buckets.try_take(key, cost)

    def stats(self) -> dict:
        return {"store": "local", "keys": len(self.buckets), "evictions": self.buckets.evictions}


class RedisLimiter:
    """GCRA in Redis, auto-pipelined: the requests that arrive while a batch is on the wire go out
    together in the next one (EVALSHA each, one round trip for all), so a busy sidecar uses one
    connection and one write per batch, not one per request."""

    def __init__(self, route: str, policy: RateLimitPolicy, link: RedisLink, local: LocalLimiter,
                 namespace: str = NAMESPACE) -> None:
        self.route = route
        self.namespace = namespace
        self.policy = policy
        self.link = link
        self.local = local
        self._interval = str(1_000_000 / policy.per_second)
        self._burst = str(policy.burst)
        self._sha = hashlib.sha1(GCRA.encode()).hexdigest()
        self._pending: list[tuple[str, list[str], asyncio.Future]] = []
        self._sending = False
        self.fallbacks = 0
        self.batches = 0

    def redis_key(self, key: str) -> str:
        digest = hashlib.blake2b(key.encode(), digest_size=8).hexdigest() if key else "-"
        return f"{self.namespace}:{self.route}:{digest}"

    async def acquire(self, key: str, cost: float = 1.0) -> Verdict:
        return await self._gcra(key, cost, force=False)

    async def charge(self, key: str, cost: float) -> None:
        await self._gcra(key, cost, force=True)

    async def _gcra(self, key: str, cost: float, *, force: bool) -> Verdict:
        if not self.link.available():        # backing off: no round trip, no wait
            return self._fallback(key, cost, f"{self.link.where} unavailable ({self.link.last_error})")
        future = asyncio.get_running_loop().create_future()
        self._pending.append((self.redis_key(key), [self._interval, self._burst, str(cost),
                                                     "1" if force else "0"], future))
        if not self._sending:
            self._sending = True
            asyncio.get_running_loop().create_task(self._send())
        try:
            # a hang guard: _send answers every future within its own timeout (at most two batches)
            allowed, wait_us = await asyncio.wait_for(asyncio.shield(future), 2 * OP_TIMEOUT + 0.5)
        except RedisUnavailable as exc:
            return self._fallback(key, cost, str(exc))
        except TimeoutError:
            return self._fallback(key, cost, f"{self.link.where} did not answer in time")
        if allowed:
            # The local bucket follows what Redis allowed, so a fallback starts from this pod's recent
            # pace rather than a fresh, full burst.
            if cost > 0:
                self.local.buckets.try_take(key, cost)
            return ALLOW
        return Verdict(False, int(wait_us) / 1_000_000)

    def _fallback(self, key: str, cost: float, why: str) -> Verdict:
        self.fallbacks += 1
        return self.local.take(key, cost, f"global limit store {why}: this pod's bucket decided")

    async def _send(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                self.batches += 1
                try:
                    results = await self.link.call("rate limit", lambda: self._run(batch))
                except RedisUnavailable as exc:
                    results = [exc] * len(batch)
                for (_, _, future), result in zip(batch, results):
                    if future.done():
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result if isinstance(result, RedisUnavailable)
                                             else RedisUnavailable(f"{self.link.where}: {result}"))
                    else:
                        future.set_result(result)
        finally:
            self._sending = False

    async def _run(self, batch) -> list:
        from redis.exceptions import NoScriptError   # redis-py only where a policy names Redis
        results = await self._pipeline(batch)
        if any(isinstance(r, NoScriptError) for r in results):   # a restarted Redis forgot the script
            await self.link.client.script_load(GCRA)
            results = await self._pipeline(batch)
        return results

    async def _pipeline(self, batch) -> list:
        pipe = self.link.client.pipeline(transaction=False)
        for redis_key, args, _ in batch:
            pipe.evalsha(self._sha, 1, redis_key, *args)
        return await pipe.execute(raise_on_error=False)

    def stats(self) -> dict:
        return {"store": self.link.where, "available": not self.link.failing, "fallbacks": self.fallbacks,
                "batches": self.batches, "local_keys": len(self.local.buckets)}
