"""The relay under CONNECT tunnels: a half-close from either side, then the other side's close, tears the
tunnel down at once. Both of the sidecar's sockets are gone, and a drain (SIGTERM's) returns without
waiting out its timeout."""
from __future__ import annotations

import asyncio

import pytest

from harness import ports, start_sidecar
from sockets import inodes, open_socket_inodes

HANG_GUARD = 10.0
DRAIN = 60.0                   # the SIGTERM drain timeout; a leaked tunnel would hold stop() this long


def policy(p) -> str:
    return f"""
    version: 1
    listeners:
      - {{name: egress, mode: proxy, port: {p['proxy']}}}
    admin: {{bind: 127.0.0.1, port: {p['admin']}}}
    health: {{bind: 127.0.0.1, port: {p['health']}}}
    routes:
      - name: tunnels
        match: {{host: 127.0.0.1}}
        allow_internal: true
    """


async def open_tunnel(proxy_port: int, target: int):
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    writer.write(f"CONNECT 127.0.0.1:{target} HTTP/1.1\r\nHost: 127.0.0.1:{target}\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HANG_GUARD)
    assert head.startswith(b"HTTP/1.1 200"), head
    return reader, writer


async def until(predicate, what: str) -> None:
    for _ in range(int(HANG_GUARD / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {HANG_GUARD}s: {what}")


@pytest.mark.parametrize("first", ["app", "upstream"])
async def test_half_close_then_close_tears_the_tunnel_down(tmp_path, first):
    seen: list[bytes] = []
    server_done = asyncio.Event()

    async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if first == "app":              # read to the app's EOF, answer, close
            seen.append(await reader.read())
            writer.write(b"bye")
            await writer.drain()
            writer.close()
        else:                           # speak, half-close, read what the app still sends, close
            writer.write(b"hi")
            writer.write_eof()
            seen.append(await reader.read())
            writer.close()
        server_done.set()

    server = await asyncio.start_server(target, "127.0.0.1", 0)
    target_port = server.sockets[0].getsockname()[1]
    p = ports()
    sc = await start_sidecar(tmp_path, policy(p))
    stopped = False
    try:
        reader, writer = await open_tunnel(p["proxy"], target_port)
        app_port = writer.get_extra_info("sockname")[1]
        await until(lambda: inodes(remote_port=target_port), "the upstream connection")
        ours = inodes(local_port=p["proxy"], remote_port=app_port) | inodes(remote_port=target_port)
        assert len(ours) == 2 and ours <= open_socket_inodes()

        if first == "app":
            writer.write(b"hello")
            writer.write_eof()                                   # the app half-closes first
            assert await asyncio.wait_for(reader.read(), HANG_GUARD) == b"bye"   # then EOF: the server closed
        else:
            assert await asyncio.wait_for(reader.read(), HANG_GUARD) == b"hi"    # the upstream's EOF came through
            writer.write(b"more")
            writer.write_eof()                                   # then the app is done too
        await asyncio.wait_for(server_done.wait(), HANG_GUARD)
        assert seen == [b"hello" if first == "app" else b"more"]

        # The sidecar closed both of its sockets, while the app still holds its own open.
        await until(lambda: not (ours & open_socket_inodes()), "the sidecar's sockets closed")
        assert not sc.runtime.relays.live
        assert not writer.transport.is_closing()
        # SIGTERM's drain finds nothing in flight: it returns at once, not after DRAIN seconds.
        await asyncio.wait_for(sc.stop(drain_timeout=DRAIN), HANG_GUARD)
        stopped = True
        writer.close()
    finally:
        if not stopped:
            await sc.stop()
        server.close()


async def test_tunnel_counts_bytes_each_way_in_its_record(tmp_path):
    finished = []

    async def target(reader, writer):
        data = await reader.read()
        writer.write(data * 3)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(target, "127.0.0.1", 0)
    target_port = server.sockets[0].getsockname()[1]
    p = ports()
    sc = await start_sidecar(tmp_path, policy(p))
    sc.runtime.sink.sinks.append(type("Sink", (), {"decision": lambda self, r: None,
                                                   "request_finished": lambda self, r: finished.append(r)})())
    try:
        reader, writer = await open_tunnel(p["proxy"], target_port)
        writer.write(b"x" * 1000)
        writer.write_eof()
        assert len(await asyncio.wait_for(reader.read(), HANG_GUARD)) == 3000
        writer.close()
        await until(lambda: finished, "the tunnel's record")
        rec, = finished
        assert (rec.relayed, rec.bytes_up, rec.bytes_down, rec.route) == ("tunnel", 1000, 3000, "tunnels")
    finally:
        await sc.stop()
        server.close()
