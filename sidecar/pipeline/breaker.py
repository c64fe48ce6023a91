"""Breaker layer: one circuit breaker per (route, target upstream), and the upstream's active health.

An unhealthy upstream (failing its health checks) or an open breaker rejects at once, without touching
the network, so the fallback chain answers in microseconds. Success is decided when the body has reached
the app whole: a stream cut mid-way counts as a failure (SPEC "What the application sees").
"""
from __future__ import annotations

from sidecar.core.breaker import Transition, transition_decision
from sidecar.core.decisions import Decision
from sidecar.grpc_rules import SERVER_FAULTS
from sidecar.exchange.context import Handler
from sidecar.exchange.types import Call, Degraded, Exchange, Reply
from sidecar.pipeline.grpc import reply_code
from sidecar.policy.conditions import Outcome
from sidecar.transport.errors import UpstreamFailure

def note_transition(ex: Exchange, target: str, transition: Transition | None) -> None:
    if transition is not None:
        ex.decide(transition_decision(transition), transition.reason, upstream=target,
                  breaker_state=transition.new.value)


async def breaker_layer(ex: Exchange, call: Call, next: Handler) -> Reply:
    health = ex.ctx.health.get(call.name)
    if health is not None and not health.healthy:
        ex.decide(Decision.UPSTREAM_UNHEALTHY, "failing its active health check", upstream=call.name,
                  breaker_state="open")
        if ex.enforce:
            raise Degraded(Outcome.UPSTREAM_UNHEALTHY, f"upstream {call.name} is unhealthy", upstream=call.name)
    breaker = ex.state.breaker(call.name)
    if breaker is None:
        return await next(ex, call)
    admitted, transition = breaker.admit()
    note_transition(ex, call.name, transition)
    if not admitted:
        ex.decide(Decision.BREAKER_OPEN, "circuit open: rejected without calling the upstream",
                  upstream=call.name, breaker_state=breaker.state.value)
        if ex.enforce:
            raise Degraded(Outcome.BREAKER_OPEN, f"circuit breaker for {call.name} is open", upstream=call.name)
        return await next(ex, call)
    clock = ex.ctx.clock
    started = clock.monotonic()
    try:
        reply = await next(ex, call)
    except UpstreamFailure as failure:
        if _outlier_only(ex, call, failure.endpoint):
            breaker.release()
        else:
            note_transition(ex, call.name, breaker.record(False, clock.monotonic() - started))
        raise
    except BaseException:
        # Cancelled (a losing hedge) or no outcome: not counted, unless it was already slow.
        note_transition(ex, call.name, breaker.abandon(clock.monotonic() - started))
        raise
    elapsed = clock.monotonic() - started
    if reply.status >= 500 or reply_code(reply) in SERVER_FAULTS:
        if _outlier_only(ex, call, reply.endpoint):
            breaker.release()
        else:
            note_transition(ex, call.name, breaker.record(False, elapsed))
    else:
        def _done(ok: bool | None) -> None:
            if ok is None:
                breaker.release()
            else:
                if ok and reply_code(reply) in SERVER_FAULTS:   # a gRPC status from the trailers
                    ok = False
                note_transition(ex, call.name, breaker.record(ok, elapsed))
        reply.on_done.append(_done)
    return reply


def _outlier_only(ex: Exchange, call: Call, endpoint: str | None) -> bool:
    """A balanced upstream's failure that is one endpoint's (`endpoint`, the key pipeline/balance.py
    put on the reply or the failure), not the upstream's: another endpoint in rotation answered well
    last. Outlier detection deals with it; the breaker does not count it."""
    if endpoint is None:
        return False
    group = ex.ctx.endpoints.get(call.name)
    ep = None if group is None else group.set.get(endpoint)
    return ep is not None and not group.set.counts_for_breaker(ep)
