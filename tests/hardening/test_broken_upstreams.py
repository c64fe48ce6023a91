"""Broken upstreams behind a running sidecar, written as raw sockets: each fault becomes a classified
failure (retried, counted by the breaker, answered by the fallback) or a JSON 502/503/504 before the
first byte, or a cut connection after it; never a crash, a bare 500 or a hung request."""
import asyncio
import time

import pytest

from sidecar.pipeline import send as send_module

from .kit import Ports, assert_healthy, exchange, get, policy_text


async def garbage_status(reader, writer):
    writer.write(b"HTTX/1.1 200 OK\r\nSet-Cookie: s=UPSTREAM-SECRET\r\n\r\nhello")


async def bad_status_code(reader, writer):
    writer.write(b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nhi")


async def not_http(reader, writer):
    writer.write(b"\x00\x01\x02 this is not http at all\r\n\r\n")


async def cl_and_te(reader, writer):
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")


async def header_too_long(reader, writer):
    writer.write(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 20000 + b"\r\nContent-Length: 0\r\n\r\n")


async def too_many_headers(reader, writer):
    writer.write(b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(500))
                 + b"Content-Length: 0\r\n\r\n")


async def reset_before_headers(reader, writer):
    writer.transport.abort()


async def close_before_headers(reader, writer):
    pass


async def trickle_headers(reader, writer):
    writer.write(b"HTTP/1.1 200 OK\r\n")
    for i in range(10_000):
        writer.write(b"X-%d: a\r\n" % i)
        await writer.drain()
        await asyncio.sleep(0.05)


async def silent(reader, writer):
    await asyncio.sleep(3600)


PRE_HEADER_FAULTS = [
    # script, status, failure kind in the JSON error
    (garbage_status, 502, "protocol-error"),
    (bad_status_code, 502, "protocol-error"),
    (not_http, 502, "protocol-error"),
    (cl_and_te, 502, "protocol-error"),
    (header_too_long, 502, "protocol-error"),
    (too_many_headers, 502, "protocol-error"),
    (reset_before_headers, 503, "reset"),
    (close_before_headers, 503, "reset"),
    (trickle_headers, 504, "timeout"),
    (silent, 504, "timeout"),
]


@pytest.mark.parametrize("script,status,kind", PRE_HEADER_FAULTS, ids=[f[0].__name__ for f in PRE_HEADER_FAULTS])
async def test_fault_before_the_first_byte_is_a_json_error(raw_upstream_factory, sidecar_factory, script,
                                                           status, kind):
    up = await raw_upstream_factory(script)
    ports = Ports()
    sc = await sidecar_factory(policy_text(ports, up.url, "defaults: {timeout: 1s}\n"))
    started = time.monotonic()
    answer = await exchange(ports.reverse, get("/x"), timeout=5)
    assert time.monotonic() - started < 2.5, "bounded by the route timeout"
    assert answer.status == status, answer
    assert answer.headers["content-type"] == "application/json"
    doc = answer.json()
    assert doc["route"] == "default" and doc["error"].startswith(kind)
    assert b"UPSTREAM-SECRET" not in answer.body and b"\\x" not in answer.body   # no raw upstream bytes
    assert sc.runtime.status()["ready"]


async def test_protocol_errors_and_resets_feed_retry_breaker_and_fallback(raw_upstream_factory, sidecar_factory):
    up = await raw_upstream_factory(garbage_status)
    ports = Ports()
    sc = await sidecar_factory(policy_text(ports, up.url, """
        routes:
          - name: guarded
            match: {path_prefix: /}
            upstream: app
            timeout: 2s
            retry: {max_retries: 2, when: [protocol-error, reset], backoff: {base: 1ms, max: 2ms}}
            breaker: {consecutive_failures: 3, open_for: 30s}
            fallback:
              when: [retries-exhausted, breaker-open, protocol-error]
              targets: [{static: {status: 200, json: {degraded: true}}}]
        """))
    first = await exchange(ports.reverse, get("/a"), close_wait=0)
    assert first.status == 200 and first.json() == {"degraded": True}
    degraded = first.headers["x-sidecar-degraded"].split(",")
    # three tries (one + two retries), three protocol errors: the breaker opened, the static answered
    assert degraded == ["retry", "breaker_opened", "static_response"]
    assert up.connections == 3
    second = await exchange(ports.reverse, get("/b"), close_wait=0)
    assert second.status == 200 and second.json() == {"degraded": True}
    assert "breaker_open" in second.headers["x-sidecar-degraded"].split(",")
    assert up.connections == 3                       # the open breaker spared the upstream
    breakers = {r["name"]: r["breakers"] for r in sc.runtime.status()["routes"]}["guarded"]
    assert breakers["app"]["state"] == "open"


async def reset_mid_body(reader, writer):
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 5000)
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.transport.abort()


async def broken_chunk_mid_body(reader, writer):
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.write(b"zz\r\nnot a chunk\r\n")
    await writer.drain()
    await asyncio.sleep(0.2)


async def short_body_then_close(reader, writer):
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")


async def stall_mid_body(reader, writer):
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    await writer.drain()
    await asyncio.sleep(3600)


AFTER_FIRST_BYTE = [reset_mid_body, broken_chunk_mid_body, short_body_then_close, stall_mid_body]


@pytest.mark.parametrize("script", AFTER_FIRST_BYTE, ids=[s.__name__ for s in AFTER_FIRST_BYTE])
async def test_fault_after_the_first_byte_cuts_the_connection_and_counts(monkeypatch, raw_upstream_factory,
                                                                         sidecar_factory, upstream, script):
    """The app already has the status line: it gets a truncated body and a closed connection (never a
    'complete' short body), and the breaker counts the cut."""
    monkeypatch.setattr(send_module, "MIN_READ_IDLE", 0.5)
    up = await raw_upstream_factory(script)
    ports = Ports()
    sc = await sidecar_factory(policy_text(ports, up.url, """
        routes:
          - name: streamed
            match: {path_prefix: /}
            upstream: app
            timeout: 0.5s
            breaker: {consecutive_failures: 2, open_for: 30s}
        """))
    for _ in range(2):
        started = time.monotonic()
        answer = await exchange(ports.reverse, get("/stream"), timeout=5)
        assert time.monotonic() - started < 3
        assert answer.status == 200 and answer.truncated and answer.closed, answer
    breakers = {r["name"]: r["breakers"] for r in sc.runtime.status()["routes"]}["streamed"]
    assert breakers["app"]["state"] == "open"
    refused = await exchange(ports.reverse, get("/stream"), timeout=5)
    assert refused.status == 503 and "breaker_open" in refused.json()["decisions"]
    assert sc.runtime.status()["ready"]


async def endless_body(reader, writer):
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    while True:
        writer.write(b"400\r\n" + b"y" * 1024 + b"\r\n")
        await writer.drain()
        await asyncio.sleep(0.01)


async def test_app_leaving_an_endless_stream_frees_the_upstream_connection(raw_upstream_factory,
                                                                           sidecar_factory):
    up = await raw_upstream_factory(endless_body)
    ports = Ports()
    sc = await sidecar_factory(policy_text(ports, up.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", ports.reverse)
    writer.write(get("/endless"))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    await asyncio.wait_for(reader.readexactly(50_000), 5)    # streamed, not buffered: it flows
    writer.transport.abort()
    for _ in range(50):                  # the sidecar drops its upstream connection too
        await asyncio.sleep(0.05)
        if not up._tasks:
            break
    assert not up._tasks, "the upstream connection outlived the app's"
    assert sc.runtime.status()["ready"]


async def test_sidecar_survives_a_mixed_storm_of_broken_upstreams(raw_upstream_factory, sidecar_factory,
                                                                  upstream):
    """Every fault at once, many times: all answered, the process healthy after."""
    scripts = [f[0] for f in PRE_HEADER_FAULTS if f[0] not in (silent, trickle_headers)] + \
        [reset_mid_body, broken_chunk_mid_body, short_body_then_close]
    ups = [await raw_upstream_factory(s) for s in scripts]
    ports = Ports()
    upstreams = "".join(f"  u{i}: {{url: '{u.url}'}}\n" for i, u in enumerate(ups))
    routes = "".join(f"  - {{name: r{i}, match: {{path_prefix: /u{i}/}}, upstream: u{i}}}\n"
                     for i in range(len(ups)))
    text = policy_text(ports, upstream.url).replace("upstreams:\n", "upstreams:\n" + upstreams) + \
        "defaults: {timeout: 2s}\nroutes:\n" + routes
    sc = await sidecar_factory(text)
    answers = await asyncio.gather(*(exchange(ports.reverse, get(f"/u{i % len(ups)}/x"), timeout=5, close_wait=0)
                                     for i in range(len(ups) * 6)))
    assert all(a.status is not None for a in answers)
    assert all(a.status in (200, 502, 503, 504) for a in answers)
    assert all(a.truncated for a in answers if a.status == 200)
    await assert_healthy(sc, ports)
