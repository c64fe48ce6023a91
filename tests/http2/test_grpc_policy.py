"""gRPC-aware policy with real grpcio servers and clients: grpc-timeout, the breaker on gRPC statuses,
static gRPC answers and refusals as gRPC statuses."""
import asyncio
import struct

import grpc

from grpc_kit import channel, method
from h2kit import H2App
from test_grpc_proxy import policy


def frame(message: bytes) -> bytes:
    return struct.pack(">BI", 0, len(message)) + message


async def test_grpc_timeout_caps_the_route_and_the_rest_goes_upstream(grpc_server_factory, sidecar_factory, port):
    remaining = []

    async def slow(name, context):
        remaining.append(context.time_remaining())
        await asyncio.sleep(1.0)
    server = await grpc_server_factory(slow)
    await sidecar_factory(policy(port, server.url, route="        timeout: 30s"))
    # A raw HTTP/2 client without a deadline of its own: the DEADLINE_EXCEEDED is the sidecar's.
    async with H2App(port["reverse"]) as app:
        answer = await app.request("POST", "/test.Echo/Unary", frame(b"x"), headers=[
            ("content-type", "application/grpc"), ("te", "trailers"), ("grpc-timeout", "100m")])
    head = answer["headers"]
    assert head[":status"] == "200" and head["grpc-status"] == "4"       # trailers-only
    assert head["content-type"] == "application/grpc"
    assert remaining and 0 < remaining[0] <= 0.1                         # the deadline left, sent upstream
    async with channel(port["reverse"]) as ch:
        try:
            await method(ch, "uu", "Unary")(b"x", timeout=0.1)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        else:
            raise AssertionError("a 1 s call under a 100 ms deadline succeeded")


async def test_unavailable_opens_the_breaker_then_a_static_grpc_error_answers(grpc_server_factory,
                                                                              sidecar_factory, port):
    async def down(name, context):
        await context.abort(grpc.StatusCode.UNAVAILABLE, "server down")
    server = await grpc_server_factory(down)
    await sidecar_factory(policy(port, server.url, route="""
        breaker: {consecutive_failures: 3, open_for: 60s}
        fallback:
          when: [breaker-open]
          targets:
            - static: {grpc_status: 14, message: "orders are paused, try later"}
    """))
    details = []
    async with channel(port["reverse"]) as ch:
        for _ in range(6):
            call = method(ch, "uu", "Unary")(b"x")
            try:
                await call
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
                details.append(exc.details())
    assert details[:3] == ["server down"] * 3
    assert details[3:] == ["orders are paused, try later"] * 3
    assert server.calls == {"Unary": 3}            # the open breaker answered without touching the server


async def test_refusals_are_grpc_statuses_not_error_pages(grpc_server_factory, sidecar_factory, port):
    server = await grpc_server_factory()
    await sidecar_factory(policy(port, server.url, route="        rate_limit: {per_second: 0.01, burst: 1}"))
    async with channel(port["reverse"]) as ch:
        assert await method(ch, "uu", "Unary")(b"x") == b"echo:x"
        try:
            await method(ch, "uu", "Unary")(b"x")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            meta = dict(exc.trailing_metadata() or ())    # trailers-only: the head is the trailers
            assert meta.get("x-sidecar-route") == "rpc"
        else:
            raise AssertionError("the rate limit let a second call through")
    assert server.calls == {"Unary": 1}

