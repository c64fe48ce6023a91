"""Hostile HTTP/2 from an app, as raw frames (hyperframe and hpack, the layers under `h2`): each is
answered with GOAWAY or RST_STREAM, and another client on another connection is still served."""

import h2.errors
import pytest
from aiohttp import web
from hyperframe.frame import ContinuationFrame, DataFrame, RstStreamFrame, WindowUpdateFrame

from h2kit import H2App, RawH2

E = h2.errors.ErrorCodes


@pytest.fixture
async def listener(upstream_factory, sidecar_factory, port):
    async def ok(request):
        await request.read()
        return web.Response(text="ok")
    up = await upstream_factory(ok)
    await sidecar_factory(f"""
    version: 1
    listeners:
      - {{name: api, mode: reverse, port: {port['reverse']}, upstream: svc}}
    admin: {{port: {port['admin']}}}
    health: {{bind: 127.0.0.1, port: {port['health']}}}
    upstreams:
      svc: {{url: "{up.url}", protocol: http1}}
    """)
    return port["reverse"], up


async def still_served(port: int) -> None:
    async with H2App(port) as app:
        answer = await app.request("GET", "/after")
    assert answer["headers"][":status"] == "200" and answer["body"] == b"ok"


async def test_malformed_frame_gets_goaway(listener):
    port, _ = listener
    async with RawH2(port) as raw:
        raw.send(b"\x00\x00\x05\x04\x00\x00\x00\x00\x00" + b"\x00" * 5)   # SETTINGS of 5 bytes (not 6n)
        goaway = await raw.goaway()
    assert goaway is not None and goaway.error_code in (E.FRAME_SIZE_ERROR, E.PROTOCOL_ERROR)
    await still_served(port)


async def test_hpack_bomb_gets_goaway(listener):
    port, up = listener
    async with RawH2(port) as raw:
        # One 4 KiB field indexed once, then referenced by one byte each: ~4 KiB on the wire, 160 KiB decoded
        raw.send(raw.headers(1, extra=[("x-bomb", "a" * 4000)] * 40))
        goaway = await raw.goaway()
    assert goaway is not None and goaway.error_code in (E.ENHANCE_YOUR_CALM, E.PROTOCOL_ERROR, E.COMPRESSION_ERROR)
    assert up.hits == 0
    await still_served(port)


async def test_continuation_flood_gets_goaway(listener):
    port, up = listener
    async with RawH2(port) as raw:
        first = raw.headers(1, end_headers=False)
        raw.send(first, *[ContinuationFrame(1, data=b"\x00" * 16) for _ in range(500)])
        goaway = await raw.goaway()
    assert goaway is not None and goaway.error_code in (E.ENHANCE_YOUR_CALM, E.PROTOCOL_ERROR)
    assert up.hits == 0
    await still_served(port)


async def test_rapid_reset_gets_goaway_and_bounded_work(listener):
    port, up = listener
    async with RawH2(port) as raw:
        frames = []
        for i in range(1000):
            sid = 2 * i + 1
            frames += [raw.headers(sid, path=f"/r{i}"), RstStreamFrame(sid, error_code=E.CANCEL)]
        raw.send(*frames)
        goaway = await raw.goaway()
    assert goaway is not None and goaway.error_code == E.ENHANCE_YOUR_CALM
    assert up.hits < 300                     # reset streams' work was cancelled, and the connection ended
    await still_served(port)


async def test_too_many_concurrent_streams_are_refused(listener):
    port, _ = listener
    async with RawH2(port) as raw:
        # 200 streams left open (no END_STREAM) against SETTINGS_MAX_CONCURRENT_STREAMS 128
        raw.send(*[raw.headers(2 * i + 1, end_stream=False) for i in range(200)])
        refused = await raw.until(lambda f: (isinstance(f, RstStreamFrame) and f.error_code == E.REFUSED_STREAM)
                                  or f.type == 0x7)
    assert refused is not None
    await still_served(port)


async def test_window_overflow_gets_goaway(listener):
    port, _ = listener
    async with RawH2(port) as raw:
        raw.send(WindowUpdateFrame(0, window_increment=2 ** 31 - 1), WindowUpdateFrame(0, window_increment=2 ** 31 - 1))
        goaway = await raw.goaway()
    assert goaway is not None and goaway.error_code == E.FLOW_CONTROL_ERROR
    await still_served(port)


async def test_data_past_the_stream_window_gets_an_error(listener):
    port, _ = listener
    async with RawH2(port) as raw:
        raw.send(raw.headers(1, path="/upload", end_stream=False),
                 *[DataFrame(1, data=b"x" * 16384) for _ in range(8)])    # 128 KiB into a 64 KiB window
        answer = await raw.until(lambda f: f.type in (0x3, 0x7))           # RST_STREAM or GOAWAY
    assert answer is not None and answer.error_code == E.FLOW_CONTROL_ERROR
    await still_served(port)
