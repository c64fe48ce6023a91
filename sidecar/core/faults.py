"""Fault injection: decide, per request, whether to add a delay and whether to abort.

Why: to rehearse an outage (does the fallback chain really answer?) without breaking the upstream.
Follows Envoy's HTTP fault filter: a delay and an abort, each with its own percentage, drawn
independently, so one request may get both (delayed, then aborted). The draw uses the injected `rng`;
the pipeline does the sleeping and checks `policy.header` (the request filter) before calling this.
"""
from __future__ import annotations

import random

from sidecar.policy.model import FaultPolicy


def _hit(percent: float, rng: random.Random) -> bool:
    # random() is in [0, 1): 0% never hits, 100% always does.
    return rng.random() * 100.0 < percent


def decide_fault(policy: FaultPolicy, rng: random.Random) -> tuple[float, int | None]:
    """(delay seconds or 0.0, abort status or None) for one request."""
    delay = 0.0
    if policy.delay is not None and _hit(policy.delay.percent, rng):
        delay = policy.delay.duration
    abort = None
    if policy.abort is not None and _hit(policy.abort.percent, rng):
        abort = policy.abort.status
    return delay, abort
