"""LLM tokens per minute shared through a real redis-server: one token bucket per key value (GCRA,
N tokens deep, refilled at N/60 per second), estimates reserved before the call and the difference
charged or refunded when the usage is known; Redis down: this pod's sliding windows decide.

Redis's clock refills 1000/60 ≈ 17 tokens a second while a test runs: every refusal below is at least
100 tokens (6 s) away from being admitted, so the counts hold on a slow machine."""
import asyncio

import aiohttp

from harness import ports
from llm.llm_upstreams import LlmApi
from sidecar.core.clock import FakeClock
from sidecar.core.ratelimit import ALLOW
from sidecar.fleet.link import Links
from sidecar.fleet.tokenlimit import make_token_limiter
from sidecar.policy.model import RateLimitPolicy


async def charged(limiter) -> None:
    """Wait (a hang guard, not a threshold) until the usage charges are written to Redis."""
    async def idle():
        while limiter.stats()["charges_pending"]:
            await asyncio.sleep(0.01)
    await asyncio.wait_for(idle(), 5)


async def test_tokens_spent_through_one_replica_count_on_the_other(redis_url):
    policy = RateLimitPolicy(tokens_per_minute=1000, key="x-tenant", store=redis_url)
    a_links, b_links = Links(), Links()
    a = make_token_limiter("llm", policy, FakeClock(), a_links)
    b = make_token_limiter("llm", policy, FakeClock(), b_links)
    try:
        for _ in range(3):
            admitted = await a.admit("acme", 300)
            assert admitted.verdict == ALLOW
            admitted.settle(300)
        refused = (await b.admit("acme", 300)).verdict
        assert not refused.allowed and not refused.decided_locally
        assert 6 < refused.retry_after <= 12          # 200 tokens over, refilled at 1000/60 per second
        assert b.stats()["spent"] == 0                # b's own windows never saw acme: Redis refused
        assert (await b.admit("zeta", 300)).verdict == ALLOW
        keys = await a_links.get(redis_url).client.keys("sidecar-tpm:llm:*")
        assert len(keys) == 2 and not any(b"acme" in k or b"zeta" in k for k in keys)
    finally:
        await a_links.close()
        await b_links.close()


async def test_usage_above_the_estimate_is_debt_and_below_it_is_refunded(redis_url):
    links = Links()
    limiter = make_token_limiter("llm", RateLimitPolicy(tokens_per_minute=1000, store=redis_url),
                                 FakeClock(), links)
    try:
        first = await limiter.admit("", 100)
        first.settle(1500)                            # the answer used 1,400 more than max_tokens said
        await charged(limiter)
        in_debt = (await limiter.admit("", 1)).verdict
        assert not in_debt.allowed and 20 < in_debt.retry_after <= 30.1   # 501 tokens over: ~30 s

        refunded = make_token_limiter("other", RateLimitPolicy(tokens_per_minute=1000, store=redis_url),
                                      FakeClock(), links)
        big = await refunded.admit("", 900)
        assert (await refunded.admit("", 200)).verdict.allowed is False    # 900 reserved in flight
        big.settle(100)                               # it spent 100: 800 given back
        await charged(refunded)
        assert (await refunded.admit("", 850)).verdict == ALLOW
    finally:
        await links.close()


async def test_a_failed_call_gives_its_whole_reservation_back(redis_url):
    """A refund as large as the reservation lands (by the time it is charged) below Redis's clock: the
    bucket is full again, not an error that would make the link back off."""
    links = Links()
    limiter = make_token_limiter("llm", RateLimitPolicy(tokens_per_minute=1000, store=redis_url),
                                 FakeClock(), links)
    try:
        failed = await limiter.admit("", 1000)
        assert (await limiter.admit("", 100)).verdict.allowed is False
        failed.settle(0)                              # no usage: an error answer, or not an LLM call
        await charged(limiter)
        assert (await limiter.admit("", 1000)).verdict == ALLOW
        assert limiter.stats()["fallbacks"] == 0 and limiter.stats()["available"]
    finally:
        await links.close()


async def test_redis_down_this_pods_windows_decide(redis_module, redis_url):
    clock = FakeClock()
    links = Links(clock)
    limiter = make_token_limiter("llm", RateLimitPolicy(tokens_per_minute=1000, store=redis_url), clock, links)
    try:
        shared = await limiter.admit("", 300)
        assert shared.verdict == ALLOW
        shared.settle(300)                            # this pod's window keeps its share: 300
        redis_module.stop()
        verdicts = []
        for _ in range(3):
            admission = await asyncio.wait_for(limiter.admit("", 300), 5)
            verdicts.append(admission.verdict)
            if admission.settle is not None:
                admission.settle(300)
        assert all(v.decided_locally and "global limit store" in v.local_reason for v in verdicts)
        assert [v.allowed for v in verdicts] == [True, True, False]     # 300 + 300 + 300, then 1,200 > 1,000
        assert limiter.stats()["fallbacks"] >= 3
    finally:
        redis_module.start()
        await links.close()


def policy(port, upstream, redis_url):
    return f"""
    version: 1
    listeners:
      - {{name: api, mode: reverse, port: {port['reverse']}, upstream: llm}}
    admin: {{port: {port['admin']}}}
    health: {{bind: 127.0.0.1, port: {port['health']}}}
    upstreams:
      llm: {{url: "{upstream}"}}
    routes:
      - name: chat
        match: {{path_prefix: /v1/}}
        upstream: llm
        rate_limit: {{tokens_per_minute: 1000, key: "header:x-tenant", store: "{redis_url}"}}
    """


async def test_two_sidecars_share_one_tokens_per_minute(upstream_factory, sidecar_factory, redis_url):
    api = LlmApi(input_tokens=100, output_tokens=200)           # every answer: 300 tokens
    upstream = await upstream_factory(api)
    a, b = ports(), ports()
    await sidecar_factory(policy(a, upstream.url, redis_url))
    await sidecar_factory(policy(b, upstream.url, redis_url))
    async with aiohttp.ClientSession() as s:
        async def post(sidecar, tenant, max_tokens, stream=False):
            body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
                    "stream": stream, "stream_options": {"include_usage": True}}
            async with s.post(f"http://127.0.0.1:{sidecar['reverse']}/v1/chat/completions", json=body,
                              headers={"x-tenant": tenant}) as r:
                return r.status, r.headers.copy(), await r.read()

        async def tokens(sidecar):
            async with s.get(f"http://127.0.0.1:{sidecar['admin']}/status") as r:
                return next(x for x in (await r.json())["routes"] if x["name"] == "chat")["tokens_per_minute"]

        async def settled(sidecar, spent):
            """Until this sidecar settled its calls and wrote their charges (a hang guard)."""
            async def done():
                while (t := await tokens(sidecar))["spent"] != spent or t["charges_pending"]:
                    await asyncio.sleep(0.02)
            await asyncio.wait_for(done(), 10)

        assert [(await post(a, "acme", 300, stream=i == 1))[0] for i in range(3)] == [200, 200, 200]
        status, headers, text = await post(b, "acme", 300)      # b never served acme
        assert status == 429 and 1 <= int(headers["retry-after"]) <= 60
        assert headers["x-sidecar-degraded"] == "rate_limited" and b"tokens per minute" in text
        assert (await post(b, "zeta", 300))[0] == 200            # another tenant, another bucket
        assert api.bodies and len(api.bodies) == 4

        # estimates of 50, usage of 300: b charges the difference, and a sees it
        assert [(await post(b, "beta", 50))[0] for _ in range(3)] == [200, 200, 200]
        await settled(b, 300 + 900)
        assert (await post(a, "beta", 150))[0] == 429            # 900 charged + 150 > 1,000
        assert (await post(a, "beta", 50))[0] == 200             # 950 fits
        status = await tokens(a)
        assert status["store"] == redis_url and status["available"]
        assert status["fallbacks"] == 0 and status["keys"] == 2
