"""Per-request state that flows through the layers, and what the layers hand back.

    Exchange   one app request under one route: the target, the body, the deadline, the decisions made
    Call       what one target is sent (the primary, or a fallback upstream with its rewrite applied)
    Reply      an answer: status, headers and a body that is bytes or a not-yet-read stream
    Degraded   raised by a layer when it cannot answer; `outcome` is a `when:` Outcome

A layer is `async def layer(ex, call, next) -> Reply`; the route's stack is composed once in
pipeline/build.py. This package is the bottom of the data plane: it imports policy, core and telemetry
records, and every layer (pipeline, cache, queue, transport, proxy) imports it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Callable

from multidict import CIMultiDict
from yarl import URL

from sidecar.core.decisions import NOT_DEGRADING, Decision, DecisionRecord
from sidecar.policy.conditions import Outcome
from sidecar.telemetry.records import RequestRecord, TelemetrySink

if TYPE_CHECKING:
    from sidecar.exchange.body import RequestBody
    from sidecar.exchange.context import Context, EgressGuard
    from sidecar.exchange.state import RouteState
    from sidecar.policy.model import Route, Upstream


class Degraded(Exception):
    """A layer could not produce an answer. `status` is what the app gets if nothing else answers."""

    __slots__ = ("outcome", "status", "reason", "retry_after", "upstream")

    def __init__(self, outcome: Outcome, reason: str, *, status: int = 503, retry_after: float | None = None,
                 upstream: str | None = None) -> None:
        super().__init__(f"{outcome}: {reason}")
        self.outcome = Outcome(outcome)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after
        self.upstream = upstream


@dataclass(slots=True)
class Call:
    """One target's request. The primary's is built once per exchange; fallbacks build their own."""
    upstream: "Upstream | None"            # None: the original destination
    name: str                              # upstream name, or host:port of the original destination
    method: str
    url: URL
    headers: CIMultiDict[str]
    body: "RequestBody"
    server_hostname: str | None = None
    fallback_target: str | None = None     # label of the fallback target, for traces
    path_qs: str = "/"                     # path and query below the target's base path (`url`'s)
    tries: int = 0                         # tries sent to this target so far (resend count)
    # A balanced upstream (pipeline/balance.py): each try goes to one endpoint, and the target's Call
    # remembers which endpoints this request tried (Envoy's previous_hosts).
    tried: set[str] | None = None


@dataclass(slots=True)
class Reply:
    status: int
    headers: CIMultiDict[str]
    upstream: str                          # who answered: an upstream name, "cache", "static", "queue"
    body: bytes | None = None
    stream: AsyncIterator[bytes] | None = None
    cache_status: str | None = None
    # Called once: True when the body reached the app whole, False when it was cut, None when the
    # reply was discarded unsent (a retried or losing answer: no verdict on the upstream).
    on_done: list[Callable[[bool | None], None]] = field(default_factory=list)
    release_cb: Callable[[], None] | None = None
    endpoint: str | None = None            # host:port that answered, for a balanced upstream
    elsewhere: bool = False                # a 429 whose Retry-After binds only the endpoint that sent it
    # A 101: the transport's Response whose connection switched protocols (proxy/upgrade.py takes it).
    upgraded: object | None = None
    # HTTP/2 trailers (gRPC's status): known with the body when it was read whole, else set by the
    # stream when it ends. An HTTP/1.1 listener does not send them (see README, HTTP/2 and gRPC).
    trailers: CIMultiDict[str] | None = None

    def release(self) -> None:
        """Discard this reply without sending it (a retried or losing answer): free its connection."""
        if self.release_cb is not None:
            self.release_cb()
            self.release_cb = None
        self.finish(None)

    def finish(self, ok: bool | None) -> None:
        callbacks, self.on_done = self.on_done, []
        for cb in callbacks:
            cb(ok)


class Exchange:
    """The state of one app request as it crosses the route's stack."""

    __slots__ = ("route", "state", "ctx", "method", "url", "headers", "body", "deadline",
                 "record", "attempts", "enforce", "retries_exhausted", "cache_key", "primary_status",
                 "connect_to", "egress_guard")

    def __init__(self, *, route: Route, state: RouteState, ctx: Context, method: str, url: URL,
                 headers: CIMultiDict[str], body: RequestBody, deadline: float, record: RequestRecord,
                 egress_guard: EgressGuard | None = None) -> None:
        self.route = route
        self.state = state
        self.ctx = ctx                       # the policy generation and its services
        self.method = method
        self.url = url                       # the original destination (absolute)
        self.headers = headers               # hop-by-hop headers already dropped
        self.body = body
        self.deadline = deadline             # monotonic seconds
        self.record = record
        self.attempts = 0                    # tries sent to upstreams, fallbacks included
        self.enforce = route.mode == "enforce"
        self.retries_exhausted = False
        self.cache_key: str | None = None
        self.primary_status: int | None = None
        # Transparent mode: the address the app connected to (SO_ORIGINAL_DST). A call with no upstream
        # connects there, whatever the Host header says; `url` keeps the Host for routes, keys, traces.
        self.connect_to: tuple[str, int] | None = None
        # Proxy listener, route without `allow_internal`: the sidecar's own ports, refused (with
        # link-local addresses) on every address a passthrough call's host resolves to.
        self.egress_guard = egress_guard

    def remaining(self) -> float:
        return self.deadline - self.ctx.clock.monotonic()

    def decide(self, decision: Decision, reason: str, *, upstream: str | None = None,
               breaker_state: str | None = None, budget_remaining: float | None = None,
               fallback_target: str | None = None) -> DecisionRecord:
        return record_decision(self.ctx.sink, self.record, decision, reason, upstream=upstream,
                               breaker_state=breaker_state, budget_remaining=budget_remaining,
                               fallback_target=fallback_target)

    def degraded_names(self) -> list[str]:
        """The decisions the app is told about in `x-sidecar-degraded`, in order, without repeats."""
        seen: list[str] = []
        for rec in self.record.decisions:
            name = rec.decision.value
            if rec.decision not in NOT_DEGRADING and name not in seen:
                seen.append(name)
        return seen


def record_decision(sink: TelemetrySink, record: RequestRecord, decision: Decision, reason: str, *,
                    upstream: str | None = None, breaker_state: str | None = None,
                    budget_remaining: float | None = None,
                    fallback_target: str | None = None) -> DecisionRecord:
    """A decision about one request: on its record (for the trace) and to the sink as it happens."""
    rec = DecisionRecord(
        decision=decision, route=record.route, upstream=upstream, reason=reason, at=time.time(),
        breaker_state=breaker_state, budget_remaining=budget_remaining, fallback_target=fallback_target,
        policy_version=record.policy_version, trace_id=record.trace_id, span_id=record.span_id)
    record.decisions.append(rec)
    record.decision_ns.append(time.time_ns())
    sink.decision(rec)
    return rec
