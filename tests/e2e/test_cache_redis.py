"""Issue 4 (cache), Redis store: two sidecars sharing one real Redis, and a Redis that is down."""
import socket

import pytest
from aiohttp import web

from cache.redis_server import RedisServer    # tests/cache/redis_server.py (tests/ is on sys.path)
from harness import ports
from sidecar.core.clock import FakeClock
from test_cache import Versioned, cache_of, get, policy


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    redis_server.flush()
    return redis_server.url


async def test_two_sidecars_share_one_redis(upstream_factory, sidecar_factory, port, redis_url):
    clock = FakeClock()                          # one clock: replicas agree on the wall time
    app = Versioned()
    up = await upstream_factory(app)
    cache = f"{{ttl: 60s, stale_if_error: 1h, store: \"{redis_url}\"}}"
    a = await sidecar_factory(policy(port, up.url, cache), clock=clock)
    port_b = ports()
    await sidecar_factory(policy(port_b, up.url, cache), clock=clock)
    _, headers, body = await get(port)
    assert headers["cache-status"] == "sidecar; fwd=miss; fwd-status=200; stored"
    await cache_of(a).drain()                    # the write has landed in Redis
    app.version = "v2"
    _, headers, body = await get(port_b)
    assert body == b"v1:/x:" and headers["cache-status"] == "sidecar; hit; ttl=60"
    assert headers["x-sidecar-upstream"] == "cache"
    assert up.hits == 1
    # and B's stale copy outlives the upstream: stored by A, served by B after expiry
    clock.advance(120)
    await up.stop()
    status, headers, body = await get(port_b)
    assert (status, body) == (200, b"v1:/x:")
    assert "cache_stale" in headers["x-sidecar-degraded"]


async def test_redis_down_requests_still_answered(upstream_factory, sidecar_factory, port):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    up = await upstream_factory(Versioned())
    sc = await sidecar_factory(policy(port, up.url, f"{{ttl: 60s, store: \"redis://127.0.0.1:{dead}/0\"}}"),
                               clock=FakeClock())
    for _ in range(3):
        status, headers, body = await get(port)
        assert (status, body) == (200, b"v1:/x:")
        assert headers["cache-status"].startswith("sidecar; fwd=miss")
    assert up.hits == 3
    assert cache_of(sc).stats()["available"] is False


async def test_redis_dies_mid_way(upstream_factory, sidecar_factory, port):
    server = RedisServer()                        # our own, to kill
    try:
        up = await upstream_factory(Versioned())
        sc = await sidecar_factory(policy(port, up.url, f"{{ttl: 60s, store: \"{server.url}\"}}"),
                                   clock=FakeClock())
        await get(port)
        await cache_of(sc).drain()
        _, headers, _ = await get(port)
        assert headers["cache-status"].startswith("sidecar; hit")
        server.stop()
        status, headers, body = await get(port)
        assert (status, body) == (200, b"v1:/x:") and headers["cache-status"].startswith("sidecar; fwd=miss")
    finally:
        server.stop()


async def test_large_bodies_round_trip_through_redis(upstream_factory, sidecar_factory, port, redis_url):
    blob = bytes(range(256)) * 4096              # 1 MiB of every byte value

    async def binary(request):
        return web.Response(body=blob, content_type="application/octet-stream")
    up = await upstream_factory(binary)
    a = await sidecar_factory(policy(port, up.url, f"{{ttl: 60s, max_body: 2MiB, store: \"{redis_url}\"}}"),
                              clock=FakeClock())
    await get(port)
    await cache_of(a).drain()
    cache_of(a)._writes.clear()
    _, headers, body = await get(port)
    assert body == blob and headers["cache-status"].startswith("sidecar; hit")
    assert up.hits == 1
