"""A sliding window of counters, kept in time buckets so old counts expire smoothly.

Shared by the retry budget (requests, retries) and the breaker (calls, failures, slow calls). The window
is split into `buckets` slots of `window / buckets` seconds, as tower's `TpsBudget` (behind Linkerd's
retry budget) splits its TTL into ten slots: a count is forgotten between `window - slot` and `window`
seconds after it was made. Adding and reading are O(1); expiring costs at most one pass over the slots,
and only when time has moved on, so the hot path stays amortised O(1).
"""
from __future__ import annotations

from .clock import Clock


class SlidingCounts:
    __slots__ = ("_clock", "_width", "_n", "_slots", "_totals", "_index")

    def __init__(self, window: float, clock: Clock, counters: int, buckets: int = 10) -> None:
        if window <= 0:
            raise ValueError(f"window must be > 0 seconds, got {window!r}")
        if buckets < 1:
            raise ValueError("need at least one bucket")
        self._clock = clock
        self._width = window / buckets
        self._n = buckets
        # _slots[bucket][counter]; _totals[counter] is the sum over the live buckets.
        self._slots = [[0] * counters for _ in range(buckets)]
        self._totals = [0] * counters
        self._index = self._bucket_index()

    def _bucket_index(self) -> int:
        return int(self._clock.monotonic() // self._width)

    def _expire(self) -> None:
        index = self._bucket_index()
        gap = index - self._index
        if gap <= 0:
            return
        if gap >= self._n:
            self.clear()
        else:
            totals = self._totals
            for k in range(self._index + 1, index + 1):
                slot = self._slots[k % self._n]
                for c, value in enumerate(slot):
                    if value:
                        totals[c] -= value
                        slot[c] = 0
        self._index = index

    def add(self, counter: int, amount: int = 1) -> None:
        self._expire()
        self._slots[self._index % self._n][counter] += amount
        self._totals[counter] += amount

    def total(self, counter: int) -> int:
        self._expire()
        return self._totals[counter]

    def totals(self) -> tuple[int, ...]:
        self._expire()
        return tuple(self._totals)

    def clear(self) -> None:
        for slot in self._slots:
            for c in range(len(slot)):
                slot[c] = 0
        for c in range(len(self._totals)):
            self._totals[c] = 0
        self._index = self._bucket_index()
