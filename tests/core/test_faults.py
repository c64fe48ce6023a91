import random

from sidecar.core.faults import decide_fault
from sidecar.policy.model import FaultAbort, FaultDelay, FaultPolicy

N = 10_000


def draws(policy: FaultPolicy, seed: int = 42) -> list[tuple[float, int | None]]:
    rng = random.Random(seed)
    return [decide_fault(policy, rng) for _ in range(N)]


def test_zero_percent_never_fires():
    policy = FaultPolicy(abort=FaultAbort(503, 0), delay=FaultDelay(1.0, 0))
    assert set(draws(policy)) == {(0.0, None)}


def test_hundred_percent_always_fires():
    policy = FaultPolicy(abort=FaultAbort(503, 100), delay=FaultDelay(1.5, 100))
    assert set(draws(policy)) == {(1.5, 503)}


def test_no_fault_configured():
    assert decide_fault(FaultPolicy(), random.Random(1)) == (0.0, None)


def test_percentages_are_honoured_independently():
    results = draws(FaultPolicy(abort=FaultAbort(503, 10), delay=FaultDelay(1.0, 30)))
    aborts = sum(1 for _, status in results if status == 503) / N
    delays = sum(1 for delay, _ in results if delay == 1.0) / N
    both = sum(1 for delay, status in results if delay and status) / N
    assert 0.09 < aborts < 0.11
    assert 0.28 < delays < 0.32
    assert 0.02 < both < 0.04                           # ~ 0.1 * 0.3: drawn independently


def test_a_seeded_rng_decides_the_same_way():
    policy = FaultPolicy(abort=FaultAbort(500, 50), delay=FaultDelay(0.2, 50))
    assert draws(policy, seed=9) == draws(policy, seed=9)
    assert draws(policy, seed=9) != draws(policy, seed=10)
