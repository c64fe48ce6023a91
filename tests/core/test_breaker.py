import dataclasses

import pytest

from sidecar.core.breaker import _TABLE, BreakerState, CircuitBreaker, Transition, TripReason
from sidecar.core.clock import FakeClock
from sidecar.policy.model import BreakerPolicy, SlowCall

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def make(**kw) -> tuple[CircuitBreaker, FakeClock]:
    clock = FakeClock()
    return CircuitBreaker(BreakerPolicy(**kw), clock), clock


def fail(breaker: CircuitBreaker, n: int, duration: float = 0.1) -> list[Transition]:
    return [t for _ in range(n) if (t := breaker.record(False, duration)) is not None]


def ok(breaker: CircuitBreaker, n: int, duration: float = 0.1) -> list[Transition]:
    return [t for _ in range(n) if (t := breaker.record(True, duration)) is not None]


def tripped(**kw) -> tuple[CircuitBreaker, FakeClock]:
    kw.setdefault("consecutive_failures", 1)
    breaker, clock = make(**kw)
    breaker.record(False, 0.1)
    assert breaker.state is OPEN
    return breaker, clock


def half_open(**kw) -> tuple[CircuitBreaker, FakeClock]:
    breaker, clock = tripped(**kw)
    clock.advance(breaker.policy.open_for)
    assert breaker.admit() == (True, Transition(OPEN, HALF_OPEN, "open for 30s, probing"))
    return breaker, clock


# -- closed -----------------------------------------------------------------------------------------

def test_closed_admits_everything_and_successes_change_nothing():
    breaker, _ = make()
    assert breaker.state is CLOSED
    for _ in range(100):
        assert breaker.admit() == (True, None)
        assert breaker.record(True, 0.1) is None
    assert breaker.open_until() is None


def test_closed_to_open_on_consecutive_failures():
    breaker, clock = make(consecutive_failures=5)
    assert fail(breaker, 4) == []
    transition = breaker.record(False, 0.1)
    assert transition == Transition(CLOSED, OPEN, "5 consecutive failures", TripReason.CONSECUTIVE_FAILURES)
    assert breaker.state is OPEN
    assert breaker.open_until() == clock.monotonic() + 30.0


def test_a_success_breaks_the_streak():
    breaker, _ = make(consecutive_failures=3)
    fail(breaker, 2)
    ok(breaker, 1)
    assert fail(breaker, 2) == []
    assert breaker.state is CLOSED
    assert breaker.snapshot()["consecutive_failures"] == 2


def test_consecutive_rule_off():
    breaker, _ = make(consecutive_failures=None)
    assert fail(breaker, 1000) == []
    assert breaker.state is CLOSED


def test_closed_to_open_on_failure_rate_once_min_requests_were_seen():
    breaker, _ = make(consecutive_failures=None, failure_rate=0.5, min_requests=20, window=30)
    for _ in range(9):                              # alternate: 18 calls, rate 0.5, under min_requests
        assert fail(breaker, 1) == [] and ok(breaker, 1) == []
    assert fail(breaker, 1) == []                   # 19 calls, 10 failures: still gated
    # The 20th call is a success, yet 10/20 reaches the threshold: the gate opening trips it.
    assert ok(breaker, 1) == [Transition(CLOSED, OPEN, "failure rate 0.50 over 30s", TripReason.FAILURE_RATE)]


def test_failure_rate_under_the_threshold_does_not_trip():
    breaker, _ = make(consecutive_failures=None, failure_rate=0.5, min_requests=10)
    for _ in range(50):
        assert fail(breaker, 1) == [] and ok(breaker, 2) == []
    assert breaker.state is CLOSED


def test_failure_rate_counts_only_the_window():
    breaker, clock = make(consecutive_failures=None, failure_rate=0.5, min_requests=10, window=30)
    fail(breaker, 9)                                # not enough calls to judge
    clock.advance(30)                               # ... and now they aged out
    assert ok(breaker, 1) == []
    assert breaker.snapshot()["window"] == {"seconds": 30, "calls": 1, "failures": 0, "slow": 0}
    assert fail(breaker, 8) == []                   # 9 calls in window
    assert fail(breaker, 1)[0].trip is TripReason.FAILURE_RATE    # 10 calls, 0.9


def test_closed_to_open_on_slow_call_rate():
    breaker, _ = make(consecutive_failures=None, min_requests=10,
                      slow_call=SlowCall(duration=5.0, rate=0.8), window=60)
    assert ok(breaker, 2, duration=5.0) == []       # exactly the limit is not slow
    assert ok(breaker, 7, duration=5.1) == []       # 9 calls: gated
    transitions = ok(breaker, 1, duration=9.0)      # 8 slow of 10
    assert transitions == [Transition(CLOSED, OPEN, "slow call rate 0.80 over 1m (slower than 5s)",
                                      TripReason.SLOW_CALL_RATE)]


def test_slow_calls_under_the_rate_do_not_trip():
    breaker, _ = make(consecutive_failures=None, min_requests=5, slow_call=SlowCall(duration=1.0, rate=0.8))
    for _ in range(20):
        ok(breaker, 1, duration=0.5)                # the rate peaks at 3/4 after each round
        ok(breaker, 3, duration=2.0)
    assert breaker.state is CLOSED


# -- open -------------------------------------------------------------------------------------------

def test_open_rejects_and_ignores_late_outcomes():
    breaker, clock = tripped()
    clock.advance(29.9)
    assert breaker.admit() == (False, None)
    assert breaker.record(False, 0.1) is None       # admitted before it opened: not counted
    assert breaker.record(True, 0.1) is None
    breaker.release()
    assert breaker.state is OPEN


def test_reading_state_never_transitions():
    breaker, clock = tripped()
    clock.advance(1_000)
    assert breaker.state is OPEN
    assert breaker.snapshot()["state"] == "open"
    assert breaker.state is OPEN


def test_open_to_half_open_after_open_for_admits_the_first_probe():
    breaker, clock = tripped(open_for=10)
    clock.advance(9.999)
    assert breaker.admit() == (False, None)
    clock.advance(0.001)
    allowed, transition = breaker.admit()
    assert allowed is True
    assert transition == Transition(OPEN, HALF_OPEN, "open for 10s, probing")
    assert transition.trip is None
    assert breaker.state is HALF_OPEN
    assert breaker.open_until() is None


# -- half-open --------------------------------------------------------------------------------------

def test_half_open_admits_only_half_open_requests_probes():
    breaker, _ = half_open(half_open_requests=3)
    assert breaker.admit() == (True, None)
    assert breaker.admit() == (True, None)
    assert breaker.admit() == (False, None)         # three probes out
    assert breaker.snapshot()["probes_in_flight"] == 3


def test_half_open_to_closed_when_the_probes_succeed():
    breaker, clock = half_open(half_open_requests=2, open_for=30)
    breaker.admit()
    assert breaker.record(True, 0.1) is None
    assert breaker.admit() == (False, None)         # one passed + one out = two: no third probe
    assert breaker.record(True, 0.1) == Transition(HALF_OPEN, CLOSED, "2 probe(s) succeeded")
    assert breaker.state is CLOSED
    assert breaker.admit() == (True, None)
    snap = breaker.snapshot()
    assert snap["window"]["calls"] == 0 and snap["consecutive_failures"] == 0
    assert snap["opened_at"] is None and snap["trip_reason"] is None


def test_half_open_to_open_doubles_open_for_up_to_the_cap():
    breaker, clock = half_open(open_for=30, max_open_for=100)
    expected = [(60.0, "1m"), (100.0, "100s"), (100.0, "100s")]
    for open_for, shown in expected:
        transition = breaker.record(False, 0.1)
        assert transition.old is HALF_OPEN and transition.new is OPEN
        assert transition.trip is TripReason.HALF_OPEN_FAILURE
        assert transition.reason == f"probe failed, open for {shown}"
        assert breaker.open_until() == clock.monotonic() + open_for
        clock.advance(open_for - 0.5)
        assert breaker.admit() == (False, None)
        clock.advance(0.5)
        assert breaker.admit()[0] is True
    # Closing resets the doubling: the next trip opens for the base period again.
    assert breaker.record(True, 0.1).new is CLOSED
    breaker.record(False, 0.1)
    assert breaker.open_until() == clock.monotonic() + 30.0
    assert breaker.snapshot()["open_for"] == 30.0


def test_a_slow_probe_counts_as_a_failed_probe():
    breaker, _ = half_open(slow_call=SlowCall(duration=2.0, rate=0.5))
    transition = breaker.record(True, 3.0)
    assert transition == Transition(HALF_OPEN, OPEN, "probe slow (3s), open for 1m", TripReason.HALF_OPEN_FAILURE)


def test_release_frees_a_probe_slot_without_counting():
    breaker, _ = half_open(half_open_requests=1)
    assert breaker.admit() == (False, None)
    breaker.release()                               # the probe was a losing hedge
    assert breaker.state is HALF_OPEN
    assert breaker.snapshot()["probes_succeeded"] == 0
    assert breaker.admit() == (True, None)
    breaker.release()
    breaker.release()                               # an extra release is harmless
    assert breaker.snapshot()["probes_in_flight"] == 0


def test_an_abandoned_call_counts_only_when_already_slow():
    breaker, _ = make(consecutive_failures=None, min_requests=4, slow_call=SlowCall(duration=0.1, rate=0.5))
    assert ok(breaker, 2) == []
    assert breaker.abandon(0.05) is None            # a losing hedge that was not slow: no outcome
    assert breaker.snapshot()["window"]["calls"] == 2
    assert breaker.abandon(0.2) is None             # past the threshold: a slow call (2 of 3)
    assert breaker.snapshot()["window"]["slow"] == 1
    transition = breaker.abandon(0.3)               # 2 slow of 4: the rate trips
    assert transition == Transition(CLOSED, OPEN, "slow call rate 0.50 over 30s (slower than 100ms)",
                                    TripReason.SLOW_CALL_RATE)


def test_an_abandoned_slow_probe_reopens():
    breaker, _ = half_open(slow_call=SlowCall(duration=2.0, rate=0.5))
    assert breaker.abandon(2.5).new is OPEN


def test_an_abandoned_call_without_slow_call_policy_is_released():
    breaker, _ = half_open(half_open_requests=1)
    assert breaker.admit() == (False, None)
    assert breaker.abandon(99.0) is None
    assert breaker.admit() == (True, None)


def test_release_is_a_no_op_when_closed():
    breaker, _ = make()
    breaker.release()
    assert breaker.state is CLOSED


def test_half_open_ignores_outcomes_when_no_probe_is_out():
    breaker, _ = half_open()
    assert breaker.record(True, 0.1).new is CLOSED  # the probe
    breaker, _ = half_open(half_open_requests=1)
    breaker.release()
    assert breaker.record(False, 0.1) is None       # a call from before the breaker opened
    assert breaker.state is HALF_OPEN


# -- operators --------------------------------------------------------------------------------------

def test_force_open_holds_until_reset():
    breaker, clock = make()
    transition = breaker.force_open("upstream unhealthy")
    assert transition == Transition(CLOSED, OPEN, "upstream unhealthy", TripReason.FORCED)
    assert breaker.open_until() is None
    clock.advance(10_000)
    assert breaker.admit() == (False, None)         # no probing while forced
    assert breaker.snapshot()["forced"] is True
    assert breaker.reset() == Transition(OPEN, CLOSED, "reset")
    assert breaker.admit() == (True, None)
    assert breaker.snapshot()["forced"] is False


def test_force_open_when_already_open_holds_it_without_a_transition():
    breaker, clock = tripped()
    assert breaker.force_open("operator") is None
    clock.advance(10_000)
    assert breaker.admit() == (False, None)
    assert breaker.snapshot()["trip_reason"] == "forced"


def test_force_open_from_half_open():
    breaker, _ = half_open()
    assert breaker.force_open("operator") == Transition(HALF_OPEN, OPEN, "operator", TripReason.FORCED)
    assert breaker.record(True, 0.1) is None        # the probe's outcome no longer counts


def test_reset_from_half_open_and_closed():
    breaker, _ = half_open()
    assert breaker.reset() == Transition(HALF_OPEN, CLOSED, "reset")
    breaker, _ = make(consecutive_failures=3)
    fail(breaker, 2)
    assert breaker.reset() is None                  # already closed: only the counters are cleared
    assert fail(breaker, 2) == []
    assert breaker.state is CLOSED


def test_snapshot_while_open():
    breaker, clock = make(consecutive_failures=2, open_for=30)
    fail(breaker, 2)
    clock.advance(12)
    snap = breaker.snapshot()
    assert snap == {
        "state": "open", "consecutive_failures": 2,
        "window": {"seconds": 30.0, "calls": 2, "failures": 2, "slow": 0},
        "open_for": 30.0, "opened_at": 1_700_000_000.0, "half_open_in": 18.0, "forced": False,
        "trip_reason": "consecutive_failures", "reason": "2 consecutive failures",
        "probes_in_flight": 0, "probes_succeeded": 0,
    }


# -- the table itself -------------------------------------------------------------------------------

def _closed(**kw):
    return make(**kw)[0]


def _open(**kw):
    return tripped(**kw)[0]


def _half(**kw):
    return half_open(**kw)[0]


EDGES = [
    # (from, how, to, transition expected)
    (_closed, lambda b: fail(b, 1), OPEN, True),                        # closed --trip--> open
    (_closed, lambda b: b.force_open("x"), OPEN, True),                 # closed --force--> open
    (_closed, lambda b: b.reset(), CLOSED, False),                      # closed --reset--> closed
    (_open, lambda b: b.admit(), OPEN, False),                          # open, period not over
    (_open, lambda b: b.force_open("x"), OPEN, False),                  # open --force--> open
    (_open, lambda b: b.reset(), CLOSED, True),                         # open --reset--> closed
    (_half, lambda b: b.record(False, 0.1), OPEN, True),                # half_open --probe failed--> open
    (_half, lambda b: b.record(True, 0.1), CLOSED, True),               # half_open --probes passed--> closed
    (_half, lambda b: b.force_open("x"), OPEN, True),                   # half_open --force--> open
    (_half, lambda b: b.reset(), CLOSED, True),                         # half_open --reset--> closed
]


@pytest.mark.parametrize("start, act, end, changes", EDGES)
def test_every_edge(start, act, end, changes):
    breaker = start(consecutive_failures=1)
    before = breaker.state
    result = act(breaker)
    assert breaker.state is end
    transition = result[-1] if isinstance(result, (list, tuple)) and result and isinstance(result[-1], Transition) \
        else result if isinstance(result, Transition) else None
    assert (transition is not None) is changes
    if transition is not None:
        assert (transition.old, transition.new) == (before, end)


def test_the_table_has_exactly_the_documented_edges():
    # open --probe--> half_open is covered by test_open_to_half_open_after_open_for_admits_the_first_probe.
    assert len(_TABLE) == 10
    assert {(s.value, e.value, t.value) for (s, e), t in _TABLE.items()} == {
        ("closed", "trip", "open"), ("closed", "force", "open"), ("closed", "reset", "closed"),
        ("open", "probe", "half_open"), ("open", "force", "open"), ("open", "reset", "closed"),
        ("half_open", "probe_failed", "open"), ("half_open", "probes_passed", "closed"),
        ("half_open", "force", "open"), ("half_open", "reset", "closed"),
    }


# -- records ----------------------------------------------------------------------------------------

def test_transition_is_a_frozen_record_that_validates():
    transition = Transition(CLOSED, OPEN, "x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        transition.reason = "y"
    with pytest.raises(ValueError):
        Transition(OPEN, OPEN, "no change")


def test_enums_read_as_their_wire_values():
    assert BreakerState.open is BreakerState.OPEN and BreakerState("half_open") is HALF_OPEN
    assert str(HALF_OPEN) == "half_open" and f"{OPEN}" == "open"
    assert TripReason.forced is TripReason.FORCED and str(TripReason.FAILURE_RATE) == "failure_rate"
    assert [s.value for s in BreakerState] == ["closed", "open", "half_open"]


# -- reload -----------------------------------------------------------------------------------------

def test_a_new_policy_keeps_the_state_under_new_thresholds():
    breaker, clock = make(consecutive_failures=5, open_for=30)
    fail(breaker, 3)
    breaker.policy = BreakerPolicy(consecutive_failures=4, open_for=10)
    assert breaker.policy.consecutive_failures == 4
    assert fail(breaker, 1)[0].reason == "4 consecutive failures"   # the streak survived the reload
    assert breaker.open_until() == clock.monotonic() + 10.0


def test_a_new_policy_during_an_open_period_keeps_its_length():
    breaker, clock = tripped(open_for=30)
    breaker.policy = BreakerPolicy(consecutive_failures=1, open_for=5, window=60)
    assert breaker.open_until() == clock.monotonic() + 30.0
    assert breaker.snapshot()["window"] == {"seconds": 60, "calls": 0, "failures": 0, "slow": 0}
