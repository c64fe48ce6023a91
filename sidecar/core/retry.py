"""Retry rules that spend nothing: which methods and outcomes are retryable, backoff, Retry-After.

Envoy's `RetryStateImpl` separates "would we retry?" (pure: the policy against the outcome) from "may
we?" (spends a budget). This module is the first half; `budget.RetryBudget.try_withdraw` is the second.
Backoff follows tenacity's `wait_random_exponential` / the AWS "full jitter" scheme: the randomness is an
injected `random.Random`, so tests are seeded and the pipeline owns the sleeping.
"""
from __future__ import annotations

import datetime as _dt
import email.utils
import random
import re
from typing import Iterator

import backoff as _backoff

from sidecar.grpc_rules import GrpcCode
from sidecar.policy.conditions import TRANSPORT_FAILURES, Outcome
from sidecar.policy.model import BackoffPolicy, RetryPolicy

# RFC 9110 §9.2.2: methods whose repetition has the same effect as one request.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

# Transport failures the transport layer reports; each is also a `when:` outcome name.
FAILURES = frozenset(TRANSPORT_FAILURES)


def method_retryable(policy: RetryPolicy, method: str, has_idempotency_key: bool) -> bool:
    """May a request with this method be sent twice? An `Idempotency-Key` makes any method safe.

    Methods compare case-sensitively, as RFC 9110 §9.1 defines them (the loader upper-cases the policy).
    """
    if has_idempotency_key:
        return True
    allowed = IDEMPOTENT_METHODS if policy.methods is None else policy.methods
    return method in allowed


def outcome_retryable(policy: RetryPolicy, *, status: int | None = None,
                      failure: Outcome | None = None, grpc: GrpcCode | None = None) -> bool:
    """Would this outcome be retried under `policy.when`? Pure: spends no budget, counts no attempt.

    `failure` is a transport failure name (see `FAILURES`); `status` a response status; `grpc` the
    answer's gRPC status when it is a gRPC answer whose status is known before its body (trailers-only,
    or the whole answer came with the head). Any one matching is enough; with none there is nothing to
    retry. A failure name the policy does not list (including
    one this module does not know) is simply not retried: a request must not fail on a name.
    """
    if failure is not None and policy.when.has(failure):
        return True
    if grpc is not None and policy.when.matches_grpc(grpc):
        return True
    return status is not None and policy.when.matches_status(status)


class Backoff:
    """The delays before retries 1, 2, 3...: `uniform(0, min(max, base * 2**n))` ("full jitter").

    Why full jitter: retries of many clients that failed together spread out instead of arriving in
    synchronised waves (AWS Architecture Blog, "Exponential Backoff and Jitter"; tenacity's
    `wait_random_exponential`). The exponential sequence is `backoff.expo`; the jitter draws from the
    injected `rng`, never the global `random`, so a seeded Random makes a test deterministic. One
    instance per request: it is the attempt counter.
    """
    __slots__ = ("_gen", "_rng")

    def __init__(self, policy: BackoffPolicy, rng: random.Random) -> None:
        self._rng = rng
        self._gen: Iterator[float] | None = None
        if policy.base > 0 and policy.max > 0:
            gen = _backoff.expo(base=2, factor=policy.base, max_value=policy.max)
            next(gen)             # backoff 2.x generators yield once (None) before the first value
            self._gen = gen

    def next_delay(self) -> float:
        if self._gen is None:
            return 0.0
        return self._rng.uniform(0.0, next(self._gen))


_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")


def parse_retry_after(value: str, now_wall: float) -> float | None:
    """Seconds to wait from a `Retry-After` value (RFC 9110 §10.2.3), or None when it is not one.

    Accepts delay-seconds and an HTTP-date (relative to `now_wall`, wall-clock seconds). A date in the
    past and a negative number mean "now" (0.0). Leniently also accepts a decimal number of seconds, as
    some servers send one; anything else is ignored (None), never an error.
    """
    text = value.strip()
    if not text:
        return None
    if _NUMBER.fullmatch(text):
        return max(0.0, float(text))
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:              # Python < 3.10 returned None for unparseable dates
        return None
    if when.tzinfo is None:       # "-0000": HTTP-dates are always GMT (RFC 9110 §5.6.7)
        when = when.replace(tzinfo=_dt.timezone.utc)
    try:
        return max(0.0, when.timestamp() - now_wall)
    except (OverflowError, ValueError, OSError):
        return None
