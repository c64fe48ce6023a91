"""Retry layer: "would we retry?" is pure (core.retry); "may we?" spends the route's budget.

Follows Envoy's retry_state_impl split. Retries happen only before the first byte reaches the app (a
Reply here is headers only), only for methods the policy allows (or a gRPC status the policy lists),
and only for replayable bodies. A gRPC answer's status is known here when it came in the head
(trailers-only, as a server's error before any message is) or with the whole answer. A
`Retry-After` is honoured when it fits in the time left; backoff is exponential with full jitter.
"""
from __future__ import annotations

from sidecar.core.decisions import Decision
from sidecar.core.retry import Backoff, method_retryable, outcome_retryable, parse_retry_after
from sidecar.exchange.context import Handler
from sidecar.exchange.types import Call, Exchange, Reply
from sidecar.grpc_rules import GrpcCode
from sidecar.pipeline.grpc import reply_code
from sidecar.policy.conditions import Outcome
from sidecar.policy.model import RetryPolicy, Route
from sidecar.transport.errors import UpstreamFailure

# What counts as a failed try on a route with no `retry` block: the block's defaults.
DEFAULT_RETRY = RetryPolicy()


def retries(route: Route) -> bool:
    """Does the route retry at all (is the retry layer in its stack)?"""
    return route.retry is not None and route.retry.max_retries > 0


def listed_code(policy: RetryPolicy, reply: Reply) -> GrpcCode | None:
    """The answer's gRPC status, read only when `policy.when` lists gRPC statuses (else None)."""
    return reply_code(reply) if policy.when.grpc else None


def failed_answer(policy: RetryPolicy, reply: Reply) -> bool:
    """Is this answer a failed try as `policy.when` counts them (its HTTP or its gRPC status)?"""
    return outcome_retryable(policy, status=reply.status, grpc=listed_code(policy, reply))


def retries_exhausted(ex: Exchange, reply: Reply) -> bool:
    """`retries-exhausted` for `reply`: the primary's last try failed, as the route's
    `retry.when` counts failures, and no retry followed it. A route that retries decides it in the
    retry layer (every retry spent, or none allowed: method, body, budget, deadline); one that does
    not (no `retry`, `max_retries: 0`) has had its one try, so a failed answer meets it at once."""
    if ex.retries_exhausted:
        return True
    if retries(ex.route):
        return False
    return failed_answer(ex.route.retry or DEFAULT_RETRY, reply)


async def retry_layer(ex: Exchange, call: Call, next: Handler) -> Reply:
    policy = ex.route.retry
    assert policy is not None                # layers_for stacks this layer only on a route that retries
    budget = ex.state.budget
    if budget is not None:
        budget.on_request()
    ctx = ex.ctx
    # gRPC's own retryPolicy: listing a status code says a call failing with it may be sent again,
    # whatever the method (every gRPC call is a POST); other outcomes follow `retry.methods`.
    method_ok = method_retryable(policy, call.method, "idempotency-key" in ex.headers)
    backoff: Backoff | None = None
    retries = 0
    while True:
        reply: Reply | None = None
        failure: UpstreamFailure | None = None
        try:
            reply = await next(ex, call)
        except UpstreamFailure as exc:
            failure = exc
        grpc_listed = False
        if reply is not None:
            code = listed_code(policy, reply)
            grpc_listed = policy.when.matches_grpc(code)
            if not grpc_listed and not outcome_retryable(policy, status=reply.status):
                return reply
            what = f"{code.condition if grpc_listed and code is not None else reply.status} from {call.name}"
        else:
            assert failure is not None       # no answer: the try raised
            if failure.kind is Outcome.TIMEOUT:
                ex.decide(Decision.TIMEOUT, f"try {retries + 1} to {call.name} timed out", upstream=call.name)
            if not outcome_retryable(policy, failure=failure.kind):
                raise failure
            what = f"{failure.kind} from {call.name}"
        # The outcome is retryable: may we?
        allowed = call.body.replayable and (method_ok or grpc_listed)
        if not allowed or retries >= policy.max_retries:
            ex.retries_exhausted = True
            return _give_up(reply, failure)
        if backoff is None:
            backoff = Backoff(policy.backoff, ctx.rng)
        delay = backoff.next_delay()
        if reply is not None and policy.respect_retry_after and not reply.elsewhere:
            header = reply.headers.get("retry-after")
            hinted = parse_retry_after(header, ctx.clock.time()) if header else None
            if hinted is not None:
                if hinted >= ex.remaining():
                    ex.retries_exhausted = True
                    ex.decide(Decision.RETRY_AFTER, f"Retry-After {hinted:g}s exceeds the time left",
                              upstream=call.name)
                    return _give_up(reply, failure)
                ex.decide(Decision.RETRY_AFTER, f"waiting {hinted:g}s as {call.name} asked", upstream=call.name)
                delay = hinted
        if delay >= ex.remaining():
            ex.retries_exhausted = True
            return _give_up(reply, failure)
        if budget is not None and not budget.try_withdraw():
            ex.retries_exhausted = True
            ex.decide(Decision.RETRY_BUDGET_EXHAUSTED, f"{what}: retry budget spent", upstream=call.name,
                      budget_remaining=0.0)
            return _give_up(reply, failure)
        ex.decide(Decision.RETRY, f"{what}; retry {retries + 1} of {policy.max_retries}",
                  upstream=call.name, budget_remaining=budget.remaining() if budget is not None else None)
        if not ex.enforce:                   # shadow: the decision is recorded, the answer is forwarded
            return _give_up(reply, failure)
        if reply is not None:
            reply.release()
        if delay > 0:
            await ctx.sleep(delay)
        retries += 1


def _give_up(reply: Reply | None, failure: UpstreamFailure | None) -> Reply:
    if reply is not None:
        return reply
    assert failure is not None
    raise failure
