"""The health of one upstream from its active checks, with hysteresis.

Why hysteresis: one lost probe should not eject an upstream, nor one lucky probe bring back a broken
one. Like Envoy's `unhealthy_threshold` / `healthy_threshold` (and Kubernetes probes'
`failureThreshold` / `successThreshold`), health flips only after `unhealthy_after` consecutive failures
or `healthy_after` consecutive passes. Before any check the upstream counts as healthy, so a sidecar
that just started sends traffic instead of failing everything until the first probe returns.
"""
from __future__ import annotations

from sidecar.policy.model import HealthCheck


class HealthState:
    __slots__ = ("check", "_healthy", "_passes", "_failures")

    def __init__(self, check: HealthCheck) -> None:
        self.check = check
        self._healthy = True
        self._passes = 0
        self._failures = 0

    @property
    def healthy(self) -> bool:
        return self._healthy

    def record(self, ok: bool) -> bool | None:
        """One check result; returns the new health when it flips, else None."""
        if ok:
            self._failures = 0
            self._passes += 1
            if not self._healthy and self._passes >= max(1, self.check.healthy_after):
                self._healthy = True
                self._passes = 0
                return True
        else:
            self._passes = 0
            self._failures += 1
            if self._healthy and self._failures >= max(1, self.check.unhealthy_after):
                self._healthy = False
                self._failures = 0
                return False
        return None
