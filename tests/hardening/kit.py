"""Raw-socket tools for the hardening tests: a sidecar and upstreams on loopback, bytes in, parsed
responses out, and the check that the sidecar is still healthy afterwards."""
from __future__ import annotations

import asyncio
import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from harness import free_port
from sidecar.app import Sidecar, start
from sidecar.policy.load import load_policy




# -- upstreams -------------------------------------------------------------------------------------
class EchoUpstream:
    """A well-behaved aiohttp upstream: answers `ok METHOD PATH LEN` and remembers what it saw."""

    def __init__(self) -> None:
        self.port = free_port()
        self.seen: list[dict] = []
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append({"method": request.method, "path": request.path_qs, "size": len(body),
                          "headers": dict(request.headers)})
        return web.Response(text=f"ok {request.method} {request.path_qs} {len(body)}")

    async def start(self) -> "EchoUpstream":
        app = web.Application(client_max_size=1024 ** 3)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


class RawUpstream:
    """An upstream that reads one request head and then runs `script(reader, writer)`: garbage,
    resets, trickles. Counts the connections it got."""

    def __init__(self, script) -> None:
        self.script = script
        self.port = free_port()
        self.connections = 0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._tasks.add(asyncio.current_task())
        try:
            await reader.readuntil(b"\r\n\r\n")
            await self.script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(asyncio.current_task())
            writer.close()

    async def start(self) -> "RawUpstream":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)


# -- the sidecar -----------------------------------------------------------------------------------
@dataclass
class Ports:
    proxy: int = field(default_factory=free_port)
    reverse: int = field(default_factory=free_port)
    admin: int = field(default_factory=free_port)
    health: int = field(default_factory=free_port)


def policy_text(ports: Ports, upstream_url: str, extra: str = "", head: str = "") -> str:
    """Both listener kinds in front of one upstream named `app`; `extra` is appended (routes ...)."""
    return textwrap.dedent(f"""\
        version: 1
        listeners:
          - {{name: egress, mode: proxy, port: {ports.proxy}}}
          - {{name: api, mode: reverse, port: {ports.reverse}, upstream: app}}
        admin: {{bind: 127.0.0.1, port: {ports.admin}}}
        health: {{bind: 127.0.0.1, port: {ports.health}}}
        upstreams:
          app: {{url: "{upstream_url}"}}
        """) + textwrap.dedent(head) + textwrap.dedent(extra)


async def start_sidecar(tmp_path: Path, text: str) -> Sidecar:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return await start(load_policy(str(path)), watch=False)


# -- raw HTTP --------------------------------------------------------------------------------------
@dataclass
class Answer:
    status: int | None                   # None: the connection closed without a status line
    reason: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    closed: bool = False                 # the sidecar closed the connection after this answer
    extra: bytes = b""                   # bytes after the answer (a second response: smuggling)
    truncated: bool = False              # the body ended before its declared framing

    def json(self) -> dict:
        return json.loads(self.body)


async def read_answer(reader: asyncio.StreamReader, *, timeout: float = 5.0, head_method: bool = False,
                      close_wait: float = 1.0) -> Answer:
    """Read one HTTP/1.x response (Content-Length, chunked or until close), then see whether the
    server closes the connection within `close_wait`."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except asyncio.IncompleteReadError as exc:
        return Answer(None, body=exc.partial, closed=True)
    except ConnectionError:
        return Answer(None, closed=True)
    lines = head.decode("latin-1").split("\r\n")
    _, status, *reason = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    answer = Answer(int(status), reason[0] if reason else "", headers)
    try:
        if head_method or answer.status in (204, 304) or 100 <= answer.status < 200:
            pass
        elif "content-length" in headers:
            answer.body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), timeout)
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            answer.body = await asyncio.wait_for(_read_chunked(reader), timeout)
        else:
            answer.body = await asyncio.wait_for(reader.read(), timeout)
            answer.closed = True
            return answer
    except asyncio.IncompleteReadError as exc:
        answer.body, answer.truncated, answer.closed = exc.partial, True, True
        return answer
    except ConnectionError:
        answer.truncated = answer.closed = True
        return answer
    try:
        more = await asyncio.wait_for(reader.read(65536), close_wait)
        answer.closed = more == b""
        answer.extra = more
    except asyncio.TimeoutError:
        answer.closed = False
    except ConnectionError:
        answer.closed = True
    return answer


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    out = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return bytes(out)
        out += await reader.readexactly(size)
        await reader.readexactly(2)


async def exchange(port: int, data: bytes, **kwargs) -> Answer:
    """Open a connection, write `data`, read one answer, close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        try:
            await writer.drain()
        except ConnectionError:
            pass
        return await read_answer(reader, **kwargs)
    finally:
        writer.close()


def get(target: str, host: str = "app.local", extra: str = "") -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


async def assert_healthy(sc: Sidecar, ports: Ports, upstream_url: str | None = None) -> None:
    """The process is unaffected: /healthz answers and a normal request still goes through."""
    answer = await exchange(ports.admin, get("/healthz", "127.0.0.1"), close_wait=0)
    assert answer.status == 200, answer
    answer = await exchange(ports.reverse, get("/still-ok"), close_wait=0)
    assert answer.status == 200 and answer.body.startswith(b"ok GET /still-ok"), answer
    if upstream_url is not None:
        answer = await exchange(ports.proxy, get(f"{upstream_url}/via-proxy", "127.0.0.1"), close_wait=0)
        assert answer.status == 200, answer
