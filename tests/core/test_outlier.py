"""Outlier ejection and the endpoint set with a fake clock: growth, cap, panic, restore, cooldown,
previous hosts, and what the route's breaker is told."""
import random

import pytest

from sidecar.core.clock import FakeClock
from sidecar.core.decisions import Decision
from sidecar.core.endpoints import EndpointSet
from sidecar.core.outlier import Outlier, ejection_cap
from sidecar.policy.model import OutlierPolicy

POLICY = OutlierPolicy(consecutive_failures=3, eject_for=10.0, max_eject_for=25.0, max_ejected=50.0)


def fail(o: Outlier, n: int, now: float) -> list[float]:
    return [d for _ in range(n) if (d := o.failure(POLICY, now)) is not None]


def test_consecutive_failures_eject_and_a_success_resets_the_count():
    o = Outlier()
    assert fail(o, 2, 0.0) == []
    o.success()
    assert fail(o, 2, 0.0) == []
    assert fail(o, 1, 0.0) == [10.0]
    assert o.ejected and o.ejected_until == 10.0


def test_ejection_grows_linearly_up_to_max_eject_for():
    o, now, got = Outlier(), 0.0, []
    for _ in range(4):
        got += fail(o, 3, now)
        now = o.ejected_until
        assert o.restore_due(now)
    assert got == [10.0, 20.0, 25.0, 25.0]


def test_time_in_service_earns_the_multiplier_back():
    o = Outlier()
    fail(o, 3, 0.0)
    o.restore_due(10.0)
    fail(o, 3, 11.0)                                  # soon again: 2 x 10s
    assert o.ejected_until == 31.0
    o.restore_due(31.0)
    assert fail(o, 3, 31.0 + 15.0) == [20.0]          # one period served: multiplier 2 -> 1, then 2
    o.restore_due(o.ejected_until)                    # back at 66
    assert fail(o, 3, 66.0 + 25.0) == [10.0]          # two periods: 2 -> 0, then 1


def test_restore_only_when_the_time_is_up():
    o = Outlier()
    fail(o, 3, 0.0)
    assert not o.restore_due(9.999)
    assert o.restore_due(10.0)
    assert not o.ejected and not o.restore_due(10.0)


def test_failures_while_ejected_do_not_extend_it():
    o = Outlier()
    fail(o, 3, 0.0)
    assert fail(o, 10, 5.0) == []
    assert o.ejected_until == 10.0


@pytest.mark.parametrize("size,percent,cap", [(1, 50, 0), (2, 50, 1), (3, 50, 1), (4, 50, 2), (10, 10, 1),
                                              (10, 35, 3), (3, 100, 3), (5, 0, 0)])
def test_ejection_cap(size, percent, cap):
    assert ejection_cap(size, OutlierPolicy(max_ejected=percent)) == cap


# -- the set ----------------------------------------------------------------------------------------

def make_set(n: int = 3, balance: str = "round-robin", weights=None) -> tuple[EndpointSet, FakeClock, random.Random]:
    clock = FakeClock()
    s = EndpointSet("orders", balance, POLICY)
    weights = weights or [1] * n
    s.update([(f"10.0.0.{i + 1}:80", weights[i], "static", None) for i in range(n)], clock.monotonic())
    return s, clock, random.Random(1)


def run(s: EndpointSet, clock: FakeClock, rng, bad: set[str], n: int) -> tuple[dict, list]:
    counts, events = {}, []
    for _ in range(n):
        p = s.pick(clock.monotonic(), rng)
        events += list(p.restored)
        ep = p.endpoint
        counts[ep.key] = counts.get(ep.key, 0) + 1
        s.start(ep)
        ev = s.finish(ep, ep.key not in bad, 0.001, clock.monotonic())
        if ev is not None:
            events.append(ev)
        clock.advance(0.01)
    return counts, events


def test_a_bad_endpoint_is_ejected_then_restored():
    s, clock, rng = make_set()
    counts, events = run(s, clock, rng, {"10.0.0.2:80"}, 30)
    assert [e.decision for e in events] == [Decision.ENDPOINT_EJECTED]
    assert counts["10.0.0.2:80"] == 3                 # three failures, then out of rotation
    clock.advance(10.0)
    p = s.pick(clock.monotonic(), rng)
    assert [e.decision for e in p.restored] == [Decision.ENDPOINT_RESTORED]
    assert not p.panic


def test_past_max_ejected_the_balancer_panics_over_all():
    s, clock, rng = make_set()
    counts, events = run(s, clock, rng, {"10.0.0.1:80", "10.0.0.2:80"}, 40)
    ejected = [e.endpoint for e in events if e.decision is Decision.ENDPOINT_EJECTED]
    assert sorted(ejected) == ["10.0.0.1:80", "10.0.0.2:80"]
    p = s.pick(clock.monotonic(), rng)
    assert p.panic and not p.none_usable              # 2 of 3 out > cap 1: all three balanced again
    keys = {s.pick(clock.monotonic(), rng).endpoint.key for _ in range(6)}
    assert keys == {"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"}


def test_all_ejected_is_panic_and_none_usable():
    s, clock, rng = make_set(2)
    run(s, clock, rng, {"10.0.0.1:80", "10.0.0.2:80"}, 20)
    p = s.pick(clock.monotonic(), rng)
    assert p.panic and p.none_usable and p.endpoint is not None


def test_unhealthy_endpoints_leave_rotation_within_the_cap():
    s, clock, rng = make_set()
    s.set_health("10.0.0.3:80", False)
    assert {s.pick(0, rng).endpoint.key for _ in range(10)} == {"10.0.0.1:80", "10.0.0.2:80"}


def test_a_cooled_endpoint_takes_nothing_until_its_time_and_then_returns():
    s, clock, rng = make_set(2)
    a = s.get("10.0.0.1:80")
    ev = s.cool_down(a, 2.0, clock.monotonic())
    assert ev.decision is Decision.ENDPOINT_COOLDOWN
    for _ in range(20):
        assert s.pick(clock.monotonic(), rng).endpoint.key == "10.0.0.2:80"
        clock.advance(0.099)
    clock.advance(0.03)                                # 2.01 s after the 429
    assert {s.pick(clock.monotonic(), rng).endpoint.key for _ in range(4)} == {"10.0.0.1:80", "10.0.0.2:80"}


def test_every_endpoint_cooling_down_gives_no_endpoint_and_the_earliest_end():
    s, clock, rng = make_set(2)
    s.cool_down(s.get("10.0.0.1:80"), 3.0, 1000.0)
    s.cool_down(s.get("10.0.0.2:80"), 1.5, 1000.0)
    p = s.pick(1000.0, rng)
    assert p.endpoint is None and p.cooled_until == 1001.5


def test_previous_hosts_go_elsewhere_when_they_can():
    s, clock, rng = make_set(3, balance="random")
    for _ in range(50):
        first = s.pick(0, rng).endpoint.key
        second = s.pick(0, rng, {first}).endpoint.key
        third = s.pick(0, rng, {first, second}).endpoint.key
        assert len({first, second, third}) == 3
        assert s.pick(0, rng, {first, second, third}).endpoint is not None   # all tried: any will do


def test_the_breaker_is_told_only_when_the_upstream_fails_as_a_whole():
    s, clock, rng = make_set(3)
    a, b, c = s.endpoints
    s.finish(a, True, 0.001, 0)
    assert not s.counts_for_breaker(b)                # a answered well: b's failure is b's alone
    s.finish(a, False, 0.001, 0)
    s.finish(b, False, 0.001, 0)
    s.finish(c, False, 0.001, 0)
    assert s.counts_for_breaker(b)                    # nobody answered well: the upstream is failing


def test_update_keeps_state_of_staying_endpoints_and_drops_gone_ones():
    s, clock, rng = make_set(3)
    b = s.get("10.0.0.2:80")
    for _ in range(3):
        s.finish(b, False, 0.001, 0)
    assert b.outlier.ejected
    added, removed = s.update([("10.0.0.2:80", 1, "dns", None), ("10.0.0.4:80", 1, "dns", None)], 0)
    assert added == ["10.0.0.4:80"] and sorted(removed) == ["10.0.0.1:80", "10.0.0.3:80"]
    assert s.get("10.0.0.2:80") is b and b.outlier.ejected and b.source == "dns"
    gone = [ep for ep in [s.get("10.0.0.1:80")] if ep]
    assert gone == []


def test_a_set_of_one_never_ejects_its_endpoint():
    s, clock, rng = make_set(1)
    ep = s.endpoints[0]
    assert all(s.finish(ep, False, 0.01, 0) is None for _ in range(10))
    assert not ep.outlier.ejected


def test_in_flight_and_share_on_the_snapshot():
    s, clock, rng = make_set(2, weights=[2, 1])
    a = s.get("10.0.0.1:80")
    s.start(a)
    snap = {row["endpoint"]: row for row in s.snapshot(clock.monotonic(), clock.time())}
    assert snap["10.0.0.1:80"]["in_flight"] == 1 and snap["10.0.0.1:80"]["share"] == 1.0
    assert snap["10.0.0.1:80"]["weight"] == 2 and snap["10.0.0.2:80"]["state"] == "active"


def test_a_fast_failure_never_makes_an_endpoint_look_fast():
    s, clock, rng = make_set(2)
    a = s.get("10.0.0.1:80")
    s.finish(a, True, 0.050, 1.0)
    before = a.ewma.rtt
    s.finish(a, False, 0.0005, 1.1)                   # a quick 503 or refused connect
    assert a.ewma.rtt == before
    s.finish(a, False, 0.500, 1.2)                    # a slow failure (a timeout) counts, as a peak
    assert a.ewma.rtt == 0.500


def test_every_endpoint_failing_its_checks_sends_nothing_but_ejected_ones_panic():
    s, clock, rng = make_set(2)
    for ep in s.endpoints:
        s.set_health(ep.key, False)
    p = s.pick(0, rng)
    assert p.endpoint is None and p.all_unhealthy
    assert s.pick(0, rng, ignore_health=True).endpoint is not None      # shadow mode sends anyway
    s.set_health("10.0.0.1:80", True)
    a = s.get("10.0.0.1:80")
    for _ in range(3):
        s.finish(a, False, 0.001, 0)
    p = s.pick(0, rng)                                # one ejected, one unhealthy: the ejected one, in panic
    assert p.panic and p.none_usable and p.endpoint is a


def test_a_streamed_answer_stays_in_flight_until_its_body_ends():
    s, clock, rng = make_set(2)
    a = s.get("10.0.0.1:80")
    s.start(a)
    s.finish(a, True, 0.01, 0, done=False)
    assert a.in_flight == 1
    s.done(a)
    assert a.in_flight == 0
    s.done(a)
    assert a.in_flight == 0


def test_the_steady_pick_steps_aside_while_any_endpoint_is_out_and_returns_when_all_are_back():
    """`pick_steady` (a first try's shortcut) answers only while every endpoint is in rotation and
    ready; an ejection, a failed check or a cooldown hands the pick to `pick`, and the shortcut comes
    back once `pick` has seen the set whole again."""
    s, clock, rng = make_set()
    assert s.pick_steady(clock.monotonic(), rng) is not None
    run(s, clock, rng, {"10.0.0.2:80"}, 30)                       # 10.0.0.2 ejected for 10 s
    assert s.pick_steady(clock.monotonic(), rng) is None
    clock.advance(10.0)
    assert s.pick_steady(clock.monotonic(), rng) is None           # not restored until a pick looks
    assert [e.decision for e in s.pick(clock.monotonic(), rng).restored] == [Decision.ENDPOINT_RESTORED]
    assert s.pick_steady(clock.monotonic(), rng) is not None
    s.set_health("10.0.0.3:80", False)
    assert s.pick_steady(clock.monotonic(), rng) is None
    s.set_health("10.0.0.3:80", True)
    assert s.pick_steady(clock.monotonic(), rng) is not None
    s.cool_down(s.get("10.0.0.1:80"), 2.0, clock.monotonic())
    assert s.pick_steady(clock.monotonic(), rng) is None
    clock.advance(2.0)
    assert s.pick_steady(clock.monotonic(), rng) is not None
