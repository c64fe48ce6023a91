"""Refusals of the real `sidecar run` (uvloop, as deployed) on real sockets: the status of an oversized
line does not depend on how TCP cut the request, and the answer speaks the request's HTTP version where
its request line was read.

The race this pins: the parser fails on the long header line in one read; a next read (more of the same
header value) arriving before the refusal was written was taken for the start of a new request line,
too long, and turned the answer into a 414 (8 of 20 tries in the issue). The client here writes the
header in 8 KiB pieces a fraction of a millisecond apart, as TCP may deliver them, from its own thread:
before the fix about one try in three answered 414."""
import asyncio
import socket
import time

import pytest

from ops_support import SidecarProcess, policy, write
from test_ops_signals import sidecar_process, wait_ready  # noqa: F401 - fixture

PAUSES = (0.0001, 0.0003, 0.001)   # seconds between the pieces
TRIES = 15                         # per pause


def status_line(port: int, head: bytes, rest: bytes = b"", pause: float = 0.0) -> tuple[bytes, bytes]:
    """Send `head`, then `rest` in 8 KiB pieces `pause` apart; the answer's (version, status)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            s.sendall(head)
            for i in range(0, len(rest), 8192):
                time.sleep(pause)
                s.sendall(rest[i:i + 8192])
        except OSError:                     # refused mid-request: the answer is waiting to be read
            pass
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    version, status, *_ = data.split(b" ", 2) + [b"", b""]
    return version, status


@pytest.fixture
async def port(tmp_path, upstream_factory, sidecar_process, ports):
    up = await upstream_factory(name="a")
    proc: SidecarProcess = sidecar_process(write(tmp_path / "policy.yaml", policy(ports, {"a": up})))
    await wait_ready(proc, ports)
    return ports["api"]


async def tries(port: int, head: bytes, rest: bytes, pauses=PAUSES, n: int = TRIES) -> dict:
    loop = asyncio.get_running_loop()
    seen = [await loop.run_in_executor(None, status_line, port, head, rest, pause)
            for pause in pauses for _ in range(n)]
    return {answer: seen.count(answer) for answer in set(seen)}


@pytest.mark.parametrize("version", [b"HTTP/1.1", b"HTTP/1.0"])
async def test_an_oversized_header_line_is_431_every_time(port, version):
    head = b"GET /x " + version + b"\r\nHost: app.local\r\nX-Big: "
    rest = b"b" * (100 * 1024) + b"\r\n\r\n"
    assert await tries(port, head, rest) == {(version, b"431"): len(PAUSES) * TRIES}


async def test_an_oversized_request_line_is_414_and_many_headers_431(port):
    seen = await tries(port, b"GET /", b"a" * (100 * 1024) + b" HTTP/1.1\r\nHost: app.local\r\n\r\n", n=3)
    assert {status for _, status in seen} == {b"414"}, seen
    many = b"".join(f"X-{i}: {'v' * 700}\r\n".encode() for i in range(120)) + b"\r\n"
    seen = await tries(port, b"GET /x HTTP/1.1\r\nHost: app.local\r\n", many, n=3)
    assert seen == {(b"HTTP/1.1", b"431"): 9}, seen
