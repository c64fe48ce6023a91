"""gRPC-aware policy with real grpcio servers and clients: grpc-timeout, the breaker on gRPC statuses,
static gRPC answers and refusals as gRPC statuses."""
import asyncio
import struct

import aiohttp
import grpc

from grpc_kit import blocking_unary, channel, method
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



# --- grpc:<code> conditions in retry.when and fallback.when ------------------------------------------

def failing(*codes):
    """A server behaviour: the first calls abort with `codes` in turn (trailers-only), then echo."""
    script = list(codes)

    async def behave(name, context):
        if script:
            await context.abort(script.pop(0), "scripted failure")
    return behave


RETRY_UNAVAILABLE = "        retry: {max_retries: 3, when: [grpc:unavailable], backoff: {base: 1ms, max: 5ms}}"


async def test_unavailable_twice_is_retried_and_the_client_sees_ok_with_the_attempts(grpc_server_factory,
                                                                                     sidecar_factory, port):
    server = await grpc_server_factory(failing(grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE))
    await sidecar_factory(policy(port, server.url, route=RETRY_UNAVAILABLE))   # no `methods: [POST]` needed
    answer, call = await asyncio.to_thread(blocking_unary, port["reverse"], b"x")
    assert answer == b"echo:x" and call.code() == grpc.StatusCode.OK
    meta = dict(call.initial_metadata())
    assert meta["x-sidecar-attempts"] == "3" and meta["x-sidecar-upstream"] == "svc"
    assert "retry" in meta["x-sidecar-degraded"].split(",")
    assert server.calls == {"Unary": 3}


async def test_a_code_the_route_does_not_list_is_not_retried(grpc_server_factory, sidecar_factory, port):
    server = await grpc_server_factory(failing(grpc.StatusCode.INVALID_ARGUMENT))
    await sidecar_factory(policy(port, server.url, route=RETRY_UNAVAILABLE))
    async with channel(port["reverse"]) as ch:
        try:
            await method(ch, "uu", "Unary")(b"x")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT and exc.details() == "scripted failure"
            assert dict(exc.trailing_metadata())["x-sidecar-attempts"] == "1"
        else:
            raise AssertionError("INVALID_ARGUMENT became a success")
    assert server.calls == {"Unary": 1}


async def test_unavailable_every_time_gives_up_after_max_retries_with_the_servers_status(grpc_server_factory,
                                                                                       sidecar_factory, port):
    server = await grpc_server_factory(failing(*[grpc.StatusCode.UNAVAILABLE] * 10))
    await sidecar_factory(policy(port, server.url, route=RETRY_UNAVAILABLE))
    async with channel(port["reverse"]) as ch:
        try:
            await method(ch, "uu", "Unary")(b"x")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE and exc.details() == "scripted failure"
            assert dict(exc.trailing_metadata())["x-sidecar-attempts"] == "4"
        else:
            raise AssertionError("an always-UNAVAILABLE server answered OK")
    assert server.calls == {"Unary": 4}


async def test_resource_exhausted_falls_back_to_a_static_grpc_error(grpc_server_factory, sidecar_factory, port):
    server = await grpc_server_factory(failing(grpc.StatusCode.RESOURCE_EXHAUSTED))
    await sidecar_factory(policy(port, server.url, route="""
        fallback:
          when: [grpc:resource-exhausted]
          targets:
            - static: {grpc_status: 14, message: "busy, try later"}
    """))
    async with channel(port["reverse"]) as ch:
        try:
            await method(ch, "uu", "Unary")(b"x")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE and exc.details() == "busy, try later"
            meta = dict(exc.trailing_metadata())
            assert meta["x-sidecar-upstream"] == "static" and meta["x-sidecar-degraded"] == "static_response"
        else:
            raise AssertionError("RESOURCE_EXHAUSTED was not replaced by the static answer")
        assert await method(ch, "uu", "Unary")(b"y") == b"echo:y"     # the server's OK is no failure
    assert server.calls == {"Unary": 2}


async def test_resource_exhausted_falls_back_to_another_upstream(grpc_server_factory, sidecar_factory, port):
    primary = await grpc_server_factory(failing(grpc.StatusCode.RESOURCE_EXHAUSTED))
    backup = await grpc_server_factory()
    text = policy(port, primary.url, route="""
        fallback:
          when: [grpc:resource-exhausted]
          targets: [{upstream: backup}]
    """).replace("    routes:", f'      backup: {{url: "{backup.url}", protocol: h2c}}\n    routes:')
    await sidecar_factory(text)
    answer, call = await asyncio.to_thread(blocking_unary, port["reverse"], b"x")
    assert answer == b"echo:x" and call.code() == grpc.StatusCode.OK
    meta = dict(call.initial_metadata())
    assert meta["x-sidecar-upstream"] == "backup" and meta["x-sidecar-attempts"] == "2"
    assert primary.calls == {"Unary": 1} and backup.calls == {"Unary": 1}


# --- a cached unary answer served stale ------------------------------------------------------------

async def test_a_cached_unary_answer_is_served_stale_when_the_upstream_is_down(grpc_server_factory,
                                                                             sidecar_factory, port):
    # OK (stored), an error of the caller's (passed on, never stored), a server fault (the stored copy)
    answers = [None, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE]

    async def behave(name, context):
        code = answers.pop(0) if answers else None
        if code is not None:
            await context.abort(code, "no such order")
    server = await grpc_server_factory(behave)
    # ttl 0: every call goes upstream while it answers; the stored copy serves only on error.
    await sidecar_factory(policy(port, server.url, route="""
        cache: {ttl: 0s, stale_if_error: 1h, key: [method, url, body]}
    """))
    answer, call = await asyncio.to_thread(blocking_unary, port["reverse"], b"order-7")
    assert answer == b"echo:order-7" and dict(call.initial_metadata())["x-sidecar-upstream"] == "svc"
    try:
        await asyncio.to_thread(blocking_unary, port["reverse"], b"order-7")
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND           # passed on, and not stored over the OK
    else:
        raise AssertionError("the server's NOT_FOUND did not reach the client")
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port['admin']}/status") as r:
            cache = (await r.json())["routes"][0]["cache"]
    assert (cache["entries"], cache["stored"], cache["not_stored"]) == (1, 1, 1)
    for down in (False, True):                       # UNAVAILABLE from the server, then no server at all
        if down:
            await server.stop()
        answer, call = await asyncio.to_thread(blocking_unary, port["reverse"], b"order-7")
        assert answer == b"echo:order-7" and call.code() == grpc.StatusCode.OK
        meta = dict(call.initial_metadata())
        assert meta["x-sidecar-upstream"] == "cache" and "stale-if-error" in meta["cache-status"]
        assert meta["x-sidecar-degraded"] == "cache_stale"
    assert server.calls == {"Unary": 3}


async def test_a_stored_call_answers_ok_with_an_empty_message_and_is_delivered_later(grpc_server_factory,
                                                                                    sidecar_factory, port,
                                                                                    tmp_path):
    server = await grpc_server_factory(failing(grpc.StatusCode.UNAVAILABLE))   # then the call goes through
    text = policy(port, server.url, route="""
        queue: {when: [grpc:unavailable], max_items: 10, max_age: 1h}
    """).rstrip() + f"\n    state_dir: {tmp_path / 'state'}\n"
    await sidecar_factory(text)
    answer, call = await asyncio.to_thread(blocking_unary, port["reverse"], b"order-9")
    # Not a 202 (grpcio would report UNKNOWN): OK, the default (empty) response, and metadata that says so.
    assert answer == b"" and call.code() == grpc.StatusCode.OK
    meta = dict(call.initial_metadata())
    assert meta["x-sidecar-upstream"] == "queue" and meta["x-sidecar-queued"]
    assert "queued" in meta["x-sidecar-degraded"].split(",")
    for _ in range(200):                             # the worker delivers it: the server's second call
        if server.calls.get("Unary") == 2:
            break
        await asyncio.sleep(0.05)
    assert server.calls == {"Unary": 2}
    assert "idempotency-key" in server.metadata[-1]     # the stored copy, as the queue sends every write
