"""The sniffing front on loopback: a transparent listener relays TLS (routed by SNI) and any other TCP to
the original destination, waits `sniff_timeout` for server-speaks-first protocols, and keeps HTTP
governed; a reverse listener keeps refusing the HTTP/2 preface until an h2 hook is registered.
SO_ORIGINAL_DST needs iptables (tests/ops/test_ops_transparent.py does it for real); here the original
destination is set by the test."""
from __future__ import annotations

import asyncio
import ssl
import subprocess

import pytest

from harness import ports, start_sidecar
from sidecar.proxy import passthrough, server as listener_server, sniff
from sidecar.proxy.sniff import H2_PREFACE, Kind, classify

HANG_GUARD = 10.0


def test_classify():
    t = dict(transparent=True)
    assert classify(b"GET / HTTP/1.1\r\n", **t) is Kind.HTTP1
    assert classify(b"\r\nPOST /x HTTP/1.0\n", **t) is Kind.HTTP1
    assert classify(b"GET /partial", **t) is None
    assert classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", **t) is Kind.H2
    assert classify(b"PRI * HTTP/2", **t) is None
    assert classify(b"\x16\x03\x01\x00", **t) is Kind.TLS
    assert classify(b"*1\r\n$4\r\nPING\r\n", **t) is Kind.TCP
    assert classify(b"SSH-2.0-OpenSSH_9.6\r\n", **t) is Kind.TCP
    assert classify(b"SET a b\r\n", **t) is Kind.TCP           # a word and a space is not HTTP
    assert classify(b"", **t) is None
    assert classify(b"GET / HTTP/1.1\r\n", transparent=False) is Kind.HTTP1
    assert classify(b"\x16\x03\x01", transparent=False) is Kind.HTTP1   # the HTTP server answers 400
    assert classify(b"PR", transparent=False) is None
    assert classify(b"POST", transparent=False) is Kind.HTTP1


def policy(p, extra: str = "", unmatched: str = "passthrough") -> str:
    return f"""
    version: 1
    listeners:
      - {{name: outbound, mode: transparent, port: {p['proxy']}, sniff_timeout: 150ms}}
      - {{name: api, mode: reverse, port: {p['reverse']}, upstream: nowhere}}
    admin: {{bind: 127.0.0.1, port: {p['admin']}}}
    health: {{bind: 127.0.0.1, port: {p['health']}}}
    unmatched: {unmatched}
    upstreams:
      nowhere: {{url: "http://127.0.0.1:9"}}
    routes:
      - name: by-sni
        match: {{host: tls.test}}
      - name: by-address
        match: {{host: 127.0.0.1}}
    {extra}
    """


class Records:
    def __init__(self):
        self.finished = []
        self.decisions = []

    def decision(self, r):
        self.decisions.append(r)

    def request_finished(self, r):
        self.finished.append(r)


@pytest.fixture
async def transparent(tmp_path, monkeypatch):
    """A sidecar whose transparent listener believes every connection was going to `target[0]`."""
    target: list[tuple[str, int]] = []
    monkeypatch.setattr(passthrough, "original_destination", lambda transport: target[0])
    monkeypatch.setattr(listener_server, "original_destination", lambda transport: target[0])
    started = []

    async def make(unmatched="passthrough"):
        p = ports()
        sc = await start_sidecar(tmp_path, policy(p, unmatched=unmatched))
        rec = Records()
        sc.runtime.sink.sinks.append(rec)
        started.append(sc)
        return p, sc, rec, target
    yield make
    for sc in started:
        await sc.stop()


@pytest.fixture(scope="module")
def tls_server_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"),
                    "-subj", "/CN=tls.test", "-addext", "subjectAltName=DNS:tls.test"],
                   check=True, capture_output=True)
    return d / "cert.pem", d / "key.pem"


async def until(predicate, what):
    for _ in range(int(HANG_GUARD / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {HANG_GUARD}s: {what}")


async def test_tls_is_relayed_to_the_original_destination_routed_by_sni(transparent, tls_server_files):
    cert, key = tls_server_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    seen_sni = []
    server_ctx.sni_callback = lambda sock, name, ctx: seen_sni.append(name)

    async def echo(reader, writer):
        writer.write(b"hello " + await reader.readline())
        await writer.drain()
        writer.close()
    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=server_ctx)
    p, sc, rec, target = await transparent()
    target.append(("127.0.0.1", server.sockets[0].getsockname()[1]))
    client_ctx = ssl.create_default_context(cafile=str(cert))    # the app trusts the server's own CA
    reader, writer = await asyncio.open_connection("127.0.0.1", p["proxy"], ssl=client_ctx,
                                                   server_hostname="tls.test")
    writer.write(b"app\n")
    assert await asyncio.wait_for(reader.read(), HANG_GUARD) == b"hello app\n"
    writer.close()
    server.close()
    assert seen_sni == ["tls.test"]                   # the server saw the app's own ClientHello
    await until(lambda: rec.finished, "the connection's record")
    r, = rec.finished
    assert (r.relayed, r.route, r.url, r.status) == ("tls", "by-sni", f"tls.test:{target[0][1]}", 200)
    assert r.bytes_up > 100 and r.bytes_down > 100     # the handshake and the records, each way


async def test_client_first_tcp_is_relayed(transparent):
    async def pong(reader, writer):
        assert await reader.readexactly(14) == b"*1\r\n$4\r\nPING\r\n"
        writer.write(b"+PONG\r\n")
        await writer.drain()
        writer.close()
    server = await asyncio.start_server(pong, "127.0.0.1", 0)
    p, sc, rec, target = await transparent()
    target.append(("127.0.0.1", server.sockets[0].getsockname()[1]))
    reader, writer = await asyncio.open_connection("127.0.0.1", p["proxy"])
    writer.write(b"*1\r\n$4\r\nPING\r\n")
    assert await asyncio.wait_for(reader.read(), HANG_GUARD) == b"+PONG\r\n"
    writer.close()
    server.close()
    await until(lambda: rec.finished, "the connection's record")
    r, = rec.finished
    assert (r.relayed, r.route, r.bytes_up, r.bytes_down) == ("tcp", "by-address", 14, 7)


async def test_server_speaks_first_after_the_sniff_timeout(transparent):
    async def banner(reader, writer):
        writer.write(b"220 banner.test ESMTP\r\n")
        await writer.drain()
        writer.write(b"echo " + await reader.readline())
        await writer.drain()
        writer.close()
    server = await asyncio.start_server(banner, "127.0.0.1", 0)
    p, sc, rec, target = await transparent()
    target.append(("127.0.0.1", server.sockets[0].getsockname()[1]))
    reader, writer = await asyncio.open_connection("127.0.0.1", p["proxy"])
    # The app says nothing: after sniff_timeout the sidecar connects and the banner comes through.
    assert await asyncio.wait_for(reader.readline(), HANG_GUARD) == b"220 banner.test ESMTP\r\n"
    writer.write(b"EHLO app\r\n")
    assert await asyncio.wait_for(reader.read(), HANG_GUARD) == b"echo EHLO app\r\n"
    writer.close()
    server.close()


async def test_plain_http_is_still_governed(transparent, upstream_factory):
    from aiohttp import web

    async def fine(request):
        return web.Response(text="fine")
    up = await upstream_factory(fine)
    p, sc, rec, target = await transparent()
    target.append(("127.0.0.1", up.port))
    reader, writer = await asyncio.open_connection("127.0.0.1", p["proxy"])
    writer.write(b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), HANG_GUARD)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200") and b"x-sidecar-route: by-address" in answer.lower()


async def test_unmatched_tls_under_deny_is_reset_and_traced(transparent):
    p, sc, rec, target = await transparent(unmatched="deny")
    target.append(("127.0.0.1", 9))
    ctx = ssl.create_default_context()
    with pytest.raises((ConnectionError, ssl.SSLError)):
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", p["proxy"], ssl=ctx,
                                                       server_hostname="other.test"), HANG_GUARD)
    await until(lambda: rec.finished, "the refusal's record")
    assert [d.decision.value for d in rec.decisions] == ["unmatched_denied"]


async def test_connect_failure_resets_the_app_and_counts_on_the_breaker(transparent):
    p, sc, rec, target = await transparent()
    from harness import free_port
    target.append(("127.0.0.1", free_port()))             # nothing listens there
    reader, writer = await asyncio.open_connection("127.0.0.1", p["proxy"])
    writer.write(b"*1\r\n$4\r\nPING\r\n")
    with pytest.raises(ConnectionError):
        data = await asyncio.wait_for(reader.read(), HANG_GUARD)
        assert data == b""                                   # or a reset, depending on timing
        raise ConnectionResetError
    writer.close()
    await until(lambda: rec.finished, "the record")
    assert rec.finished[0].error_type == "connect-failure"


@pytest.fixture
def no_h2_hook():
    """The sidecar installs proxy/h2server.py's hook when a runtime starts; these tests take it out."""
    previous = sniff.h2_factory()
    sniff.register_h2(None)
    yield
    sniff.register_h2(previous)


async def test_h2_preface_on_reverse_is_refused_until_a_hook_is_registered(transparent, no_h2_hook):
    p, sc, rec, target = await transparent()
    sniff.register_h2(None)                         # starting the runtime installed the HTTP/2 one
    reader, writer = await asyncio.open_connection("127.0.0.1", p["reverse"])
    writer.write(H2_PREFACE)
    answer = await asyncio.wait_for(reader.read(), HANG_GUARD)
    writer.close()
    assert answer.split(b" ")[1] == b"400"          # aiohttp refuses the preface, as before sniffing

    got = []

    class Fake(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            got.append(data)
            self.transport.write(b"h2 here")
            self.transport.close()

    def factory(conn: sniff.Sniffed):
        assert conn.listener.name == "api" and conn.first == H2_PREFACE
        return Fake()
    sniff.register_h2(factory)
    try:
        assert sniff.ALPN_PROTOCOLS == ["h2", "http/1.1"]
        reader, writer = await asyncio.open_connection("127.0.0.1", p["reverse"])
        writer.write(H2_PREFACE)
        assert await asyncio.wait_for(reader.read(), HANG_GUARD) == b"h2 here"
        writer.close()
        assert got == [H2_PREFACE]
    finally:
        sniff.register_h2(None)
    assert sniff.ALPN_PROTOCOLS == ["http/1.1"]


async def test_h2_preface_on_transparent_passes_through_as_tcp_without_a_hook(transparent, no_h2_hook):
    async def peer(reader, writer):
        writer.write(b"got " + await reader.readexactly(len(H2_PREFACE)))
        await writer.drain()
        writer.close()
    server = await asyncio.start_server(peer, "127.0.0.1", 0)
    p, sc, rec, target = await transparent()
    sniff.register_h2(None)                         # starting the runtime installed the HTTP/2 one
    target.append(("127.0.0.1", server.sockets[0].getsockname()[1]))
    reader, writer = await asyncio.open_connection("127.0.0.1", p["proxy"])
    writer.write(H2_PREFACE)
    assert await asyncio.wait_for(reader.read(), HANG_GUARD) == b"got " + H2_PREFACE
    writer.close()
    server.close()


def test_sniff_timeout_is_a_transparent_listener_setting(tmp_path):
    from sidecar.policy.errors import PolicyError
    from sidecar.policy.load import load_policy
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nlisteners:\n  - {name: t, mode: transparent, sniff_timeout: 50ms, idle_timeout: 5m}\n"
                    "  - {name: p, mode: proxy, port: 15001, sniff_timeout: 1s}\n")
    with pytest.raises(PolicyError) as err:
        load_policy(str(path))
    assert [str(p) for p in err.value.problems] == [
        f"{path}:4:56: listener 'p': only a transparent listener sniffs"]
    path.write_text("version: 1\nlisteners:\n  - {name: t, mode: transparent, sniff_timeout: 50ms, idle_timeout: 5m}\n")
    listener, = load_policy(str(path)).listeners
    assert (listener.sniff_timeout, listener.idle_timeout) == (0.05, 300.0)


async def test_truncated_and_random_first_bytes_are_relayed_whole_after_the_sniff_timeout(transparent):
    """Whatever the app sends first (a ClientHello cut anywhere, random bytes) and then waits: the
    sidecar decides by `sniff_timeout` and relays every byte it read to the original destination."""
    import random
    from test_clienthello import HELLO
    received: list[bytes] = []

    async def sink(reader, writer):
        received.append(await reader.read(65536))
        writer.write(b"ack")
        await writer.drain()
        writer.close()
    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    p, sc, rec, target = await transparent()
    target.append(("127.0.0.1", server.sockets[0].getsockname()[1]))
    rng = random.Random(15)
    cases = [HELLO[:n] for n in rng.sample(range(1, len(HELLO)), 12)] + \
        [bytes([0x16, 0x03]) + rng.randbytes(rng.randrange(1, 300)) for _ in range(6)] + \
        [rng.randbytes(rng.randrange(1, 300)) for _ in range(6)] + [b"GET /half", b"PRI * HT"]
    for first in cases:
        reader, writer = await asyncio.open_connection("127.0.0.1", p["proxy"])
        writer.write(first)
        if first.startswith((b"GET", b"PRI")):
            writer.close()                    # a partial request line or preface is HTTP's or h2's to refuse

            continue
        answer = await asyncio.wait_for(reader.read(), HANG_GUARD)
        writer.close()
        assert answer == b"ack", first
        assert received[-1] == first
    server.close()


async def test_plain_http_to_an_ipv6_original_destination_is_named_in_brackets(transparent, upstream_factory):
    from aiohttp import web

    async def host_seen(request):
        return web.Response(text=request.headers.get("Host", "(none)"))
    up = await upstream_factory(host_seen, host="::1")
    p, sc, rec, target = await transparent()
    target.append(("::1", up.port))
    name = f"[::1]:{up.port}"
    # HTTP/1.0 with no Host: the original destination is all there is to name the target by
    with_host = f"GET /x HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode()
    for request in (b"GET /x HTTP/1.0\r\n\r\n", with_host):
        reader, writer = await asyncio.open_connection("127.0.0.1", p["proxy"])
        writer.write(request)
        answer = await asyncio.wait_for(reader.read(), HANG_GUARD)
        writer.close()
        assert answer.split(b" ")[1] == b"200", answer
        assert f"x-sidecar-upstream: {name}\r\n".encode() in answer.lower(), answer
        assert answer.endswith(f"\r\n\r\n{name}".encode())          # the Host the server saw
    assert up.hits == 2
    # any other TCP to the same destination is relayed, and its record names it the same way
    reader, writer = await asyncio.open_connection("127.0.0.1", p["proxy"])
    writer.write(b"*1\r\n$4\r\nPING\r\n")
    assert (await asyncio.wait_for(reader.read(), HANG_GUARD)).split(b" ")[1] == b"400"   # from the server
    writer.close()
    await until(lambda: any(r.relayed == "tcp" for r in rec.finished), "the relayed connection's record")
    r = next(r for r in rec.finished if r.relayed == "tcp")
    assert (r.url, r.tries[0].upstream) == (name, name)
