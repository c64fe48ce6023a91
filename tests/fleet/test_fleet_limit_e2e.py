"""One rate limit across three real `sidecar run` processes sharing one real redis-server (GCRA in Redis)."""
import asyncio
import collections

import aiohttp

from fleet_support import Pod, RecordingUpstream

RATE, BURST = 20, 20
# The bound holds exactly for what Redis decides; +2 for a request admitted at each edge of the measured
# window (the window is measured in this process, the buckets run on Redis's clock).
EDGE = 2


def fleet_policy(redis_url: str, upstream: RecordingUpstream):
    def text(pod: Pod) -> str:
        return f"""
        version: 1
        listeners:
          - {{name: api, mode: reverse, port: {pod.listen}, upstream: svc}}
        admin: {{port: {pod.admin}}}
        health: {{bind: 127.0.0.1, port: {pod.health}}}
        upstreams:
          svc: {{url: "{upstream.url}"}}
        routes:
          - name: global
            match: {{path_prefix: /global}}
            upstream: svc
            rate_limit: {{per_second: {RATE}, burst: {BURST}, store: "{redis_url}"}}
          - name: tenant
            match: {{path_prefix: /tenant}}
            upstream: svc
            rate_limit: {{per_second: {RATE}, burst: {BURST}, key: "header:x-tenant", store: "{redis_url}"}}
        state_dir: {pod.state_dir}
        """
    return text


async def offer(pods, path, rate, seconds, tenants=(None,)):
    """`rate` requests/s for `seconds`, round-robin over the pods (and tenants); returns each answer's
    (pod index, tenant, status, decided by the pod's local bucket) and the measured length of the run."""
    loop = asyncio.get_running_loop()
    total = int(rate * seconds)
    results = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as s:
        async def one(i):
            pod, tenant = i % len(pods), tenants[i % len(tenants)]
            headers = {"x-tenant": tenant} if tenant else {}
            async with s.get(pods[pod].url + path, headers=headers) as r:
                await r.read()
                local = "rate_limit_local" in r.headers.get("x-sidecar-degraded", "")
                results.append((pod, tenant, r.status, local))
        start = loop.time()
        tasks = []
        for i in range(total):
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        return results, loop.time() - start


async def test_a_global_limit_holds_across_three_sidecars(tmp_path, redis_url):
    upstream = await RecordingUpstream().start()
    upstream.down = False
    pods = [Pod(tmp_path, name, fleet_policy(redis_url, upstream)) for name in "abc"]
    try:
        for pod in pods:
            pod.start()
        for pod in pods:
            await pod.ready()

        # 300 requests/s for 5 s over the three: the upstream sees at most burst + rate x time of what
        # Redis decided. On a starved machine a Redis call may take longer than 0.5 s: that request is
        # decided by the pod's bucket instead (fail open, by design), says so in x-sidecar-degraded, and
        # is counted apart.
        results, took = await offer(pods, "/global", 300, 5.0)
        passed = collections.Counter(pod for pod, _, status, _ in results if status == 200)
        statuses = collections.Counter(status for _, _, status, _ in results)
        by_redis = sum(1 for _, _, status, local in results if status == 200 and not local)
        local = sum(1 for *_, local in results if local)
        bound = BURST + RATE * took + EDGE
        # 408: on a starved machine the sidecar's header-read timeout may answer a request before the
        # limiter sees it (proxy/guard.py); it never reaches the upstream either
        assert set(statuses) <= {200, 429, 408}, statuses
        assert upstream.hits == statuses[200]
        assert BURST + RATE <= by_redis <= bound, (by_redis, took, local)
        assert sorted(passed) == [0, 1, 2], passed           # every sidecar let some through
        print(f"global: {upstream.hits} of {len(results)} reached the upstream in {took:.2f}s, {by_redis} "
              f"decided by Redis (bound {bound:.0f}); per sidecar {dict(passed)}; decided locally {local}")

        # with key: header:x-tenant, each tenant has its own 20/s: together they get more than one
        # bucket could give (150 requests/s each, over three times the limit)
        before = upstream.hits
        results, took = await offer(pods, "/tenant", 300, 3.0, tenants=("acme", "zeta"))
        by_tenant = collections.Counter(t for _, t, status, _ in results if status == 200)
        by_redis_tenant = collections.Counter(t for _, t, status, local in results if status == 200 and not local)
        one_bucket = BURST + RATE * took + EDGE
        assert upstream.hits - before == sum(by_tenant.values())
        assert all(by_redis_tenant[t] <= one_bucket for t in ("acme", "zeta")), (by_redis_tenant, one_bucket)
        assert sum(by_tenant.values()) > one_bucket, (by_tenant, one_bucket)
        print(f"tenants: {dict(by_tenant)} in {took:.2f}s, {dict(by_redis_tenant)} decided by Redis "
              f"(each bound {one_bucket:.0f})")
    finally:
        for pod in pods:
            pod.stop()
        await upstream.stop()
