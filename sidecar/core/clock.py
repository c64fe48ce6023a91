"""Injected time, so `core/` never reads the wall clock itself (STYLE habit 2).

Every stateful object in `core/` takes a `Clock`: production passes `SYSTEM_CLOCK`, tests pass a
`FakeClock` and move time by hand, as linkerd2-proxy's tests do with paused tokio time and tenacity /
stamina do with an injected sleep. Windows, open periods and refills use `monotonic()`; `time()` is only
for timestamps shown to people (e.g. when a breaker opened) and for HTTP dates (`Retry-After`).
"""
from __future__ import annotations

import time as _time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back; for durations and deadlines."""
        ...

    def time(self) -> float:
        """Wall-clock seconds since the epoch; for timestamps and HTTP dates only."""
        ...


class SystemClock:
    """The real clocks: `time.monotonic` and `time.time`, called directly (no Python frame between:
    the request path reads the clock several times per request)."""
    __slots__ = ()

    monotonic = staticmethod(_time.monotonic)
    time = staticmethod(_time.time)


SYSTEM_CLOCK = SystemClock()


class FakeClock:
    """A clock that only moves when told to: `advance()` moves both readings by the same amount."""
    __slots__ = ("_mono", "_wall")

    def __init__(self, start: float = 1000.0, wall: float = 1_700_000_000.0) -> None:
        self._mono = float(start)
        self._wall = float(wall)

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a monotonic clock does not go back")
        self._mono += seconds
        self._wall += seconds

    def monotonic(self) -> float:
        return self._mono

    def time(self) -> float:
        return self._wall
