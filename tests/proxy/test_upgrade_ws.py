"""WebSocket upgrades through the reverse and proxy listeners, with aiohttp's client and the `websockets`
package: echoes both ways (text and binary, one of 1 MiB), the handshake retried and fallen back like a
GET, a refused handshake relayed as it is, SIGTERM closing open sockets with 1001, and the cost of idle
sockets."""
from __future__ import annotations

import asyncio
import os

import aiohttp
import pytest
import websockets
from aiohttp import web

from harness import free_port, ports, start_sidecar

HANG_GUARD = 20.0
MiB = 1024 * 1024


async def ws_echo(request: web.Request) -> web.StreamResponse:
    if request.path == "/forbidden":
        return web.json_response({"error": "no"}, status=403)
    ws = web.WebSocketResponse(max_msg_size=4 * MiB)
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == aiohttp.WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type == aiohttp.WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


def policy(p, primary: str, backup: str, extra: str = "") -> str:
    return f"""
    version: 1
    listeners:
      - {{name: egress, mode: proxy, port: {p['proxy']}}}
      - {{name: api, mode: reverse, port: {p['reverse']}, upstream: primary}}
    admin: {{bind: 127.0.0.1, port: {p['admin']}}}
    health: {{bind: 127.0.0.1, port: {p['health']}}}
    upstreams:
      primary: {{url: "{primary}", connect_timeout: 1s}}
      backup: {{url: "{backup}"}}
    routes:
      - name: ws
        match: {{path_prefix: /}}
        upstream: primary
        allow_internal: true
        timeout: 10s
        retry: {{max_retries: 1, when: [connect-failure, 502, 503]}}
        fallback:
          when: [retries-exhausted, connect-failure, breaker-open]
          targets: [{{upstream: backup}}]
    {extra}
    """


@pytest.fixture
async def sidecar(tmp_path, upstream_factory):
    made = []

    async def make(primary_up=True):
        up = await upstream_factory(ws_echo)
        p = ports()
        primary = up.url if primary_up else f"http://127.0.0.1:{free_port()}"
        sc = await start_sidecar(tmp_path, policy(p, primary, up.url))
        made.append(sc)
        return p, sc, up
    yield make
    for sc in made:
        await sc.stop()


def messages(n: int = 1000):
    """Alternating text and binary, one of them 1 MiB."""
    for i in range(n):
        if i == 500:
            yield os.urandom(MiB)
        elif i % 2:
            yield f"text message {i}"
        else:
            yield i.to_bytes(4, "big") * 8


async def echo_with_aiohttp(url: str, proxy: str | None = None) -> tuple[int, dict]:
    sent = list(messages())
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(url, proxy=proxy, max_msg_size=4 * MiB) as ws:
            headers = dict(ws._response.headers)

            async def writer():
                for m in sent:
                    await (ws.send_str(m) if isinstance(m, str) else ws.send_bytes(m))
            task = asyncio.create_task(writer())
            got = []
            for _ in sent:
                msg = await asyncio.wait_for(ws.receive(), HANG_GUARD)
                got.append(msg.data)
            await task
    assert got == sent
    return len(got), headers


async def echo_with_websockets(uri: str, **kwargs) -> int:
    sent = list(messages())
    async with websockets.connect(uri, max_size=4 * MiB, open_timeout=HANG_GUARD, **kwargs) as ws:
        async def writer():
            for m in sent:
                await ws.send(m)
        task = asyncio.create_task(writer())
        got = [await asyncio.wait_for(ws.recv(), HANG_GUARD) for _ in sent]
        await task
    assert got == sent
    return len(got)


async def test_echo_through_the_reverse_listener(sidecar):
    p, sc, up = await sidecar()
    n, headers = await echo_with_aiohttp(f"http://127.0.0.1:{p['reverse']}/echo")
    assert n == 1000 and headers["x-sidecar-route"] == "ws" and headers["x-sidecar-upstream"] == "primary"
    assert await echo_with_websockets(f"ws://127.0.0.1:{p['reverse']}/echo") == 1000


async def test_echo_through_the_proxy_listener(sidecar):
    p, sc, up = await sidecar()
    proxy = f"http://127.0.0.1:{p['proxy']}"
    # aiohttp sends the handshake in absolute form to the proxy: governed by the route
    n, headers = await echo_with_aiohttp(f"http://127.0.0.1:{up.port}/echo", proxy=proxy)
    assert n == 1000 and headers["x-sidecar-route"] == "ws"
    # websockets tunnels through CONNECT: relayed with connect-level policy
    assert await echo_with_websockets(f"ws://127.0.0.1:{up.port}/echo", proxy=proxy) == 1000


async def test_handshake_to_a_down_upstream_is_retried_then_falls_back(sidecar):
    p, sc, up = await sidecar(primary_up=False)
    finished = []
    sc.runtime.sink.sinks.append(type("S", (), {"decision": lambda self, r: None,
                                                "request_finished": lambda self, r: finished.append(r)})())
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(f"http://127.0.0.1:{p['reverse']}/echo") as ws:
            headers = ws._response.headers
            await ws.send_str("hello")
            assert (await asyncio.wait_for(ws.receive(), HANG_GUARD)).data == "hello"
    assert headers["x-sidecar-upstream"] == "backup"
    assert headers["x-sidecar-attempts"] == "3"              # two tries to the primary, one to the backup
    assert "fallback" in headers["x-sidecar-degraded"].split(",")
    for _ in range(200):
        if finished:
            break
        await asyncio.sleep(0.02)
    rec, = finished
    assert (rec.relayed, rec.status, rec.upstream) == ("upgrade", 101, "backup")
    assert rec.bytes_up > 0 and rec.bytes_down > 0
    assert [t.error_type for t in rec.tries] == ["connect-failure", "connect-failure", None]


async def test_a_refused_handshake_reaches_the_client_as_it_is(sidecar):
    p, sc, up = await sidecar()
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await s.ws_connect(f"http://127.0.0.1:{p['reverse']}/forbidden")
    assert err.value.status == 403
    with pytest.raises(websockets.InvalidStatus) as err:
        await websockets.connect(f"ws://127.0.0.1:{p['reverse']}/forbidden", open_timeout=HANG_GUARD)
    assert err.value.response.status_code == 403
    assert err.value.response.headers["x-sidecar-route"] == "ws"


async def test_sigterm_closes_open_sockets_with_1001(sidecar):
    p, sc, up = await sidecar()
    opened = [await websockets.connect(f"ws://127.0.0.1:{p['reverse']}/echo", open_timeout=HANG_GUARD)
              for _ in range(3)]
    await opened[0].send("x" * 100_000)                       # one is mid-conversation
    assert len(await opened[0].recv()) == 100_000
    # drain timeout far above the hang guard: the sockets are told to go away at once, not waited out
    await asyncio.wait_for(sc.runtime.drain(60.0), HANG_GUARD)
    for ws in opened:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), HANG_GUARD)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    assert not sc.runtime.relays.live


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_200_idle_sockets_cost_bounded_memory(sidecar, capsys):
    p, sc, up = await sidecar()
    # warm up: one socket first, so imports and first-use caches are not counted
    first = await websockets.connect(f"ws://127.0.0.1:{p['reverse']}/echo", open_timeout=HANG_GUARD)
    before = rss_kib()
    opened = [await websockets.connect(f"ws://127.0.0.1:{p['reverse']}/echo", open_timeout=HANG_GUARD)
              for _ in range(200)]
    for ws in opened[::20]:
        await ws.send("still here")
        assert await ws.recv() == "still here"
    grown = rss_kib() - before
    assert len(sc.runtime.relays.live) == 201
    # Both ends of every socket live in this process (client, sidecar twice, upstream): the bound is for
    # all four together, about 50 KiB a socket.
    with capsys.disabled():
        print(f"\n200 idle WebSockets (client, sidecar and upstream in one process): RSS +{grown} KiB, "
              f"{grown / 200:.1f} KiB per socket")
    assert grown < 200 * 256
    for ws in [first, *opened]:
        await ws.close()


async def test_handshake_retried_to_a_second_endpoint(tmp_path, upstream_factory):
    up = await upstream_factory(ws_echo)
    p = ports()
    dead = f"http://127.0.0.1:{free_port()}"
    sc = await start_sidecar(tmp_path, f"""
    version: 1
    listeners:
      - {{name: api, mode: reverse, port: {p['reverse']}, upstream: pair}}
    admin: {{bind: 127.0.0.1, port: {p['admin']}}}
    health: {{bind: 127.0.0.1, port: {p['health']}}}
    upstreams:
      pair:
        endpoints: [{{url: "{dead}"}}, {{url: "{up.url}"}}]
        balance: round-robin
    routes:
      - name: ws
        match: {{path_prefix: /}}
        upstream: pair
        retry: {{max_retries: 1, when: [connect-failure]}}
    """)
    try:
        for _ in range(2):                    # whichever endpoint round-robin starts with
            async with aiohttp.ClientSession() as s:
                async with s.ws_connect(f"http://127.0.0.1:{p['reverse']}/echo") as ws:
                    assert ws._response.headers["x-sidecar-endpoint"] == f"127.0.0.1:{up.port}"
                    await ws.send_str("hi")
                    assert (await asyncio.wait_for(ws.receive(), HANG_GUARD)).data == "hi"
    finally:
        await sc.stop()
