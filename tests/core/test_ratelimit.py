import pytest

from sidecar.core.clock import FakeClock
from sidecar.core.ratelimit import TokenBucket


def test_starts_full_then_refuses_with_the_time_to_the_next_token():
    bucket = TokenBucket(per_second=10, burst=3, clock=FakeClock())
    assert [bucket.try_take() for _ in range(3)] == [(True, 0.0)] * 3
    allowed, retry_after = bucket.try_take()
    assert allowed is False
    assert retry_after == pytest.approx(0.1)


def test_refills_at_the_rate():
    clock = FakeClock()
    bucket = TokenBucket(per_second=10, burst=2, clock=clock)
    bucket.try_take()
    bucket.try_take()
    clock.advance(0.05)                                 # half a token
    allowed, retry_after = bucket.try_take()
    assert (allowed, retry_after) == (False, pytest.approx(0.05))
    clock.advance(0.05)
    assert bucket.try_take() == (True, 0.0)
    assert bucket.try_take()[0] is False


def test_refills_in_small_steps_without_losing_a_token_to_rounding():
    clock = FakeClock()
    bucket = TokenBucket(per_second=1, burst=1, clock=clock)
    bucket.try_take()
    for _ in range(10):
        clock.advance(0.1)
    assert bucket.try_take() == (True, 0.0)


def test_never_holds_more_than_burst():
    clock = FakeClock()
    bucket = TokenBucket(per_second=100, burst=5, clock=clock)
    clock.advance(3600)
    assert sum(bucket.try_take()[0] for _ in range(20)) == 5


def test_sustained_rate():
    clock = FakeClock()
    bucket = TokenBucket(per_second=50, burst=20, clock=clock)
    allowed = 0
    for _ in range(1000):                               # 10 s of 100 requests/s
        allowed += bucket.try_take()[0]
        clock.advance(0.01)
    assert allowed == pytest.approx(20 + 50 * 10, abs=1)


@pytest.mark.parametrize("per_second, burst", [(0, 1), (-1, 1), (1, 0)])
def test_nonsense_is_refused(per_second, burst):
    with pytest.raises(ValueError):
        TokenBucket(per_second, burst, FakeClock())
