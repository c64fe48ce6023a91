"""Slow and idle clients: a bounded time to send request headers, a bounded keep-alive idle time,
and hundreds of half-sent requests that cannot starve anyone else. Timeouts are shortened here; the
defaults (10s headers, 75s idle) are asserted separately."""
import asyncio
import resource
import time

import pytest

from sidecar.proxy import guard

from .kit import assert_healthy, exchange, get, policy_text, read_answer


@pytest.fixture
async def fast(monkeypatch, sidecar_factory, ports, upstream):
    monkeypatch.setattr(guard, "HEADER_TIMEOUT", 0.6)
    monkeypatch.setattr(guard, "IDLE_TIMEOUT", 1.0)
    return await sidecar_factory(policy_text(ports, upstream.url))


def test_defaults_are_nginx_like():
    assert guard.HEADER_TIMEOUT == 10.0
    assert guard.IDLE_TIMEOUT == 75.0
    assert guard.MAX_HEADER_BYTES == 64 * 1024


async def test_headers_trickled_past_the_deadline_get_408_and_close(fast, ports, upstream):
    reader, writer = await asyncio.open_connection("127.0.0.1", ports.reverse)
    started = time.monotonic()
    request = get("/slow")
    answer_task = asyncio.ensure_future(read_answer(reader, timeout=5))
    for byte in request[:-2]:            # one byte every 50 ms: never completes within 0.6 s
        if answer_task.done():
            break
        try:
            writer.write(bytes([byte]))
            await writer.drain()
        except ConnectionError:
            break
        await asyncio.sleep(0.05)
    answer = await answer_task
    writer.close()
    assert answer.status == 408 and answer.closed
    assert 0.5 <= time.monotonic() - started < 2.0
    assert upstream.seen == []
    await assert_healthy(fast, ports, upstream.url)


async def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(fast, ports):
    reader, writer = await asyncio.open_connection("127.0.0.1", ports.reverse)
    started = time.monotonic()
    answer = await read_answer(reader, timeout=5)
    writer.close()
    assert answer.status == 408 and answer.closed
    assert time.monotonic() - started < 2.0


async def test_an_idle_keepalive_connection_is_closed_after_the_idle_timeout(fast, ports):
    reader, writer = await asyncio.open_connection("127.0.0.1", ports.reverse)
    writer.write(get("/one"))
    first = await read_answer(reader, close_wait=0)
    assert first.status == 200
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 5) == b""      # closed, without a 408: nothing was sent
    writer.close()
    assert 0.8 <= time.monotonic() - started < 2.5


async def test_a_slow_request_within_the_deadline_and_keepalive_reuse(fast, ports, upstream):
    """Headers sent in pieces inside the deadline are fine; and the timer restarts per request."""
    reader, writer = await asyncio.open_connection("127.0.0.1", ports.reverse)
    for _ in range(3):
        request = get("/pieces")
        for i in range(0, len(request), 8):
            writer.write(request[i:i + 8])
            await asyncio.sleep(0.01)
        answer = await read_answer(reader, close_wait=0)
        assert answer.status == 200
        await asyncio.sleep(0.4)         # idle between requests, under both timeouts
    writer.close()
    assert len(upstream.seen) == 3


async def test_a_slow_upload_body_is_not_cut_by_the_header_timeout(fast, ports, upstream):
    """The header deadline covers the head only: a body may take its time (bounded by idle reads)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", ports.reverse)
    writer.write(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 20\r\n\r\n")
    for _ in range(10):                  # 2 bytes every 150 ms: 1.5 s, well past the 0.6 s deadline
        writer.write(b"xx")
        await writer.drain()
        await asyncio.sleep(0.15)
    answer = await read_answer(reader, close_wait=0)
    writer.close()
    assert answer.status == 200 and answer.body == b"ok POST /upload 20"


async def test_a_slow_chunked_upload_is_not_cut_either(fast, ports, upstream):
    reader, writer = await asyncio.open_connection("127.0.0.1", ports.reverse)
    writer.write(b"POST /chunks HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(8):
        writer.write(b"3\r\nabc\r\n")
        await writer.drain()
        await asyncio.sleep(0.15)
    writer.write(b"0\r\n\r\n")
    answer = await read_answer(reader, close_wait=0)
    writer.close()
    assert answer.status == 200 and answer.body == b"ok POST /chunks 24"


async def test_headers_growing_past_the_total_cap_in_many_reads_get_431(fast, ports, upstream):
    reader, writer = await asyncio.open_connection("127.0.0.1", ports.reverse)
    writer.write(b"GET /big HTTP/1.1\r\nHost: a\r\n")
    status = None
    for i in range(120):                 # 120 x 700 B > 64 KiB, each line well under 8 KiB
        try:
            writer.write(f"X-{i}: {'v' * 700}\r\n".encode())
            await writer.drain()
        except ConnectionError:
            break
        await asyncio.sleep(0)
    answer = await read_answer(reader)
    writer.close()
    status = answer.status
    assert status == 431 and answer.closed
    assert upstream.seen == []


async def test_hundreds_of_half_sent_requests_do_not_starve_others(fast, ports, upstream):
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    count = min(300, (soft - 100) // 2)
    slow = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", ports.reverse)
        writer.write(b"GET /never-finished HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        slow.append((reader, writer))
    # Meanwhile, normal requests are answered promptly.
    started = time.monotonic()
    answers = await asyncio.gather(*(exchange(ports.reverse, get(f"/ok{i}"), close_wait=0) for i in range(50)))
    assert all(a.status == 200 for a in answers)
    assert time.monotonic() - started < 2.0
    # And every half-sent request is answered 408 and closed once its deadline passed.
    closed = await asyncio.gather(*(read_answer(r, timeout=5) for r, _ in slow))
    for _, writer in slow:
        writer.close()
    assert {a.status for a in closed} == {408}
    assert all(a.closed for a in closed)
    server = fast.runtime._servers["api"][1]
    await asyncio.sleep(0.1)
    assert len(server.connections) <= 1
    await assert_healthy(fast, ports, upstream.url)


async def test_a_client_gone_after_its_answer_leaves_no_connection_behind(sidecar_factory, ports,
                                                                          raw_upstream_factory):
    """The app sent part of a body, got its answer (the upstream did not wait for the rest) and went
    away: its connection is released at once, not after aiohttp's 10 s lingering read of the unread
    body on a socket that is already gone."""
    async def answer_at_once(reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()                  # until the sidecar drops the half-sent upload
    up = await raw_upstream_factory(answer_at_once)
    sc = await sidecar_factory(policy_text(ports, up.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", ports.reverse)
    writer.write(b"POST /upload HTTP/1.1\r\nHost: app.local\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
    answer = await read_answer(reader, close_wait=0)
    assert (answer.status, answer.body) == (200, b"ok")
    servers = [entry[1] for entry in sc.runtime._servers.values()]
    assert any(server.connections for server in servers)
    writer.close()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5.0             # aiohttp's lingering_time is 10 s
    while any(server.connections for server in servers) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    assert not any(server.connections for server in servers), "the connection outlived its client"


async def test_a_client_waiting_for_100_continue_gets_it_before_sending_its_body(sidecar_factory, ports,
                                                                               upstream):
    """RFC 9110 §10.1.1: curl and others send `Expect: 100-continue` and hold the body back until a 100
    (curl gives up waiting after a second). The sidecar answers it; the upstream sees no Expect."""
    await sidecar_factory(policy_text(ports, upstream.url))
    for port, target in ((ports.reverse, "/upload"), (ports.proxy, f"{upstream.url}/upload")):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"POST {target} HTTP/1.1\r\nHost: app.local\r\nContent-Length: 5\r\n"
                     f"Expect: 100-continue\r\n\r\n".encode())
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)   # the body is not sent yet
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        answer = await read_answer(reader, close_wait=0)
        writer.close()
        assert (answer.status, answer.body) == (200, b"ok POST /upload 5")
        assert "Expect" not in upstream.seen[-1]["headers"]
