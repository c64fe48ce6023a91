"""Issue 2: real traffic through both listener modes, bodies of every size, streaming, CONNECT, TLS."""
import asyncio
import hashlib
import os
import ssl
import subprocess

import aiohttp
import pytest
from aiohttp import web

from harness import free_port

MiB = 1024 * 1024


async def echo(request: web.Request) -> web.StreamResponse:
    """Streams the body back while hashing it, so 50 MiB never sits whole in the upstream either."""
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        size += len(chunk)
    return web.json_response({"method": request.method, "path": request.path_qs, "size": size,
                              "sha256": digest.hexdigest(),
                              "headers": {k.lower(): v for k, v in request.headers.items()}})


def policy(port, upstream_url, extra=""):
    return f"""
    version: 1
    listeners:
      - {{name: egress, mode: proxy, port: {port['proxy']}}}
      - {{name: api, mode: reverse, port: {port['reverse']}, upstream: echo}}
    admin: {{bind: 127.0.0.1, port: {port['admin']}}}
    health: {{bind: 127.0.0.1, port: {port['health']}}}
    upstreams:
      echo: {{url: "{upstream_url}"}}
    defaults:
      timeout: 30s
    routes:
      - name: echo-route
        match: {{path_prefix: /}}
        upstream: echo
    {extra}
    """


def chunks(total: int, size: int = 256 * 1024):
    async def gen():
        sent = 0
        block = os.urandom(size)
        while sent < total:
            part = block[: min(size, total - sent)]
            sent += len(part)
            yield part
    return gen()


@pytest.mark.parametrize("method", ["GET", "POST", "PUT"])
@pytest.mark.parametrize("size", [0, MiB, 50 * MiB])
@pytest.mark.parametrize("listener", ["proxy", "reverse"])
async def test_bodies_of_every_size(upstream_factory, sidecar_factory, port, method, size, listener):
    if method == "GET" and size:
        size = min(size, MiB)               # GET with a body is legal but rare: one size is enough
    up = await upstream_factory(echo)
    await sidecar_factory(policy(port, up.url))
    body = os.urandom(size) if size <= MiB else None
    expected = hashlib.sha256(body).hexdigest() if body is not None else None
    data = body if body is not None else chunks(size)
    async with aiohttp.ClientSession() as s:
        if listener == "proxy":
            url = f"http://127.0.0.1:{up.port}/items?b=2&a=1"
            kwargs = {"proxy": f"http://127.0.0.1:{port['proxy']}"}
        else:
            url = f"http://127.0.0.1:{port['reverse']}/items?b=2&a=1"
            kwargs = {}
        async with s.request(method, url, data=data, **kwargs) as r:
            assert r.status == 200
            doc = await r.json()
            assert r.headers["x-sidecar-route"] == "echo-route"
            assert r.headers["x-sidecar-upstream"] == "echo"
            assert r.headers["x-sidecar-attempts"] == "1"
            assert "x-sidecar-degraded" not in r.headers
    assert doc["size"] == size
    assert doc["path"] == "/items?b=2&a=1"
    if expected is not None:
        assert doc["sha256"] == expected


async def test_chunked_response_streams_before_upstream_finishes(upstream_factory, sidecar_factory, port):
    release = asyncio.Event()

    async def slow_stream(request):
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: first\n\n")
        await release.wait()
        await resp.write(b"data: second\n\n")
        await resp.write_eof()
        return resp
    up = await upstream_factory(slow_stream)
    await sidecar_factory(policy(port, up.url))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port['reverse']}/stream") as r:
            first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
            assert first == b"data: first\n\n"   # arrived while the upstream still holds the rest
            release.set()
            rest = await asyncio.wait_for(r.content.read(), 5)
            assert rest == b"data: second\n\n"


async def test_hop_by_hop_headers_dropped_both_ways(upstream_factory, sidecar_factory, port):
    async def handler(request):
        seen = {k.lower(): v for k, v in request.headers.items()}
        return web.json_response(seen, headers={"x-private": "secret-hop", "connection": "x-private",
                                                "keep-alive": "timeout=5", "x-end": "kept"})
    up = await upstream_factory(handler)
    await sidecar_factory(policy(port, up.url))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{up.port}/h", proxy=f"http://127.0.0.1:{port['proxy']}",
                         headers={"connection": "x-drop-me", "x-drop-me": "1", "te": "trailers",
                                  "keep-alive": "300", "upgrade": "websocket",
                                  "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                                  "x-app": "kept"}) as r:
            seen = await r.json()
            assert "x-private" not in r.headers
            assert "keep-alive" not in r.headers
            assert r.headers["x-end"] == "kept"
    for hop in ("x-drop-me", "te", "keep-alive", "upgrade"):
        assert hop not in seen
    assert seen["x-app"] == "kept"
    # traceparent passes, carrying the caller's trace id (the parent span is the sidecar's try)
    assert seen["traceparent"].split("-")[1] == "0af7651916cd43dd8448eb211c80319c"


async def test_dead_upstream_gives_json_error_quickly(sidecar_factory, port):
    dead = free_port()
    await sidecar_factory(policy(port, f"http://127.0.0.1:{dead}"))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port['reverse']}/x") as r:
            assert r.status == 503
            assert r.headers["content-type"].startswith("application/json")
            doc = await r.json()
    assert doc["route"] == "echo-route"
    assert "connect-failure" in doc["error"]
    assert isinstance(doc["decisions"], list)


async def test_unmatched_passthrough_and_deny(upstream_factory, sidecar_factory, port):
    up = await upstream_factory(echo)
    await sidecar_factory(f"""
    version: 1
    listeners: [{{name: egress, mode: proxy, port: {port['proxy']}}}]
    admin: {{port: {port['admin']}}}
    health: {{bind: 127.0.0.1, port: {port['health']}}}
    routes:
      - name: only-this
        match: {{path_prefix: /allowed}}
    """)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{up.port}/other", proxy=f"http://127.0.0.1:{port['proxy']}") as r:
            assert r.status == 200
            assert r.headers["x-sidecar-route"] == "default"
    p2 = {k: free_port() for k in port}
    await sidecar_factory(f"""
    version: 1
    listeners: [{{name: egress, mode: proxy, port: {p2['proxy']}}}]
    admin: {{port: {p2['admin']}}}
    health: {{bind: 127.0.0.1, port: {p2['health']}}}
    unmatched: deny
    routes:
      - name: only-this
        match: {{path_prefix: /allowed}}
    """)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{up.port}/other", proxy=f"http://127.0.0.1:{p2['proxy']}") as r:
            assert r.status == 403
            doc = await r.json()
            assert doc["decisions"] == ["unmatched_denied"]
        async with s.get(f"http://127.0.0.1:{up.port}/allowed", proxy=f"http://127.0.0.1:{p2['proxy']}") as r:
            assert r.status == 200


async def test_connect_tunnel(sidecar_factory, port, tmp_path):
    async def echo_tcp(reader, writer):
        while data := await reader.read(1024):
            writer.write(b"echo:" + data)
            await writer.drain()
        writer.close()
    server = await asyncio.start_server(echo_tcp, "127.0.0.1", 0)
    target = server.sockets[0].getsockname()[1]
    sc = await sidecar_factory(policy(port, "http://127.0.0.1:1"))
    reader, writer = await asyncio.open_connection("127.0.0.1", port["proxy"])
    writer.write(f"CONNECT 127.0.0.1:{target} HTTP/1.1\r\nHost: 127.0.0.1:{target}\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.read(100), 5) == b"echo:ping"
    writer.write(b"pong")
    assert await asyncio.wait_for(reader.read(100), 5) == b"echo:pong"
    writer.close()
    server.close()
    # a CONNECT to a dead port is refused with a JSON 502 and the process carries on
    reader, writer = await asyncio.open_connection("127.0.0.1", port["proxy"])
    dead = free_port()
    writer.write(f"CONNECT 127.0.0.1:{dead} HTTP/1.1\r\nHost: 127.0.0.1:{dead}\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 502")
    writer.close()
    assert sc.runtime.ready



def proxy_only(port) -> str:
    """A proxy listener and nothing else: every request takes the default route to its destination."""
    return f"""
    version: 1
    listeners: [{{name: egress, mode: proxy, port: {port['proxy']}}}]
    admin: {{port: {port['admin']}}}
    health: {{bind: 127.0.0.1, port: {port['health']}}}
    """


async def metrics(port) -> str:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port['admin']}/metrics") as r:
            return await r.text()


async def test_a_proxied_request_to_an_ipv6_literal_names_its_destination_in_brackets(
        upstream_factory, sidecar_factory, port):
    up = await upstream_factory(echo, host="::1")
    await sidecar_factory(proxy_only(port))
    async with aiohttp.ClientSession() as s:
        # absolute-form, as an app with HTTP_PROXY sends it: GET http://[::1]:PORT/x
        async with s.get(f"http://[::1]:{up.port}/x", proxy=f"http://127.0.0.1:{port['proxy']}") as r:
            assert r.status == 200
            name = f"[::1]:{up.port}"                         # RFC 3986 3.2.2 authority, not ::1:PORT
            assert r.headers["x-sidecar-upstream"] == name
            assert (await r.json())["headers"]["host"] == name
    assert f'sidecar_upstream_requests_total{{code="200",route="default",upstream="{name}"}} 1.0' \
        in await metrics(port)


async def test_a_connect_tunnel_to_an_ipv6_literal_names_its_destination_in_brackets(
        upstream_factory, sidecar_factory, port):
    up = await upstream_factory(echo, host="::1")
    await sidecar_factory(proxy_only(port))
    name = f"[::1]:{up.port}"
    reader, writer = await asyncio.open_connection("127.0.0.1", port["proxy"])
    writer.write(f"CONNECT {name} HTTP/1.1\r\nHost: {name}\r\n\r\n".encode())
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200")
    writer.write(f"GET /x HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
    assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 200")
    writer.close()
    text = await metrics(port)
    assert f'sidecar_upstream_requests_total{{code="200",route="default",upstream="{name}"}} 1.0' in text


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return d / "cert.pem", d / "key.pem"


def server_tls(tls_files) -> ssl.SSLContext:
    """A TLS server context with the test certificate (for localhost and 127.0.0.1)."""
    cert, key = tls_files
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


async def test_tls_origination_to_https_upstream(upstream_factory, sidecar_factory, port, tls_files):
    cert, _ = tls_files
    ctx = server_tls(tls_files)
    up = await upstream_factory(echo, ssl_context=ctx)
    assert up.url.startswith("https://")
    await sidecar_factory(f"""
    version: 1
    listeners: [{{name: api, mode: reverse, port: {port['reverse']}, upstream: secure}}]
    admin: {{port: {port['admin']}}}
    health: {{bind: 127.0.0.1, port: {port['health']}}}
    upstreams:
      secure: {{url: "{up.url}", tls: {{ca_file: "{cert}"}}}}
    """)
    async with aiohttp.ClientSession() as s:
        # the app speaks plain HTTP; the sidecar speaks TLS, verifying the upstream against the CA file
        async with s.post(f"http://127.0.0.1:{port['reverse']}/secure?q=1", data=b"hello") as r:
            assert r.status == 200
            doc = await r.json()
    assert doc["size"] == 5 and doc["path"] == "/secure?q=1"
    assert doc["headers"]["host"] == f"127.0.0.1:{up.port}"


async def test_tls_verification_failure_is_a_connect_failure(upstream_factory, sidecar_factory, port, tls_files):
    cert, _ = tls_files
    ctx = server_tls(tls_files)
    up = await upstream_factory(echo, ssl_context=ctx)
    await sidecar_factory(f"""
    version: 1
    listeners: [{{name: api, mode: reverse, port: {port['reverse']}, upstream: secure}}]
    admin: {{port: {port['admin']}}}
    health: {{bind: 127.0.0.1, port: {port['health']}}}
    upstreams:
      secure: {{url: "{up.url}"}}
    """)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port['reverse']}/x") as r:
            assert r.status == 503
            assert "connect-failure" in (await r.json())["error"]
    assert up.hits == 0


async def test_admin_basics_and_redacted_config(upstream_factory, sidecar_factory, port, monkeypatch):
    monkeypatch.setenv("TEST_API_KEY", "sk-very-secret-value")
    up = await upstream_factory(echo)
    await sidecar_factory(f"""
    version: 1
    listeners: [{{name: api, mode: reverse, port: {port['reverse']}, upstream: llm}}]
    admin: {{port: {port['admin']}}}
    health: {{bind: 127.0.0.1, port: {port['health']}}}
    upstreams:
      llm: {{url: "{up.url}", headers: {{authorization: "Bearer ${{TEST_API_KEY}}"}}}}
    """)
    async with aiohttp.ClientSession() as s:
        for p in (port["admin"], port["health"]):
            async with s.get(f"http://127.0.0.1:{p}/healthz") as r:
                assert r.status == 200
            async with s.get(f"http://127.0.0.1:{p}/readyz") as r:
                assert r.status == 200
        async with s.get(f"http://127.0.0.1:{port['admin']}/config") as r:
            text = await r.text()
        assert "sk-very-secret-value" not in text
        assert "redacted" in text
        async with s.get(f"http://127.0.0.1:{port['reverse']}/v1/x") as r:
            doc = await r.json()
        # the upstream got the key the sidecar added
        assert doc["headers"]["authorization"] == "Bearer sk-very-secret-value"


async def test_an_https_upstream_that_does_not_agree_to_h2_never_sees_http2_bytes(sidecar_factory, port,
                                                                                   tls_files):
    """`protocol: auto` on https offers h2 and http/1.1 by ALPN; a server that picks neither (or 1.1)
    gets HTTP/1.1 only -- not the HTTP/2 preface first, as a `PRI * HTTP/2.0` request in its log."""
    cert, _ = tls_files
    ctx = server_tls(tls_files)
    first_lines: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            first_lines.append(head.split(b"\r\n", 1)[0])
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
    upstream_port = free_port()
    server = await asyncio.start_server(lambda r, w: _quietly(serve(r, w)), "127.0.0.1", upstream_port, ssl=ctx)
    try:
        await sidecar_factory(f"""
        version: 1
        listeners: [{{name: api, mode: reverse, port: {port['reverse']}, upstream: secure}}]
        admin: {{port: {port['admin']}}}
        health: {{bind: 127.0.0.1, port: {port['health']}}}
        upstreams:
          secure: {{url: "https://127.0.0.1:{upstream_port}", protocol: auto, tls: {{ca_file: "{cert}"}}}}
        """)
        async with aiohttp.ClientSession() as s:
            for i in range(2):
                async with s.get(f"http://127.0.0.1:{port['reverse']}/one{i}") as r:
                    assert r.status == 200 and await r.read() == b"ok"
    finally:
        server.close()
    assert first_lines == [b"GET /one0 HTTP/1.1", b"GET /one1 HTTP/1.1"]


async def _quietly(work) -> None:
    try:
        await work
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
        pass
