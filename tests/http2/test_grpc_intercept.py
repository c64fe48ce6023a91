"""gRPC through an intercepted CONNECT: a grpcio client with `grpc.http_proxy` set and the sidecar's CA
as its only root sends CONNECT to the proxy listener, then TLS with ALPN h2 to the sidecar, which
terminates it and sends each call through the route policy to an h2c gRPC server. The 1.5 MB unary
message is larger than every HTTP/2 window on the way: flow control over the TLS transport both ways."""
import grpc

from grpc_kit import SERVICE, method

HOST = "rpc.intercepted.test"


def policy(port, state, upstream_url):
    return f"""
    version: 1
    state_dir: {state}
    listeners:
      - {{name: egress, mode: proxy, port: {port['proxy']}, intercept: {{hosts: [{HOST}]}}}}
    admin: {{port: {port['admin']}}}
    health: {{bind: 127.0.0.1, port: {port['health']}}}
    upstreams:
      svc: {{url: "{upstream_url}", protocol: h2c}}
    routes:
      - name: rpc
        match: {{host: {HOST}, path_prefix: /{SERVICE}/}}
        upstream: svc
    """


async def test_grpcio_through_an_intercepted_connect_is_governed_per_call(grpc_server_factory, sidecar_factory,
                                                                          port, tmp_path):
    server = await grpc_server_factory()
    state = tmp_path / "state"
    await sidecar_factory(policy(port, state, server.url))
    roots = grpc.ssl_channel_credentials(root_certificates=(state / "intercept-bundle.pem").read_bytes())
    options = [("grpc.http_proxy", f"http://127.0.0.1:{port['proxy']}"), ("grpc.enable_retries", 0)]
    async with grpc.aio.secure_channel(f"{HOST}:443", roots, options=options) as ch:
        call = method(ch, "uu", "Unary")(b"hi")
        assert await call == b"echo:hi"
        meta = dict(await call.initial_metadata())
        assert meta["x-sidecar-route"] == "rpc" and meta["x-sidecar-upstream"] == "svc"

        big = bytes(range(256)) * 6144              # 1.5 MB
        assert await method(ch, "uu", "Unary")(big, timeout=20) == b"echo:" + big

        got = [m async for m in method(ch, "us", "ServerStream")(b"1000")]
        assert len(got) == 1000 and got[-1] == b"m999"

        bidi = method(ch, "ss", "Bidi")()
        for word in (b"a", b"b"):
            await bidi.write(word)
            assert await bidi.read() == b"re:" + word
        await bidi.done_writing()
        assert await bidi.read() == grpc.aio.EOF
        assert await bidi.code() == grpc.StatusCode.OK
    assert server.calls == {"Unary": 2, "ServerStream": 1, "Bidi": 1}
