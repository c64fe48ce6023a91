"""The decision vocabulary and the frozen record every degradation decision becomes.

One vocabulary (SPEC "Decisions") is used alike in `x-sidecar-degraded`, span events, metric labels
and the admin event feed. Records go to a `DecisionSink`; telemetry implements sinks.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol


class Decision(str, enum.Enum):
    RETRY = "retry"
    RETRY_BUDGET_EXHAUSTED = "retry_budget_exhausted"
    RETRY_AFTER = "retry_after"
    HEDGE = "hedge"
    TIMEOUT = "timeout"
    BREAKER_OPEN = "breaker_open"
    BREAKER_OPENED = "breaker_opened"
    BREAKER_HALF_OPEN = "breaker_half_open"
    BREAKER_CLOSED = "breaker_closed"
    CONCURRENCY_FULL = "concurrency_full"
    FALLBACK = "fallback"
    CACHE_HIT = "cache_hit"
    CACHE_STALE = "cache_stale"
    CACHE_REVALIDATE = "cache_revalidate"
    STATIC_RESPONSE = "static_response"
    QUEUED = "queued"
    QUEUE_DELIVERED = "queue_delivered"
    QUEUE_EXPIRED = "queue_expired"
    FAULT_INJECTED = "fault_injected"
    RATE_LIMITED = "rate_limited"
    RATE_LIMIT_LOCAL = "rate_limit_local"      # extension: a global limit decided by this pod's bucket
    QUEUE_UNAVAILABLE = "queue_unavailable"    # extension: the queue's store could not take the write
    UPSTREAM_UNHEALTHY = "upstream_unhealthy"
    UPSTREAM_HEALTHY = "upstream_healthy"
    ENDPOINT_EJECTED = "endpoint_ejected"
    ENDPOINT_RESTORED = "endpoint_restored"
    ENDPOINT_COOLDOWN = "endpoint_cooldown"
    BALANCER_PANIC = "balancer_panic"
    UNMATCHED_DENIED = "unmatched_denied"
    CONFIG_RELOADED = "config_reloaded"
    CONFIG_REJECTED = "config_rejected"

    def __str__(self) -> str:  # so f-strings and header joins print the wire name
        return self.value


# Decisions that do not by themselves make an answer "degraded" for the application: a fresh cache hit
# is the cache doing its job.
NOT_DEGRADING = frozenset({Decision.CACHE_HIT})


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    decision: Decision
    route: str
    upstream: str | None
    reason: str
    at: float                              # wall-clock seconds (time.time())
    breaker_state: str | None = None
    budget_remaining: float | None = None
    fallback_target: str | None = None
    policy_version: str | None = None
    trace_id: str | None = None            # 32 hex digits, when the decision belongs to a request
    span_id: str | None = None

    def as_dict(self) -> dict[str, float | str | None]:
        out = {"decision": self.decision.value, "route": self.route, "upstream": self.upstream,
               "reason": self.reason, "at": self.at}
        for key in ("breaker_state", "budget_remaining", "fallback_target", "policy_version",
                    "trace_id", "span_id"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


class DecisionSink(Protocol):
    def decision(self, record: DecisionRecord) -> None: ...
