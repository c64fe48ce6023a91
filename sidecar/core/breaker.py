"""The circuit breaker for one (route, upstream): every state transition in one table.

    closed --trip (consecutive / failure rate / slow-call rate)--> open
    closed --force_open()--> open (held until reset())
    open --open_for elapsed, next admit()--> half_open (that admit is the first probe)
    half_open --a probe fails (or is slow)--> open, open_for doubled up to max_open_for
    half_open --half_open_requests probes succeeded--> closed
    open / half_open --reset()--> closed

Why this shape: h11 keeps every transition of its state machine in one table in one module, so the
machine can be read (and tested edge by edge) in one place -- that is `_TABLE` below. The trip rules
follow resilience4j (failure-rate and slow-call-rate thresholds over a sliding window, gated by a
minimum number of calls) and linkerd2-proxy (a consecutive-failures breaker whose `TripReason` is kept
for observability); the doubling open period is Envoy's outlier-detection ejection back-off.

No I/O and no timers: time comes from the injected `Clock`, and "open -> half_open" happens lazily
inside `admit()`, so reading `state` never changes it and tests move a `FakeClock` by hand.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from sidecar.core.clock import Clock
from sidecar.core.decisions import Decision
from sidecar.core.window import SlidingCounts
from sidecar.policy.model import BreakerPolicy


class BreakerState(str, enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    # Lower-case aliases (the same members), so `BreakerState.open` reads like the wire value.
    closed = "closed"
    open = "open"
    half_open = "half_open"

    def __str__(self) -> str:
        return self.value


class TripReason(str, enum.Enum):
    CONSECUTIVE_FAILURES = "consecutive_failures"
    FAILURE_RATE = "failure_rate"
    SLOW_CALL_RATE = "slow_call_rate"
    HALF_OPEN_FAILURE = "half_open_failure"
    FORCED = "forced"
    consecutive_failures = "consecutive_failures"
    failure_rate = "failure_rate"
    slow_call_rate = "slow_call_rate"
    half_open_failure = "half_open_failure"
    forced = "forced"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class Transition:
    """One edge taken: handed to the pipeline, which turns it into a `breaker_*` decision."""
    old: BreakerState
    new: BreakerState
    reason: str                           # for people: "5 consecutive failures", "failure rate 0.62 over 30s"
    trip: TripReason | None = None        # set when `new` is open: why it tripped

    def __post_init__(self) -> None:
        if self.old is self.new:
            raise ValueError(f"a transition changes state, got {self.old} -> {self.new}")


# The decision each edge becomes (SPEC "Decisions"), for every caller: data plane, queue, tunnels.
_DECISION = {
    BreakerState.OPEN: Decision.BREAKER_OPENED,
    BreakerState.HALF_OPEN: Decision.BREAKER_HALF_OPEN,
    BreakerState.CLOSED: Decision.BREAKER_CLOSED,
}


def transition_decision(transition: Transition) -> Decision:
    """`breaker_opened`, `breaker_half_open` or `breaker_closed`: the edge's new state, as a decision."""
    return _DECISION[transition.new]


class _Event(enum.Enum):
    TRIP = "trip"                         # a closed-state threshold was crossed
    PROBE = "probe"                       # admit() after the open period: let a probe through
    PROBE_FAILED = "probe_failed"
    PROBES_PASSED = "probes_passed"
    FORCE = "force"                       # operator / health check
    RESET = "reset"


_C, _O, _H = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN

# The whole state machine. A (state, event) pair missing here is a bug in this module, not a request
# outcome, so it raises KeyError.
_TABLE: dict[tuple[BreakerState, _Event], BreakerState] = {
    (_C, _Event.TRIP): _O,
    (_C, _Event.FORCE): _O,
    (_C, _Event.RESET): _C,               # clears the counters, no transition
    (_O, _Event.PROBE): _H,
    (_O, _Event.FORCE): _O,               # already open: now held open until reset()
    (_O, _Event.RESET): _C,
    (_H, _Event.PROBE_FAILED): _O,
    (_H, _Event.PROBES_PASSED): _C,
    (_H, _Event.FORCE): _O,
    (_H, _Event.RESET): _C,
}

_CALLS, _FAILURES, _SLOW = 0, 1, 2


def _secs(value: float) -> str:
    """250ms, 30s, 5m: durations in reasons read like the policy file."""
    if value >= 60 and value % 60 == 0:
        return f"{int(value // 60)}m"
    if value < 1:
        return f"{value * 1000:g}ms"
    return f"{value:g}s"


class CircuitBreaker:
    __slots__ = ("_policy", "_clock", "_state", "_consecutive", "_window", "_open_for", "_opened_at",
                 "_opened_wall", "_forced", "_probes", "_passed", "_trip", "_reason")

    def __init__(self, policy: BreakerPolicy, clock: Clock) -> None:
        self._policy = policy
        self._clock = clock
        self._state = _C
        self._consecutive = 0
        self._window = SlidingCounts(policy.window, clock, counters=3)
        self._open_for = policy.open_for
        self._opened_at: float | None = None      # monotonic, when it last opened
        self._opened_wall: float | None = None    # the same instant on the wall clock, for /status
        self._forced = False
        self._probes = 0                          # half-open probes admitted and not yet finished
        self._passed = 0                          # half-open probes that succeeded
        self._trip: TripReason | None = None
        self._reason = ""

    @property
    def state(self) -> BreakerState:
        return self._state

    @property
    def policy(self) -> BreakerPolicy:
        return self._policy

    @policy.setter
    def policy(self, policy: BreakerPolicy) -> None:
        """A reload keeps the breaker's state (SPEC "Policy reload") under the new thresholds.

        A new `window` length starts an empty window; an open period already running keeps its length,
        the next one uses the new `open_for`.
        """
        old, self._policy = self._policy, policy
        if policy.window != old.window:
            self._window = SlidingCounts(policy.window, self._clock, counters=3)
        if self._state is _C:
            self._open_for = policy.open_for

    # -- the request path -------------------------------------------------------------------------

    def admit(self) -> tuple[bool, Transition | None]:
        """May a call go to the upstream now? Open -> half_open happens here, lazily."""
        state = self._state
        if state is _C:
            return True, None
        if state is _O:
            until = self.open_until()
            if until is None or self._clock.monotonic() < until:
                return False, None
            transition = self._fire(_Event.PROBE, f"open for {_secs(self._open_for)}, probing")
            self._probes = 1
            return True, transition
        # Half-open: at most `half_open_requests` probes in total are out or passed, so exactly that
        # many successes close the breaker and no more load than that reaches a recovering upstream.
        if self._probes + self._passed < self._probes_needed():
            self._probes += 1
            return True, None
        return False, None

    def record(self, success: bool, duration: float) -> Transition | None:
        """The outcome of an admitted call; `duration` in seconds decides whether it was slow."""
        slow_call = self._policy.slow_call
        slow = slow_call is not None and duration > slow_call.duration
        state = self._state
        if state is _C:
            return self._record_closed(success, slow)
        if state is _H and self._probes > 0:
            self._probes -= 1
            if not success or slow:
                self._open_for = min(self._open_for * 2, max(self._policy.max_open_for, self._policy.open_for))
                what = "probe failed" if not success else f"probe slow ({_secs(duration)})"
                return self._fire(_Event.PROBE_FAILED, f"{what}, open for {_secs(self._open_for)}",
                                  TripReason.HALF_OPEN_FAILURE)
            self._passed += 1
            if self._passed >= self._probes_needed():
                return self._fire(_Event.PROBES_PASSED, f"{self._passed} probe(s) succeeded")
        # Open, or half-open with no probe out: a call admitted before the breaker opened finished
        # late. It says nothing about the upstream's state now, so it is not counted.
        return None

    def abandon(self, duration: float) -> Transition | None:
        """An admitted call we gave up after `duration` seconds (a losing hedge, a cancelled request).
        Past the slow-call threshold it counts as slow (it could only have been slower): otherwise
        hedging would hide exactly the slowness `slow_call` is there to catch. Else no outcome."""
        slow_call = self._policy.slow_call
        if slow_call is not None and duration > slow_call.duration:
            return self.record(True, duration)
        self.release()
        return None

    def release(self) -> None:
        """An admitted call ended with no outcome (cancelled, e.g. a losing hedge): free its probe slot."""
        if self._state is _H and self._probes > 0:
            self._probes -= 1

    # -- operators and health checks --------------------------------------------------------------

    def force_open(self, reason: str) -> Transition | None:
        """Open now and stay open until `reset()` (no half-open probing while forced)."""
        return self._fire(_Event.FORCE, reason, TripReason.FORCED)

    def reset(self) -> Transition | None:
        """Close now and forget the counters, the doubling and any forced open."""
        return self._fire(_Event.RESET, "reset")

    def open_until(self) -> float | None:
        """Monotonic time the open period ends; None unless open (or when forced open: no end)."""
        if self._state is not _O or self._forced or self._opened_at is None:
            return None
        return self._opened_at + self._open_for

    def snapshot(self) -> dict[str, object]:
        """Plain data for /status."""
        calls, failures, slow = self._window.totals()
        until = self.open_until()
        return {
            "state": self._state.value,
            "consecutive_failures": self._consecutive,
            "window": {"seconds": self._policy.window, "calls": calls, "failures": failures, "slow": slow},
            "open_for": self._open_for,
            "opened_at": self._opened_wall,
            "half_open_in": None if until is None else max(0.0, until - self._clock.monotonic()),
            "forced": self._forced,
            "trip_reason": None if self._trip is None else self._trip.value,
            "reason": self._reason,
            "probes_in_flight": self._probes,
            "probes_succeeded": self._passed,
        }

    # -- internals --------------------------------------------------------------------------------

    def _probes_needed(self) -> int:
        return max(1, self._policy.half_open_requests)

    def _record_closed(self, success: bool, slow: bool) -> Transition | None:
        policy = self._policy
        window = self._window
        window.add(_CALLS)
        if success:
            self._consecutive = 0
        else:
            self._consecutive += 1
            window.add(_FAILURES)
            limit = policy.consecutive_failures
            if limit and self._consecutive >= limit:
                return self._fire(_Event.TRIP, f"{self._consecutive} consecutive failures",
                                  TripReason.CONSECUTIVE_FAILURES)
        if slow:
            window.add(_SLOW)
        if policy.failure_rate is None and policy.slow_call is None:
            return None
        # Checked on every call, successes included: old calls ageing out of the window, or the call
        # that reaches `min_requests`, can push a rate over its threshold too.
        calls, failures, slows = window.totals()
        if calls < max(1, policy.min_requests):
            return None
        if policy.failure_rate is not None and failures / calls >= policy.failure_rate:
            return self._fire(_Event.TRIP, f"failure rate {failures / calls:.2f} over {_secs(policy.window)}",
                              TripReason.FAILURE_RATE)
        if policy.slow_call is not None and slows / calls >= policy.slow_call.rate:
            return self._fire(_Event.TRIP,
                              f"slow call rate {slows / calls:.2f} over {_secs(policy.window)} "
                              f"(slower than {_secs(policy.slow_call.duration)})",
                              TripReason.SLOW_CALL_RATE)
        return None

    def _fire(self, event: _Event, reason: str, trip: TripReason | None = None) -> Transition | None:
        old = self._state
        new = _TABLE[(old, event)]
        self._state = new
        self._probes = 0
        self._passed = 0
        if new is _O:
            if old is not _O:
                self._opened_at = self._clock.monotonic()
                self._opened_wall = self._clock.time()
            self._forced = event is _Event.FORCE
            self._trip = trip
            self._reason = reason
        elif new is _C:
            # Closing starts afresh: no failure streak, an empty window, the base open period.
            self._consecutive = 0
            self._window.clear()
            self._open_for = self._policy.open_for
            self._opened_at = self._opened_wall = None
            self._forced = False
            self._trip = None
            self._reason = reason
        else:
            self._reason = reason
        if old is new:
            return None
        return Transition(old, new, reason, trip if new is _O else None)
