"""Scripted LLM APIs on loopback: OpenAI-style (JSON, or SSE with a final usage chunk when the request
sets `stream_options.include_usage`) and Anthropic-style (JSON, or the message_start / content_block /
message_delta / message_stop events). Each remembers the bodies it was sent."""
from __future__ import annotations

import asyncio
import json
import time

from aiohttp import web


class LlmApi:
    """One handler for an `Upstream`: answers with the given usage and model; records request bodies."""

    def __init__(self, *, model: str | None = None, input_tokens: int = 11, output_tokens: int = 7,
                 chunks: int = 3, hold: asyncio.Event | None = None) -> None:
        self.model = model                  # None: echo the request's model
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self.chunks = chunks
        self.hold = hold                    # set: the stream pauses after its first event until set
        self.bodies: list[dict] = []
        self.first_event_ns: list[int] = []  # when each stream's first event was written

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        doc = await request.json()
        self.bodies.append(doc)
        model = self.model or doc.get("model", "unknown")
        if request.path.endswith("/messages"):
            return await (self._anthropic_stream if doc.get("stream") else self._anthropic_json)(request, model)
        return await (self._openai_stream if doc.get("stream") else self._openai_json)(request, doc, model)

    # -- OpenAI chat completions -----------------------------------------------------------------
    def _usage(self) -> dict:
        return {"prompt_tokens": self.input_tokens, "completion_tokens": self.output_tokens,
                "total_tokens": self.input_tokens + self.output_tokens}

    async def _openai_json(self, request, doc, model) -> web.Response:
        return web.json_response({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"},
                         "finish_reason": "stop"}],
            "usage": self._usage()})

    async def _openai_stream(self, request, doc, model) -> web.StreamResponse:
        resp = await _sse(request)
        include_usage = (doc.get("stream_options") or {}).get("include_usage") is True
        base = {"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 1, "model": model}
        for i in range(self.chunks):
            chunk = dict(base, choices=[{"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}])
            if include_usage:
                chunk["usage"] = None
            await self._event(resp, chunk, first=i == 0)
        await self._event(resp, dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}]))
        if include_usage:
            await self._event(resp, dict(base, choices=[], usage=self._usage()))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    # -- Anthropic messages ----------------------------------------------------------------------
    async def _anthropic_json(self, request, model) -> web.Response:
        return web.json_response({
            "id": "msg_1", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": "hello"}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens}})

    async def _anthropic_stream(self, request, model) -> web.StreamResponse:
        resp = await _sse(request)
        await self._event(resp, {"type": "message_start", "message": {
            "id": "msg_2", "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": 1}}}, name="message_start", first=True)
        await self._event(resp, {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}, name="content_block_start")
        for i in range(self.chunks):
            await self._event(resp, {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": f"w{i} "}}, name="content_block_delta")
        await self._event(resp, {"type": "content_block_stop", "index": 0}, name="content_block_stop")
        await self._event(resp, {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                 "usage": {"output_tokens": self.output_tokens}}, name="message_delta")
        await self._event(resp, {"type": "message_stop"}, name="message_stop")
        await resp.write_eof()
        return resp

    async def _event(self, resp, doc, *, name: str | None = None, first: bool = False) -> None:
        head = f"event: {name}\n" if name else ""
        await resp.write(f"{head}data: {json.dumps(doc)}\n\n".encode())
        if first:
            self.first_event_ns.append(time.perf_counter_ns())
            if self.hold is not None:
                await self.hold.wait()


async def _sse(request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
    await resp.prepare(request)
    return resp
