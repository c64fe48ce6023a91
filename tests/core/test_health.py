from sidecar.core.health import HealthState
from sidecar.policy.model import HealthCheck


def test_starts_healthy():
    assert HealthState(HealthCheck(path="/")).healthy is True


def test_flips_after_the_thresholds_and_reports_each_flip_once():
    state = HealthState(HealthCheck(path="/", unhealthy_after=2, healthy_after=3))
    assert state.record(True) is None
    assert state.record(False) is None
    assert state.record(False) is False
    assert state.healthy is False
    assert state.record(False) is None                  # still down: no news
    assert [state.record(True) for _ in range(3)] == [None, None, True]
    assert state.healthy is True


def test_an_interruption_restarts_the_streak():
    state = HealthState(HealthCheck(path="/", unhealthy_after=3, healthy_after=2))
    for ok in (False, False, True, False, False):
        assert state.record(ok) is None
    assert state.record(False) is False
    assert [state.record(ok) for ok in (True, False, True)] == [None, None, None]
    assert state.record(True) is True


def test_thresholds_of_one():
    state = HealthState(HealthCheck(path="/", unhealthy_after=1, healthy_after=1))
    assert state.record(False) is False
    assert state.record(True) is True
