"""Golden signals for /status and the dashboard, from the counters the Prometheus sink already keeps.

Per route, per upstream and per endpoint of a balanced upstream over the last minute: success rate, requests per second, latency p50/p95/p99
(Linkerd viz's columns), and for LLM traffic the tokens and cost spent; per route over the last hour,
where the answers came from (primary, each fallback target, cache, static): the fallback analytics view.

Nothing is added per request: `tick()` (once a second, from a task) takes a reading of the metrics'
cumulative counters (`Metrics.cumulative`), and `snapshot()` (a /status poll) differences the current
reading against the one from a minute (an hour, for answer sources) ago, as Prometheus' `rate()` and
`histogram_quantile()` would. Percentiles are interpolated within the request-duration histogram's
buckets, so they are as coarse as those buckets (`metrics.BUCKETS`). The clock is injected.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from sidecar.telemetry.metrics import BUCKETS, Cumulative, Metrics, Totals

SECONDS = 60                               # the golden signals' window
SPARK_STEP = 5                             # seconds per sparkline point (12 points a minute)
HOUR = 3600                                # the fallback analytics' window
MAX_KEYS = 100                             # routes, upstreams and endpoints kept per reading


class Signals:
    def __init__(self, metrics: Metrics, clock: Callable[[], float] = time.monotonic) -> None:
        self._metrics = metrics
        self._clock = clock
        self._seconds: deque[tuple[float, Cumulative]] = deque(maxlen=SECONDS + 2)
        self._minutes: deque[tuple[float, dict[str, dict[str, int]]]] = deque(maxlen=HOUR // 60 + 2)
        self.tick()

    def tick(self) -> None:
        """Keep this second's reading (and this minute's answer counts)."""
        now = self._clock()
        reading = _bounded(self._metrics.cumulative())
        self._seconds.append((now, reading))
        if not self._minutes or now - self._minutes[-1][0] >= 60:
            self._minutes.append((now, reading.answers))

    def snapshot(self) -> dict:
        now = self._clock()
        current = _bounded(self._metrics.cumulative())
        base_at, base = _at_or_before(self._seconds, now - SECONDS)
        seconds = max(1.0, now - base_at)
        points = [_at_or_before(self._seconds, now - SECONDS + SPARK_STEP * k)[1]
                  for k in range(SECONDS // SPARK_STEP)] + [current]
        return {
            "window_seconds": SECONDS,
            "routes": [_row(name, t, base.routes, seconds, [p.routes for p in points])
                       for name, t in current.routes.items()],
            "upstreams": [_row(name, t, base.upstreams, seconds, [p.upstreams for p in points])
                          for name, t in current.upstreams.items()],
            "endpoints": [_row(name, t, base.endpoints, seconds, [p.endpoints for p in points])
                          for name, t in current.endpoints.items()],
            "fallback": {"window_seconds": HOUR, "routes": self._shares(now, current.answers)},
        }

    def _shares(self, now: float, answers: dict[str, dict[str, int]]) -> list[dict]:
        _, old = _at_or_before(self._minutes, now - HOUR)
        out = []
        for route, sources in answers.items():
            before = old.get(route, {})
            delta = {s: n - before.get(s, 0) for s, n in sources.items() if n - before.get(s, 0) > 0}
            total = sum(delta.values())
            if total:
                out.append({"route": route, "answers": total, "shares": {
                    s: round(n / total, 4) for s, n in sorted(delta.items(), key=lambda kv: -kv[1])}})
        return out


def _at_or_before(ring: deque, t: float):
    """The newest entry taken at or before `t`, else the oldest one (the sidecar is younger than that)."""
    found = ring[0]
    for entry in ring:
        if entry[0] > t:
            break
        found = entry
    return found


def _row(name: str, now: Totals, base_table: dict[str, Totals], seconds: float,
         points: list[dict[str, Totals]]) -> dict:
    base = base_table.get(name) or Totals()
    n = now.requests - base.requests
    failed = now.failures - base.failures
    latency = [a - b for a, b in zip(now.latency, base.latency)]
    rps, success = [], []
    for before, after in zip(points, points[1:]):
        a, b = after.get(name) or Totals(), before.get(name) or Totals()
        dn = a.requests - b.requests
        rps.append(round(dn / SPARK_STEP, 2))
        success.append(None if dn <= 0 else round(1 - (a.failures - b.failures) / dn, 3))
    return {
        "name": name,
        "requests": n,
        "rps": round(n / seconds, 3),
        "success_rate": None if n <= 0 else round((n - failed) / n, 4),
        "latency_ms": {f"p{q}": _quantile(latency, q / 100) for q in (50, 95, 99)},
        "tokens_per_min": now.tokens - base.tokens,          # spent in the window, not extrapolated
        "cost_per_min": round(now.cost - base.cost, 6),
        "spark": {"rps": rps, "success": success},
    }


def _quantile(counts: list[int], q: float) -> float | None:
    """Milliseconds, interpolated linearly within the bucket holding the rank (`histogram_quantile`)."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    running = 0
    for i, n in enumerate(counts):
        if n and running + n >= rank:
            if i >= len(BUCKETS):              # the +Inf bucket: the highest finite bound
                return round(BUCKETS[-1] * 1000, 3)
            lower = BUCKETS[i - 1] if i else 0.0
            return round((lower + (BUCKETS[i] - lower) * (rank - running) / n) * 1000, 3)
        running += n
    return round(BUCKETS[-1] * 1000, 3)


def _bounded(reading: Cumulative) -> Cumulative:
    if max(len(reading.routes), len(reading.upstreams), len(reading.endpoints)) <= MAX_KEYS:
        return reading
    return Cumulative(dict(list(reading.routes.items())[:MAX_KEYS]),
                      dict(list(reading.upstreams.items())[:MAX_KEYS]), reading.answers,
                      dict(list(reading.endpoints.items())[:MAX_KEYS]))
