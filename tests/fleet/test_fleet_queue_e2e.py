"""The shared queue with real `sidecar run` processes and a real redis-server: pods die (SIGKILL, state_dir
deleted) holding accepted writes, the others deliver each exactly once, in acceptance order per route."""
import asyncio
import collections

import aiohttp
import pytest

from cache.redis_server import RedisServer
from fleet_support import Pod, RecordingUpstream, wait_for

VISIBILITY = 2          # seconds; a claim by a dead replica is taken over after this


def queue_policy(redis_url: str, upstream: RecordingUpstream, timeout: str = "3s"):
    def text(pod: Pod) -> str:
        return f"""
        version: 1
        listeners:
          - {{name: api, mode: reverse, port: {pod.listen}, upstream: svc}}
        admin: {{port: {pod.admin}}}
        health: {{bind: 127.0.0.1, port: {pod.health}}}
        upstreams:
          svc: {{url: "{upstream.url}"}}
        defaults:
          timeout: {timeout}
          retry: {{max_retries: 1, when: [503, connect-failure], methods: [POST], backoff: {{base: 10ms, max: 20ms}}}}
          breaker: {{consecutive_failures: 2, open_for: 200ms, max_open_for: 500ms}}
        routes:
          - name: orders
            match: {{path_prefix: /orders}}
            upstream: svc
            queue: {{when: [breaker-open, retries-exhausted], store: "{redis_url}", visibility_timeout: {VISIBILITY}s}}
          - name: invoices
            match: {{path_prefix: /invoices}}
            upstream: svc
            queue: {{when: [breaker-open, retries-exhausted], store: "{redis_url}", visibility_timeout: {VISIBILITY}s}}
          - name: limited
            match: {{path_prefix: /limited}}
            upstream: svc
            retry: null
            breaker: null
            rate_limit: {{per_second: 1000, burst: 1000, store: "{redis_url}"}}
        state_dir: {pod.state_dir}
        """
    return text


async def post(pod: Pod, path: str, n: int) -> tuple[int, dict, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.post(pod.url + path, json={"n": n}) as r:
            return r.status, dict(r.headers), await r.json(content_type=None)


async def accept_writes(pod: Pod, count: int) -> dict[str, list[tuple[int, str]]]:
    """`count` writes alternating between two routes, each answered 202; returns the keys per route."""
    accepted = collections.defaultdict(list)
    for n in range(count):
        path = "/orders" if n % 3 else "/invoices"
        status, headers, body = await post(pod, path, n)
        assert status == 202, (status, body)
        assert headers["x-sidecar-queued"] == body["queued"]
        accepted[path].append((n, body["idempotency_key"]))
    return accepted


async def delivered_everything(upstream: RecordingUpstream, accepted, survivors) -> None:
    total = sum(len(v) for v in accepted.values())
    await wait_for(lambda: len(upstream.got) >= total, 60, f"{total} deliveries; got {upstream.got}")
    await asyncio.sleep(VISIBILITY + 0.5)          # long enough for any second delivery to show up
    by_route = collections.defaultdict(list)
    for path, n, key in upstream.got:
        by_route[path].append((n, key))
    assert dict(by_route) == dict(accepted)        # each exactly once, in acceptance order per route
    delivered = 0
    for pod in survivors:
        doc = await pod.get_json("/status")
        delivered += sum(r.get("delivered", 0) for r in doc["queue"]["by_route"].values())
        assert doc["queue"]["depth"] == 0
    assert delivered == total


@pytest.mark.parametrize("a_holds_a_claim", [False, True], ids=["a-idle", "a-holding-a-claim"])
async def test_writes_accepted_by_a_dead_pod_are_delivered_by_the_others_exactly_once(
        tmp_path, redis_url, a_holds_a_claim):
    upstream = await RecordingUpstream().start()
    policy = queue_policy(redis_url, upstream)
    a, b, c = (Pod(tmp_path, name, policy) for name in "abc")
    try:
        if a_holds_a_claim:
            await a.start().ready()                    # alone: A takes every route's lease
        else:
            b.start(), c.start()                       # B or C deliver; A only accepts
            await asyncio.gather(b.ready(), c.ready())
            await a.start().ready()
        accepted = await accept_writes(a, 9)
        if a_holds_a_claim:
            # A reads the head of each route and keeps failing to send it (upstream down); only then do
            # B and C start, so the claims in the group's pending list are A's when it dies
            async def a_holds_both() -> bool:
                routes = (await a.get_json("/status"))["queue"]["by_route"].values()
                return upstream.refused >= 4 and all(r["delivering_here"] for r in routes)
            await wait_for(a_holds_both, 30, "A delivering both routes")
            b.start(), c.start()
        await asyncio.gather(b.ready(), c.ready())
        await a.kill_pod()
        assert upstream.got == []
        upstream.down = False
        await delivered_everything(upstream, accepted, [b, c])
        if a_holds_a_claim:
            logs = b.log.read_text() + c.log.read_text()
            assert "reclaimed" in logs and f"-{a.proc.pid}-" in logs
    finally:
        for pod in (a, b, c):
            pod.stop()
        await upstream.stop()


async def test_redis_down_refuses_writes_limits_fall_back_and_both_resume(tmp_path):
    redis = RedisServer(aof_dir=str(tmp_path))                 # appendonly yes, appendfsync always
    upstream = await RecordingUpstream().start()
    a, b = (Pod(tmp_path, name, queue_policy(redis.url, upstream)) for name in "ab")
    try:
        a.start(), b.start()
        await asyncio.gather(a.ready(), b.ready())
        accepted = await accept_writes(a, 4)

        redis.restart()                                          # between accept and delivery: nothing lost
        more = await accept_writes_when_back(a, 4, start=100)
        for path, items in more.items():
            accepted[path].extend(items)

        redis.stop()
        for n in range(3):                                       # a refused write is the route's failure
            status, headers, body = await asyncio.wait_for(post(a, "/orders", 1000 + n), 15)
            assert status == 503 and "x-sidecar-queued" not in headers, (status, body)
            assert "queue_unavailable" in headers["x-sidecar-degraded"], headers
        async with aiohttp.ClientSession() as s:
            async with s.get(a.url + "/limited") as r:
                assert r.status == 200 and "rate_limit_local" in r.headers["x-sidecar-degraded"]
        redis.start()

        async def limit_is_global_again() -> bool:
            async with aiohttp.ClientSession() as s:
                async with s.get(b.url + "/limited") as r:
                    return r.status == 200 and "x-sidecar-degraded" not in r.headers
        await wait_for(limit_is_global_again, 20, "the global limit deciding again")
        more = await accept_writes_when_back(b, 3, start=200)
        for path, items in more.items():
            accepted[path].extend(items)

        upstream.down = False
        await delivered_everything(upstream, accepted, [a, b])
    finally:
        for pod in (a, b):
            pod.stop()
        await upstream.stop()
        redis.stop()


async def accept_writes_when_back(pod: Pod, count: int, start: int) -> dict[str, list[tuple[int, str]]]:
    """After a Redis restart: wait until the pod queues again (its first tries may be refused: no 202,
    nothing stored), then accept `count` writes."""
    async def accepts() -> bool:
        status, _, body = await post(pod, "/orders", -1)
        if status == 202:
            probes.append(("/orders", (-1, body["idempotency_key"])))
        return status == 202
    probes: list = []
    await wait_for(accepts, 20, "the queue accepting again", interval=0.3)
    accepted = collections.defaultdict(list)
    for path, item in probes:
        accepted[path].append(item)
    for n in range(start, start + count):
        path = "/orders" if n % 3 else "/invoices"
        status, headers, body = await post(pod, path, n)
        assert status == 202, (status, body)
        accepted[path].append((n, body["idempotency_key"]))
    return accepted


async def test_a_pod_stopped_cleanly_hands_its_claim_over_at_once(tmp_path, redis_url):
    """SIGTERM (a rolling update) rather than SIGKILL: the next deliverer does not wait out the
    visibility timeout (60 s here) for the entry the stopped pod had claimed."""
    upstream = await RecordingUpstream().start()
    slow = queue_policy(redis_url, upstream)

    def policy(pod: Pod) -> str:
        return slow(pod).replace(f"visibility_timeout: {VISIBILITY}s", "visibility_timeout: 60s")
    a, b = Pod(tmp_path, "a", policy), Pod(tmp_path, "b", policy)
    try:
        await a.start().ready()                        # alone: A takes the leases
        b.start()
        accepted = await accept_writes(a, 3)
        await wait_for(lambda: upstream.refused >= 3, 30, "A's delivery attempts")
        await b.ready()
        assert await a.terminate() == 0
        upstream.down = False
        # well inside the 60 s visibility timeout: B took A's claim over because A said it was gone
        await wait_for(lambda: len(upstream.got) >= 3, 30, f"B delivering A's claimed writes: {upstream.got}")
        by_route = {}
        for path, n, key in upstream.got:
            by_route.setdefault(path, []).append((n, key))
        assert by_route == dict(accepted)
    finally:
        for pod in (a, b):
            pod.stop()
        await upstream.stop()
