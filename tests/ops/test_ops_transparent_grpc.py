"""gRPC through the transparent listener for real: a grpcio client (uid 1000) in the app namespace
calls a grpcio server in the other namespace by its IP; iptables REDIRECTs the connection to the
sidecar, which sniffs the HTTP/2 preface, governs each call and speaks h2c to the original destination.
Same namespaces, rules and skips as test_ops_transparent.py."""
from __future__ import annotations

import json
import sys
import textwrap

import pytest

from test_ops_transparent import (APP_UID, PROXY_PORT, SIDECAR_UID, as_uid, interpreter_caps,  # noqa: F401
                                   netns, refused_by_kernel, run, wait_for_line, workdir)

SERVER = textwrap.dedent("""
    import asyncio, sys
    import grpc

    async def main():
        async def unary(req, ctx):
            return b"echo:" + req
        async def server_stream(req, ctx):
            for i in range(int(req)):
                yield b"m%d" % i
        async def client_stream(reqs, ctx):
            n = 0
            async for _ in reqs:
                n += 1
            return b"%d" % n
        async def bidi(reqs, ctx):
            async for r in reqs:
                yield b"re:" + r
        handler = grpc.method_handlers_generic_handler("test.Echo", {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi)})
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"{sys.argv[1]}:{sys.argv[2]}")
        await server.start()
        print("READY", flush=True)
        await server.wait_for_termination()
    asyncio.run(main())
""")

CLIENT = textwrap.dedent("""
    import asyncio, json, sys
    import grpc

    async def main():
        out = {}
        async with grpc.aio.insecure_channel(sys.argv[1], options=[("grpc.enable_http_proxy", 0)]) as ch:
            call = ch.unary_unary("/test.Echo/Unary")(b"hi")
            out["unary"] = (await call).decode()
            out["meta"] = {k: v for k, v in (await call.initial_metadata())}
            out["stream"] = len([m async for m in ch.unary_stream("/test.Echo/ServerStream")(b"1000")])
            async def many():
                for _ in range(30):
                    yield b"x"
            out["client_stream"] = (await ch.stream_unary("/test.Echo/ClientStream")(many())).decode()
            bidi = ch.stream_stream("/test.Echo/Bidi")()
            got = []
            for w in (b"a", b"b"):
                await bidi.write(w)
                got.append((await bidi.read()).decode())
            await bidi.done_writing()
            out["bidi"] = got
        print(json.dumps(out))
    asyncio.run(main())
""")


def test_grpc_calls_are_intercepted_and_governed(netns, workdir):  # noqa: F811 - fixtures
    caps = interpreter_caps()
    nat = run(*netns.exec(netns.app, "iptables", "-t", "nat", "-S", "OUTPUT"), check=False)
    if nat.returncode != 0:
        (pytest.skip if refused_by_kernel(nat) else pytest.fail)(f"iptables nat table refused: {nat.stderr.strip()}")
    for name, text in (("grpc_server.py", SERVER), ("grpc_client.py", CLIENT)):
        (workdir / name).write_text(text)
        (workdir / name).chmod(0o644)
    srv_log = workdir / "server.log"
    server = netns.spawn(netns.srv, [sys.executable, str(workdir / "grpc_server.py"), netns.srv_ip, "50051"],
                         srv_log, workdir)
    wait_for_line(srv_log, server, "READY")
    done = run(*netns.exec(netns.app, sys.executable, "-m", "sidecar", "iptables",
                           "--proxy-port", str(PROXY_PORT), "--proxy-uid", str(SIDECAR_UID)), check=False)
    if done.returncode != 0:
        (pytest.skip if refused_by_kernel(done) else pytest.fail)(f"`sidecar iptables` failed: {done.stderr.strip()}")
    policy = workdir / "policy.yaml"
    policy.write_text(textwrap.dedent(f"""\
        version: 1
        listeners:
          - {{name: outbound, mode: transparent, bind: 0.0.0.0, port: {PROXY_PORT}}}
        admin: {{bind: 127.0.0.1, port: 15000}}
        health: {{bind: 127.0.0.1, port: 15021}}
        routes:
          - name: echo-rpc
            match: {{path_prefix: /test.Echo/}}
        """))
    policy.chmod(0o644)
    sc_log = workdir / "sidecar.log"
    sidecar = netns.spawn(netns.app, as_uid(SIDECAR_UID, caps, sys.executable, "-m", "sidecar", "run",
                                            "-c", str(policy)), sc_log, workdir)
    wait_for_line(sc_log, sidecar, "sidecar ready")
    argv = as_uid(APP_UID, caps, sys.executable, str(workdir / "grpc_client.py"), f"{netns.srv_ip}:50051")
    out = json.loads(run(*netns.exec(netns.app, *argv), timeout=60).stdout)
    assert out["unary"] == "echo:hi", sc_log.read_text()
    assert out["meta"]["x-sidecar-route"] == "echo-rpc"          # governed, not tunnelled
    assert out["meta"]["x-sidecar-upstream"] == f"{netns.srv_ip}:50051"
    assert out["stream"] == 1000 and out["client_stream"] == "30" and out["bidi"] == ["re:a", "re:b"]
