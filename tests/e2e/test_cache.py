"""Issue 4 (cache), memory store: real upstreams on loopback, a real sidecar, a fake clock for ages."""
import asyncio

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from sidecar.core.clock import FakeClock


def policy(port, upstream_url, cache, extra=""):
    return f"""
    version: 1
    listeners:
      - {{name: api, mode: reverse, port: {port['reverse']}, upstream: svc}}
    admin: {{port: {port['admin']}}}
    health: {{bind: 127.0.0.1, port: {port['health']}}}
    upstreams:
      svc: {{url: "{upstream_url}"}}
    defaults:
      timeout: 10s
    routes:
      - name: r
        match: {{path_prefix: /}}
        upstream: svc
        cache: {cache}
{extra}
    """


class Versioned:
    """An upstream whose answers say which version and request number they are."""

    def __init__(self, **headers) -> None:
        self.version = "v1"
        self.status = 200
        self.headers = headers
        self.gate: asyncio.Event | None = None
        self.count = 0

    async def __call__(self, request: web.Request) -> web.Response:
        self.count += 1
        if self.gate is not None:
            await self.gate.wait()
        body = await request.read()
        return web.Response(status=self.status, text=f"{self.version}:{request.path_qs}:{body.decode()}",
                            headers=self.headers)


async def get(port, path="/x", method="GET", **kwargs) -> tuple[int, CIMultiDict, bytes]:
    async with aiohttp.ClientSession() as s:
        async with s.request(method, f"http://127.0.0.1:{port['reverse']}{path}", **kwargs) as r:
            return r.status, CIMultiDict(r.headers), await r.read()


async def many(port, n, path="/x", **kwargs):
    return await asyncio.gather(*(get(port, path, **kwargs) for _ in range(n)))


def cache_of(sc):
    return sc.runtime.gen.states["r"].cache


async def wait_for(predicate, timeout=5.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.005)


async def test_fresh_hit_does_not_reach_the_upstream(upstream_factory, sidecar_factory, port):
    clock = FakeClock()
    app = Versioned()
    up = await upstream_factory(app)
    await sidecar_factory(policy(port, up.url, "{ttl: 60s}"), clock=clock)
    status, headers, body = await get(port)
    assert (status, body) == (200, b"v1:/x:")
    assert headers["cache-status"] == "sidecar; fwd=miss; fwd-status=200; stored"
    assert headers["x-sidecar-upstream"] == "svc" and headers["x-sidecar-attempts"] == "1"
    clock.advance(20)
    app.version = "v2"
    status, headers, body = await get(port)
    assert (status, body) == (200, b"v1:/x:")
    assert headers["cache-status"] == "sidecar; hit; ttl=40"
    assert headers["x-sidecar-upstream"] == "cache" and headers["x-sidecar-attempts"] == "0"
    assert headers["age"] == "20"
    assert "x-sidecar-degraded" not in headers          # a hit is the cache doing its job
    assert up.hits == 1


async def test_query_order_does_not_split_entries(upstream_factory, sidecar_factory, port):
    up = await upstream_factory(Versioned())
    await sidecar_factory(policy(port, up.url, "{ttl: 60s}"), clock=FakeClock())
    await get(port, "/x?b=2&a=1")
    _, headers, _ = await get(port, "/x?a=1&b=2")
    assert headers["cache-status"].startswith("sidecar; hit")
    assert up.hits == 1


async def test_stale_if_error_after_expiry(upstream_factory, sidecar_factory, port):
    clock = FakeClock()
    app = Versioned()
    up = await upstream_factory(app)
    await sidecar_factory(policy(port, up.url, "{ttl: 10s, stale_if_error: 1h}"), clock=clock)
    await get(port)
    clock.advance(30)
    app.status, app.version = 503, "down"
    status, headers, body = await get(port)
    assert (status, body) == (200, b"v1:/x:")
    assert headers["cache-status"] == "sidecar; fwd=stale; fwd-status=503; ttl=-20; detail=stale-if-error"
    assert "cache_stale" in headers["x-sidecar-degraded"]
    assert headers["x-sidecar-upstream"] == "cache" and headers["age"] == "30"
    # the upstream stopped answering at all: still the stale copy
    await up.stop()
    status, headers, body = await get(port)
    assert (status, body) == (200, b"v1:/x:")
    assert headers["cache-status"] == "sidecar; fwd=stale; ttl=-20; detail=stale-if-error"
    # past stale_if_error: the error goes through
    clock.advance(3600)
    status, headers, _ = await get(port)
    assert status in (502, 503) and "cache-status" not in headers


async def test_stale_while_revalidate_refreshes_once_under_concurrency(upstream_factory, sidecar_factory,
                                                                        port):
    clock = FakeClock()
    app = Versioned()
    up = await upstream_factory(app)
    sc = await sidecar_factory(policy(port, up.url, "{ttl: 10s, stale_while_revalidate: 60s}"), clock=clock)
    await get(port)
    clock.advance(15)
    app.version, app.gate = "v2", asyncio.Event()      # the refresh hangs until the burst is answered
    results = await many(port, 20)
    assert all(body == b"v1:/x:" for _, _, body in results)
    for _, headers, _ in results:
        assert headers["cache-status"] == "sidecar; hit; ttl=-5; detail=stale-while-revalidate"
        assert headers["x-sidecar-degraded"] == "cache_revalidate"
        assert headers["x-sidecar-attempts"] == "0"
    await wait_for(lambda: app.count == 2)
    app.gate.set()
    await cache_of(sc).drain()
    assert up.hits == 2                                  # one prime, ONE refresh for 20 requests
    assert cache_of(sc).stats()["revalidations"] == 1
    _, headers, body = await get(port)
    assert body == b"v2:/x:" and headers["cache-status"] == "sidecar; hit; ttl=10"
    assert up.hits == 2


async def test_post_keys_hash_the_body(upstream_factory, sidecar_factory, port):
    up = await upstream_factory(Versioned())
    await sidecar_factory(policy(port, up.url, "{ttl: 60s, key: [method, url, body]}"), clock=FakeClock())
    first = await get(port, method="POST", data=b'{"q": "a"}')
    again = await get(port, method="POST", data=b'{"q": "a"}')
    other = await get(port, method="POST", data=b'{"q": "b"}')
    assert first[2] == again[2] == b'v1:/x:{"q": "a"}' and other[2] == b'v1:/x:{"q": "b"}'
    assert again[1]["cache-status"].startswith("sidecar; hit")
    assert other[1]["cache-status"].startswith("sidecar; fwd=miss")
    assert up.hits == 2
    # without `body` in the key, POST is not cached at all (RFC 9111)
    put = await get(port, method="PUT", data=b"z")
    assert put[1]["cache-status"] == "sidecar; fwd=method; fwd-status=200"


async def test_post_is_not_cached_without_body_in_key(upstream_factory, sidecar_factory, port):
    up = await upstream_factory(Versioned())
    await sidecar_factory(policy(port, up.url, "{ttl: 60s}"), clock=FakeClock())
    for _ in range(2):
        _, headers, _ = await get(port, method="POST", data=b"a")
        assert headers["cache-status"] == "sidecar; fwd=method; fwd-status=200"
    assert up.hits == 2


async def test_concurrent_misses_are_coalesced(upstream_factory, sidecar_factory, port):
    app = Versioned()
    app.gate = asyncio.Event()
    up = await upstream_factory(app)
    sc = await sidecar_factory(policy(port, up.url, "{ttl: 60s}"), clock=FakeClock())
    burst = asyncio.ensure_future(many(port, 20))
    await wait_for(lambda: cache_of(sc).stats()["collapsed"] == 19)
    app.gate.set()
    results = await burst
    assert up.hits == 1
    assert all((status, body) == (200, b"v1:/x:") for status, _, body in results)
    statuses = sorted(h["cache-status"] for _, h, _ in results)
    assert statuses.count("sidecar; fwd=miss; ttl=60; collapsed") == 19
    assert statuses.count("sidecar; fwd=miss; fwd-status=200; stored") == 1


async def test_uncacheable_leader_lets_followers_go_on_their_own(upstream_factory, sidecar_factory, port):
    app = Versioned(**{"Cache-Control": "no-store"})
    app.gate = asyncio.Event()
    up = await upstream_factory(app)
    sc = await sidecar_factory(policy(port, up.url, "{ttl: 60s}"), clock=FakeClock())
    burst = asyncio.ensure_future(many(port, 5))
    await wait_for(lambda: cache_of(sc).stats()["collapsed"] == 4)
    app.gate.set()
    results = await burst
    assert all(status == 200 for status, _, _ in results)
    assert up.hits == 5


async def test_upstream_no_store_is_not_stored(upstream_factory, sidecar_factory, port):
    up = await upstream_factory(Versioned(**{"Cache-Control": "no-store"}))
    await sidecar_factory(policy(port, up.url, "{ttl: 60s}"), clock=FakeClock())
    for _ in range(2):
        _, headers, _ = await get(port)
        assert headers["cache-status"] == "sidecar; fwd=miss; fwd-status=200; detail=no-store"
    assert up.hits == 2


async def test_app_no_cache_goes_upstream_and_refreshes_the_entry(upstream_factory, sidecar_factory, port):
    app = Versioned()
    up = await upstream_factory(app)
    await sidecar_factory(policy(port, up.url, "{ttl: 60s}"), clock=FakeClock())
    await get(port)
    app.version = "v2"
    _, headers, body = await get(port, headers={"Cache-Control": "no-cache"})
    assert body == b"v2:/x:" and headers["cache-status"] == "sidecar; fwd=request; fwd-status=200; stored"
    _, headers, body = await get(port)
    assert body == b"v2:/x:" and headers["cache-status"].startswith("sidecar; hit")
    assert up.hits == 2


async def test_app_no_store_neither_reads_nor_writes(upstream_factory, sidecar_factory, port):
    app = Versioned()
    up = await upstream_factory(app)
    await sidecar_factory(policy(port, up.url, "{ttl: 60s}"), clock=FakeClock())
    await get(port)
    app.version = "v2"
    _, headers, body = await get(port, headers={"Cache-Control": "no-store"})
    assert body == b"v2:/x:"
    assert headers["cache-status"] == "sidecar; fwd=request; fwd-status=200; detail=no-store"
    _, _, body = await get(port)
    assert body == b"v1:/x:"                             # the stored copy was not replaced
    _, headers, body = await get(port, "/y", headers={"Cache-Control": "only-if-cached"})
    assert headers["cache-status"] == "sidecar; detail=only-if-cached"
    assert up.hits == 2


async def test_lru_bound_by_max_entries(upstream_factory, sidecar_factory, port):
    up = await upstream_factory(Versioned())
    sc = await sidecar_factory(policy(port, up.url, "{ttl: 60s, max_entries: 2}"), clock=FakeClock())
    for path in ("/a", "/b", "/c"):
        await get(port, path)
    assert cache_of(sc).entries() == 2
    _, headers, _ = await get(port, "/c")
    assert headers["cache-status"].startswith("sidecar; hit")
    _, headers, _ = await get(port, "/a")                 # the oldest went first
    assert headers["cache-status"].startswith("sidecar; fwd=miss")
    assert up.hits == 4


async def test_streams_are_stored_only_within_max_body(upstream_factory, sidecar_factory, port):
    async def chunked(request):
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        size = int(request.query["size"])
        for _ in range(size // 512):
            await resp.write(b"x" * 512)
        await resp.write_eof()
        return resp
    up = await upstream_factory(chunked)
    await sidecar_factory(policy(port, up.url, "{ttl: 60s, max_body: 2KiB}"), clock=FakeClock())
    for _ in range(2):
        _, headers, body = await get(port, "/s?size=8192")
        assert len(body) == 8192 and headers["cache-status"] == "sidecar; fwd=miss; fwd-status=200"
    assert up.hits == 2
    await get(port, "/s?size=2048")
    _, headers, body = await get(port, "/s?size=2048")
    assert len(body) == 2048 and headers["cache-status"].startswith("sidecar; hit")
    assert up.hits == 3


async def test_head_is_answered_from_the_get_entry(upstream_factory, sidecar_factory, port):
    up = await upstream_factory(Versioned(ETag='"e1"'))
    await sidecar_factory(policy(port, up.url, "{ttl: 60s}"), clock=FakeClock())
    await get(port)
    status, headers, body = await get(port, method="HEAD")
    assert (status, body) == (200, b"") and headers["content-length"] == "6"
    assert headers["cache-status"].startswith("sidecar; hit")
    status, headers, _ = await get(port, headers={"If-None-Match": '"e1"'})
    assert status == 304 and headers["etag"] == '"e1"' and headers["cache-status"].startswith("sidecar; hit")
    assert up.hits == 1


async def test_fallback_cache_stale_target_when_primary_is_down(upstream_factory, sidecar_factory, port):
    clock = FakeClock()
    up = await upstream_factory(Versioned())
    await sidecar_factory(policy(port, up.url, "{ttl: 10s, stale_if_error: 1h}", extra="""
        fallback:
          when: [connect-failure, 5xx]
          targets:
            - cache: stale
            - static: {status: 200, json: {error: degraded}}
    """), clock=clock)
    await get(port)
    await get(port, "/other")
    clock.advance(60)
    await up.stop()
    status, headers, body = await get(port)
    assert (status, body) == (200, b"v1:/x:")
    assert "cache_stale" in headers["x-sidecar-degraded"].split(",")
    assert headers["x-sidecar-upstream"] == "cache"
    assert headers["cache-status"] == "sidecar; fwd=stale; ttl=-50; detail=fallback"
    # nothing cached for this key: the chain goes on to the static answer
    status, headers, body = await get(port, "/never")
    assert status == 200 and b"degraded" in body and "static_response" in headers["x-sidecar-degraded"]


async def test_status_and_metrics_report_the_cache(upstream_factory, sidecar_factory, port):
    up = await upstream_factory(Versioned())
    await sidecar_factory(policy(port, up.url, "{ttl: 60s}"), clock=FakeClock())
    await get(port, "/a")
    await get(port, "/a")
    await get(port, "/b")
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port['admin']}/status") as r:
            status = await r.json()
            route = status["routes"][0]
        async with s.get(f"http://127.0.0.1:{port['admin']}/metrics") as r:
            metrics = await r.text()
    assert (route["cache"]["entries"], route["cache"]["hits"], route["cache"]["store"]) == (2, 1, "memory")
    # two misses went upstream, one after the other: one keep-alive connection, idle now
    assert status["connection_pools"]["svc"] == {"open": 1, "idle": 1, "waiting": 0, "max": 100}
    assert "sidecar_cache_entries 2.0" in metrics


async def test_reload_keeps_entries_when_store_and_key_are_unchanged(upstream_factory, sidecar_factory, port,
                                                                     tmp_path):
    up = await upstream_factory(Versioned())
    sc = await sidecar_factory(policy(port, up.url, "{ttl: 60s}"), clock=FakeClock())
    await get(port)
    path = tmp_path / "policy.yaml"
    path.write_text(path.read_text().replace("ttl: 60s", "ttl: 120s"))
    ok, error = await sc.runtime.reload()
    assert ok, error
    _, headers, _ = await get(port)
    assert headers["cache-status"].startswith("sidecar; hit")
    path.write_text(path.read_text().replace("{ttl: 120s}", "{ttl: 120s, key: [url]}"))
    ok, error = await sc.runtime.reload()
    assert ok, error
    _, headers, _ = await get(port)
    assert headers["cache-status"].startswith("sidecar; fwd=miss")
    assert up.hits == 2


async def test_collapsed_misses_on_a_failing_upstream_share_the_stale_copy(upstream_factory, sidecar_factory,
                                                                          port):
    clock = FakeClock()
    app = Versioned()
    up = await upstream_factory(app)
    sc = await sidecar_factory(policy(port, up.url, "{ttl: 10s, stale_if_error: 1h}"), clock=clock)
    await get(port)
    clock.advance(60)
    app.status, app.gate = 503, asyncio.Event()
    burst = asyncio.ensure_future(many(port, 10))
    await wait_for(lambda: cache_of(sc).stats()["collapsed"] == 9)
    app.gate.set()
    results = await burst
    assert up.hits == 2                                  # the prime, then ONE forward for ten requests
    assert all((status, body) == (200, b"v1:/x:") for status, _, body in results)
    assert all("cache_stale" in h["x-sidecar-degraded"] for _, h, _ in results)


class FakeSleep:
    """The runtime's sleep: records what it was asked and waits for the test to let it go."""

    def __init__(self) -> None:
        self.asked: list[float] = []
        self.go = asyncio.Queue()

    async def __call__(self, seconds: float) -> None:
        self.asked.append(seconds)
        await self.go.get()


async def test_warm_paths_are_fetched_at_start_and_on_schedule(upstream_factory, sidecar_factory, port):
    clock, sleep = FakeClock(), FakeSleep()
    app = Versioned()
    up = await upstream_factory(app)
    sc = await sidecar_factory(policy(port, up.url, "{ttl: 10m, warm: [{path: /models, every: 5m}]}"),
                               clock=clock, sleep=sleep)
    await wait_for(lambda: sleep.asked)                  # the first round is done: sleeping till the next
    assert up.hits == 1 and up.requests[0]["path"] == "/models"
    assert sleep.asked == [300]
    await cache_of(sc).drain()
    _, headers, body = await get(port, "/models")
    assert body == b"v1:/models:" and headers["cache-status"].startswith("sidecar; hit")
    app.version = "v2"
    clock.advance(300)
    sleep.go.put_nowait(None)
    await wait_for(lambda: len(sleep.asked) == 2)
    await cache_of(sc).drain()
    assert up.hits == 2                                  # refreshed although the copy was still fresh
    _, headers, body = await get(port, "/models")
    assert body == b"v2:/models:" and headers["cache-status"].startswith("sidecar; hit")


async def test_sse_streams_stream_and_do_not_hold_collapsed_requests(upstream_factory, sidecar_factory, port):
    release = asyncio.Event()

    async def sse(request):
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: first\n\n")
        await release.wait()
        await resp.write(b"data: last\n\n")
        await resp.write_eof()
        return resp
    up = await upstream_factory(sse)
    sc = await sidecar_factory(policy(port, up.url, "{ttl: 60s}"), clock=FakeClock())
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port['reverse']}/events") as r:
            assert await r.content.readuntil(b"\n\n") == b"data: first\n\n"   # streamed, not buffered
            # a second request for the key goes upstream itself instead of waiting for the stream to end
            second = asyncio.ensure_future(get(port, "/events"))
            await wait_for(lambda: up.hits == 2)
            release.set()
            assert await r.read() == b"data: last\n\n"
        status, _, body = await second
        assert body == b"data: first\n\ndata: last\n\n"
    await cache_of(sc).drain()
    _, headers, body = await get(port, "/events")         # ended whole within max_body: stored
    assert body == b"data: first\n\ndata: last\n\n" and headers["cache-status"].startswith("sidecar; hit")
    assert up.hits == 2


async def test_vary_keeps_variants_apart(upstream_factory, sidecar_factory, port):
    async def by_language(request):
        return web.Response(text=request.headers.get("accept-language", "none"),
                            headers={"Vary": "Accept-Language"})
    up = await upstream_factory(by_language)
    await sidecar_factory(policy(port, up.url, "{ttl: 60s}"), clock=FakeClock())
    assert (await get(port, headers={"Accept-Language": "fr"}))[2] == b"fr"
    _, headers, body = await get(port, headers={"Accept-Language": "fr"})
    assert body == b"fr" and headers["cache-status"].startswith("sidecar; hit")
    _, headers, body = await get(port, headers={"Accept-Language": "de"})
    assert body == b"de" and headers["cache-status"].startswith("sidecar; fwd=vary-miss")
    assert up.hits == 2


async def test_shadow_mode_decides_but_always_forwards(upstream_factory, sidecar_factory, port):
    app = Versioned()
    up = await upstream_factory(app)
    sc = await sidecar_factory(policy(port, up.url, "{ttl: 60s}", extra="        mode: shadow"),
                               clock=FakeClock())
    await get(port)
    await cache_of(sc).drain()
    app.version = "v2"
    _, headers, body = await get(port)
    assert body == b"v2:/x:" and "cache-status" not in headers and "x-sidecar-degraded" not in headers
    assert up.hits == 2
    assert sc.runtime.status()["routes"][0]["cache"]["entries"] == 1


class Validating:
    """An upstream with an ETag (and a Last-Modified) that answers 304 to a matching validator, and
    remembers the validators it was sent."""

    def __init__(self, etag: str | None = '"v1"', last_modified: str | None = None) -> None:
        self.etag, self.last_modified = etag, last_modified
        self.body = "version one"
        self.seen: list[tuple[str | None, str | None]] = []
        self.full = self.not_modified = 0

    async def __call__(self, request: web.Request) -> web.Response:
        inm, ims = request.headers.get("If-None-Match"), request.headers.get("If-Modified-Since")
        self.seen.append((inm, ims))
        headers = {"cache-control": "max-age=3600", "x-generation": str(self.full + self.not_modified)}
        if self.etag:
            headers["etag"] = self.etag
        if self.last_modified:
            headers["last-modified"] = self.last_modified
        if (inm is not None and inm == self.etag) or (inm is None and ims is not None and ims == self.last_modified):
            self.not_modified += 1
            return web.Response(status=304, headers=headers)
        self.full += 1
        return web.Response(text=self.body, headers=headers)


async def test_an_expired_copy_is_revalidated_and_a_304_serves_it_fresh(upstream_factory, sidecar_factory, port):
    clock = FakeClock()
    app = Validating()
    up = await upstream_factory(app)
    sc = await sidecar_factory(policy(port, up.url, "{ttl: 10s}"), clock=clock)
    assert (await get(port))[2] == b"version one"
    clock.advance(30)
    status, headers, body = await get(port)
    assert (status, body) == (200, b"version one")      # the stored body, not the empty 304
    assert app.seen[-1] == ('"v1"', None) and (app.full, app.not_modified) == (1, 1)
    assert headers["cache-status"] == "sidecar; fwd=stale; fwd-status=304; ttl=10; stored"
    assert headers["x-generation"] == "1"                 # the 304's header fields replace the stored ones
    assert headers["age"] == "0" and headers["x-sidecar-degraded"] == "cache_revalidate"
    assert cache_of(sc).stats()["not_modified"] == 1
    clock.advance(5)
    _, headers, body = await get(port)                   # freshened: a plain hit again
    assert body == b"version one" and headers["cache-status"] == "sidecar; hit; ttl=5"
    assert up.hits == 2


async def test_a_changed_resource_replaces_the_expired_copy(upstream_factory, sidecar_factory, port):
    clock = FakeClock()
    app = Validating()
    up = await upstream_factory(app)
    await sidecar_factory(policy(port, up.url, "{ttl: 10s}"), clock=clock)
    await get(port)
    clock.advance(30)
    app.etag, app.body = '"v2"', "version two"
    status, headers, body = await get(port)
    assert (status, body) == (200, b"version two") and app.seen[-1] == ('"v1"', None)
    assert headers["cache-status"] == "sidecar; fwd=stale; fwd-status=200; stored"
    _, headers, body = await get(port)
    assert body == b"version two" and headers["cache-status"].startswith("sidecar; hit")


async def test_last_modified_alone_is_revalidated_with_if_modified_since(upstream_factory, sidecar_factory, port):
    clock = FakeClock()
    app = Validating(etag=None, last_modified="Wed, 25 Nov 2026 10:00:00 GMT")
    up = await upstream_factory(app)
    await sidecar_factory(policy(port, up.url, "{ttl: 10s}"), clock=clock)
    await get(port)
    assert app.seen[0] == (None, None)                  # the first fetch is unconditional
    clock.advance(30)
    status, headers, body = await get(port)
    assert (status, body) == (200, b"version one")
    assert app.seen[-1] == (None, "Wed, 25 Nov 2026 10:00:00 GMT") and app.not_modified == 1


async def test_the_background_refresh_is_conditional_too(upstream_factory, sidecar_factory, port):
    clock = FakeClock()
    app = Validating()
    up = await upstream_factory(app)
    sc = await sidecar_factory(policy(port, up.url, "{ttl: 10s, stale_while_revalidate: 60s}"), clock=clock)
    await get(port)
    clock.advance(15)
    _, headers, body = await get(port)                   # served stale, refreshed behind
    assert body == b"version one" and headers["cache-status"].endswith("detail=stale-while-revalidate")
    await wait_for(lambda: app.not_modified == 1)
    await cache_of(sc).drain()
    assert app.seen[-1] == ('"v1"', None) and app.full == 1
    _, headers, body = await get(port)
    assert body == b"version one" and headers["cache-status"] == "sidecar; hit; ttl=10"


async def test_the_apps_own_validator_is_forwarded_untouched(upstream_factory, sidecar_factory, port):
    clock = FakeClock()
    app = Validating()
    up = await upstream_factory(app)
    await sidecar_factory(policy(port, up.url, "{ttl: 10s}"), clock=clock)
    await get(port)
    clock.advance(30)
    status, _, body = await get(port, headers={"If-None-Match": '"other"'})
    assert (status, body) == (200, b"version one") and app.seen[-1] == ('"other"', None)
