"""LLM calls through the real data plane, with the `openai` and `anthropic` packages as clients and
scripted OpenAI/Anthropic APIs as upstreams: GenAI attributes on the spans the real OTLP receiver gets,
token counters in /metrics equal to the upstream's usage, the mapped model, streams not held back."""
import asyncio
import time

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llm_upstreams import LlmApi


def policy(port, primary, backup, endpoint, *, prices=""):
    return f"""
    version: 1
    listeners: [{{name: llm, mode: reverse, port: {port['reverse']}, upstream: primary}}]
    admin: {{port: {port['admin']}}}
    health: {{bind: 127.0.0.1, port: {port['health']}}}
    {f'telemetry: {{traces: {{endpoint: "{endpoint}", protocol: http/protobuf, sample_ratio: 1.0}}}}'
     if endpoint else ""}
    {prices}
    upstreams:
      primary: {{url: "{primary}"}}
      backup: {{url: "{backup}"}}
    routes:
      - name: chat
        match: {{path_prefix: /v1/}}
        upstream: primary
        fallback:
          when: [5xx]
          targets:
            - upstream: backup
              rewrite: {{json_map: {{model: {{gpt-4o: backup-large, "*": backup-small}}}}}}
    """


def samples(text: str, name: str) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


async def scrape(port) -> str:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port['admin']}/metrics") as r:
            return await r.text()


def flush(sc) -> None:
    for sink in sc.runtime.sink.sinks:
        if hasattr(sink, "force_flush"):
            sink.force_flush()


@pytest.fixture
def clean_otel_env(monkeypatch):
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_SDK_DISABLED",
                "OTEL_TRACES_SAMPLER", "OTEL_SERVICE_NAME"):
        monkeypatch.delenv(var, raising=False)


async def test_openai_stream_through_fallback_spans_and_metrics(upstream_factory, sidecar_factory, port,
                                                                otlp_http_receiver, clean_otel_env):
    import openai
    from aiohttp import web

    async def down(request):
        return web.json_response({"error": "overloaded"}, status=503)
    primary = await upstream_factory(down)
    api = LlmApi(model="backup-large-2025-01", input_tokens=23, output_tokens=42)
    backup = await upstream_factory(api)
    prices = 'llm: {prices: {backup-large: {input_per_million: 1000, output_per_million: 2000}}}'
    sc = await sidecar_factory(policy(port, primary.url, backup.url, otlp_http_receiver.traces_url,
                                      prices=prices))
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port['reverse']}/v1", api_key="sk-app",
                                max_retries=0)
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=50,
        stream_options={"include_usage": True})
    text, usage = [], None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    await client.close()
    assert "".join(text) == "w0 w1 w2 "
    assert (usage.prompt_tokens, usage.completion_tokens) == (23, 42)
    assert api.bodies[0]["model"] == "backup-large"          # json_map applied on the way out

    flush(sc)
    spans = otlp_http_receiver.wait_for_spans(3)
    root = next(sp for sp in spans if sp.name == "chat")
    a = root.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "gpt-4o"              # the app's
    assert a["sidecar.llm.sent_model"] == "backup-large"       # after json_map
    assert a["gen_ai.response.model"] == "backup-large-2025-01"
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (23, 42)
    assert list(a["gen_ai.response.finish_reasons"]) == ["stop"]
    assert a["gen_ai.request.stream"] is True and a["gen_ai.request.max_tokens"] == 50
    assert a["gen_ai.response.time_to_first_chunk"] > 0
    assert a["sidecar.llm.cost"] == pytest.approx((23 * 1000 + 42 * 2000) / 1e6)
    tries = sorted((sp for sp in spans if sp.kind == "CLIENT"), key=lambda sp: sp.start_ns)
    assert [t.attributes["http.response.status_code"] for t in tries] == [503, 200]
    assert tries[0].attributes["gen_ai.request.model"] == "gpt-4o"
    assert "gen_ai.usage.input_tokens" not in tries[0].attributes
    assert tries[1].attributes["gen_ai.request.model"] == "backup-large"
    assert tries[1].attributes["gen_ai.usage.output_tokens"] == 42

    text = await scrape(port)
    tokens = samples(text, "sidecar_llm_tokens_total")
    labels = (("model", "backup-large-2025-01"), ("route", "chat"), ("upstream", "backup"))
    assert tokens == {tuple(sorted((*labels, ("kind", "input")))): 23.0,
                      tuple(sorted((*labels, ("kind", "output")))): 42.0}
    requests = samples(text, "sidecar_llm_requests_total")
    assert requests[tuple(sorted((*labels, ("outcome", "success"))))] == 1.0
    assert requests[(("model", "gpt-4o"), ("outcome", "server_error"), ("route", "chat"),
                     ("upstream", "primary"))] == 1.0
    assert samples(text, "sidecar_llm_cost_total")[tuple(sorted(labels))] == pytest.approx(0.107)
    assert samples(text, "sidecar_llm_time_to_first_token_seconds_count")[tuple(sorted(labels))] == 1.0


async def test_token_counters_match_upstream_usage_over_many_calls(upstream_factory, sidecar_factory, port,
                                                                   otlp_http_receiver, clean_otel_env):
    """JSON and streamed answers, OpenAI and Anthropic shapes: the counters are the exact sums."""
    import anthropic
    import openai
    api = LlmApi(input_tokens=5, output_tokens=9)
    primary = await upstream_factory(api)
    sc = await sidecar_factory(policy(port, primary.url, primary.url, otlp_http_receiver.traces_url))
    base = f"http://127.0.0.1:{port['reverse']}"
    oa = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="sk", max_retries=0)
    an = anthropic.AsyncAnthropic(base_url=base, api_key="sk", max_retries=0)
    for i in range(3):
        await oa.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
        stream = await oa.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}],
                                                  stream=True, stream_options={"include_usage": True})
        async for _ in stream:
            pass
        msg = await an.messages.create(model="claude-x", max_tokens=64, messages=[{"role": "user", "content": "x"}])
        assert msg.usage.output_tokens == 9
        async with an.messages.stream(model="claude-x", max_tokens=64,
                                      messages=[{"role": "user", "content": "x"}]) as s:
            final = await s.get_final_message()
        assert (final.usage.input_tokens, final.usage.output_tokens) == (5, 9)
    # a stream without include_usage carries no usage: not counted, not an error
    stream = await oa.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}],
                                              stream=True)
    async for _ in stream:
        pass
    await oa.close()
    await an.close()
    tokens = samples(await scrape(port), "sidecar_llm_tokens_total")
    by = {(dict(k)["model"], dict(k)["kind"]): v for k, v in tokens.items()}
    assert by == {("gpt-4o-mini", "input"): 30.0, ("gpt-4o-mini", "output"): 54.0,
                  ("claude-x", "input"): 30.0, ("claude-x", "output"): 54.0}
    flush(sc)
    spans = otlp_http_receiver.wait_for_spans(13 * 2, where=lambda sp: sp.kind == "CLIENT" or sp.name == "chat")
    anthropic_spans = [sp for sp in spans if sp.name == "chat"
                       and sp.attributes.get("gen_ai.provider.name") == "anthropic"]
    assert len(anthropic_spans) == 6
    assert all(sp.attributes["gen_ai.usage.output_tokens"] == 9 for sp in anthropic_spans)
    assert {tuple(sp.attributes["gen_ai.response.finish_reasons"]) for sp in anthropic_spans} == {("end_turn",)}


async def test_first_chunk_is_not_held_back(upstream_factory, sidecar_factory, port, clean_otel_env, capsys):
    """The upstream writes its first event and then waits until the client has read it: a sidecar that
    buffered the stream would never deliver it (the hang guard would fail the test). The first chunk's
    latency through the sidecar and direct is printed for the report."""
    figures = {}
    for via in ("direct", "sidecar"):
        hold = asyncio.Event()
        api = LlmApi(hold=hold)
        up = await upstream_factory(api)
        url = up.url
        if via == "sidecar":
            p = dict(port)
            await sidecar_factory(policy(p, up.url, up.url, None))
            url = f"http://127.0.0.1:{p['reverse']}"
        latencies = []
        async with aiohttp.ClientSession() as s:
            for _ in range(20):
                hold.clear()
                async with s.post(f"{url}/v1/chat/completions", json={
                        "model": "m", "stream": True, "stream_options": {"include_usage": True},
                        "messages": []}) as r:
                    first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 10)
                    got = time.perf_counter_ns()
                    assert first.startswith(b"data: ")
                    latencies.append((got - api.first_event_ns[-1]) / 1e6)
                    hold.set()
                    await r.read()
        latencies.sort()
        figures[via] = latencies[len(latencies) // 2]
    with capsys.disabled():
        print(f"\nfirst-chunk latency, median of 20 (upstream write -> client read): direct "
              f"{figures['direct']:.3f} ms, through the sidecar {figures['sidecar']:.3f} ms")


NOT_LLM = [
    ("text/html", b"<html><body>usage: none</body></html>"),
    ("application/json", b'{"object": "chat.completion", "model": "m", "usage": {"prompt_tokens": "12"}}'),
    ("application/json", b'{"model": "m", "usage": {"prompt_tokens": 1, "completion_tokens": 2'),   # truncated
    ("text/event-stream", b'data: {"model": "m", "choices": []}\n\ndata: {"usage": {"prompt_tokens": 5, "compl'),
    ("text/event-stream", b"data: not json\n\n: comment\n\nevent: x\n" + b"data: " + b"z" * 300_000 + b"\n\n"),
    ("application/octet-stream", bytes(range(256)) * 64),
]


async def test_non_llm_answers_on_an_llm_route_pass_untouched(upstream_factory, sidecar_factory, port,
                                                               clean_otel_env):
    from aiohttp import web

    async def answer(request):
        ctype, body = NOT_LLM[int(request.headers["x-case"])]
        resp = web.StreamResponse(headers={"content-type": ctype})
        await resp.prepare(request)
        for i in range(0, len(body), 1000):      # streamed in pieces, as a real upstream might
            await resp.write(body[i:i + 1000])
        await resp.write_eof()
        return resp
    up = await upstream_factory(answer)
    await sidecar_factory(policy(port, up.url, up.url, None))
    async with aiohttp.ClientSession() as s:
        for case, (ctype, body) in enumerate(NOT_LLM):
            async with s.post(f"http://127.0.0.1:{port['reverse']}/v1/chat/completions", headers={"x-case": str(case)},
                              json={"model": "gpt-4o", "stream": True}) as r:
                assert r.status == 200
                assert await r.read() == body
    text = await scrape(port)
    assert "sidecar_llm_tokens_total{" not in text and "sidecar_llm_requests_total{" not in text
    assert samples(text, "sidecar_requests_total")[(("code", "200"), ("route", "chat"))] == len(NOT_LLM)
