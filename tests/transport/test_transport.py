"""The transport's connection pools against real loopback servers that count their connections:
keep-alive reuse, the `max_connections` bound, the one resend on a keep-alive connection the upstream
closed under an idempotent request, and a connection that is never reused after an early answer."""
from __future__ import annotations

import asyncio

import pytest
from multidict import CIMultiDict
from yarl import URL

from sidecar.policy.model import Upstream
from sidecar.transport.client import Transport
from sidecar.transport.errors import UpstreamFailure


class CountingServer:
    """Minimal HTTP/1.1 on a raw socket: reads a head (and a Content-Length body), then `script`
    decides what to do. Counts connections, and how many are open at once."""

    def __init__(self, script) -> None:
        self.script = script
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> "CountingServer":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                if not await self.script(reader, writer, head, served):
                    break
                served += 1
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass                         # the test is over or the client went away
        finally:
            self.open -= 1
            writer.close()

    async def read_body(self, reader: asyncio.StreamReader, head: bytes) -> bytes:
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                body = await reader.readexactly(int(line.split(b":")[1]))
                self.bodies.append(body)
                return body
        if b"transfer-encoding: chunked" in head.lower():
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                data = await reader.readexactly(size + 2)
                if size == 0:
                    break
                parts.append(data[:-2])
            self.bodies.append(b"".join(parts))
            return self.bodies[-1]
        return b""


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def answer_ok(reader, writer, head, served) -> bool:
    writer.write(OK)
    await writer.drain()
    return True


def upstream(port: int, max_connections: int = 100) -> Upstream:
    return Upstream(name="up", url=f"http://127.0.0.1:{port}", scheme="http", host="127.0.0.1", port=port,
                    base_path="", max_connections=max_connections)


async def send(transport: Transport, up: Upstream, method: str = "GET", body=None, timeout: float = 5.0):
    resp = await transport.send(up, method, URL(f"{up.origin}/x"), CIMultiDict({"Host": "a"}), body,
                                timeout=timeout, read_idle=5.0)
    data = await resp.content.read()
    resp.release()
    return resp.status, data


@pytest.fixture
async def transport():
    t = Transport()
    yield t
    await t.close()


async def test_sequential_requests_reuse_one_keepalive_connection(transport):
    server = await CountingServer(answer_ok).start()
    up = upstream(server.port)
    for _ in range(5):
        assert await send(transport, up) == (200, b"ok")
    await server.stop()
    assert server.connections == 1 and len(server.heads) == 5


async def test_max_connections_bounds_the_connections_opened(transport):
    gate = asyncio.Event()

    async def held(reader, writer, head, served) -> bool:
        await gate.wait()
        writer.write(OK)
        await writer.drain()
        return True
    server = await CountingServer(held).start()
    up = upstream(server.port, max_connections=2)
    sends = [asyncio.ensure_future(send(transport, up)) for _ in range(6)]
    while len(server.heads) < 2:
        await asyncio.sleep(0.01)
    gate.set()
    assert await asyncio.gather(*sends) == [(200, b"ok")] * 6
    assert transport.stats() == {"up": {"open": 2, "idle": 2, "waiting": 0, "max": 2}}
    await server.stop()
    assert server.connections == 2 and server.most_open == 2 and len(server.heads) == 6


@pytest.mark.parametrize("method, resent", [("GET", True), ("PUT", True), ("POST", False)])
async def test_a_keepalive_connection_closed_under_a_request_is_resent_once_if_idempotent(
        transport, method, resent):
    async def close_the_second(reader, writer, head, served) -> bool:
        await server.read_body(reader, head)
        if served == 1:                  # as an upstream closing an idle connection the moment it is used
            return False
        writer.write(OK)
        await writer.drain()
        return True
    server = await CountingServer(close_the_second).start()
    up = upstream(server.port)
    assert await send(transport, up, method, b"1") == (200, b"ok")
    if resent:
        assert await send(transport, up, method, b"2") == (200, b"ok")
        assert server.connections == 2 and server.bodies == [b"1", b"2", b"2"]
    else:
        with pytest.raises(UpstreamFailure) as failure:
            await send(transport, up, method, b"2")
        assert failure.value.kind == "reset" and server.connections == 1
    await server.stop()


async def test_an_answer_before_the_whole_upload_closes_the_connection(transport):
    more = asyncio.Event()

    async def refuse(reader, writer, head, served) -> bool:
        if len(server.heads) == 1:
            writer.write(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            return True                  # keeps reading: the rest of the upload would follow
        await server.read_body(reader, head)
        writer.write(OK)
        await writer.drain()
        return True
    server = await CountingServer(refuse).start()
    up = upstream(server.port)

    async def upload():
        yield b"first part"
        await more.wait()                # never set: the upstream answers mid-upload
        yield b"never sent"
    assert await send(transport, up, "POST", upload()) == (413, b"")
    assert await send(transport, up, "POST", b"next") == (200, b"ok")
    await server.stop()
    assert server.connections == 2, "a connection with half an upload on it must not carry another request"
    assert server.bodies == [b"next"]


async def test_a_streamed_body_without_length_goes_chunked(transport):
    async def echo(reader, writer, head, served) -> bool:
        await server.read_body(reader, head)
        writer.write(OK)
        await writer.drain()
        return True
    server = await CountingServer(echo).start()
    up = upstream(server.port)

    async def parts():
        for part in (b"a" * 10, b"b" * 70_000, b"c"):
            yield part
    assert await send(transport, up, "POST", parts()) == (200, b"ok")
    await server.stop()
    assert b"transfer-encoding: chunked" in server.heads[0].lower()
    assert server.bodies == [b"a" * 10 + b"b" * 70_000 + b"c"]


async def test_an_upstream_that_never_answers_is_a_timeout(transport):
    async def silent(reader, writer, head, served) -> bool:
        await asyncio.Event().wait()
        return False
    server = await CountingServer(silent).start()
    with pytest.raises(UpstreamFailure) as failure:
        await send(transport, upstream(server.port), timeout=0.2)
    assert failure.value.kind == "timeout"
    await server.stop()


async def test_a_refused_connection_is_a_connect_failure(transport):
    server = await CountingServer(answer_ok).start()
    port = server.port
    await server.stop()
    await asyncio.sleep(0)
    with pytest.raises(UpstreamFailure) as failure:
        await send(transport, upstream(port))
    assert failure.value.kind == "connect-failure" and f"127.0.0.1:{port}" in failure.value.detail
