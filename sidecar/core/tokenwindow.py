"""LLM tokens per minute: the tokens a route spent over a sliding minute, kept in one-second slots.

Why this shape: a provider's quota (OpenAI's and Anthropic's TPM limits) counts tokens over a rolling
minute, and a call's cost is known only when its answer's `usage` arrives. So a call is admitted against
an estimate, which is written into the slot of its start and corrected there when the usage is known
(`settle`): in-flight calls count, and a call that spent more or less than guessed is set right. The
estimate is the request's `max_tokens` when it has one, else the average of the calls settled so far.

Admission (Envoy's "may we?" half, spending on success): the window's tokens plus the estimate must stay
within the limit; an empty window admits any one call (a `max_tokens` above the limit would otherwise
never pass). When refused, `retry_after` is when enough of the oldest slots will have expired.
No I/O; the clock is injected, so tests move a `FakeClock` across the minute. The limiters built on
these windows (and on a shared bucket in Redis) are `sidecar/fleet/tokenlimit.py`; what they answer is a
`TokenAdmission`.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from .clock import Clock
from .ratelimit import Verdict

_AVERAGE_WEIGHT = 0.2       # each settled call moves the no-max_tokens estimate a fifth of the way


@dataclass(slots=True)
class Reservation:
    slot: int                              # the absolute slot the estimate was written into
    tokens: int
    settled: bool = False


@dataclass(frozen=True, slots=True)
class TokenAdmission:
    """A token limiter's answer for one call. Admitted: `settle(tokens)` once its real usage is known
    (0 for a failed or non-LLM answer). `spent`: the tokens the deciding window held, when a local
    window decided (None when the shared bucket did), for the decision's reason."""
    verdict: Verdict
    spent: int | None = None
    settle: Callable[[int], None] | None = None


class TokenWindow:
    __slots__ = ("limit", "_clock", "_width", "_n", "_slots", "_total", "_index", "_average")

    def __init__(self, limit: int, clock: Clock, window: float = 60.0, slots: int = 60) -> None:
        if limit < 1:
            raise ValueError(f"tokens_per_minute must be >= 1, got {limit!r}")
        self.limit = limit
        self._clock = clock
        self._width = window / slots
        self._n = slots
        self._slots = [0] * slots
        self._total = 0
        self._index = self._now_index()
        self._average: float | None = None

    def _now_index(self) -> int:
        return int(self._clock.monotonic() // self._width)

    def _expire(self) -> None:
        index = self._now_index()
        gap = index - self._index
        if gap <= 0:
            return
        if gap >= self._n:
            self._slots = [0] * self._n
            self._total = 0
        else:
            for k in range(self._index + 1, index + 1):
                self._total -= self._slots[k % self._n]
                self._slots[k % self._n] = 0
        self._index = index

    def spent(self) -> int:
        """Tokens in the window: answered calls' usage plus in-flight calls' estimates."""
        self._expire()
        return self._total

    def estimate(self, max_tokens: int | None) -> int:
        if max_tokens is not None:
            return max_tokens
        return round(self._average) if self._average is not None else 0

    def try_spend(self, estimate: int, force: bool = False) -> tuple[Reservation | None, float]:
        """(a reservation, 0.0) when admitted; (None, seconds until it would be) when not. `force`:
        reserve whatever the window holds (a shared limit admitted the call; this window only keeps
        this process's share of the spending)."""
        self._expire()
        if force or self._total == 0 or self._total + estimate <= self.limit:
            self._slots[self._index % self._n] += estimate
            self._total += estimate
            return Reservation(self._index, estimate), 0.0
        return None, self._retry_after(estimate)

    def _retry_after(self, estimate: int) -> float:
        now = self._clock.monotonic()
        left = self._total
        for k in range(self._index - self._n + 1, self._index + 1):   # oldest slot first
            left -= self._slots[k % self._n]
            if left == 0 or left + estimate <= self.limit:
                return max((k + self._n) * self._width - now, 0.0)
        return self._n * self._width

    def settle(self, reservation: Reservation, tokens: int) -> None:
        """The call's real usage (0 for a failed or non-LLM answer) replaces its estimate, in the slot
        it was reserved in, if that slot is still inside the window."""
        if reservation.settled:
            return
        reservation.settled = True
        self._expire()
        if reservation.slot > self._index - self._n:
            delta = tokens - reservation.tokens
            slot = reservation.slot % self._n
            delta = max(delta, -self._slots[slot])
            self._slots[slot] += delta
            self._total += delta
        if tokens > 0:
            self._average = tokens if self._average is None else \
                self._average + _AVERAGE_WEIGHT * (tokens - self._average)


class KeyedTokenWindows:
    """One window per key value (`rate_limit.key`), bounded like the request buckets: past `max_keys`
    the least recently used window is dropped (its key starts again from an empty minute)."""
    __slots__ = ("limit", "max_keys", "_clock", "_windows", "evictions")

    def __init__(self, limit: int, max_keys: int, clock: Clock) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys!r}")
        self.limit = limit
        self.max_keys = max_keys
        self._clock = clock
        self._windows: OrderedDict[str, TokenWindow] = OrderedDict()
        self.evictions = 0

    def window(self, key: str) -> TokenWindow:
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = TokenWindow(self.limit, self._clock)
            if len(self._windows) > self.max_keys:
                self._windows.popitem(last=False)
                self.evictions += 1
        else:
            self._windows.move_to_end(key)
        return window

    def spent(self) -> dict[str, int]:
        """Tokens in each key's window, most recently used last (for /status)."""
        return {key: w.spent() for key, w in self._windows.items()}

    def __len__(self) -> int:
        return len(self._windows)
