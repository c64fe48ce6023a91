import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core.budget import RetryBudget
from sidecar.core.clock import FakeClock
from sidecar.policy.model import BudgetPolicy


def drain(budget: RetryBudget) -> int:
    spent = 0
    while budget.try_withdraw():
        spent += 1
        assert spent < 10_000
    return spent


def requests(budget: RetryBudget, n: int) -> None:
    for _ in range(n):
        budget.on_request()


def test_ratio_allows_exactly_that_share_of_requests():
    budget = RetryBudget(BudgetPolicy(ratio=0.2, min_per_second=0, window=10), FakeClock())
    requests(budget, 100)
    assert budget.remaining() == 20.0
    assert drain(budget) == 20
    assert budget.remaining() == 0.0
    assert budget.try_withdraw() is False          # refusing spends nothing
    assert budget.remaining() == 0.0


def test_no_traffic_and_no_floor_means_no_retries():
    budget = RetryBudget(BudgetPolicy(ratio=0.2, min_per_second=0, window=10), FakeClock())
    assert budget.remaining() == 0.0
    assert budget.try_withdraw() is False


def test_remaining_counts_whole_retries():
    budget = RetryBudget(BudgetPolicy(ratio=0.2, min_per_second=0, window=10), FakeClock())
    requests(budget, 4)                            # 0.8 of a retry
    assert budget.remaining() == 0.0
    assert budget.try_withdraw() is False
    budget.on_request()
    assert budget.remaining() == 1.0
    assert budget.try_withdraw() is True


def test_float_ratios_do_not_lose_a_retry_to_rounding():
    budget = RetryBudget(BudgetPolicy(ratio=0.1, min_per_second=0, window=10), FakeClock())
    requests(budget, 30)                           # 0.1 * 30 == 3.0000000000000004 or 2.999...
    assert drain(budget) == 3


def test_after_the_window_the_budget_is_available_again():
    clock = FakeClock()
    budget = RetryBudget(BudgetPolicy(ratio=0.2, min_per_second=0, window=10), clock)
    requests(budget, 100)
    assert drain(budget) == 20
    clock.advance(10)
    assert budget.remaining() == 0.0               # the old requests aged out with the retries
    requests(budget, 100)
    assert drain(budget) == 20


def test_the_window_slides():
    clock = FakeClock(start=0.0)
    budget = RetryBudget(BudgetPolicy(ratio=0.2, min_per_second=0, window=10), clock)
    requests(budget, 100)
    assert drain(budget) == 20                     # t=0: 20 of 20 spent
    clock.advance(5)
    requests(budget, 100)                          # t=5: 200 requests -> 40 allowed, 20 spent
    assert budget.remaining() == 20.0
    clock.advance(5)                               # t=10: the t=0 requests and retries are gone
    assert budget.remaining() == 20.0
    assert drain(budget) == 20
    clock.advance(5)                               # t=15: the t=5 requests are gone, but the
    assert budget.remaining() == 0.0               # retries spent at t=10 still count
    requests(budget, 100)
    assert budget.remaining() == 0.0               # 20 allowed, 20 spent
    clock.advance(5)                               # t=20: the t=10 retries are gone
    assert budget.remaining() == 20.0


def test_min_per_second_is_a_floor_for_quiet_routes():
    clock = FakeClock()
    budget = RetryBudget(BudgetPolicy(ratio=0.2, min_per_second=5, window=10), clock)
    assert budget.remaining() == 50.0              # 5/s over a 10 s window, no traffic needed
    assert drain(budget) == 50
    requests(budget, 10)                           # ratio on top of the floor
    assert drain(budget) == 2
    clock.advance(10)
    assert budget.remaining() == 50.0


def test_a_zero_window_is_refused():
    with pytest.raises(ValueError):
        RetryBudget(BudgetPolicy(window=0), FakeClock())


# A reference model: every event with its bucket; an event in bucket k counts while now's bucket < k + N.
ops = st.lists(st.one_of(
    st.tuples(st.just("request"), st.integers(1, 30)),
    st.tuples(st.just("retry"), st.integers(1, 10)),
    st.tuples(st.just("advance"), st.floats(0, 6, allow_nan=False)),
), max_size=60)


@settings(max_examples=200, deadline=None)
@given(ops=ops, ratio=st.sampled_from([0.0, 0.1, 0.2, 0.5, 1.0]), floor=st.sampled_from([0.0, 0.5, 2.0]))
def test_matches_a_reference_model(ops, ratio, floor):
    window, n = 10.0, 10
    width = window / n
    clock = FakeClock(start=0.0)
    budget = RetryBudget(BudgetPolicy(ratio=ratio, min_per_second=floor, window=window), clock)
    events: list[tuple[str, int]] = []

    def live(kind: str) -> int:
        now = int(clock.monotonic() // width)
        return sum(1 for k, b in events if k == kind and now < b + n)

    for op, arg in ops:
        if op == "advance":
            clock.advance(arg)
        elif op == "request":
            for _ in range(arg):
                budget.on_request()
                events.append(("request", int(clock.monotonic() // width)))
        else:
            for _ in range(arg):
                allowed = live("retry") + 1 <= ratio * live("request") + floor * window + 1e-9
                assert budget.try_withdraw() is allowed
                if allowed:
                    events.append(("retry", int(clock.monotonic() // width)))
        expected = ratio * live("request") + floor * window - live("retry")
        assert budget.remaining() == max(0.0, math.floor(expected + 1e-9))
