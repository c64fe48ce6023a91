"""Real grpcio servers and clients on loopback, with generic method handlers (bytes in, bytes out: no
codegen). Service `test.Echo`: Unary, ServerStream, ClientStream, Bidi."""
from __future__ import annotations

import grpc

from harness import free_port

SERVICE = "test.Echo"
NO_PROXY = [("grpc.enable_http_proxy", 0), ("grpc.enable_retries", 0)]


class EchoServer:
    """A grpc.aio server; `behaviour(method, context)` may abort before the echo (a test's script)."""

    def __init__(self, behaviour=None) -> None:
        self.port = free_port()
        self.calls: dict[str, int] = {}
        self.metadata: list[dict] = []
        self._behaviour = behaviour
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _enter(self, method: str, context) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1
        self.metadata.append(dict(context.invocation_metadata()))
        if self._behaviour is not None:
            await self._behaviour(method, context)

    async def start(self) -> "EchoServer":
        async def unary(request: bytes, context) -> bytes:
            await self._enter("Unary", context)
            return b"echo:" + request

        async def server_stream(request: bytes, context):
            await self._enter("ServerStream", context)
            count = int(request.decode() or "0")
            for i in range(count):
                yield b"m%d" % i

        async def client_stream(requests, context) -> bytes:
            await self._enter("ClientStream", context)
            total, n = 0, 0
            async for msg in requests:
                total += len(msg)
                n += 1
            return b"%d/%d" % (n, total)

        async def bidi(requests, context):
            await self._enter("Bidi", context)
            async for msg in requests:
                yield b"re:" + msg

        handler = grpc.method_handlers_generic_handler(SERVICE, {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        })
        self._server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        self._server.add_generic_rpc_handlers((handler,))
        self._server.add_insecure_port(self.address)
        await self._server.start()
        return self

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)
            self._server = None


def channel(port: int) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=NO_PROXY)


def method(ch: grpc.aio.Channel, kind: str, name: str):
    factory = {"uu": ch.unary_unary, "us": ch.unary_stream, "su": ch.stream_unary, "ss": ch.stream_stream}[kind]
    return factory(f"/{SERVICE}/{name}")


def blocking_unary(port: int, request: bytes, timeout: float = 10.0):
    """One unary call with grpcio's blocking API, `with_call`: (answer, call) with the call's metadata.
    Run it in a thread (`asyncio.to_thread`) while the sidecar serves on the test's loop."""
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=NO_PROXY) as ch:
        return ch.unary_unary(f"/{SERVICE}/Unary").with_call(request, timeout=timeout)
