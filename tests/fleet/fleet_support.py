"""Real `sidecar run` processes for fleet tests: each a "pod" with its own ports and state_dir, killed
the way Kubernetes kills pods (SIGKILL, state_dir gone), and an upstream that records what it got."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import aiohttp
from aiohttp import web

from harness import free_port


def sidecar_command(policy: Path) -> list[str]:
    script = Path(sys.executable).with_name("sidecar")
    if script.exists():
        return [str(script), "run", "-c", str(policy)]
    return [sys.executable, "-m", "sidecar", "run", "-c", str(policy)]


class Pod:
    """One sidecar process; `policy(pod)` writes its policy text (ports and state_dir are the pod's)."""

    def __init__(self, root: Path, name: str, policy) -> None:
        self.name = name
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.listen, self.admin, self.health = free_port(), free_port(), free_port()
        self.state_dir = self.dir / "state"
        self.log = self.dir / "sidecar.log"
        self.policy = self.dir / "policy.yaml"
        self.policy.write_text(textwrap.dedent(policy(self)))
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Pod":
        self.proc = subprocess.Popen(sidecar_command(self.policy), cwd=self.dir, stdout=self.log.open("a"),
                                     stderr=subprocess.STDOUT, env={**os.environ, "SIDECAR_LOG_LEVEL": "info"})
        return self

    async def ready(self, timeout: float = 90.0) -> "Pod":     # a hang guard: a loaded CI box starts slowly
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        async with aiohttp.ClientSession() as s:
            while True:
                assert self.proc.poll() is None, f"{self.name} exited early:\n{self.log.read_text()}"
                try:
                    async with s.get(f"http://127.0.0.1:{self.admin}/readyz") as r:
                        if r.status == 200:
                            return self
                except aiohttp.ClientError:
                    pass
                assert loop.time() < end, f"{self.name} not ready:\n{self.log.read_text()}"
                await asyncio.sleep(0.05)

    # Waits run in a thread: the upstream lives on this test's event loop and must keep answering.
    async def kill_pod(self) -> None:
        """What a deleted pod looks like to the sidecar: SIGKILL, and its emptyDir state_dir gone."""
        self.proc.send_signal(signal.SIGKILL)
        assert await asyncio.to_thread(self.proc.wait, 10) == -signal.SIGKILL
        shutil.rmtree(self.state_dir, ignore_errors=True)

    async def terminate(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.proc.wait, timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    async def get_json(self, path: str) -> dict:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{self.admin}{path}") as r:
                return await r.json()

    async def metrics(self) -> str:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{self.admin}/metrics") as r:
                return await r.text()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen}"


class RecordingUpstream:
    """503 to writes while `down` (reads are answered 200 always); when up, answers 201 and records (route path, body n, Idempotency-Key) in
    arrival order. `hold` (an Event) parks each write before it is recorded, to catch a claim mid-way."""

    def __init__(self) -> None:
        self.port = free_port()
        self.down = True
        self.got: list[tuple[str, int, str]] = []
        self.hits = 0
        self.refused = 0
        self.hold: asyncio.Event | None = None
        self.arrived = asyncio.Event()
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        body = await request.read()
        if self.down and request.method == "POST":
            self.refused += 1
            return web.Response(status=503)
        if request.method == "POST" and body:
            self.arrived.set()
            if self.hold is not None:
                await self.hold.wait()
            n = int(__import__("json").loads(body)["n"])
            self.got.append((request.path, n, request.headers.get("Idempotency-Key", "")))
        return web.json_response({"ok": True}, status=201 if request.method == "POST" else 200)

    async def start(self) -> "RecordingUpstream":
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def wait_for(predicate, timeout: float, what: str, interval: float = 0.1) -> None:
    """A hang guard, not a timing assertion: polls until `predicate()` holds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert loop.time() < end, f"gave up waiting: {what}"
        await asyncio.sleep(interval)
