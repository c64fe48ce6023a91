import email.utils
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.core.retry import (FAILURES, IDEMPOTENT_METHODS, Backoff, method_retryable, outcome_retryable,
                                parse_retry_after)
from sidecar.grpc_rules import GrpcCode
from sidecar.policy.conditions import parse_when
from sidecar.policy.model import BackoffPolicy, RetryPolicy

# -- methods ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, key, expected", [
    ("GET", False, True), ("HEAD", False, True), ("OPTIONS", False, True), ("PUT", False, True),
    ("DELETE", False, True), ("TRACE", False, True),
    ("POST", False, False), ("PATCH", False, False), ("CONNECT", False, False),
    ("POST", True, True), ("PATCH", True, True),
    ("get", False, False),                     # methods are case-sensitive (RFC 9110 §9.1)
])
def test_default_methods_are_the_idempotent_ones_or_any_with_an_idempotency_key(method, key, expected):
    assert method_retryable(RetryPolicy(), method, key) is expected


def test_listed_methods_replace_the_default():
    policy = RetryPolicy(methods=frozenset({"POST"}))
    assert method_retryable(policy, "POST", False) is True
    assert method_retryable(policy, "GET", False) is False
    assert method_retryable(policy, "GET", True) is True
    assert IDEMPOTENT_METHODS == {"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"}


# -- outcomes ---------------------------------------------------------------------------------------

POLICY = RetryPolicy(when=parse_when(["connect-failure", "reset", "timeout", 429, 503]))


@pytest.mark.parametrize("kw, expected", [
    ({"failure": "connect-failure"}, True), ({"failure": "reset"}, True), ({"failure": "timeout"}, True),
    ({"failure": "protocol-error"}, False),
    ({"status": 429}, True), ({"status": 503}, True), ({"status": 502}, False), ({"status": 200}, False),
    ({"status": 500}, False),
    ({}, False),
    ({"failure": "protocol-error", "status": 503}, True),
])
def test_outcome_retryable(kw, expected):
    assert outcome_retryable(POLICY, **kw) is expected


def test_status_classes_come_from_the_conditions():
    policy = RetryPolicy(when=parse_when(["5xx"]))
    assert outcome_retryable(policy, status=500) and outcome_retryable(policy, status=599)
    assert not outcome_retryable(policy, status=429)
    gateway = RetryPolicy(when=parse_when(["gateway-error"]))
    assert [s for s in range(500, 505) if outcome_retryable(gateway, status=s)] == [502, 503, 504]


def test_default_policy_retries_connect_failures_and_gateway_errors():
    policy = RetryPolicy()
    assert outcome_retryable(policy, failure="connect-failure")
    assert outcome_retryable(policy, status=502)
    assert not outcome_retryable(policy, failure="timeout")


def test_a_failure_the_policy_does_not_list_is_not_retried():
    assert outcome_retryable(POLICY, failure="breaker-open") is False
    assert outcome_retryable(POLICY, failure="no-such-thing") is False
    assert FAILURES == {"connect-failure", "reset", "timeout", "protocol-error"}


# -- backoff ----------------------------------------------------------------------------------------

class Ceiling(random.Random):
    """An rng whose jitter always picks the top of the range: shows the envelope."""

    def uniform(self, a, b):
        return b


def test_envelope_doubles_from_base_and_stops_at_max():
    backoff = Backoff(BackoffPolicy(base=0.1, max=2.0), Ceiling())
    delays = [backoff.next_delay() for _ in range(10)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0, 2.0, 2.0])


@given(seed=st.integers(0, 2**32), base=st.floats(0.001, 1.0), factor=st.floats(1.0, 100.0))
def test_every_delay_is_within_zero_and_the_capped_exponential(seed, base, factor):
    policy = BackoffPolicy(base=base, max=base * factor)
    backoff = Backoff(policy, random.Random(seed))
    for n in range(40):
        delay = backoff.next_delay()
        assert 0.0 <= delay <= min(policy.max, policy.base * 2 ** n) + 1e-12


def test_seeded_rngs_give_the_same_delays():
    policy = BackoffPolicy(base=0.025, max=0.25)
    first = Backoff(policy, random.Random(7))
    second = Backoff(policy, random.Random(7))
    a = [first.next_delay() for _ in range(20)]
    assert a == [second.next_delay() for _ in range(20)]
    assert len(set(a)) == 20                             # it is jittered


def test_the_cap_is_reached_and_jitter_is_full():
    backoff = Backoff(BackoffPolicy(base=0.1, max=1.0), random.Random(3))
    for _ in range(5):
        backoff.next_delay()                             # past the cap from here on
    late = [backoff.next_delay() for _ in range(2000)]
    assert max(late) <= 1.0
    assert max(late) > 0.95 and min(late) < 0.05         # spread over the whole [0, max]
    assert 0.45 < sum(late) / len(late) < 0.55


def test_the_global_random_is_not_used():
    random.seed(123)
    state = random.getstate()
    backoff = Backoff(BackoffPolicy(), random.Random(1))
    for _ in range(10):
        backoff.next_delay()
    assert random.getstate() == state


def test_zero_base_means_no_delay():
    backoff = Backoff(BackoffPolicy(base=0.0, max=1.0), random.Random(1))
    assert [backoff.next_delay() for _ in range(3)] == [0.0, 0.0, 0.0]


# -- Retry-After ------------------------------------------------------------------------------------

NOW = 1_700_000_000.0


def http_date(at: float) -> str:
    return email.utils.formatdate(at, usegmt=True)


@pytest.mark.parametrize("value, expected", [
    ("120", 120.0), ("0", 0.0), (" 5 ", 5.0), ("1.5", 1.5), ("-3", 0.0),
])
def test_delay_seconds(value, expected):
    assert parse_retry_after(value, NOW) == expected


def test_http_date_in_the_future_and_the_past():
    assert parse_retry_after(http_date(NOW + 30), NOW) == 30.0
    assert parse_retry_after(http_date(NOW - 30), NOW) == 0.0


def test_obsolete_http_date_forms():
    at = email.utils.parsedate_to_datetime("Sun, 06 Nov 1994 08:49:37 GMT").timestamp()
    assert parse_retry_after("Sunday, 06-Nov-94 08:49:37 GMT", at - 10) == 10.0    # RFC 850
    assert parse_retry_after("Sun Nov  6 08:49:37 1994", at - 10) == 10.0          # asctime


@pytest.mark.parametrize("value", [
    "", "   ", "soon", "1e3", "inf", "nan", "12abc", "+5", "Mon, 99 Foo 2024",
    "Mon, 32 Jan 2024 00:00:00 GMT", "Sun, 06 Nov 99999 08:49:37 GMT",
])
def test_garbage_is_ignored(value):
    assert parse_retry_after(value, NOW) is None


def test_grpc_statuses_are_retried_only_when_listed():
    policy = RetryPolicy(when=parse_when(["grpc:unavailable", 503]))
    assert outcome_retryable(policy, status=200, grpc=GrpcCode.UNAVAILABLE)
    assert not outcome_retryable(policy, status=200, grpc=GrpcCode.INVALID_ARGUMENT)
    assert not outcome_retryable(policy, status=200, grpc=GrpcCode.OK)
    assert not outcome_retryable(RetryPolicy(), status=200, grpc=GrpcCode.UNAVAILABLE)   # the default lists none
