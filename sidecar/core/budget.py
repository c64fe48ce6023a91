"""The per-route retry budget: retries may add at most `ratio` extra load, plus a small floor.

Why a budget: a fixed `max_retries` multiplies load by up to (1 + max_retries) exactly when an upstream is
struggling, which turns a brown-out into an outage. Linkerd's retry budget (tower's `TpsBudget`) bounds
retries to a share of recent traffic instead, and that is what this follows -- rate-based, not Envoy's
`retry_budget` (a share of *concurrent* requests):

    a retry is allowed while  retries_in_window + 1 <= ratio * requests_in_window + min_per_second * window

`min_per_second * window` is the floor that lets a low-traffic route still retry. Counts live in a
bucketed sliding window (see `window.py`), so the allowance recovers smoothly as old traffic ages out.
This is the "may we?" half of Envoy's split: `retry.outcome_retryable` answers "would we?" and spends
nothing; `try_withdraw` spends.
"""
from __future__ import annotations

import math

from sidecar.policy.model import BudgetPolicy
from .clock import Clock
from .window import SlidingCounts

_REQUESTS, _RETRIES = 0, 1
_EPSILON = 1e-9          # 0.1 * 30 requests must allow 3 retries, not 2.9999999999999996 of them


class RetryBudget:
    __slots__ = ("policy", "_counts", "_reserve")

    def __init__(self, policy: BudgetPolicy, clock: Clock, buckets: int = 10) -> None:
        self.policy = policy
        self._counts = SlidingCounts(policy.window, clock, counters=2, buckets=buckets)
        self._reserve = max(0.0, policy.min_per_second) * policy.window

    def on_request(self) -> None:
        """Deposit: call once per original request (not per retry)."""
        self._counts.add(_REQUESTS)

    def try_withdraw(self) -> bool:
        """Spend one retry if the budget allows it now; False (spending nothing) when exhausted."""
        if self._available() < 1.0:
            return False
        self._counts.add(_RETRIES)
        return True

    def remaining(self) -> float:
        """Whole retries still allowed now (>= 0); `try_withdraw()` succeeds iff this is >= 1."""
        return float(math.floor(self._available()))

    def _available(self) -> float:
        requests, retries = self._counts.totals()
        return max(0.0, self.policy.ratio * requests + self._reserve - retries + _EPSILON)
