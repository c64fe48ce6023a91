"""A token bucket: `burst` requests at once, then `per_second` on average.

Why: the same local rate limit as Envoy's `local_ratelimit` filter (a bucket of `max_tokens` refilled
at a fixed rate), but refilled continuously from the injected clock instead of by a timer, so it needs
no background task and tests move a `FakeClock`. When empty it says how long until the next token, for
the `Retry-After` of the 429 the pipeline answers with.
"""
from __future__ import annotations

from .clock import Clock

_EPSILON = 1e-9          # a token refilled in steps of 0.1 s must not come out as 0.9999999999


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

    def try_take(self) -> tuple[bool, float]:
        """Take one token: (True, 0.0), or (False, seconds until one will be there)."""
        now = self._clock.monotonic()
        elapsed = now - self._stamp
        if elapsed > 0:
            self._tokens = min(float(self.burst), self._tokens + elapsed * self.per_second)
            self._stamp = now
        if self._tokens >= 1.0 - _EPSILON:
            self._tokens = max(0.0, self._tokens - 1.0)
            return True, 0.0
        return False, (1.0 - self._tokens) / self.per_second
