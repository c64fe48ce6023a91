"""Golden signals through a running sidecar: a stream the upstream cuts after its first byte is a
failed request (the app got a 200 head and half a body), in /status's signals and in /metrics."""
import json

import aiohttp
from aiohttp import web


class SseApi:
    """An OpenAI-style SSE stream; `cut`: one event, then the connection is aborted (an RST, no end)."""

    def __init__(self) -> None:
        self.cut = False

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        chunk = {"object": "chat.completion.chunk", "model": "m",
                 "choices": [{"index": 0, "delta": {"content": "w"}, "finish_reason": None}]}
        await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if self.cut:
            request.transport.abort()            # the event went out with the write; then an RST
            return resp
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def policy(port, upstream):
    return f"""
    version: 1
    listeners:
      - {{name: api, mode: reverse, port: {port['reverse']}, upstream: llm}}
    admin: {{port: {port['admin']}}}
    health: {{bind: 127.0.0.1, port: {port['health']}}}
    upstreams:
      llm: {{url: "{upstream}"}}
    routes:
      - name: chat
        match: {{path_prefix: /v1/}}
        upstream: llm
    """


async def test_a_stream_cut_after_its_first_byte_counts_as_a_failure(upstream_factory, sidecar_factory, port):
    api = SseApi()
    upstream = await upstream_factory(api)
    await sidecar_factory(policy(port, upstream.url))
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as s:
        async def stream():
            async with s.post(f"http://127.0.0.1:{port['reverse']}/v1/chat/completions", json=body) as r:
                assert r.status == 200
                first = await r.content.readuntil(b"\n\n")
                assert first.startswith(b"data: ")
                try:
                    rest = await r.read()
                except aiohttp.ClientPayloadError:
                    return "cut"
                assert rest.endswith(b"data: [DONE]\n\n")
                return "whole"

        assert [await stream() for _ in range(3)] == ["whole"] * 3
        api.cut = True
        assert await stream() == "cut"

        async with s.get(f"http://127.0.0.1:{port['admin']}/status") as r:
            signals = (await r.json())["signals"]
        route = next(x for x in signals["routes"] if x["name"] == "chat")
        llm = next(x for x in signals["upstreams"] if x["name"] == "llm")
        assert (route["requests"], route["success_rate"]) == (4, 0.75)
        assert (llm["requests"], llm["success_rate"]) == (4, 0.75)
        async with s.get(f"http://127.0.0.1:{port['admin']}/metrics") as r:
            metrics = await r.text()
        assert 'sidecar_requests_total{code="200",route="chat"} 3.0' in metrics
        assert 'sidecar_requests_total{code="reset",route="chat"} 1.0' in metrics
        assert 'sidecar_upstream_requests_total{code="reset",route="chat",upstream="llm"} 1.0' in metrics
