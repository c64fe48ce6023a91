"""The limiters against a real redis-server: one GCRA bucket shared by every "replica" (here, three
limiters with their own connections, as three pods would have), keyed buckets, the local fallback."""
import asyncio

from sidecar.core.clock import FakeClock
from sidecar.core.ratelimit import ALLOW
from sidecar.fleet import link as link_module
from sidecar.fleet.link import Links
from sidecar.fleet.ratelimit import make_limiter
from sidecar.policy.model import RateLimitPolicy

# A rate so slow that no token comes back while a test runs: the counts are exact, whatever the load.
SLOW = 0.001


async def test_one_bucket_across_replicas(redis_url):
    policy = RateLimitPolicy(per_second=SLOW, burst=5, store=redis_url)
    replicas = [Links() for _ in range(3)]
    limiters = [make_limiter("orders", policy, FakeClock(), links) for links in replicas]
    try:
        verdicts = [await limiters[n % 3].acquire("") for n in range(12)]
        assert [v.allowed for v in verdicts] == [True] * 5 + [False] * 7
        assert not any(v.decided_locally for v in verdicts)
        assert verdicts[-1].retry_after > 900          # the next token is ~1000 s away at 0.001/s
    finally:
        for links in replicas:
            await links.close()


async def test_one_bucket_per_key_value(redis_url):
    policy = RateLimitPolicy(per_second=SLOW, burst=3, key="x-tenant", store=redis_url)
    links = Links()
    a, b = make_limiter("chat", policy, FakeClock(), links), make_limiter("chat", policy, FakeClock(), Links())
    try:
        got = {t: [(await (a if n % 2 else b).acquire(t)).allowed for n in range(5)] for t in ("acme", "zeta")}
        assert got == {"acme": [True] * 3 + [False] * 2, "zeta": [True] * 3 + [False] * 2}
        # the tenant's value is hashed into the key: an API key used as tenant never lands in Redis
        keys = await links.get(redis_url).client.keys("sidecar-rl:chat:*")
        assert len(keys) == 2 and not any(b"acme" in k or b"zeta" in k for k in keys)
    finally:
        await links.close()


async def test_charge_debits_after_the_fact_for_usage_counted_limits(redis_url):
    policy = RateLimitPolicy(per_second=SLOW, burst=100, store=redis_url)
    links = Links()
    limiter = make_limiter("llm", policy, FakeClock(), links)
    try:
        assert (await limiter.acquire("", cost=0)).allowed
        await limiter.charge("", 150)                  # the answer used more than the whole allowance
        assert not (await limiter.acquire("", cost=0)).allowed
    finally:
        await links.close()


async def test_redis_down_falls_back_to_the_local_bucket_then_comes_back(redis_module, redis_url, caplog):
    clock = FakeClock()
    policy = RateLimitPolicy(per_second=SLOW, burst=2, store=redis_url)
    links = Links(clock)
    limiter = make_limiter("orders", policy, clock, links)
    try:
        assert (await limiter.acquire("")).allowed and not (await limiter.acquire("")).decided_locally
        redis_module.stop()
        down = []
        for _ in range(3):                             # each after its backoff: Redis is tried again
            down.append(await asyncio.wait_for(limiter.acquire(""), 5))
            clock.advance(link_module.BACKOFF_MAX)
        assert all(v.decided_locally for v in down)
        warnings = [r for r in caplog.records if r.levelname == "WARNING" and r.name == "sidecar.fleet"]
        assert len(warnings) == 1 and "unavailable" in warnings[0].getMessage()   # one warning, then quiet
        assert "global limit store" in down[0].local_reason
        # the local bucket followed the two Redis admissions... of which it saw both: it is empty now
        assert [v.allowed for v in down] == [False, False, False]
        redis_module.start()
        clock.advance(link_module.BACKOFF_MAX)         # past the backoff: the next call tries Redis again
        back = await limiter.acquire("")
        assert any("is back" in r.getMessage() for r in caplog.records)
        assert back == ALLOW                           # Redis decided again (a restart without AOF: a full bucket)
    finally:
        await links.close()
