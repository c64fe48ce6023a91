"""Balancers with a seeded rng and a fake clock: exact picks where the algorithm is deterministic,
exact agreement with a reference draw where it is random, and the load-aware choices P2C must make."""
import math
import random
from collections import Counter
from dataclasses import dataclass, field

import pytest

from sidecar.core.balance import DECAY, DEFAULT_RTT, Balancer, PeakEwma, RoundRobin, ewma_cost, p2c


@dataclass(eq=False)
class Ep:
    key: str
    weight: int = 1
    in_flight: int = 0
    ewma: PeakEwma = field(default_factory=lambda: PeakEwma(0.0))


def eps(*weights: int) -> list[Ep]:
    return [Ep(chr(ord("a") + i), w) for i, w in enumerate(weights)]


def share(counter: Counter, n: int) -> dict:
    return {k: v / n for k, v in counter.items()}


def binomial_ok(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


# -- round robin ------------------------------------------------------------------------------------

def test_smooth_weighted_round_robin_sequence_is_nginx_s():
    rr = RoundRobin()
    cands = eps(5, 1, 1)
    assert "".join(rr.pick(cands).key for _ in range(7)) == "aabacaa"
    assert "".join(rr.pick(cands).key for _ in range(7)) == "aabacaa"     # periodic


def test_round_robin_equal_weights_cycles_and_skips_missing_candidates():
    bal = Balancer("round-robin")
    a, b, c = eps(1, 1, 1)
    rng = random.Random(1)
    assert [bal.pick([a, b, c], rng, 0).key for _ in range(6)] == list("abcabc")
    # b out of rotation: a and c alternate; b's turn is not stolen from the others
    assert [bal.pick([a, c], rng, 0).key for _ in range(4)] == list("acac")


# -- random -------------------------------------------------------------------------------------------

def test_weighted_random_matches_a_reference_draw_exactly():
    cands = eps(3, 1, 6)
    bal = Balancer("random")
    rng, ref = random.Random(42), random.Random(42)
    got = Counter()
    want = Counter()
    for _ in range(10_000):
        got[bal.pick(cands, rng, 0).key] += 1
        x = ref.random() * 10
        want["a" if x < 3 else "b" if x < 4 else "c"] += 1
    assert got == want
    assert all(binomial_ok(got[k], 10_000, w / 10) for k, w in zip("abc", (3, 1, 6)))


# -- P2C ----------------------------------------------------------------------------------------------

def test_p2c_takes_the_less_loaded_of_two_distinct_draws():
    a, b, c = eps(1, 1, 1)
    b.in_flight = 5
    bal = Balancer("least-request")
    rng = random.Random(7)
    picks = Counter(bal.pick([a, b, c], rng, 0).key for _ in range(3000))
    # b is picked only if drawn with ... never: any pair containing b has a less loaded partner
    assert picks["b"] == 0
    assert binomial_ok(picks["a"], 3000, 0.5)


def test_p2c_equal_load_is_uniform_and_exactly_the_first_draw():
    cands = eps(1, 1, 1, 1)
    rng, ref = random.Random(3), random.Random(3)
    bal = Balancer("least-request")
    for _ in range(2000):
        i = int(ref.random() * 4)        # the first of the two draws (two floats, as p2c takes them)
        ref.random()
        assert bal.pick(cands, rng, 0).key == cands[i].key


def test_least_request_with_weights_splits_by_weight_when_idle():
    cands = eps(9, 1)
    bal = Balancer("least-request")
    rng = random.Random(11)
    n = 10_000
    picks = Counter(bal.pick(cands, rng, 0).key for _ in range(n))
    assert binomial_ok(picks["a"], n, 0.9)


def test_weights_and_load_combine_as_weight_over_cost():
    a, b = eps(2, 1)
    a.in_flight = 3                      # cost 4 -> share 2/4 = 0.5; b: 1/1 = 1 -> a gets 1/3
    rng = random.Random(5)
    n = 9000
    picks = Counter(Balancer("least-request").pick([a, b], rng, 0).key for _ in range(n))
    assert binomial_ok(picks["a"], n, 1 / 3)


def test_ewma_prefers_the_fast_endpoint_and_reacts_to_a_slow_one():
    now = 100.0
    a, b, c = (Ep(k, ewma=PeakEwma(now)) for k in "abc")
    for ep, rtt in ((a, 0.002), (b, 0.002), (c, 0.002)):
        ep.ewma.observe(rtt, now)
    c.ewma.observe(0.200, now)           # one slow answer: the peak counts in full, at once
    assert c.ewma.estimate(now) == pytest.approx(0.200)
    bal = Balancer("ewma")
    rng = random.Random(9)
    picks = Counter(bal.pick([a, b, c], rng, now).key for _ in range(3000))
    assert picks["c"] == 0               # P2C: every pair with c has a cheaper partner


def test_peak_ewma_moves_toward_faster_samples_by_elapsed_time_and_decays_when_idle():
    e = PeakEwma(0.0, rtt=0.100)
    e.observe(0.010, DECAY)              # one decay period later: weight 1 - 1/e on the sample
    assert e.rtt == pytest.approx(0.100 / math.e + 0.010 * (1 - 1 / math.e))
    assert e.estimate(DECAY + DECAY) == pytest.approx(e.rtt / math.e)
    fresh = PeakEwma(5.0)
    assert fresh.estimate(5.0) == DEFAULT_RTT


def test_ewma_cost_counts_in_flight():
    a = Ep("a", ewma=PeakEwma(0.0, rtt=0.01))
    a.in_flight = 2
    assert ewma_cost(a, 0.0) == pytest.approx(0.03)


def test_slow_endpoint_share_under_ewma_with_traffic():
    """A simulated stream: two endpoints answer in 2 ms, one in 200 ms; the slow one gets ~nothing."""
    now = 0.0
    cands = [Ep(k, ewma=PeakEwma(now)) for k in "abc"]
    rtt = {"a": 0.002, "b": 0.002, "c": 0.200}
    bal = Balancer("ewma")
    rng = random.Random(1)
    picks = Counter()
    for _ in range(2000):
        ep = bal.pick(cands, rng, now)
        picks[ep.key] += 1
        now += 0.005
        ep.ewma.observe(rtt[ep.key], now)
    assert picks["c"] / 2000 < 0.02


def test_unknown_balancer_is_refused():
    with pytest.raises(ValueError):
        Balancer("fastest")


def test_ewma_over_equal_weights_picks_exactly_as_p2c_over_ewma_cost():
    """The set passes `uniform=True` and the ewma balancer takes an inlined path: it must pick what
    p2c over `ewma_cost` picks, draw for draw, whatever the latencies, ages and loads."""
    state = random.Random(5)
    cands = eps(1, 1, 1, 1)
    bal = Balancer("ewma")
    rng, ref = random.Random(9), random.Random(9)
    for step in range(5000):
        now = step * 0.05
        for ep in cands:                     # estimates of any age, in flight 0-3
            ep.ewma = PeakEwma(now - state.choice((0.0, 0.5, 30.0, -1.0)), state.uniform(0.001, 0.2))
            ep.in_flight = state.randrange(4)
        assert bal.pick(cands, rng, now, True) is p2c(cands, ref, now, ewma_cost, True)
