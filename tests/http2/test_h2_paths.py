"""HTTP/2 on either side of the sidecar, with the other side HTTP/1.1 or HTTP/2: bodies both ways,
trailers, the upstream pool's stream limits, GOAWAY, RST_STREAM and PING."""
import asyncio
import os

import aiohttp
import pytest
from aiohttp import web

from h2kit import H2App, H2Upstream
from sidecar.transport import h2client


def policy(port, upstream_url, protocol="h2c", route="", extra=""):
    return f"""
    version: 1
    listeners:
      - {{name: api, mode: reverse, port: {port['reverse']}, upstream: svc}}
    admin: {{port: {port['admin']}}}
    health: {{bind: 127.0.0.1, port: {port['health']}}}
    upstreams:
      svc: {{url: "{upstream_url}", protocol: {protocol}{extra}}}
    routes:
      - name: r
        match: {{path_prefix: /}}
        upstream: svc
{route}
    """


@pytest.fixture
async def h2_upstream_factory():
    made = []

    async def make(**kwargs):
        up = await H2Upstream(**kwargs).start()
        made.append(up)
        return up
    yield make
    for up in made:
        await up.stop()


async def test_http2_app_to_http1_upstream(upstream_factory, sidecar_factory, port):
    async def echo(request):
        body = await request.read()
        return web.Response(body=body, headers={"x-seen-host": request.headers["Host"],
                                                "x-cookie": request.headers.get("cookie", "")})
    up = await upstream_factory(echo)
    await sidecar_factory(policy(port, up.url, protocol="http1"))
    big = os.urandom(3 * 1024 * 1024)
    async with H2App(port["reverse"]) as app:
        small, large = await asyncio.gather(
            app.request("GET", "/a?b=1", headers=[("cookie", "a=1"), ("cookie", "b=2")]),
            app.request("POST", "/upload", big))
    assert small["headers"][":status"] == "200"
    assert small["headers"]["x-sidecar-route"] == "r" and small["headers"]["x-sidecar-attempts"] == "1"
    assert small["headers"]["x-cookie"] == "a=1; b=2"           # RFC 9113 §8.2.3 crumbs joined
    assert up.requests[0]["path"] in ("/a?b=1", "/upload")
    assert large["body"] == big


async def test_http1_app_to_h2c_upstream_trailers_dropped(h2_upstream_factory, sidecar_factory, port):
    up = await h2_upstream_factory()
    await sidecar_factory(policy(port, up.url))
    big = os.urandom(1024 * 1024)
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{port['reverse']}/echo?x=1", data=big) as r:
            assert r.status == 200
            assert r.headers["x-method"] == "POST" and r.headers["x-path"] == "/echo?x=1"
            assert await r.read() == big
            assert "x-trailer" not in r.headers              # HTTP/1.1 listener: trailers are dropped


async def test_a_small_h2c_answer_whole_at_its_head_is_taken_whole(h2_upstream_factory, sidecar_factory, port):
    """An answer whose END_STREAM came with its head (nginx sends a small one so) is read at once, like
    a small HTTP/1.1 answer: the app gets it with a Content-Length (HTTP/1.1 and HTTP/2 alike, not
    chunked), and the upstream's stream, ended both ways, is not reset."""
    up = await h2_upstream_factory(trailers=False)
    await sidecar_factory(policy(port, up.url))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{port['reverse']}/whole", data=b"x" * 100) as r:
            assert r.status == 200 and await r.read() == b"x" * 100
            assert r.headers["Content-Length"] == "100" and "Transfer-Encoding" not in r.headers
    async with H2App(port["reverse"]) as app:
        answer = await app.request("POST", "/whole-h2", b"y" * 50)
    assert answer["headers"][":status"] == "200" and answer["body"] == b"y" * 50
    assert answer["headers"]["content-length"] == "50"
    assert up.resets == 0 and len(up.requests) == 2


async def test_http2_both_sides_relays_trailers_and_multiplexes_one_connection(h2_upstream_factory,
                                                                               sidecar_factory, port):
    up = await h2_upstream_factory(hold=0.2)
    await sidecar_factory(policy(port, up.url))
    async with H2App(port["reverse"]) as app:
        answers = await asyncio.gather(*(app.request("POST", f"/s{i}", b"x" * i) for i in range(1, 7)))
    for i, a in enumerate(answers, start=1):
        assert a["headers"][":status"] == "200" and a["body"] == b"x" * i
        assert a["trailers"] == {"x-trailer": "yes", "x-length": str(i)}
    assert up.connections == 1                             # six calls, one multiplexed connection


async def test_max_concurrent_streams_opens_another_connection(h2_upstream_factory, sidecar_factory, port):
    up = await h2_upstream_factory(max_streams=2, hold=0.5)
    await sidecar_factory(policy(port, up.url))
    async with aiohttp.ClientSession() as s:
        async def one(i):
            async with s.get(f"http://127.0.0.1:{port['reverse']}/c{i}") as r:
                return r.status
        assert await asyncio.gather(*(one(i) for i in range(6))) == [200] * 6
        async with s.get(f"http://127.0.0.1:{port['admin']}/status") as r:
            pools = (await r.json())["connection_pools"]
    assert up.connections >= 2                 # 6 concurrent calls never fit 2 streams on one connection
    assert pools["svc"]["h2"]["open"] == up.connections and pools["svc"]["h2"]["streams"] == 0


async def test_goaway_unprocessed_stream_is_sent_again_on_a_new_connection(h2_upstream_factory,
                                                                           sidecar_factory, port):
    up = await h2_upstream_factory(goaway_at=2)
    # retry (even with no retries) keeps a small body replayable; a body streamed from its first byte
    # cannot be sent twice, and its unprocessed stream fails as a reset
    await sidecar_factory(policy(port, up.url, route="        retry: {max_retries: 0}"))
    async with aiohttp.ClientSession() as s:
        for i in range(3):
            async with s.post(f"http://127.0.0.1:{port['reverse']}/w{i}", data=b"write") as r:
                assert r.status == 200 and await r.read() == b"write", await r.text()
                assert r.headers["x-sidecar-attempts"] == "1"   # the transport's resend, not a policy retry
    assert [req["headers"][":path"] for req in up.requests] == ["/w0", "/w1", "/w2"]
    assert up.connections == 2


async def test_a_graceful_goaway_lets_the_stream_in_flight_finish(h2_upstream_factory, sidecar_factory, port):
    up = await h2_upstream_factory(drain_at=1, hold=0.3)   # GOAWAY first, the answer 0.3 s later
    await sidecar_factory(policy(port, up.url, route="        retry: {max_retries: 0}"))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{port['reverse']}/in-flight", data=b"kept") as r:
            assert r.status == 200 and await r.read() == b"kept", await r.text()
            assert r.headers["x-sidecar-attempts"] == "1"
        async with s.post(f"http://127.0.0.1:{port['reverse']}/next", data=b"new") as r:
            assert r.status == 200 and await r.read() == b"new"
    assert [req["headers"][":path"] for req in up.requests] == ["/in-flight", "/next"]
    assert up.connections == 2                  # the drained connection takes no new stream


async def test_abandoned_try_resets_its_stream(h2_upstream_factory, sidecar_factory, port):
    up = await h2_upstream_factory(hold=3.0)
    await sidecar_factory(policy(port, up.url, route="        per_try_timeout: 200ms\n        retry: {max_retries: 0}"))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port['reverse']}/slow") as r:
            assert r.status == 504
    for _ in range(200):
        if up.resets:
            break
        await asyncio.sleep(0.02)
    assert up.resets == 1                       # RST_STREAM (CANCEL): the upstream stops working on it


async def test_idle_connection_is_pinged(h2_upstream_factory, sidecar_factory, port, monkeypatch):
    monkeypatch.setattr(h2client, "PING_INTERVAL", 0.1)
    up = await h2_upstream_factory()
    await sidecar_factory(policy(port, up.url))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port['reverse']}/p") as r:
            assert r.status == 200
    for _ in range(500):
        if up.pings >= 2:
            break
        await asyncio.sleep(0.02)
    assert up.pings >= 2



async def test_app_goaway_with_streams_in_flight_is_no_verdict_on_the_upstream(upstream_factory, sidecar_factory,
                                                                             port, caplog):
    """A client's GOAWAY (h2load ends every run with one while requests are in flight) closes `h2`'s
    connection state: those streams can no longer be answered. They end as if the app had reset them;
    the route's breaker does not count them against the upstream, and nothing is logged as an error."""
    arrived, release = asyncio.Event(), asyncio.Event()
    held = 0

    async def answer(request):
        nonlocal held
        if request.path == "/hold":
            held += 1
            if held == 3:
                arrived.set()
            await release.wait()
        return web.Response(text="ok")
    up = await upstream_factory(answer)
    await sidecar_factory(policy(port, up.url, protocol="http1",
                                 route="        breaker: {consecutive_failures: 2, open_for: 5m}"))
    async with H2App(port["reverse"]) as app:
        for _ in range(3):
            sid = app.conn.get_next_available_stream_id()
            app.conn.send_headers(sid, [(":method", "GET"), (":scheme", "http"), (":authority", "app.local"),
                                        (":path", "/hold")], end_stream=True)
        app.flush()
        await asyncio.wait_for(arrived.wait(), 10)
        app.conn.close_connection()              # GOAWAY, NO_ERROR; the socket stays open
        app.flush()
        async with H2App(port["reverse"]) as other:   # a round trip after it: the GOAWAY was read by now
            assert (await other.request("GET", "/ok"))["headers"][":status"] == "200"
        release.set()                            # the held answers come back from the upstream
        await asyncio.wait_for(app.closed.wait(), 10)
    async with H2App(port["reverse"]) as again:
        answer_ = await again.request("GET", "/ok")
    assert answer_["headers"][":status"] == "200" and answer_["headers"]["x-sidecar-upstream"] == "svc"
    assert not [r for r in caplog.records if r.name.startswith("sidecar") and r.levelname == "ERROR"]
