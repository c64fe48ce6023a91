"""A cap on requests in flight for one route.

Why: a slow upstream otherwise collects every request the application sends until the sidecar runs out
of memory or sockets. Like Envoy's `max_requests` circuit-breaker threshold (and resilience4j's
semaphore bulkhead), over the cap a request is refused at once -- `concurrency_full`, then the fallback
chain -- instead of queueing. A plain counter: the event loop is single-threaded, so no lock is needed.
"""
from __future__ import annotations


class ConcurrencyLimit:
    __slots__ = ("max", "_in_flight")

    def __init__(self, max: int) -> None:  # noqa: A002 - the policy's own word
        if max < 1:
            raise ValueError(f"max must be >= 1, got {max!r}")
        self.max = max
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def try_acquire(self) -> bool:
        if self._in_flight >= self.max:
            return False
        self._in_flight += 1
        return True

    def release(self) -> None:
        # Never below zero: a double release must not open room for one request too many later.
        if self._in_flight > 0:
            self._in_flight -= 1
