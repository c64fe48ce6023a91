"""Tokens per minute, with a fake clock: admission, settling, Retry-After, and the window sliding."""
import pytest

from sidecar.core.clock import FakeClock
from sidecar.core.tokenwindow import TokenWindow


def call(window: TokenWindow, tokens: int, max_tokens: int | None = None):
    reservation, retry_after = window.try_spend(window.estimate(max_tokens))
    if reservation is not None:
        window.settle(reservation, tokens)
    return reservation is not None, retry_after


def test_fourth_call_of_300_tokens_is_refused_until_the_window_slides():
    clock = FakeClock()
    w = TokenWindow(1000, clock)
    assert call(w, 300) == (True, 0.0)          # no estimate yet: the empty window admits it
    clock.advance(5)
    assert call(w, 300)[0]                      # estimate 300 (the average): 600 <= 1000
    clock.advance(5)
    assert call(w, 300)[0]                      # 900 <= 1000
    clock.advance(5)
    ok, retry_after = call(w, 300)              # 900 + 300 > 1000
    assert not ok and w.spent() == 900
    assert retry_after == pytest.approx(45.0)   # the first call's slot leaves the minute at t=60
    clock.advance(44.5)
    assert not call(w, 300)[0]
    clock.advance(0.5)                          # t=60: the first 300 expired, 600 + 300 fits
    assert call(w, 300)[0] and w.spent() == 900
    clock.advance(60)
    assert w.spent() == 0


def test_in_flight_estimates_count_and_usage_corrects_them():
    clock = FakeClock()
    w = TokenWindow(1000, clock)
    first, _ = w.try_spend(w.estimate(600))     # max_tokens 600, in flight
    assert w.spent() == 600
    assert w.try_spend(w.estimate(500))[0] is None          # 600 + 500 > 1000 while the first is out
    w.settle(first, 120)                        # it used far fewer
    assert w.spent() == 120
    assert w.try_spend(w.estimate(500))[0] is not None
    w.settle(first, 999)                        # settling twice changes nothing
    assert w.spent() == 620


def test_an_empty_window_admits_a_call_above_the_limit():
    w = TokenWindow(100, FakeClock())
    r, _ = w.try_spend(w.estimate(4096))
    assert r is not None
    assert w.try_spend(0)[0] is None and w.try_spend(0)[1] == pytest.approx(60.0)


def test_usage_arriving_after_its_slot_expired_is_dropped():
    clock = FakeClock()
    w = TokenWindow(1000, clock)
    r, _ = w.try_spend(100)
    clock.advance(61)
    w.settle(r, 900)
    assert w.spent() == 0


def test_one_window_per_key_bounded():
    from sidecar.core.tokenwindow import KeyedTokenWindows
    clock = FakeClock()
    windows = KeyedTokenWindows(1000, max_keys=2, clock=clock)
    for _ in range(3):
        assert call(windows.window("tenant-a"), 300)[0]
    assert not call(windows.window("tenant-a"), 300)[0]    # a's minute is full
    assert call(windows.window("tenant-b"), 300)[0]        # b has its own
    windows.window("tenant-c")                             # a third key evicts the least recent (a)
    assert len(windows) == 2 and windows.evictions == 1
    assert windows.window("tenant-a").spent() == 0
