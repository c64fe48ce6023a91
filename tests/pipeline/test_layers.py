"""Each pipeline layer alone, with a fake `next` (tests/pipeline/layerkit.py)."""
import pytest

from layerkit import Next, Store, context, decided, exchange, reply
from sidecar.exchange.types import Degraded
from sidecar.pipeline.breaker import breaker_layer
from sidecar.grpc_rules import GrpcCode
from sidecar.pipeline.failure import Failure
from sidecar.pipeline.fallback import fallback_layer
from sidecar.pipeline.guards import concurrency_layer, fault_layer, rate_limit_layer
from sidecar.pipeline.retry import retry_layer
from sidecar.pipeline.storeforward import queue_layer
from sidecar.policy.conditions import Outcome, parse_when
from sidecar.transport.errors import UpstreamFailure


async def test_retry_tries_again_after_the_backoff_and_returns_the_good_answer(tmp_path):
    ctx = context(tmp_path, "retry: {max_retries: 2, backoff: {base: 100ms, max: 1s}}")
    ex, call = exchange(ctx)
    nxt = Next(reply(503), UpstreamFailure(Outcome.RESET, "cut"), reply(200))
    answer = await retry_layer(ex, call, next=nxt)
    assert answer.status == 200 and nxt.calls == 3
    assert decided(ex) == ["retry", "retry"]
    assert len(ctx.sleep.asked) == 2 and all(0 <= s <= 1.0 for s in ctx.sleep.asked)
    assert not ex.retries_exhausted


async def test_retry_gives_up_when_retries_are_spent_and_says_so(tmp_path):
    ctx = context(tmp_path, "retry: {max_retries: 1, backoff: {base: 1ms, max: 2ms}}")
    ex, call = exchange(ctx)
    answer = await retry_layer(ex, call, next=Next(reply(503), reply(502)))
    assert answer.status == 502 and ex.retries_exhausted


async def test_retry_leaves_a_post_alone_unless_allowed(tmp_path):
    ctx = context(tmp_path, "retry: {max_retries: 2}")
    ex, call = exchange(ctx, method="POST", body=b"{}")
    nxt = Next(reply(503))
    assert (await retry_layer(ex, call, next=nxt)).status == 503
    assert nxt.calls == 1 and ex.retries_exhausted and decided(ex) == []


async def test_an_open_breaker_rejects_without_calling_next(tmp_path):
    ctx = context(tmp_path, "breaker: {consecutive_failures: 2, open_for: 10s}")
    ex, call = exchange(ctx)
    for _ in range(2):
        assert (await breaker_layer(ex, call, next=Next(reply(500)))).status == 500
    nxt = Next()
    with pytest.raises(Degraded) as raised:
        await breaker_layer(ex, call, next=nxt)
    assert raised.value.outcome is Outcome.BREAKER_OPEN and nxt.calls == 0
    assert decided(ex) == ["breaker_opened", "breaker_open"]


async def test_rate_limit_and_concurrency_refuse_with_their_outcomes(tmp_path):
    ctx = context(tmp_path, "rate_limit: {per_second: 1, burst: 1}\n")
    ex, call = exchange(ctx)
    assert (await rate_limit_layer(ex, call, next=Next(reply(200)))).status == 200
    with pytest.raises(Degraded) as raised:
        await rate_limit_layer(ex, call, next=Next())
    assert raised.value.outcome is Outcome.RATE_LIMITED and raised.value.status == 429

    ctx = context(tmp_path, "concurrency: {max: 1}\n")
    ex, call = exchange(ctx)
    held = await concurrency_layer(ex, call, next=Next(reply(200)))   # in flight until finished
    with pytest.raises(Degraded) as raised:
        await concurrency_layer(ex, call, next=Next())
    assert raised.value.outcome is Outcome.CONCURRENCY_FULL
    held.finish(True)
    assert (await concurrency_layer(ex, call, next=Next(reply(200)))).status == 200


async def test_fault_abort_answers_without_calling_next(tmp_path):
    ctx = context(tmp_path, "fault: {abort: {status: 503, percent: 100}}\n")
    ex, call = exchange(ctx)
    nxt = Next()
    answer = await fault_layer(ex, call, next=nxt)
    assert answer.status == 503 and answer.upstream == "fault" and nxt.calls == 0
    assert decided(ex) == ["fault_injected"]


async def test_fallback_answers_static_for_a_matching_failure_and_passes_other_answers(tmp_path):
    ctx = context(tmp_path, """
        fallback:
          when: [connect-failure, 503]
          targets: [{static: {status: 200, json: {from: static}}}]
        """)
    ex, call = exchange(ctx)
    answer = await fallback_layer(ex, call, next=Next(UpstreamFailure(Outcome.CONNECT_FAILURE, "refused")))
    assert answer.status == 200 and answer.upstream == "static" and decided(ex) == ["static_response"]
    ex, call = exchange(ctx)
    assert (await fallback_layer(ex, call, next=Next(reply(404)))).status == 404
    ex, call = exchange(ctx)
    assert (await fallback_layer(ex, call, next=Next(reply(503)))).upstream == "static"


async def test_fallback_on_retries_exhausted_without_a_retry_block(tmp_path):
    ctx = context(tmp_path, """
        fallback: {when: [retries-exhausted], targets: [{static: {status: 200}}]}
        """)
    ex, call = exchange(ctx)
    assert (await fallback_layer(ex, call, next=Next(reply(503)))).upstream == "static"
    ex, call = exchange(ctx)
    assert (await fallback_layer(ex, call, next=Next(reply(500)))).status == 500   # 500 is not retried


def grpc_reply(code: int | None, http: int = 200, content_type: str = "application/grpc"):
    answer = reply(http, **{"content-type": content_type})
    if code is not None:
        answer.headers["grpc-status"] = str(code)           # trailers-only: the status in the head
    return answer


async def test_retry_on_a_listed_grpc_status_whatever_the_method(tmp_path):
    ctx = context(tmp_path, "retry: {max_retries: 3, when: [grpc:unavailable], backoff: {base: 1ms, max: 2ms}}")
    ex, call = exchange(ctx, method="POST", headers={"content-type": "application/grpc"})
    nxt = Next(grpc_reply(14), grpc_reply(14), grpc_reply(None))        # OK comes in the trailers
    answer = await retry_layer(ex, call, next=nxt)
    assert nxt.calls == 3 and "grpc-status" not in answer.headers and not ex.retries_exhausted
    assert [d.reason.split(";")[0] for d in ex.record.decisions] == ["grpc:unavailable from svc"] * 2
    ex, call = exchange(ctx, method="POST")
    nxt = Next(grpc_reply(3), grpc_reply(14, content_type="application/json"), grpc_reply(None))
    assert await retry_layer(ex, call, next=nxt) and nxt.calls == 1      # INVALID_ARGUMENT is not listed
    assert await retry_layer(ex, call, next=nxt) and nxt.calls == 2      # not a gRPC answer: no gRPC status


async def test_fallback_and_queue_conditions_on_grpc_statuses(tmp_path):
    ctx = context(tmp_path, """
        retry: {max_retries: 1, when: [grpc:unavailable], backoff: {base: 1ms, max: 2ms}}
        fallback: {when: [grpc:resource-exhausted, retries-exhausted], targets: [{static: {grpc_status: 14}}]}
        """)
    ex, call = exchange(ctx, method="POST")
    assert (await fallback_layer(ex, call, next=Next(grpc_reply(8)))).upstream == "static"
    ex, call = exchange(ctx, method="POST")
    assert (await fallback_layer(ex, call, next=Next(grpc_reply(5)))).upstream == "svc"   # NOT_FOUND: the app's
    ex, call = exchange(ctx, method="POST")
    stack = lambda ex, call: retry_layer(ex, call, next=Next(grpc_reply(14), grpc_reply(14)))
    assert (await fallback_layer(ex, call, next=stack)).upstream == "static"              # retries exhausted
    failure = Failure(None, 200, "grpc:unavailable from svc", reply=grpc_reply(14), grpc=GrpcCode.UNAVAILABLE)
    assert failure.matches(parse_when(["grpc:unavailable"]), ex)                           # as queue.when sees it
    assert not failure.matches(parse_when(["grpc:internal", "5xx"]), ex)


class Released:
    """A failed answer that knows whether it was released (its connection given back)."""

    def __init__(self, status: int) -> None:
        self.reply = reply(status)
        self.released = False
        self.reply.release_cb = self._release

    def _release(self) -> None:
        self.released = True


async def test_queue_stores_a_failed_write_and_answers_202_reads_pass(tmp_path):
    store = Store()
    ctx = context(tmp_path, "queue: {when: [connect-failure, 503]}", queue=store)
    ex, call = exchange(ctx, method="POST", body=b"{}")
    failed = Released(503)
    answer = await queue_layer(ex, call, next=Next(failed.reply))
    assert answer.status == 202 and failed.released and store.taken == ["503 from svc"]
    ex, call = exchange(ctx, method="PUT", body=b"{}")
    answer = await queue_layer(ex, call, next=Next(UpstreamFailure(Outcome.CONNECT_FAILURE, "refused")))
    assert answer.status == 202 and store.taken[-1].startswith("connect-failure")
    ex, call = exchange(ctx, method="GET")
    assert (await queue_layer(ex, call, next=Next(reply(503)))).status == 503   # a read is never queued
    ex, call = exchange(ctx, method="POST", body=b"{}")
    assert (await queue_layer(ex, call, next=Next(reply(500)))).status == 500   # 500 is not listed
    assert len(store.taken) == 2


async def test_a_full_queue_hands_the_failure_on_unchanged(tmp_path):
    ctx = context(tmp_path, "queue: {when: [connect-failure, 503]}", queue=Store(full=True))
    ex, call = exchange(ctx, method="POST", body=b"{}")
    assert (await queue_layer(ex, call, next=Next(reply(503)))).status == 503
    ex, call = exchange(ctx, method="POST", body=b"{}")
    with pytest.raises(UpstreamFailure):
        await queue_layer(ex, call, next=Next(UpstreamFailure(Outcome.CONNECT_FAILURE, "refused")))


async def test_a_write_is_queued_before_any_fallback_target_and_a_read_falls_back(tmp_path):
    store = Store()
    ctx = context(tmp_path, """
        queue: {when: [503]}
        fallback: {when: [503], targets: [{static: {status: 200}}]}
        """, queue=store)
    # fallback over queue, as build.py composes them
    stack = lambda nxt: (lambda ex, call: fallback_layer(ex, call, next=lambda e, c: queue_layer(e, c, next=nxt)))
    ex, call = exchange(ctx, method="POST", body=b"{}")
    assert (await stack(Next(reply(503)))(ex, call)).status == 202 and decided(ex) == []
    ex, call = exchange(ctx, method="GET")
    assert (await stack(Next(reply(503)))(ex, call)).upstream == "static"
    from sidecar.pipeline.build import layers_for
    assert [f.__name__ for f in layers_for(ctx.policy.routes[0])][:2] == ["fallback_layer", "queue_layer"]
