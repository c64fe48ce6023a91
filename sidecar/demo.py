"""`sidecar demo`: flaky, dead and hung upstreams on loopback, the sidecar in front, a short load, and
a table of what each policy did. Everything runs in one process on 127.0.0.1; nothing leaves the host."""
from __future__ import annotations

import asyncio
import collections
import json
import random
import socket
import statistics
import tempfile
import textwrap
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from sidecar.app import start
from sidecar.policy.load import load_policy


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DemoUpstream:
    """A scripted upstream: `mode` can be flipped while the demo runs (up, down, flaky, failing)."""

    def __init__(self, name: str, rng: random.Random, mode: str = "up") -> None:
        self.name = name
        self.rng = rng
        self.mode = mode
        self.port = _port()
        self.hits = 0
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        body = await request.read()
        if self.mode == "failing" or (self.mode == "flaky" and self.rng.random() < 0.2):
            return web.json_response({"error": "unavailable"}, status=503)
        if self.mode == "hung":
            await asyncio.sleep(30)
        if self.mode == "anthropic":
            return await _anthropic_answer(request, json.loads(body))
        model = ""
        if body.startswith(b"{"):
            model = json.loads(body).get("model", "")
        if request.path.endswith("/chat/completions"):   # an OpenAI-shaped answer, with its usage
            return web.json_response({
                "object": "chat.completion", "model": model, "served_by": self.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 20 + len(body) // 16, "completion_tokens": 35}})
        return web.json_response({"served_by": self.name, "model": model, "path": request.path})

    async def up(self) -> None:
        if self._runner is not None:
            return
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def down(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


async def _anthropic_answer(request: web.Request, doc: dict) -> web.StreamResponse:
    """What Anthropic's Messages API answers (it refuses an OpenAI-shaped body), whole or streamed."""
    if "max_tokens" not in doc or any(m.get("role") not in ("user", "assistant") for m in doc.get("messages", [])):
        return web.json_response({"type": "error", "error": {"type": "invalid_request_error",
                                                             "message": "not a Messages request"}}, status=400)
    text = f"Claude here, answering in Anthropic's format ({doc['model']})"
    usage = {"input_tokens": 12, "output_tokens": 9}
    if not doc.get("stream"):
        return web.json_response({"id": "msg_demo", "type": "message", "role": "assistant", "model": doc["model"],
                                  "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                                  "stop_sequence": None, "usage": usage})
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    events = [("message_start", {"message": {"id": "msg_demo", "type": "message", "role": "assistant",
                                             "model": doc["model"], "content": [], "usage": usage}}),
              ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})]
    events += [("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": word + " "}})
               for word in text.split()]
    events += [("content_block_stop", {"index": 0}),
               ("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 9}}),
               ("message_stop", {})]
    for name, data in events:
        await resp.write(f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n".encode())
    await resp.write_eof()
    return resp


POLICY = """
version: 1
listeners:
  - {{name: egress, mode: proxy, port: {proxy}}}
  - {{name: llm, mode: reverse, port: {llm}, upstream: provider}}
admin: {{bind: 127.0.0.1, port: {admin}}}
health: {{bind: 127.0.0.1, port: {health}}}
telemetry: {{service_name: sidecar-demo}}
llm: {{prices: {{gpt-4o: {{input_per_million: 2.5, output_per_million: 10}}, backup-large: {{input_per_million: 1, output_per_million: 4}}}}}}
upstreams:
  flaky: {{url: "http://127.0.0.1:{flaky}"}}
  failing: {{url: "http://127.0.0.1:{failing}"}}
  hung:
    url: "http://127.0.0.1:{hung}"
    health_check: {{path: /health, interval: 200ms, timeout: 100ms, unhealthy_after: 2, healthy_after: 2}}
  provider: {{url: "http://127.0.0.1:{provider}"}}
  backup: {{url: "http://127.0.0.1:{backup}"}}
  anthropic: {{url: "http://127.0.0.1:{anthropic}", headers: {{x-api-key: demo-anthropic-key}}}}
defaults:
  timeout: 5s
routes:
  - name: flaky-api
    match: {{host: flaky.demo}}
    upstream: flaky
    retry: {{max_retries: 3, when: [503], backoff: {{base: 2ms, max: 20ms}}, budget: {{ratio: 0.5, min_per_second: 10, window: 10s}}}}
  - name: retry-storm
    match: {{host: failing.demo}}
    upstream: failing
    retry: {{max_retries: 3, when: [503], backoff: {{base: 1ms, max: 5ms}}, budget: {{ratio: 0.2, min_per_second: 1, window: 10s}}}}
  - name: hung-service
    match: {{host: hung.demo}}
    upstream: hung
    fallback:
      when: [breaker-open, timeout]
      targets: [{{static: {{status: 200, json: {{items: [], note: "served from the sidecar while the service is down"}}}}}}]
  - name: chat
    match: {{path_prefix: /v1/chat/}}
    upstream: provider
    retry: {{max_retries: 1, when: [connect-failure, 503], methods: [POST], backoff: {{base: 2ms, max: 5ms}}}}
    breaker: {{consecutive_failures: 3, open_for: 30s}}
    cache: {{ttl: 1s, stale_if_error: 1h, key: [method, url, body]}}
    fallback:
      when: [breaker-open, retries-exhausted, 5xx]
      targets:
        - upstream: backup
          rewrite: {{json_map: {{model: {{gpt-4o: backup-large, "*": backup-small}}}}, headers: {{x-served-by: fallback}}}}
        - upstream: anthropic         # as in policies/llm-backup.yaml: another provider's API, translated
          rewrite:
            translate: openai-chat/anthropic-messages
            max_tokens: 1024
            json_map: {{model: {{"*": claude-sonnet-4-5}}}}
        - cache: stale
        - static: {{status: 200, json: {{error: degraded, message: "Try again shortly"}}}}
"""


class Tally:
    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}

    def add(self, label: str, status: int, headers, elapsed: float) -> None:
        row = self.rows.setdefault(label, {"n": 0, "ok": 0, "lat": [], "answered_by": collections.Counter(),
                                           "decisions": collections.Counter(), "attempts": 0})
        row["n"] += 1
        row["ok"] += 200 <= status < 300
        row["lat"].append(elapsed * 1000)
        row["answered_by"][headers.get("x-sidecar-upstream", "?")] += 1
        row["attempts"] += int(headers.get("x-sidecar-attempts", "0"))
        for d in filter(None, headers.get("x-sidecar-degraded", "").split(",")):
            row["decisions"][d] += 1

    def print(self, upstream_hits: dict[str, int]) -> None:
        head = f"{'scenario':34} {'reqs':>5} {'ok %':>6} {'p50 ms':>7} {'p99 ms':>7} {'tries/req':>9}  answered by / decisions"
        print(head)
        print("-" * len(head))
        for label, row in self.rows.items():
            lat = sorted(row["lat"])
            p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
            by = ", ".join(f"{k} {v}" for k, v in row["answered_by"].most_common())
            dec = ", ".join(f"{k} {v}" for k, v in row["decisions"].most_common())
            print(f"{label:34} {row['n']:>5} {100 * row['ok'] / row['n']:>6.1f} {statistics.median(lat):>7.1f} "
                  f"{p99:>7.1f} {row['attempts'] / row['n']:>9.2f}  {by}")
            if dec:
                print(f"{'':34} {'':>5} {'':>6} {'':>7} {'':>7} {'':>9}  decisions: {dec}")
        print()
        print("upstream load: " + ", ".join(f"{k}={v}" for k, v in upstream_hits.items()))


async def _demo(requests: int) -> int:
    rng = random.Random(42)
    ups = {name: DemoUpstream(name, rng, mode) for name, mode in
           [("flaky", "flaky"), ("failing", "failing"), ("hung", "hung"), ("provider", "up"), ("backup", "up"),
            ("anthropic", "anthropic")]}
    for up in ups.values():
        await up.up()
    ports = {"proxy": _port(), "llm": _port(), "admin": _port(), "health": _port()}
    text = POLICY.format(**ports, **{name: up.port for name, up in ups.items()})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "demo.yaml"
        path.write_text(textwrap.dedent(text))
        sidecar = await start(load_policy(str(path)), watch=False)
        tally = Tally()
        try:
            await _run(sidecar, ups, ports, tally, requests)
            llm_lines = _llm_summary(sidecar)
        finally:
            await sidecar.stop()
            for up in ups.values():
                await up.down()
    tally.print({name: up.hits for name, up in ups.items()})
    print()
    for line in llm_lines:
        print(line)
    print(f"\nadmin API was at http://127.0.0.1:{ports['admin']}/ (dashboard), /status, /metrics, /events")
    return 0


async def _run(sidecar, ups, ports, tally: Tally, requests: int) -> None:
    proxy = f"http://127.0.0.1:{ports['proxy']}"
    llm = f"http://127.0.0.1:{ports['llm']}/v1/chat/completions"
    async with aiohttp.ClientSession() as s:
        async def get(label: str, host: str, n: int, concurrency: int = 10) -> None:
            sem = asyncio.Semaphore(concurrency)

            async def one(i: int) -> None:
                async with sem:
                    t0 = time.perf_counter()
                    async with s.get(f"http://{host}/items?i={i}", proxy=proxy) as r:
                        await r.read()
                        tally.add(label, r.status, r.headers, time.perf_counter() - t0)
            await asyncio.gather(*(one(i) for i in range(n)))

        async def chat(label: str, n: int, model: str = "gpt-4o", prompt: str = "q", stream: bool = False) -> str:
            answer = ""
            for i in range(n):
                t0 = time.perf_counter()
                body = {"model": model, "messages": [{"role": "user", "content": f"{prompt}{i % 3}"}],
                        "stream": stream}
                async with s.post(llm, json=body) as r:
                    answer = (await r.read()).decode()
                    tally.add(label, r.status, r.headers, time.perf_counter() - t0)
            return answer

        print("1. a flaky API (20% 503s) behind retries with a budget")
        await get("flaky-api: 20% 503s", "flaky.demo", requests)
        print("2. an API failing every request: the retry budget stops a retry storm")
        await get("retry-storm: always 503", "failing.demo", requests)
        print("3. a service that accepts connections and never answers: health checks fail it fast")
        while sidecar.runtime.health["hung"].healthy:
            await asyncio.sleep(0.05)
        await get("hung-service: never answers", "hung.demo", max(20, requests // 5))
        print("4. an LLM provider outage: a backup of the same API, then Anthropic (translated), then the stale "
              "cache, then a static answer")
        await chat("chat: provider healthy (3 cached)", 6)
        await ups["provider"].down()
        await chat("chat: provider down -> backup", 6, prompt="new question ")
        await ups["backup"].down()
        answer = await chat("chat: backup down -> Anthropic", 3, prompt="another question ")
        print("   Anthropic's answer, as the OpenAI app gets it:", _choice(answer))
        streamed = await chat("chat: streamed, from Anthropic", 1, prompt="stream it ", stream=True)
        events = " ".join(line for line in streamed.splitlines() if line.startswith("data:"))
        print(f"   streamed: {events[:150]} ...")
        await ups["anthropic"].down()
        await asyncio.sleep(1.1)           # let the cached answers pass their 1s ttl: they are stale now
        await chat("chat: all down -> stale cache", 3)
        await chat("chat: all down, uncached -> static", 3, prompt="never asked ")
        print()


def _llm_summary(sidecar) -> list[str]:
    """The LLM route's tokens (from /metrics) and where its answers came from (/status signals)."""
    from prometheus_client.parser import text_string_to_metric_families
    body, _ = sidecar.metrics.render()
    tokens: dict[tuple[str, str], dict[str, float]] = {}
    cost: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            key = (sample.labels.get("upstream", ""), sample.labels.get("model", ""))
            if sample.name == "sidecar_llm_tokens_total":
                tokens.setdefault(key, {})[sample.labels["kind"]] = sample.value
            elif sample.name == "sidecar_llm_cost_total":
                cost[key] = sample.value
    lines = ["LLM tokens on route chat (sidecar_llm_tokens_total, read from each answer's usage):"]
    for (upstream, model), kinds in sorted(tokens.items()):
        price = f", cost {cost[(upstream, model)]:.6f}" if (upstream, model) in cost else ""
        lines.append(f"  {upstream:10} {model:14} input {kinds.get('input', 0):>6.0f}  output "
                     f"{kinds.get('output', 0):>6.0f}{price}")
    for row in sidecar.signals.snapshot()["fallback"]["routes"]:
        if row["route"] == "chat":
            shares = ", ".join(f"{source} {100 * share:.0f}%" for source, share in row["shares"].items())
            lines.append(f"chat answers by source over the demo ({row['answers']}): {shares}")
    return lines


def _choice(answer: str) -> str:
    try:
        doc = json.loads(answer)
        return f"model={doc['model']!r} finish_reason={doc['choices'][0]['finish_reason']!r} " \
               f"content={doc['choices'][0]['message']['content']!r} usage={doc['usage']['total_tokens']}"
    except (ValueError, KeyError, IndexError, TypeError):
        return answer[:200]


def run_demo(requests: int = 200) -> int:
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    return asyncio.run(_demo(requests))
