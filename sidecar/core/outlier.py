"""Outlier detection for one endpoint (Envoy's consecutive-failures detector). No I/O; time is passed in.

    in service --`consecutive_failures` in a row--> ejected for eject_for x n (n: its recent ejections)
    ejected    --the time has passed, next look--> in service (restored)

Why the ejection grows linearly: that is Envoy's `base_ejection_time x number of ejections`, capped by
`max_ejection_time`. An endpoint that has stayed in service earns it back: the multiplier drops by one for
every `eject_for` it served since its last restore (Envoy decrements it on each healthy interval), so a
pod that failed once last week is not ejected for five minutes today.

How many of a set may be out at once (`max_ejected`) is the set's business (core/endpoints.py): an
ejection is always recorded here, and the set decides whether the balancer may honour it.
"""
from __future__ import annotations

from sidecar.policy.model import OutlierPolicy


class Outlier:
    __slots__ = ("failures", "ejected_until", "ejections", "restored_at")

    def __init__(self) -> None:
        self.failures = 0                      # consecutive failures while in service
        self.ejected_until: float | None = None
        self.ejections = 0                     # the multiplier of the next ejection, minus one
        self.restored_at: float | None = None

    @property
    def ejected(self) -> bool:
        return self.ejected_until is not None

    def success(self) -> None:
        self.failures = 0

    def failure(self, policy: OutlierPolicy, now: float) -> float | None:
        """Count a failure; returns how long the endpoint is ejected for when this one ejects it."""
        if self.ejected_until is not None:
            return None                        # already out (a late answer, or traffic in panic)
        self.failures += 1
        limit = policy.consecutive_failures
        if limit <= 0 or self.failures < limit:
            return None
        if self.ejections and self.restored_at is not None and policy.eject_for > 0:
            earned = int((now - self.restored_at) // policy.eject_for)
            self.ejections = max(0, self.ejections - earned)
        self.ejections += 1
        duration = min(policy.eject_for * self.ejections, max(policy.max_eject_for, policy.eject_for))
        self.ejected_until = now + duration
        self.failures = 0
        return duration

    def restore_due(self, now: float) -> bool:
        """Bring the endpoint back if its time is up; True when it came back on this call."""
        until = self.ejected_until
        if until is None or now < until:
            return False
        self.ejected_until = None
        self.restored_at = now
        self.failures = 0
        return True


def ejection_cap(size: int, policy: OutlierPolicy | None) -> int:
    """How many of `size` endpoints may be out of rotation before the balancer panics.

    As Envoy's `max_ejection_percent`, with its "at least one host" rule for sets of two or more; a set
    of one never takes its only endpoint out (the route's breaker judges it)."""
    if size <= 1:
        return 0
    percent = 50.0 if policy is None else policy.max_ejected
    if percent <= 0:
        return 0
    return max(1, int(size * percent / 100.0 + 1e-9))
