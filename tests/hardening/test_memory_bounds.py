"""Memory and descriptor bounds of a real sidecar process (`python -m sidecar run`): uploads and
downloads far larger than its memory budget stream through in constant memory (peak RSS, VmHWM, is
read from /proc), and connections opened and closed by the hundred leave no descriptor behind."""
import asyncio
import hashlib
import os
import subprocess
import sys

import aiohttp
import pytest
from aiohttp import web

from .kit import Ports, exchange, get, policy_text

MiB = 1024 * 1024
SIZE = 200 * MiB
BUDGET = 64 * MiB                        # peak RSS may grow this much over the warmed-up process


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


class Streams:
    """An upstream that hashes what it receives and sends any amount without holding it."""

    def __init__(self) -> None:
        self.received: dict[str, tuple[int, str]] = {}

    async def upload(self, request: web.Request) -> web.Response:
        digest, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        self.received[request.path] = (size, digest.hexdigest())
        return web.json_response({"size": size})

    async def download(self, request: web.Request) -> web.StreamResponse:
        size = int(request.query["size"])
        resp = web.StreamResponse()
        resp.content_length = size
        await resp.prepare(request)
        block = bytes(range(256)) * 256           # 64 KiB
        sent = 0
        while sent < size:
            part = block[: min(len(block), size - sent)]
            await resp.write(part)
            sent += len(part)
        await resp.write_eof()
        return resp


def _expected_download_digest(size: int) -> str:
    block = bytes(range(256)) * 256
    digest = hashlib.sha256()
    full, rest = divmod(size, len(block))
    for _ in range(full):
        digest.update(block)
    digest.update(block[:rest])
    return digest.hexdigest()


@pytest.fixture
async def process(tmp_path):
    streams = Streams()
    app = web.Application(client_max_size=SIZE * 2)
    app.router.add_post("/up/{name}", streams.upload)
    app.router.add_get("/down", streams.download)
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")
    app.router.add_get("/{tail:.*}", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    up_port = site._server.sockets[0].getsockname()[1]
    ports = Ports()
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text(ports, f"http://127.0.0.1:{up_port}", """
        routes:
          - name: retried
            match: {path_prefix: /up/retried}
            upstream: app
            retry: {max_retries: 1, max_body: 64KiB}
        """))
    proc = subprocess.Popen([sys.executable, "-m", "sidecar", "run", "-c", str(policy), "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(100):
            await asyncio.sleep(0.1)
            try:
                answer = await exchange(ports.admin, get("/readyz", "127.0.0.1"), close_wait=0)
                if answer.status == 200:
                    break
            except OSError:
                continue
        else:
            pytest.fail(f"sidecar did not become ready: {proc.stderr.read1(4096) if proc.poll() is not None else ''}")
        yield proc, ports, streams, up_port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        await runner.cleanup()


async def _body(size: int, block: int = 256 * 1024):
    chunk = os.urandom(block)
    sent = 0
    while sent < size:
        part = chunk[: min(block, size - sent)]
        sent += len(part)
        yield part


async def test_uploads_and_downloads_stream_in_constant_memory(process):
    proc, ports, streams, up_port = process
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        for _ in range(20):                       # warm up pools, caches, code paths
            async with session.get(f"http://127.0.0.1:{ports.reverse}/warm") as r:
                await r.read()
        await asyncio.sleep(0.2)
        base = proc_status(proc.pid)
        # uploads: a plain route (streamed from the first byte) and a retried one (64 KiB kept for a
        # replay, the rest streamed), through both listeners
        uploads = [(f"http://127.0.0.1:{ports.reverse}/up/plain", {}),
                   (f"http://127.0.0.1:{ports.reverse}/up/retried", {}),
                   (f"http://127.0.0.1:{up_port}/up/proxied", {"proxy": f"http://127.0.0.1:{ports.proxy}"})]
        for url, kwargs in uploads:
            async with session.post(url, data=_body(SIZE), **kwargs) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["size"] == SIZE
        # downloads
        for url, kwargs in [(f"http://127.0.0.1:{ports.reverse}/down?size={SIZE}", {}),
                            (f"http://127.0.0.1:{up_port}/down?size={SIZE}",
                             {"proxy": f"http://127.0.0.1:{ports.proxy}"})]:
            digest, size = hashlib.sha256(), 0
            async with session.get(url, **kwargs) as r:
                assert r.status == 200
                async for chunk in r.content.iter_chunked(256 * 1024):
                    digest.update(chunk)
                    size += len(chunk)
            assert size == SIZE and digest.hexdigest() == _expected_download_digest(SIZE)
    after = proc_status(proc.pid)
    moved = SIZE * 5
    print(f"streamed {moved / MiB:.0f} MiB: RSS {base['VmRSS'] / MiB:.1f} MiB before, "
          f"peak {after['VmHWM'] / MiB:.1f} MiB, now {after['VmRSS'] / MiB:.1f} MiB")
    assert after["VmHWM"] - base["VmRSS"] < BUDGET, \
        f"peak RSS grew {(after['VmHWM'] - base['VmRSS']) / MiB:.1f} MiB while {moved / MiB:.0f} MiB streamed"
    assert {k: v[0] for k, v in streams.received.items()} == {
        "/up/plain": SIZE, "/up/retried": SIZE, "/up/proxied": SIZE}


async def test_connections_by_the_hundred_leave_no_descriptors(process):
    """Round after round of hundreds of app connections, good and malformed, leave no app-side
    socket open and no other descriptor behind; the sockets that stay are pooled upstream
    connections, bounded by the pools (`max_connections`, 100 by default)."""
    proc, ports, _, up_port = process

    async def round_trip() -> None:
        answers = await asyncio.gather(*(exchange(ports.reverse, get(f"/c{i}"), close_wait=0) for i in range(100)))
        assert all(a.status == 200 for a in answers)
        answers = await asyncio.gather(*(exchange(ports.proxy, get(f"http://127.0.0.1:{up_port}/p{i}", "x"),
                                                  close_wait=0) for i in range(100)))
        assert all(a.status == 200 for a in answers)
        answers = await asyncio.gather(*(exchange(ports.reverse, b"GET / HTTP/1.1\r\nHost: a\r\nX : y\r\n\r\n",
                                                  close_wait=0) for _ in range(100)))
        assert all(a.status == 400 for a in answers)
        await asyncio.sleep(0.5)

    await round_trip()
    first = descriptors(proc.pid, ports, up_port)
    for _ in range(4):
        await round_trip()
        now = descriptors(proc.pid, ports, up_port)
        assert now["app"] <= 2, f"app connections left open: {now}"
        assert now["upstream"] <= 2 * 100, f"pooled upstream connections beyond the two pools: {now}"
        assert now["other"] <= first["other"] + 2, f"descriptors other than sockets grew: {first} -> {now}"
        assert now["listening"] == first["listening"], f"listening sockets changed: {first} -> {now}"


def descriptors(pid: int, ports: Ports, up_port: int) -> dict[str, int]:
    """The process's descriptors by kind: sockets accepted from apps on the data-plane listeners,
    sockets to the upstream, listening sockets, and everything else (files, pipes, epoll, eventfd,
    other sockets)."""
    inodes = []
    other = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            inodes.append(target[8:-1])
        else:
            other += 1
    table = {}
    for name in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{name}") as f:
            next(f)
            for line in f:
                cols = line.split()
                local, remote, state, inode = cols[1], cols[2], cols[3], cols[9]
                table[inode] = (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16), state)
    counts = {"app": 0, "upstream": 0, "listening": 0, "other": other}
    for inode in inodes:
        local, remote, state = table.get(inode, (0, 0, ""))
        if state == "0A":                                  # TCP_LISTEN
            counts["listening"] += 1
        elif local in (ports.reverse, ports.proxy):
            counts["app"] += 1
        elif remote == up_port:
            counts["upstream"] += 1
        else:
            counts["other"] += 1
    return counts
