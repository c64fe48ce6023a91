"""A `when:` condition means the same whatever layers a route has: `retries-exhausted` is met when the
primary's last try failed (as the route's `retry.when` counts failures; the default list without a
`retry` block) and no retry followed it -- none configured, `max_retries: 0`, or every one spent.
Real upstreams on loopback, a real sidecar in front."""
import json

import aiohttp
import pytest
from aiohttp import web

RETRY_BLOCKS = {
    "no retry block": "",
    "max_retries 0": "retry: {max_retries: 0}",
    "max_retries 1": "retry: {max_retries: 1, backoff: {base: 1ms, max: 2ms}}",
}


def policy(port, upstream_url, tmp_path, retry: str, chain: str) -> str:
    return f"""
    version: 1
    listeners:
      - {{name: api, mode: reverse, port: {port['reverse']}, upstream: svc}}
    admin: {{port: {port['admin']}}}
    health: {{bind: 127.0.0.1, port: {port['health']}}}
    upstreams:
      svc: {{url: "{upstream_url}"}}
    routes:
      - name: r
        match: {{path_prefix: /}}
        upstream: svc
        timeout: 5s
        {retry}
        {chain}
    state_dir: {tmp_path / "state"}
    """


async def overloaded(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"error": "overloaded"}, status=503)


@pytest.mark.parametrize("retry", RETRY_BLOCKS.values(), ids=RETRY_BLOCKS.keys())
async def test_retries_exhausted_falls_back_whatever_the_retry_block(upstream_factory, sidecar_factory, port,
                                                                      tmp_path, retry):
    up = await upstream_factory(overloaded)
    chain = "fallback: {when: [retries-exhausted], targets: [{static: {status: 200, json: {from: static}}}]}"
    await sidecar_factory(policy(port, up.url, tmp_path, retry, chain))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port['reverse']}/x") as r:
            body = await r.read()
            assert (r.status, json.loads(body)) == (200, {"from": "static"}), body
            assert "static_response" in r.headers["x-sidecar-degraded"]
    assert up.hits == (2 if "max_retries: 1" in retry else 1)


@pytest.mark.parametrize("retry", RETRY_BLOCKS.values(), ids=RETRY_BLOCKS.keys())
async def test_retries_exhausted_queues_the_first_failed_write(upstream_factory, sidecar_factory, port,
                                                               tmp_path, retry):
    """No breaker has opened yet: the first write that fails is queued (202), not answered 503."""
    up = await upstream_factory(overloaded)
    await sidecar_factory(policy(port, up.url, tmp_path, retry, "queue: {when: [retries-exhausted]}"))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{port['reverse']}/orders", json={"n": 1}) as r:
            body = await r.read()
            assert r.status == 202, body
            assert r.headers["x-sidecar-degraded"] == "queued"


async def test_a_status_the_route_does_not_retry_is_not_retries_exhausted(upstream_factory, sidecar_factory,
                                                                          port, tmp_path):
    """500 is not in the default `retry.when`: without a retry block it is not a failed try either."""
    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=500)
    up = await upstream_factory(broken)
    chain = "fallback: {when: [retries-exhausted], targets: [{static: {status: 200}}]}"
    await sidecar_factory(policy(port, up.url, tmp_path, "", chain))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port['reverse']}/x") as r:
            assert r.status == 500
