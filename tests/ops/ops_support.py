"""Helpers for the operations tests: upstreams on loopback, ConfigMap-style policy directories,
bounded polling, and the real `sidecar run` as a subprocess."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from harness import free_port

REPO = Path(__file__).resolve().parents[2]




async def eventually(check, *, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Poll `check` (sync or async) until it returns a truthy value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = check()
            if asyncio.iscoroutine(last):
                last = await last
        except (OSError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
            last = exc
        if last and not isinstance(last, BaseException):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        await asyncio.sleep(interval)


class Upstream:
    """An aiohttp server on a free loopback port that answers with `handler` and counts its requests."""

    def __init__(self, handler=None, name: str = "up") -> None:
        self.port = free_port()
        self.name = name
        self.hits = 0
        self._handler = handler or self._hello
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _hello(self, request: web.Request) -> web.Response:
        return web.Response(text=f"hello from {self.name}")

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        return await self._handler(request)

    async def start(self) -> "Upstream":
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def write(path: Path, text: str) -> Path:
    """Write a policy (dedented) to `path` in place, as an editor that truncates and rewrites does."""
    path.write_text(textwrap.dedent(text))
    return path


class ConfigMapDir:
    """A directory laid out the way the kubelet's AtomicWriter lays out a ConfigMap volume:

        ..2026_05_09_10_00_00.000000001/policy.yaml
        ..data -> ..2026_05_09_10_00_00.000000001
        policy.yaml -> ..data/policy.yaml

    `swap()` publishes a new version as the kubelet does: a new timestamped directory, a `..data_tmp`
    symlink to it renamed over `..data` (one atomic rename), then the old directory removed.
    """

    def __init__(self, root: Path, text: str) -> None:
        self.root = root
        self.generation = 0
        root.mkdir(parents=True, exist_ok=True)
        current = self._write_version(text)
        os.symlink(current, root / "..data")
        os.symlink("..data/policy.yaml", root / "policy.yaml")

    @property
    def path(self) -> Path:
        return self.root / "policy.yaml"

    def _write_version(self, text: str) -> str:
        self.generation += 1
        name = f"..2026_05_09_10_00_00.{self.generation:09d}"
        (self.root / name).mkdir()
        (self.root / name / "policy.yaml").write_text(textwrap.dedent(text))
        return name

    def swap(self, text: str) -> None:
        old = os.readlink(self.root / "..data")
        new = self._write_version(text)
        os.symlink(new, self.root / "..data_tmp")
        os.rename(self.root / "..data_tmp", self.root / "..data")
        (self.root / old / "policy.yaml").unlink()
        (self.root / old).rmdir()


async def admin_json(admin_port: int, path: str = "/status") -> dict:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{admin_port}{path}") as r:
            return await r.json()


async def admin_text(admin_port: int, path: str = "/metrics") -> str:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{admin_port}{path}") as r:
            return await r.text()


async def get(port: int, path: str = "/", **kwargs) -> tuple[int, dict, str]:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}{path}", **kwargs) as r:
            return r.status, CIMultiDict(r.headers), await r.text()


class SidecarProcess:
    """`python -m sidecar run -c FILE` as a child process, its log kept in a file for failure messages."""

    def __init__(self, policy: Path, log: Path, *extra: str) -> None:
        self.log_path = log
        self._log = open(log, "wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for var in [v for v in env if v.startswith("OTEL_")]:
            env.pop(var)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run", "-c", str(policy), *extra],
            cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"sidecar still running after {timeout}s; log:\n{self.log()}")
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()


# -- policies and admin calls shared by the reload and listener tests -------------------------------
def policy(ports, ups, *, main="a", main_extra="", extra_routes="", extra_listeners="", api_upstream="a",
           extra_top=""):
    """A reverse listener in front of upstreams `ups` ({name: Upstream}); route `main` -> `main`.
    `extra_routes` come before `main` (first match wins); `main_extra` is added to `main`'s keys;
    `extra_top` adds top-level keys (telemetry, ...)."""
    out = [
        "version: 1",
        "listeners:",
        f"  - {{name: api, mode: reverse, port: {ports['api']}, upstream: {api_upstream}}}",
        *_indent(extra_listeners, 2),
        f"admin: {{port: {ports['admin']}}}",
        f"health: {{bind: 127.0.0.1, port: {ports['health']}}}",
        "upstreams:",
        *(f'  {name}: {{url: "{up.url}"}}' for name, up in ups.items()),
        "routes:",
        *_indent(extra_routes, 2),
        "  - name: main",
        "    match: {path_prefix: /}",
        f"    upstream: {main}",
        *_indent(main_extra, 4),
        *_indent(extra_top, 0),
    ]
    return "\n".join(out) + "\n"


def _indent(text: str, by: int) -> list[str]:
    text = textwrap.dedent(text).strip("\n")
    return [" " * by + line for line in text.splitlines()] if text else []


def version_of(status: dict) -> str:
    return status["policy"]["version"]


async def reload_via_admin(ports) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{ports['admin']}/reload") as r:
            return r.status, await r.json()


def metric(text: str, name: str, **labels) -> float | None:
    """The value of the series `name{labels}` in a Prometheus text page (label order ignored)."""
    for line in text.splitlines():
        found = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$", line)
        if found is None or found[1] != name:
            continue
        have = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', found[2] or ""))
        if have == labels:
            return float(found[3])
    return None
