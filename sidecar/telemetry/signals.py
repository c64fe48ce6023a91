"""Golden signals for /status and the dashboard: per route and per upstream, over the last minute,
success rate, requests per second and latency p50/p95/p99 (Linkerd viz's columns), plus tokens and cost
per minute for LLM traffic; and per route, over the last hour, where the answers came from (primary,
each fallback target, cache, static): the fallback analytics view.

A `TelemetrySink`. Per finished request it touches one one-second slot per route and per try's upstream
(a few integer additions and one latency bucket), in rings of 60 slots; per-minute slots keep the hour's
answer sources. Nothing is computed until `snapshot()` is asked for (a /status poll). Keys are bounded:
route names come from the policy, upstream names of passthrough traffic are capped like the metrics'.
"""
from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable

from sidecar.core.decisions import DecisionRecord
from sidecar.telemetry.records import RequestRecord

SECONDS = 60                               # the golden signals' window
MINUTES = 60                               # the fallback analytics' window
SPARK_POINTS = 12                          # sparkline points of SECONDS / SPARK_POINTS each
MAX_KEYS = 200
# Latency bucket bounds: 0.25 ms growing by 1.25x to ~3 min; a percentile is read as its bucket's upper
# bound, so within 25 % of the true value (HdrHistogram's trade, coarser).
BOUNDS = tuple(0.00025 * 1.25 ** k for k in range(61))
LOCAL_SOURCES = frozenset({"cache", "static", "queue", "fault"})


class _Slots:
    """One key's last minute, one slot per second: stamp, requests, failures, latency counts, tokens, cost."""
    __slots__ = ("stamp", "count", "fail", "hist", "tokens", "cost")

    def __init__(self) -> None:
        self.stamp = [-1] * SECONDS
        self.count = [0] * SECONDS
        self.fail = [0] * SECONDS
        self.hist: list[list[int] | None] = [None] * SECONDS
        self.tokens = [0] * SECONDS
        self.cost = [0.0] * SECONDS

    def add(self, sec: int, ok: bool, latency: float | None, tokens: int, cost: float) -> None:
        i = sec % SECONDS
        if self.stamp[i] != sec:
            self.stamp[i] = sec
            self.count[i] = self.fail[i] = self.tokens[i] = 0
            self.cost[i] = 0.0
            self.hist[i] = None
        self.count[i] += 1
        if not ok:
            self.fail[i] += 1
        if latency is not None:
            hist = self.hist[i]
            if hist is None:
                hist = self.hist[i] = [0] * (len(BOUNDS) + 1)
            hist[bisect_left(BOUNDS, latency)] += 1
        self.tokens[i] += tokens
        self.cost[i] += cost

    def summary(self, now: int, elapsed: float) -> dict:
        count = fail = tokens = 0
        cost = 0.0
        merged = [0] * (len(BOUNDS) + 1)
        width = SECONDS // SPARK_POINTS
        spark_n = [0] * SPARK_POINTS
        spark_fail = [0] * SPARK_POINTS
        for i in range(SECONDS):
            age = now - self.stamp[i]
            if not 0 <= age < SECONDS:
                continue
            count += self.count[i]
            fail += self.fail[i]
            tokens += self.tokens[i]
            cost += self.cost[i]
            hist = self.hist[i]
            if hist is not None:
                for b, n in enumerate(hist):
                    if n:
                        merged[b] += n
            point = SPARK_POINTS - 1 - age // width
            spark_n[point] += self.count[i]
            spark_fail[point] += self.fail[i]
        seconds = max(1.0, min(float(SECONDS), elapsed))
        return {
            "requests": count,
            "rps": round(count / seconds, 3),
            "success_rate": None if count == 0 else round((count - fail) / count, 4),
            "latency_ms": {f"p{q}": _percentile(merged, q / 100) for q in (50, 95, 99)},
            # spent in the last minute (not extrapolated from a shorter uptime)
            "tokens_per_min": tokens,
            "cost_per_min": round(cost, 6),
            "spark": {"rps": [round(n / width, 2) for n in spark_n],
                      "success": [None if n == 0 else round((n - f) / n, 3) for n, f in zip(spark_n, spark_fail)]},
        }


def _percentile(hist: list[int], q: float) -> float | None:
    total = sum(hist)
    if total == 0:
        return None
    rank = q * total
    running = 0
    for b, n in enumerate(hist):
        running += n
        if running >= rank:
            bound = BOUNDS[b] if b < len(BOUNDS) else BOUNDS[-1]
            return round(bound * 1000, 3)
    return round(BOUNDS[-1] * 1000, 3)


class _Sources:
    """One route's last hour of answer sources, one slot per minute."""
    __slots__ = ("stamp", "counts")

    def __init__(self) -> None:
        self.stamp = [-1] * MINUTES
        self.counts: list[dict[str, int]] = [{} for _ in range(MINUTES)]

    def add(self, minute: int, source: str) -> None:
        i = minute % MINUTES
        if self.stamp[i] != minute:
            self.stamp[i] = minute
            self.counts[i] = {}
        counts = self.counts[i]
        counts[source] = counts.get(source, 0) + 1

    def shares(self, minute: int) -> tuple[int, dict[str, float]]:
        totals: dict[str, int] = {}
        for i in range(MINUTES):
            if 0 <= minute - self.stamp[i] < MINUTES:
                for source, n in self.counts[i].items():
                    totals[source] = totals.get(source, 0) + n
        total = sum(totals.values())
        return total, {s: round(n / total, 4) for s, n in sorted(totals.items(), key=lambda kv: -kv[1])}


def answer_source(record: RequestRecord) -> str:
    """primary | upstream:NAME (a fallback target) | cache | static | queue | fault | failed"""
    who = record.upstream
    if who in LOCAL_SOURCES:
        return who
    for t in reversed(record.tries):
        if t.upstream == who and t.status is not None:
            return t.fallback_target or "primary"
    return "failed"                        # the sidecar's own error answer: nothing could answer


class Signals:
    """The golden-signals sink; `snapshot()` is the `signals` part of /status."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._started = clock()
        self.routes: dict[str, _Slots] = {}
        self.upstreams: dict[str, _Slots] = {}
        self.sources: dict[str, _Sources] = {}

    def decision(self, record: DecisionRecord) -> None:
        pass

    def request_finished(self, record: RequestRecord) -> None:
        if record.listener == "queue":     # a queued write's later delivery is not an answer to the app
            return
        now = self._clock()
        sec = int(now)
        ok = record.error_type is None and record.status < 500
        latency = (record.end_ns - record.start_ns) / 1e9 if record.end_ns else None
        tokens, cost = 0, 0.0
        for t in record.tries:
            llm = t.llm
            t_tokens, t_cost = 0, 0.0
            if llm is not None and llm.has_usage:
                t_tokens = (llm.input_tokens or 0) + (llm.output_tokens or 0)
                t_cost = llm.cost() or 0.0
                tokens += t_tokens
                cost += t_cost
            slots = _slot(self.upstreams, t.upstream)
            if slots is not None:
                t_ok = t.error_type is None and (t.status is None or t.status < 500)
                t_latency = (t.end_ns - t.start_ns) / 1e9 if t.end_ns else None
                slots.add(sec, t_ok, t_latency, t_tokens, t_cost)
        slots = _slot(self.routes, record.route)
        if slots is not None:
            slots.add(sec, ok, latency, tokens, cost)
        sources = self.sources.get(record.route)
        if sources is None:
            if len(self.sources) >= MAX_KEYS:
                return
            sources = self.sources[record.route] = _Sources()
        sources.add(int(now // 60), answer_source(record))

    def snapshot(self) -> dict:
        now = self._clock()
        sec, minute = int(now), int(now // 60)
        elapsed = now - self._started
        fallback = []
        for route, sources in self.sources.items():
            total, shares = sources.shares(minute)
            if total:
                fallback.append({"route": route, "answers": total, "shares": shares})
        return {
            "window_seconds": SECONDS,
            "routes": [{"name": name, **slots.summary(sec, elapsed)} for name, slots in self.routes.items()],
            "upstreams": [{"name": name, **slots.summary(sec, elapsed)} for name, slots in self.upstreams.items()],
            "fallback": {"window_seconds": MINUTES * 60, "routes": fallback},
        }


def _slot(table: dict[str, _Slots], key: str) -> _Slots | None:
    slots = table.get(key)
    if slots is None:
        if len(table) >= MAX_KEYS:
            key = "other"
            slots = table.get(key)
            if slots is not None:
                return slots
        slots = table[key] = _Slots()
    return slots
