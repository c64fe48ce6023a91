import pytest

from sidecar.core.concurrency import ConcurrencyLimit


def test_admits_up_to_max():
    limit = ConcurrencyLimit(2)
    assert limit.try_acquire() and limit.try_acquire()
    assert limit.in_flight == 2
    assert limit.try_acquire() is False
    assert limit.in_flight == 2
    limit.release()
    assert limit.in_flight == 1
    assert limit.try_acquire() is True


def test_release_never_goes_below_zero():
    limit = ConcurrencyLimit(1)
    limit.release()
    assert limit.in_flight == 0
    assert limit.try_acquire() is True
    assert limit.try_acquire() is False


def test_max_must_be_positive():
    with pytest.raises(ValueError):
        ConcurrencyLimit(0)
