"""Real servers on loopback for end-to-end tests: upstreams you script, and a sidecar in front."""
from __future__ import annotations

import contextlib
import socket
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from sidecar.app import Sidecar, start
from sidecar.core.authority import authority
from sidecar.policy.load import load_policy


_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on, never one this test process handed out before: the kernel
    may give the same ephemeral port to two bind(0) calls in a row once the first socket is closed,
    and a policy with its listener and admin on one port is (rightly) refused."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


@contextlib.asynccontextmanager
async def stopped_after(start: Callable[..., Awaitable[Any]]) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """A factory fixture's body: `make(...)` awaits `start(...)` and keeps what it returns; each of those
    is stopped (`await thing.stop()`) when the block ends, in the order they were made."""
    made: list[Any] = []

    async def make(*args, **kwargs):
        thing = await start(*args, **kwargs)
        made.append(thing)
        return thing
    try:
        yield make
    finally:
        for thing in made:
            await thing.stop()


class Upstream:
    """An aiohttp app on a free loopback port (127.0.0.1, or `host="::1"`); counts the requests it saw."""

    def __init__(self, handler=None, *, ssl_context=None, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = free_port()
        self.hits = 0
        self.requests: list[dict] = []
        self._handler = handler
        self._ssl = ssl_context
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self._ssl else "http"
        return f"{scheme}://{authority(self.host, self.port)}"

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        self.requests.append({"method": request.method, "path": request.path_qs,
                              "headers": dict(request.headers)})
        return await self._handler(request)

    async def start(self) -> "Upstream":
        app = web.Application(client_max_size=1024 ** 3)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, ssl_context=self._ssl).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def write_policy(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


async def start_sidecar(tmp_path: Path, text: str, **kwargs) -> Sidecar:
    policy = load_policy(str(write_policy(tmp_path, text)))
    return await start(policy, watch=kwargs.pop("watch", False), **kwargs)


def ports() -> dict[str, int]:
    """Fresh ports for a policy's listeners and admin/health endpoints."""
    return {"proxy": free_port(), "reverse": free_port(), "admin": free_port(), "health": free_port(),
            "reverse2": free_port()}
