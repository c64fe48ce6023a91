"""THE durability test: six writes acknowledged with 202, the sidecar killed with SIGKILL, a new sidecar
on the same state_dir delivers every one of them, in order, exactly once. Real CLI, real processes."""
import asyncio
import os
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


class FlakyUpstream:
    """503 while `down`; once up, records each write (201) in arrival order."""

    def __init__(self) -> None:
        self.down = True
        self.got: list[tuple[int, str]] = []
        self.refused = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.down:
            self.refused += 1
            return web.Response(status=503)
        self.got.append((body["n"], request.headers["Idempotency-Key"]))
        return web.json_response({"ok": True}, status=201)


async def wait_ready(admin_port: int, proc: subprocess.Popen, log: Path, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    async with aiohttp.ClientSession() as s:
        while True:
            assert proc.poll() is None, f"sidecar exited early:\n{log.read_text()}"
            try:
                async with s.get(f"http://127.0.0.1:{admin_port}/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            assert loop.time() < end, f"sidecar not ready:\n{log.read_text()}"
            await asyncio.sleep(0.05)


async def test_kill_9_loses_nothing_acknowledged(tmp_path):
    upstream = FlakyUpstream()
    app = web.Application()
    app.router.add_post("/{tail:.*}", upstream.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    up_port, listen, admin_port, health_port = free_port(), free_port(), free_port(), free_port()
    await web.TCPSite(runner, "127.0.0.1", up_port).start()
    policy = tmp_path / "policy.yaml"
    policy.write_text(textwrap.dedent(f"""
        version: 1
        listeners:
          - {{name: api, mode: reverse, port: {listen}, upstream: svc}}
        admin: {{port: {admin_port}}}
        health: {{bind: 127.0.0.1, port: {health_port}}}
        upstreams:
          svc: {{url: "http://127.0.0.1:{up_port}"}}
        routes:
          - name: orders
            match: {{path_prefix: /}}
            upstream: svc
            timeout: 5s
            retry: {{max_retries: 1, when: [503, connect-failure], methods: [POST], backoff: {{base: 10ms, max: 20ms}}}}
            breaker: {{consecutive_failures: 2, open_for: 200ms, max_open_for: 500ms}}
            queue: {{when: [breaker-open, retries-exhausted]}}
        state_dir: ./state
    """))
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    procs: list[subprocess.Popen] = []

    def launch(log: Path) -> subprocess.Popen:
        proc = subprocess.Popen(sidecar_command(policy), cwd=tmp_path, stdout=log.open("w"),
                                stderr=subprocess.STDOUT, env={**os.environ, "SIDECAR_LOG_LEVEL": "info"})
        procs.append(proc)
        return proc

    try:
        first = launch(logs[0])
        await wait_ready(admin_port, first, logs[0])
        keys = []
        async with aiohttp.ClientSession() as s:
            for n in range(6):
                async with s.post(f"http://127.0.0.1:{listen}/orders", json={"n": n}) as r:
                    assert r.status == 202, await r.text()
                    keys.append((await r.json())["idempotency_key"])
        # No grace period: a 202 means the write is on disk already.
        os.kill(first.pid, signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL
        assert upstream.got == []

        second = launch(logs[1])
        await wait_ready(admin_port, second, logs[1])
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{admin_port}/queue") as r:
                listing = await r.json()
        assert listing["depth"] == 6
        assert [i["idempotency_key"] for i in listing["items"]] == keys

        upstream.down = False
        loop = asyncio.get_running_loop()
        end = loop.time() + 30
        async with aiohttp.ClientSession() as s:
            while True:
                async with s.get(f"http://127.0.0.1:{admin_port}/queue") as r:
                    depth = (await r.json())["depth"]
                if depth == 0 and len(upstream.got) >= 6:
                    break
                assert loop.time() < end, f"not delivered: {upstream.got}\n{logs[1].read_text()}"
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)         # and nothing is delivered twice afterwards
            async with s.get(f"http://127.0.0.1:{admin_port}/status") as r:
                stats = (await r.json())["queue"]
        assert upstream.got == list(zip(range(6), keys))
        assert stats["depth"] == 0 and stats["by_route"]["orders"]["delivered"] == 6

        second.send_signal(signal.SIGTERM)
        assert second.wait(15) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        await runner.cleanup()


def test_a_state_dir_that_cannot_be_created_stops_startup_with_a_clear_error(tmp_path):
    (tmp_path / "blocker").write_text("a file, not a directory")
    policy = tmp_path / "policy.yaml"
    policy.write_text(textwrap.dedent(f"""
        version: 1
        listeners:
          - {{name: api, mode: reverse, port: {free_port()}, upstream: svc}}
        admin: {{port: {free_port()}}}
        health: {{bind: 127.0.0.1, port: {free_port()}}}
        upstreams:
          svc: {{url: "http://127.0.0.1:1"}}
        routes:
          - {{name: orders, match: {{path_prefix: /}}, upstream: svc, queue: {{when: [retries-exhausted]}}}}
        state_dir: ./blocker/state
    """))
    done = subprocess.run(sidecar_command(policy), cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    output = done.stdout + done.stderr
    assert "state_dir" in output and "cannot be created (Not a directory)" in output
    assert "Traceback" not in output
