"""Rate limits as pure logic: a token bucket, a bounded set of them keyed by a request value, and the
verdict every limiter returns.

    TokenBucket   `burst` requests at once, then `per_second` on average (Envoy's `local_ratelimit`:
                  a bucket of `max_tokens` refilled at a fixed rate), refilled continuously from the
                  injected clock, so it needs no background task and tests move a `FakeClock`
    KeyedBuckets  one TokenBucket per key value (`rate_limit.key: header:x-tenant`), at most
                  `max_keys` of them: the least recently used goes first, so a flood of distinct
                  values cannot grow memory without bound
    Verdict       what a limiter answers: allowed or not, how long until it would be, and, when the
                  shared store could not decide, why the local bucket did

The I/O side (the Redis GCRA script, the fallback to these buckets) is `sidecar/fleet/ratelimit.py`.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .clock import Clock

_EPSILON = 1e-9          # a token refilled in steps of 0.1 s must not come out as 0.9999999999


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    retry_after: float = 0.0             # seconds until `cost` would be allowed (0 when allowed)
    local_reason: str | None = None      # set when the shared store was not asked or did not answer

    @property
    def decided_locally(self) -> bool:
        return self.local_reason is not None


ALLOW = Verdict(True)


class TokenBucket:
    __slots__ = ("per_second", "burst", "_clock", "_tokens", "_stamp")

    def __init__(self, per_second: float, burst: int, clock: Clock) -> None:
        if per_second <= 0:
            raise ValueError(f"per_second must be > 0, got {per_second!r}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst!r}")
        self.per_second = float(per_second)
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)        # starts full
        self._stamp = clock.monotonic()

    def try_take(self, cost: float = 1.0) -> tuple[bool, float]:
        """Take `cost` tokens: (True, 0.0), or (False, seconds until they will be there)."""
        now = self._clock.monotonic()
        elapsed = now - self._stamp
        if elapsed > 0:
            self._tokens = min(float(self.burst), self._tokens + elapsed * self.per_second)
            self._stamp = now
        if self._tokens >= cost - _EPSILON:
            self._tokens = max(0.0, self._tokens - cost)
            return True, 0.0
        return False, (cost - self._tokens) / self.per_second


class KeyedBuckets:
    """One bucket per key value, bounded: past `max_keys`, the least recently used bucket is dropped
    (its key starts again with a full bucket, the same as a key never seen)."""
    __slots__ = ("per_second", "burst", "max_keys", "_clock", "_buckets", "evictions")

    def __init__(self, per_second: float, burst: int, max_keys: int, clock: Clock) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys!r}")
        self.per_second = per_second
        self.burst = burst
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self.evictions = 0

    def bucket(self, key: str) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.per_second, self.burst, self._clock)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
                self.evictions += 1
        else:
            self._buckets.move_to_end(key)
        return bucket

    def try_take(self, key: str, cost: float = 1.0) -> tuple[bool, float]:
        return self.bucket(key).try_take(cost)

    def __len__(self) -> int:
        return len(self._buckets)
