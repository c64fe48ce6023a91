import pytest

from sidecar.core.clock import FakeClock
from sidecar.core.window import SlidingCounts


def test_counts_expire_bucket_by_bucket():
    clock = FakeClock(start=0.0)
    counts = SlidingCounts(10.0, clock, counters=2)       # ten 1-second buckets
    counts.add(0)
    clock.advance(5)
    counts.add(0, 3)
    counts.add(1)
    assert counts.totals() == (4, 1)
    clock.advance(5)          # t=10: the bucket of t=0 has aged out
    assert counts.totals() == (3, 1)
    clock.advance(4.9)        # t=14.9: the t=5 bucket lives until t=15
    assert counts.totals() == (3, 1)
    clock.advance(0.1)
    assert counts.totals() == (0, 0)


def test_a_long_idle_gap_clears_everything():
    clock = FakeClock(start=0.0)
    counts = SlidingCounts(10.0, clock, counters=1)
    counts.add(0, 7)
    clock.advance(1_000)
    assert counts.total(0) == 0
    counts.add(0)
    assert counts.total(0) == 1


def test_clear_and_validation():
    clock = FakeClock()
    counts = SlidingCounts(1.0, clock, counters=1)
    counts.add(0, 2)
    counts.clear()
    assert counts.total(0) == 0
    with pytest.raises(ValueError):
        SlidingCounts(0.0, clock, counters=1)
