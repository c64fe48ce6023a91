import pytest

from sidecar.core.clock import SYSTEM_CLOCK, Clock, FakeClock


def test_fake_clock_starts_where_told_and_moves_only_when_advanced():
    clock = FakeClock()
    assert (clock.monotonic(), clock.time()) == (1000.0, 1_700_000_000.0)
    clock.advance(2.5)
    assert (clock.monotonic(), clock.time()) == (1002.5, 1_700_000_002.5)
    assert FakeClock(start=5.0, wall=10.0).monotonic() == 5.0


def test_fake_clock_refuses_to_go_back():
    with pytest.raises(ValueError):
        FakeClock().advance(-1)


def test_clocks_satisfy_the_protocol():
    def read(clock: Clock) -> tuple[float, float]:
        return clock.monotonic(), clock.time()

    mono, wall = read(SYSTEM_CLOCK)
    assert isinstance(mono, float) and isinstance(wall, float)
    assert read(FakeClock()) == (1000.0, 1_700_000_000.0)
