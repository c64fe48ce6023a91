"""gRPC through a reverse listener: real grpcio clients and servers, the sidecar speaking HTTP/2 on
both sides (h2c prior knowledge in, `protocol: h2c` out)."""
import asyncio

import grpc

from grpc_kit import channel, method


def policy(port, upstream_url, route="", protocol="h2c"):
    return f"""
    version: 1
    listeners:
      - {{name: api, mode: reverse, port: {port['reverse']}, upstream: svc}}
    admin: {{port: {port['admin']}}}
    health: {{bind: 127.0.0.1, port: {port['health']}}}
    upstreams:
      svc: {{url: "{upstream_url}", protocol: {protocol}}}
    routes:
      - name: rpc
        match: {{path_prefix: /test.Echo/}}
        upstream: svc
{route}
    """


async def test_four_kinds_of_call_through_a_reverse_listener(grpc_server_factory, sidecar_factory, port):
    server = await grpc_server_factory()
    await sidecar_factory(policy(port, server.url))
    async with channel(port["reverse"]) as ch:
        call = method(ch, "uu", "Unary")(b"hi")
        assert await call == b"echo:hi"
        meta = dict(await call.initial_metadata())
        assert meta["x-sidecar-route"] == "rpc" and meta["x-sidecar-attempts"] == "1"
        assert await call.code() == grpc.StatusCode.OK

        got = [m async for m in method(ch, "us", "ServerStream")(b"1000")]
        assert len(got) == 1000 and got[0] == b"m0" and got[-1] == b"m999"

        async def many():
            for i in range(50):
                yield b"x" * i
        assert await method(ch, "su", "ClientStream")(many()) == b"50/%d" % sum(range(50))

        bidi = method(ch, "ss", "Bidi")()
        for word in (b"a", b"b", b"c"):
            await bidi.write(word)
            assert await bidi.read() == b"re:" + word
        await bidi.done_writing()
        assert await bidi.read() == grpc.aio.EOF
        assert await bidi.code() == grpc.StatusCode.OK
    assert server.calls == {"Unary": 1, "ServerStream": 1, "ClientStream": 1, "Bidi": 1}


async def test_drain_lets_a_call_in_flight_finish(grpc_server_factory, sidecar_factory, port):
    started = asyncio.Event()

    async def slow(name, context):
        started.set()
        await asyncio.sleep(0.5)
    server = await grpc_server_factory(slow)
    sidecar = await sidecar_factory(policy(port, server.url))
    async with channel(port["reverse"]) as ch:
        call = method(ch, "uu", "Unary")(b"last")
        await asyncio.wait_for(started.wait(), 10)
        drained = asyncio.ensure_future(sidecar.runtime.drain(10))
        assert await call == b"echo:last"           # GOAWAY sent, the stream in flight answered
        await drained


async def test_calls_on_one_client_connection_spread_over_three_replicas(grpc_server_factory, sidecar_factory,
                                                                         port):
    servers = [await grpc_server_factory() for _ in range(3)]
    endpoints = ", ".join(f'{{url: "{s.url}"}}' for s in servers)
    await sidecar_factory(f"""
    version: 1
    listeners:
      - {{name: api, mode: reverse, port: {port['reverse']}, upstream: svc}}
    admin: {{port: {port['admin']}}}
    health: {{bind: 127.0.0.1, port: {port['health']}}}
    upstreams:
      svc: {{endpoints: [{endpoints}], protocol: h2c, balance: round-robin}}
    routes:
      - name: rpc
        match: {{path_prefix: /test.Echo/}}
        upstream: svc
    """)
    seen = set()
    async with channel(port["reverse"]) as ch:          # one HTTP/2 connection from the app
        for i in range(30):
            call = method(ch, "uu", "Unary")(b"%d" % i)
            assert await call == b"echo:%d" % i
            seen.add(dict(await call.initial_metadata())["x-sidecar-endpoint"])
    assert [s.calls.get("Unary", 0) for s in servers] == [10, 10, 10]   # per call, not per connection
    assert len(seen) == 3
