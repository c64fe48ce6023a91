from sidecar.core.clock import FakeClock
from sidecar.core.ratelimit import KeyedBuckets


def test_each_key_has_its_own_bucket():
    buckets = KeyedBuckets(per_second=1, burst=2, max_keys=10, clock=FakeClock())
    assert [buckets.try_take("a")[0] for _ in range(3)] == [True, True, False]
    assert [buckets.try_take("b")[0] for _ in range(3)] == [True, True, False]


def test_distinct_keys_are_bounded_least_recently_used_first():
    buckets = KeyedBuckets(per_second=1, burst=1, max_keys=2, clock=FakeClock())
    buckets.try_take("a")
    buckets.try_take("b")
    buckets.try_take("a")                    # a is the recent one now
    buckets.try_take("c")                    # evicts b
    assert len(buckets) == 2 and buckets.evictions == 1
    assert buckets.try_take("a")[0] is False  # a kept its (empty) bucket
    assert buckets.try_take("b")[0] is True   # b starts again full, as a key never seen


def test_cost_takes_several_tokens():
    clock = FakeClock()
    buckets = KeyedBuckets(per_second=10, burst=10, max_keys=1, clock=clock)
    assert buckets.try_take("k", cost=8) == (True, 0.0)
    allowed, wait = buckets.try_take("k", cost=5)
    assert not allowed and abs(wait - 0.3) < 1e-9
