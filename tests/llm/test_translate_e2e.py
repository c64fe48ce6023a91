"""Cross-provider fallback end to end: the real `openai` and `anthropic` SDKs as the app, a primary
that answers 503, and a backup of the other API whose request parser is strict (the checkers in
provider_shapes.py, derived from the SDKs' own request types). Real servers on loopback."""
import asyncio
import json
import time

import aiohttp
import anthropic
import openai
import pytest
from aiohttp import web

from llm_streams import anthropic_sse, openai_sse
from provider_shapes import Rejected, check_anthropic, check_openai
from sidecar.llm.translate.sse import encode

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}


def down(status=503):
    async def handler(request):
        await request.read()
        return web.json_response({"error": {"message": "primary down", "type": "server_error"}}, status=status)
    return handler


class AnthropicBackup:
    """An Anthropic-shaped server: strict about what it accepts; answers a tool call when offered tools,
    else echoes the last user text. `gate` holds a stream after its first text delta until released."""

    def __init__(self, status=200):
        self.status = status
        self.bodies: list[dict] = []
        self.gate: asyncio.Event | None = None
        self.pause = 0.0                     # between writes, so the sidecar reads them as separate chunks

    def message(self, doc):
        if doc.get("tools"):
            content = [{"type": "text", "text": "Let me check."},
                       {"type": "tool_use", "id": "toolu_01", "name": doc["tools"][0]["name"],
                        "input": {"city": "Paris"}}]
            stop = "tool_use"
        else:
            last = doc["messages"][-1]["content"]
            text = last if isinstance(last, str) else last[-1]["text"]
            content, stop = [{"type": "text", "text": f"echo: {text}"}], "end_turn"
        return {"id": "msg_01", "type": "message", "role": "assistant", "model": doc["model"] + "-20250929",
                "content": content, "stop_reason": stop, "stop_sequence": None,
                "usage": {"input_tokens": 21, "output_tokens": 8}}

    async def __call__(self, request):
        doc = await request.json()
        self.bodies.append(doc)
        if self.status != 200:
            return web.json_response({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
                                     status=self.status)
        try:
            check_anthropic(doc)
        except Rejected as exc:
            return web.json_response({"type": "error", "error": {"type": "invalid_request_error",
                                                                 "message": str(exc)}}, status=400)
        message = self.message(doc)
        if not doc.get("stream"):
            return web.json_response(message)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        raw = anthropic_sse(message).split(b"\n\n")[:-1]
        raw[-2:] = [raw[-2] + b"\n\n" + raw[-1]]   # message_delta and message_stop in one write, as often
        for event in raw:
            await resp.write(event + b"\n\n")
            await asyncio.sleep(self.pause)
            if self.gate is not None and b"text_delta" in event:
                await self.gate.wait()       # the rest only once the app has seen this delta
                self.gate = None
        await resp.write_eof()
        return resp


def policy(port, primary, backup, spare=None, target_extra="", spare_translated=False):
    spare_up = f'spare: {{url: "{spare}"}}' if spare else ""
    spare_target = "- upstream: spare" if spare else ""
    if spare_translated:
        spare_target += "\n              rewrite: {translate: openai-chat/anthropic-messages}"
    return f"""
    version: 1
    listeners: [{{name: llm, mode: reverse, port: {port['reverse']}, upstream: openai}}]
    admin: {{port: {port['admin']}}}
    health: {{bind: 127.0.0.1, port: {port['health']}}}
    upstreams:
      openai: {{url: "{primary}"}}
      anthropic: {{url: "{backup}", headers: {{x-api-key: "${{ANTHROPIC_KEY:-none}}"}}}}
      {spare_up}
    routes:
      - name: chat
        match: {{path_prefix: /v1/, methods: [POST]}}
        upstream: openai
        timeout: 20s
        fallback:
          when: [5xx]
          targets:
            - upstream: anthropic
              rewrite:
                translate: openai-chat/anthropic-messages
                max_tokens: 512
                json_map: {{model: {{"*": claude-sonnet-4-5}}}}
                {target_extra}
            {spare_target}
    """


@pytest.fixture
async def o2a(upstream_factory, sidecar_factory, port, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_KEY", "sk-ant-backup")
    primary = await upstream_factory(down())
    backend = AnthropicBackup()
    backup = await upstream_factory(backend)
    sidecar = await sidecar_factory(policy(port, primary.url, backup.url))
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port['reverse']}/v1", api_key="sk-openai-app",
                                max_retries=0)
    client.sidecar = sidecar
    yield client, backend, backup, primary
    await client.close()


async def test_openai_app_gets_a_tool_call_completion_from_anthropic(o2a):
    client, backend, backup, primary = o2a
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o", tools=[WEATHER], temperature=0.2,
        messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Weather in Paris?"}])
    completion = raw.parse()
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert completion.model == "claude-sonnet-4-5-20250929"       # what the provider served
    assert completion.usage.prompt_tokens == 21 and completion.usage.completion_tokens == 8
    assert completion.usage.total_tokens == 29
    assert raw.headers["x-sidecar-upstream"] == "anthropic"
    assert raw.headers["x-sidecar-degraded"] == "fallback"
    sent = backend.bodies[0]
    assert sent["system"] == "You are terse." and sent["max_tokens"] == 512 and sent["model"] == "claude-sonnet-4-5"
    seen = backup.requests[0]
    assert seen["path"] == "/v1/messages"
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert "authorization" not in headers                            # the app's OpenAI key stays home
    assert "sk-openai-app" not in json.dumps(seen["headers"])
    assert headers["x-api-key"] == "sk-ant-backup" and headers["anthropic-version"] == "2023-06-01"
    assert primary.hits == 1
    fallback = [d for d in client.sidecar.hub.recent if d["decision"] == "fallback"]
    assert "(translated openai-chat/anthropic-messages)" in fallback[-1]["reason"]   # as traces show it


async def test_a_hedged_translated_backup_beats_a_primary_that_never_answers(upstream_factory, sidecar_factory,
                                                                              port):
    async def hung(request):
        await asyncio.sleep(30)
    primary = await upstream_factory(hung)
    backup = await upstream_factory(AnthropicBackup())
    text = policy(port, primary.url, backup.url).replace("when: [5xx]", "when: [5xx, timeout]\n          hedge: 100ms")
    # A POST is raced only where the route says POST may be sent twice (a completion has no side effect).
    retry = "timeout: 20s\n        retry: {max_retries: 1, methods: [POST]}"
    await sidecar_factory(text.replace("timeout: 20s", retry))
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port['reverse']}/v1", api_key="k", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(model="gpt-4o",
                                                                 messages=[{"role": "user", "content": "quick"}])
    assert raw.parse().choices[0].message.content == "echo: quick"
    assert raw.headers["x-sidecar-upstream"] == "anthropic" and "hedge" in raw.headers["x-sidecar-degraded"]
    await client.close()


async def test_openai_app_streams_from_anthropic_chunk_by_chunk(o2a):
    client, backend, _, _ = o2a
    backend.gate = asyncio.Event()
    gate = backend.gate
    stream = await client.chat.completions.create(
        model="gpt-4o", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "a fairly long sentence to echo back"}])
    text, finish, usage, seen_first = "", None, None, False
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                text += choice.delta.content
                if not seen_first:
                    seen_first = True
                    assert not gate.is_set()     # this delta came while the backup held the rest back
                    gate.set()
            finish = choice.finish_reason or finish
    assert seen_first and text == "echo: a fairly long sentence to echo back"
    assert finish == "stop" and usage.prompt_tokens == 21 and usage.completion_tokens == 8


async def test_openai_app_streams_a_tool_call(o2a):
    client, _, _, _ = o2a
    stream = await client.chat.completions.create(
        model="gpt-4o", stream=True, tools=[WEATHER], messages=[{"role": "user", "content": "Paris?"}])
    calls: dict[int, dict] = {}
    finish = None
    async for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                slot = calls.setdefault(call.index, {"name": "", "args": ""})
                slot["name"] += call.function.name or ""
                slot["args"] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["args"]) == {"city": "Paris"}


async def test_a_request_anthropic_cannot_serve_gets_a_400_with_the_reason(o2a):
    client, backend, _, _ = o2a
    with pytest.raises(openai.BadRequestError, match="n > 1"):
        await client.chat.completions.create(model="gpt-4o", n=2, messages=[{"role": "user", "content": "x"}])
    assert backend.bodies == []


async def test_overloaded_anthropic_mid_chain_hands_over_to_the_next_target(upstream_factory, sidecar_factory, port):
    primary = await upstream_factory(down())
    overloaded = AnthropicBackup(status=529)
    backup = await upstream_factory(overloaded)

    async def spare_handler(request):
        doc = await request.json()
        return web.json_response({"id": "chatcmpl-s", "object": "chat.completion", "created": 1, "model": doc["model"],
                                  "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": "from the spare"}}]})
    spare = await upstream_factory(spare_handler)
    await sidecar_factory(policy(port, primary.url, backup.url, spare.url))
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port['reverse']}/v1", api_key="k", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(model="gpt-4o",
                                                                 messages=[{"role": "user", "content": "x"}])
    assert raw.parse().choices[0].message.content == "from the spare"
    assert raw.headers["x-sidecar-upstream"] == "spare"
    assert (primary.hits, backup.hits, spare.hits) == (1, 1, 1)
    await client.close()


async def test_overloaded_anthropic_as_the_last_resort_reaches_the_app_as_an_openai_503(
        upstream_factory, sidecar_factory, port):
    primary = await upstream_factory(down(502))
    backup = await upstream_factory(AnthropicBackup(status=529))
    await sidecar_factory(policy(port, primary.url, backup.url).replace("when: [5xx]", "when: [502]"))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{port['reverse']}/v1/chat/completions",
                          json={"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}) as r:
            assert r.status == 502                # nothing answered: the primary's own answer
    assert backup.hits == 1


async def test_a_stream_cut_mid_way_ends_the_apps_stream_with_an_error(upstream_factory, sidecar_factory, port):
    primary = await upstream_factory(down())

    async def cut(request):
        await request.read()
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        message = {"id": "m", "type": "message", "role": "assistant", "model": "c",
                   "content": [{"type": "text", "text": "half an answer"}], "stop_reason": "end_turn",
                   "usage": {"input_tokens": 1, "output_tokens": 1}}
        raw = anthropic_sse(message)
        began = raw.index(b"text_delta")
        await resp.write(raw[:raw.index(b"\n\n", began) + 20])   # the answer began; cut in the next event
        request.transport.close()
        return resp
    backup = await upstream_factory(cut)
    await sidecar_factory(policy(port, primary.url, backup.url))
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port['reverse']}/v1", api_key="k", max_retries=0)
    stream = await client.chat.completions.create(model="gpt-4o", stream=True,
                                                  messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.APIError, match="stream"):
        async for _ in stream:
            pass
    await client.close()


class OpenAIBackup:
    """An OpenAI-shaped server, strict about what it accepts (check_openai)."""

    def __init__(self):
        self.bodies: list[dict] = []

    async def __call__(self, request):
        doc = await request.json()
        self.bodies.append(doc)
        try:
            check_openai(doc)
        except Rejected as exc:
            return web.json_response({"error": {"message": str(exc), "type": "invalid_request_error"}}, status=400)
        msg = {"role": "assistant", "content": f"echo: {doc['messages'][-1]['content']}"}
        finish = "stop"
        if doc.get("tools"):
            msg = {"role": "assistant", "content": None,
                   "tool_calls": [{"id": "call_9", "type": "function",
                                   "function": {"name": doc["tools"][0]["function"]["name"],
                                                "arguments": '{"city": "Oslo"}'}}]}
            finish = "tool_calls"
        completion = {"id": "chatcmpl-9", "object": "chat.completion", "created": 1, "model": doc["model"] + "-0613",
                      "choices": [{"index": 0, "finish_reason": finish, "message": msg}],
                      "usage": {"prompt_tokens": 30, "completion_tokens": 4, "total_tokens": 34}}
        if not doc.get("stream"):
            return web.json_response(completion)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        include = doc.get("stream_options", {}).get("include_usage", False)
        for event in openai_sse(completion, include_usage=include).split(b"\n\n")[:-1]:
            await resp.write(event + b"\n\n")
        await resp.write_eof()
        return resp


@pytest.fixture
async def a2o(upstream_factory, sidecar_factory, port):
    primary = await upstream_factory(down(529))
    backend = OpenAIBackup()
    backup = await upstream_factory(backend)
    await sidecar_factory(f"""
    version: 1
    listeners: [{{name: llm, mode: reverse, port: {port['reverse']}, upstream: anthropic}}]
    admin: {{port: {port['admin']}}}
    health: {{bind: 127.0.0.1, port: {port['health']}}}
    upstreams:
      anthropic: {{url: "{primary.url}"}}
      openai: {{url: "{backup.url}", headers: {{authorization: "Bearer sk-openai-backup"}}}}
    routes:
      - name: messages
        match: {{path: /v1/messages, methods: [POST]}}
        upstream: anthropic
        fallback:
          when: [5xx]
          targets:
            - upstream: openai
              rewrite: {{translate: anthropic-messages/openai-chat, json_map: {{model: {{"*": gpt-4o}}}}}}
    """)
    client = anthropic.AsyncAnthropic(base_url=f"http://127.0.0.1:{port['reverse']}", api_key="sk-ant-app",
                                      max_retries=0)
    yield client, backend, backup
    await client.close()


async def test_anthropic_app_gets_a_message_from_openai(a2o):
    client, backend, backup = a2o
    message = await client.messages.create(model="claude-sonnet-4-5", max_tokens=200, system="Be kind.",
                                           messages=[{"role": "user", "content": "hello"}])
    assert message.content[0].text == "echo: hello" and message.stop_reason == "end_turn"
    assert message.model == "gpt-4o-0613"
    assert message.usage.input_tokens == 30 and message.usage.output_tokens == 4
    assert backend.bodies[0]["messages"][0] == {"role": "system", "content": "Be kind."}
    headers = {k.lower(): v for k, v in backup.requests[0]["headers"].items()}
    assert headers["authorization"] == "Bearer sk-openai-backup"     # the upstream's key, not the app's
    assert "x-api-key" not in headers and "anthropic-version" not in headers
    assert backup.requests[0]["path"] == "/v1/chat/completions"


async def test_anthropic_app_gets_tool_use_from_openai_whole_and_streamed(a2o):
    client, _, _ = a2o
    tool = {"name": "get_weather", "description": "Weather", "input_schema": WEATHER["function"]["parameters"]}
    message = await client.messages.create(model="claude-sonnet-4-5", max_tokens=200, tools=[tool],
                                           messages=[{"role": "user", "content": "Oslo?"}])
    assert message.stop_reason == "tool_use"
    block = message.content[0]
    assert block.type == "tool_use" and block.name == "get_weather" and block.input == {"city": "Oslo"}
    async with client.messages.stream(model="claude-sonnet-4-5", max_tokens=200, tools=[tool],
                                      messages=[{"role": "user", "content": "Oslo?"}]) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[0].input == {"city": "Oslo"}
    assert final.usage.output_tokens == 4


async def test_anthropic_app_streams_text_from_openai(a2o):
    client, _, _ = a2o
    async with client.messages.stream(model="claude-sonnet-4-5", max_tokens=50,
                                      messages=[{"role": "user", "content": "streamed hello"}]) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "echo: streamed hello" and final.stop_reason == "end_turn"


async def test_time_to_first_chunk_through_the_sidecar_is_reported(o2a, port):
    """A figure for the report, not an assertion: this machine is shared and busy."""
    client, backend, backup, _ = o2a
    body = {"model": "claude-sonnet-4-5", "max_tokens": 20, "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}
    direct, through = [], []
    async with aiohttp.ClientSession() as s:
        for _ in range(5):
            started = time.perf_counter()
            async with s.post(f"{backup.url}/v1/messages", json=body) as r:
                await r.content.readuntil(b"text_delta")
                direct.append(time.perf_counter() - started)
                await r.read()
            started = time.perf_counter()
            async with s.post(f"http://127.0.0.1:{port['reverse']}/v1/chat/completions",
                              json={"model": "gpt-4o", "stream": True,
                                    "messages": [{"role": "user", "content": "hi"}]}) as r:
                await r.content.readuntil(b'"content":"echo')
                through.append(time.perf_counter() - started)
                await r.read()
    direct.sort()
    through.sort()
    print(f"\ntime to first text chunk (aiohttp client, median of 5): backup directly {direct[2] * 1000:.1f} ms, "
          f"through the sidecar (a 503 from the primary first, then translated) {through[2] * 1000:.1f} ms")
    assert len(direct) == len(through) == 5


async def test_an_overload_streamed_before_the_answer_begins_moves_the_chain_on(upstream_factory, sidecar_factory,
                                                                                port):
    """Anthropic can answer 200 and then stream `error: overloaded_error` before any content: no byte has
    reached the app yet, so the chain tries the next target."""
    primary = await upstream_factory(down())

    async def overloaded_stream(request):
        await request.read()
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(encode({"type": "message_start", "message": {"id": "m", "model": "c", "usage": {}}},
                                "message_start") + encode({"type": "ping"}, "ping"))
        await resp.write(encode({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
                                "error"))
        await resp.write_eof()
        return resp
    backup = await upstream_factory(overloaded_stream)
    spare = await upstream_factory(AnthropicBackup())      # speaks Anthropic too: the same translation
    await sidecar_factory(policy(port, primary.url, backup.url, spare.url, spare_translated=True))
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port['reverse']}/v1", api_key="k", max_retries=0)
    stream = await client.chat.completions.with_raw_response.create(
        model="gpt-4o", stream=True, messages=[{"role": "user", "content": "busy?"}])
    assert stream.headers["x-sidecar-upstream"] == "spare"
    text = ""
    async for chunk in stream.parse():
        text += "".join(c.delta.content or "" for c in chunk.choices)
    assert text == "echo: busy?"
    assert (backup.hits, spare.hits) == (1, 1)
    await client.close()


async def test_a_stream_cut_before_the_answer_began_is_a_failed_try(upstream_factory, sidecar_factory, port):
    primary = await upstream_factory(down())

    async def cut(request):
        await request.read()
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(encode({"type": "message_start", "message": {"id": "m", "model": "c"}}, "message_start"))
        request.transport.close()
        return resp
    backup = await upstream_factory(cut)
    await sidecar_factory(policy(port, primary.url, backup.url))
    async with aiohttp.ClientSession() as s:
        body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "x"}]}
        async with s.post(f"http://127.0.0.1:{port['reverse']}/v1/chat/completions", json=body) as r:
            assert r.status == 503 and r.headers["x-sidecar-upstream"] == "openai"   # the primary's own answer
    assert backup.hits == 1


async def test_a_translated_stream_is_read_to_its_end_so_its_tokens_are_counted(o2a, port):
    """The usage scanner below the translation sees each provider chunk once the next is asked for: the
    translated stream reads the provider's to its end, so `message_delta`'s usage is counted."""
    from prometheus_client.parser import text_string_to_metric_families
    client, backend, _, _ = o2a
    backend.pause = 0.01
    for _ in range(2):
        stream = await client.chat.completions.create(model="gpt-4o", stream=True,
                                                      messages=[{"role": "user", "content": "count me"}])
        async for _chunk in stream:
            pass
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port['admin']}/metrics") as r:
            text = await r.text()
    tokens = {(s.labels["upstream"], s.labels["kind"]): s.value for family in text_string_to_metric_families(text)
              for s in family.samples if s.name == "sidecar_llm_tokens_total"}
    assert tokens[("anthropic", "input")] == 2 * 21 and tokens[("anthropic", "output")] == 2 * 8


async def test_the_trace_names_the_translation_and_both_models(upstream_factory, sidecar_factory, port,
                                                               otlp_http_receiver, monkeypatch):
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_SDK_DISABLED",
                "OTEL_TRACES_SAMPLER", "OTEL_SERVICE_NAME"):
        monkeypatch.delenv(var, raising=False)
    primary = await upstream_factory(down())
    backup = await upstream_factory(AnthropicBackup())
    text = policy(port, primary.url, backup.url).replace(
        "    upstreams:", f"    telemetry: {{traces: {{endpoint: \"{otlp_http_receiver.traces_url}\", "
                         "protocol: http/protobuf, sample_ratio: 1.0}}\n    upstreams:", 1)
    sc = await sidecar_factory(text)
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port['reverse']}/v1", api_key="k", max_retries=0)
    await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "traced"}])
    await client.close()
    for sink in sc.runtime.sink.sinks:
        if hasattr(sink, "force_flush"):
            sink.force_flush()
    spans = otlp_http_receiver.wait_for_spans(3)
    root = next(sp for sp in spans if sp.name == "chat")
    fallback = [e for e in root.events if e.attributes.get("sidecar.decision") == "fallback"]
    assert "(translated openai-chat/anthropic-messages)" in fallback[0].attributes["sidecar.reason"]
    a = root.attributes
    assert a["gen_ai.request.model"] == "gpt-4o"                       # what the app asked for
    assert a["sidecar.llm.sent_model"] == "claude-sonnet-4-5"          # after translation and json_map
    assert a["gen_ai.response.model"] == "claude-sonnet-4-5-20250929"  # what the provider served
