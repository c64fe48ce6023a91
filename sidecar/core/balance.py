"""Load balancers: which endpoint of an upstream takes the next try. No I/O; rng and time are passed in.

    ewma           power of two choices over peak-EWMA latency x (in-flight + 1)   (Linkerd's default)
    least-request  power of two choices over in-flight requests                     (Envoy's LEAST_REQUEST)
    round-robin    smooth weighted round robin                                      (nginx's)
    random         weighted random

Weights. Every balancer respects them. When all weights are equal, the two P2C balancers draw two
distinct candidates uniformly and take the cheaper (ties: the first drawn), as tower and Envoy do. When
weights differ they follow Envoy's least-request rule instead: each candidate's chance is its weight
divided by its cost, so equal loads split exactly by weight and a loaded or slow endpoint gets less.
(Envoy draws from an EDF schedule; a weighted draw keeps the balancer stateless and testable with a
seeded rng.)

Peak EWMA (tower's `PeakEwma`, which Linkerd uses): the estimate jumps to any slower sample at once,
moves toward faster samples with weight `1 - exp(-elapsed / DECAY)`, and decays toward zero while no
answer comes back, so an endpoint that was slow is tried again after a while instead of never. A new
endpoint starts at `DEFAULT_RTT`.
"""
from __future__ import annotations

import math
import random
from typing import Callable, Literal, Protocol, Sequence, TypeVar

Balance = Literal["ewma", "least-request", "round-robin", "random"]
BALANCERS: tuple[Balance, ...] = ("ewma", "least-request", "round-robin", "random")

DEFAULT_RTT = 0.030          # seconds; Linkerd's default RTT estimate for an endpoint not yet heard from
DECAY = 10.0                 # seconds; Linkerd's EWMA decay


class PeakEwma:
    """A latency estimate in seconds: peak-sensitive, decaying (see the module docstring)."""
    __slots__ = ("rtt", "at")

    def __init__(self, now: float, rtt: float = DEFAULT_RTT) -> None:
        self.rtt = rtt
        self.at = now

    def estimate(self, now: float) -> float:
        elapsed = now - self.at
        if elapsed <= 0:
            return self.rtt
        return self.rtt * math.exp(-elapsed / DECAY)

    def observe(self, sample: float, now: float) -> None:
        if sample > self.rtt:
            self.rtt = sample                 # peak: a slow answer counts in full, at once
        else:
            keep = math.exp(-max(0.0, now - self.at) / DECAY)
            self.rtt = self.rtt * keep + sample * (1.0 - keep)
        self.at = now


class Candidate(Protocol):
    """What a balancer reads of an endpoint (core.endpoints.EndpointState has these)."""
    key: str
    weight: int
    in_flight: int
    ewma: PeakEwma


C = TypeVar("C", bound=Candidate)             # what a balancer is given is what it returns


def ewma_cost(ep: Candidate, now: float) -> float:
    return ep.ewma.estimate(now) * (ep.in_flight + 1)


def least_request_cost(ep: Candidate, now: float) -> float:
    return float(ep.in_flight + 1)


def weighted_random(cands: Sequence[C], rng: random.Random) -> C:
    total = 0
    for ep in cands:
        total += ep.weight
    x = rng.random() * total
    for ep in cands:
        x -= ep.weight
        if x < 0:
            return ep
    return cands[-1]                          # float rounding at the very top of the range


def _by_share(cands: Sequence[C], shares: Sequence[float], rng: random.Random) -> C:
    total = sum(shares)
    if not total > 0:
        return cands[0]
    x = rng.random() * total
    for ep, share in zip(cands, shares):
        x -= share
        if x < 0:
            return ep
    return cands[-1]


def p2c(cands: Sequence[C], rng: random.Random, now: float,
        cost: Callable[[Candidate, float], float], uniform: bool | None = None) -> C:
    """Power of two choices over `cost(ep, now)`; weighted by weight / cost when weights differ.
    `uniform`: the caller knows whether every weight is equal (else it is looked at here)."""
    n = len(cands)
    if n == 1:
        return cands[0]
    if uniform is None:
        first_weight = cands[0].weight
        uniform = all(ep.weight == first_weight for ep in cands)
    if not uniform:
        return _by_share(cands, [ep.weight / max(cost(ep, now), 1e-9) for ep in cands], rng)
    # Two distinct indexes from two floats: `randrange` costs more than the rest of the pick.
    i = int(rng.random() * n)
    j = int(rng.random() * (n - 1))
    if j >= i:
        j += 1                                # two distinct candidates
    a, b = cands[i], cands[j]
    return b if cost(b, now) < cost(a, now) else a


class RoundRobin:
    """nginx's smooth weighted round robin: weights 5,1,1 give a a b a c a a, not a a a a a b c.

    Only the candidates of each pick take part, so an ejected or already-tried endpoint is skipped
    without disturbing the others' turn."""
    __slots__ = ("_current",)

    def __init__(self) -> None:
        self._current: dict[str, float] = {}

    def pick(self, cands: Sequence[C]) -> C:
        current = self._current
        total = 0
        best: C | None = None
        best_value = -math.inf
        for ep in cands:
            total += ep.weight
            value = current.get(ep.key, 0.0) + ep.weight
            current[ep.key] = value
            if value > best_value:
                best, best_value = ep, value
        assert best is not None
        current[best.key] = best_value - total
        return best

    def forget(self, keys: set[str]) -> None:
        """Endpoints gone from the set (a DNS answer changed) leave no state behind."""
        for key in [k for k in self._current if k not in keys]:
            del self._current[key]


class Balancer:
    """One upstream's balancer; `pick` chooses among candidates already filtered for availability."""
    __slots__ = ("kind", "_rr")

    def __init__(self, kind: Balance) -> None:
        if kind not in BALANCERS:
            raise ValueError(f"unknown balancer {kind!r}")
        self.kind = kind
        self._rr = RoundRobin() if kind == "round-robin" else None

    def pick(self, cands: Sequence[C], rng: random.Random, now: float,
             uniform: bool | None = None) -> C:
        """`uniform`: every candidate's weight is the same (None: look)."""
        n = len(cands)
        if n == 1:
            return cands[0]
        kind = self.kind
        if kind == "ewma":
            if uniform:                       # the common case, inlined: p2c over ewma_cost
                i = int(rng.random() * n)
                j = int(rng.random() * (n - 1))
                if j >= i:
                    j += 1
                a, b = cands[i], cands[j]
                ea, eb = a.ewma, b.ewma
                # ewma_cost(a) and ewma_cost(b), the same arithmetic in the same order
                cost_a = ea.rtt if now <= ea.at else ea.rtt * math.exp(-(now - ea.at) / DECAY)
                cost_b = eb.rtt if now <= eb.at else eb.rtt * math.exp(-(now - eb.at) / DECAY)
                return b if cost_b * (b.in_flight + 1) < cost_a * (a.in_flight + 1) else a
            return p2c(cands, rng, now, ewma_cost, uniform)
        if kind == "least-request":
            return p2c(cands, rng, now, least_request_cost, uniform)
        if self._rr is not None:
            return self._rr.pick(cands)
        return weighted_random(cands, rng)

    def forget(self, keys: set[str]) -> None:
        if self._rr is not None:
            self._rr.forget(keys)
