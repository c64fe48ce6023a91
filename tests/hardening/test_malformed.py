"""Malformed and hostile requests from the app, over raw sockets to a running sidecar: each refused
with its 4xx/505 and a JSON error, the connection closed, nothing forwarded, the process unaffected."""
import asyncio

import pytest

from .kit import assert_healthy, exchange, get, read_answer
from .smuggling_corpus import CASES


@pytest.mark.parametrize("case,listener", [(c, lst) for c in CASES for lst in c.listeners],
                         ids=[f"{c.name}-{lst}" for c in CASES for lst in c.listeners])
async def test_corpus_is_refused(sidecar, ports, upstream, case, listener):
    port = getattr(ports, listener)
    target = "/smuggle" if listener == "reverse" else f"{upstream.url}/smuggle"
    answer = await exchange(port, case.render(target, "app.local"))
    assert answer.status == case.status, (case.why, answer)
    assert answer.closed, "the framing is lost: the connection must close"
    assert answer.extra == b"", "a second answer on the connection: something was smuggled"
    doc = answer.json()
    assert doc["route"] is None and doc["error"]
    assert b"smuggle" not in answer.body.lower() and b"\\x" not in answer.body   # no echo of raw bytes
    assert upstream.seen == [], "nothing of a refused request reaches the upstream"
    await assert_healthy(sidecar, ports, upstream.url)


async def test_all_cases_on_one_connection_each_in_a_burst(sidecar, ports, upstream):
    """The whole corpus at once, concurrently: every connection gets its answer, none hangs."""
    cases = [c for c in CASES if "reverse" in c.listeners]
    answers = await asyncio.gather(*(exchange(ports.reverse, c.render("/smuggle", "app.local")) for c in cases))
    assert [a.status for a in answers] == [c.status for c in cases]
    assert upstream.seen == []
    await assert_healthy(sidecar, ports, upstream.url)


async def test_refused_request_after_a_good_one_on_a_keepalive_connection(sidecar, ports, upstream):
    """A good request, then a smuggling attempt on the same connection: the first is answered, the
    second refused and the connection closed; the upstream saw only the first."""
    reader, writer = await asyncio.open_connection("127.0.0.1", ports.reverse)
    writer.write(get("/first"))
    first = await read_answer(reader, close_wait=0.2)
    assert first.status == 200 and not first.closed
    writer.write(CASES[0].render("/second", "app.local"))
    second = await read_answer(reader)
    writer.close()
    assert second.status == 400 and second.closed
    assert [s["path"] for s in upstream.seen] == ["/first"]


async def test_pipelined_requests_are_each_answered_in_order(sidecar, ports, upstream):
    reader, writer = await asyncio.open_connection("127.0.0.1", ports.reverse)
    body = b"hello"
    writer.write(get("/one") + b"POST /two HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n" + body + get("/three"))
    answers = [await read_answer(reader, close_wait=0) for _ in range(3)]
    writer.close()
    assert [a.body for a in answers] == [b"ok GET /one 0", b"ok POST /two 5", b"ok GET /three 0"]


async def test_declined_upgrade_does_not_swallow_the_next_request(sidecar, ports, upstream):
    """An upgrade the upstream declines (it answers 200, not 101) is relayed as an ordinary answer, and
    bytes after it are parsed as the next request, not tunnelled (RFC 9110 §7.8)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", ports.reverse)
    writer.write(get("/up", extra="Connection: Upgrade\r\nUpgrade: websocket\r\n") + get("/next"))
    first = await read_answer(reader, close_wait=0)
    second = await read_answer(reader, close_wait=0)
    writer.close()
    assert (first.status, second.status) == (200, 200)
    assert [s["path"] for s in upstream.seen] == ["/up", "/next"]
    assert {k.lower(): v for k, v in upstream.seen[0]["headers"].items()}["upgrade"] == "websocket"
    assert "upgrade" not in {k.lower() for k in upstream.seen[1]["headers"]}


async def test_absolute_form_on_the_reverse_listener_keeps_its_path(sidecar, ports, upstream):
    """RFC 9112 §3.2.2: a server accepts absolute-form; the path and query are what is forwarded."""
    answer = await exchange(ports.reverse, get("http://elsewhere.example/x/y?q=1"), close_wait=0)
    assert answer.status == 200
    assert upstream.seen[-1]["path"] == "/x/y?q=1"


async def test_connect_on_a_reverse_listener_is_405(sidecar, ports, upstream):
    answer = await exchange(ports.reverse, b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n")
    assert answer.status == 405
    await assert_healthy(sidecar, ports, upstream.url)


async def test_request_body_cut_short_is_not_forwarded_as_complete(sidecar, ports, upstream):
    """The app promises 100 bytes, sends 10 and closes: the upstream never gets a 'complete' body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", ports.reverse)
    writer.write(b"POST /cut HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    await writer.drain()
    writer.close()
    await asyncio.sleep(0.3)
    assert all(s["size"] == 100 for s in upstream.seen if s["path"] == "/cut")
    await assert_healthy(sidecar, ports, upstream.url)
