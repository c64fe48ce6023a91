"""`python -m bench.llm_stream [--seconds S] [--concurrency C] [--out DIR]`: a streamed chat completion
(OpenAI-style SSE ending with a `stream_options.include_usage` chunk) direct to an aiohttp upstream and
through the sidecar's full-policy route (bench/configs.py's `full`: retry + budget + breaker +
concurrency, 5 % trace sampling, plus `rate_limit.tokens_per_minute`, so every answer's usage is read
from the stream and settled), side by side:

    paced   the upstream writes PACED_CHUNKS events PACED_GAP_MS apart (a model generating tokens):
            first-chunk latency as the client sees it (request sent -> first event read), p50 and p99,
            and the time to the last event -- what a chat UI feels
    flood   the upstream writes FLOOD_CHUNKS events back to back: completions/s and events/s at C
            concurrent streams -- the proxy's cost per chunk

The upstream and the client are in their own processes on the load generator's core (both Python: at
flood the direct row is bounded by that core, not by the upstream alone); the sidecar runs alone on
the other core (bench/systems.py's layout). Each run checks that the sidecar counted exactly the
tokens the upstream reported (its `sidecar_llm_tokens_total`), i.e. that the LLM path was taken.
Results: DIR/llm.md and DIR/llm.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from bench.configs import bare_env, sidecar_overhead
from bench.systems import ROOT, cpus, free_port, http_get, spawn, stop_group, wait_port

PACED_CHUNKS, PACED_GAP_MS = 20, 10
FLOOD_CHUNKS = 200
INPUT_TOKENS = 12                           # each stream's usage: input, and one output token per chunk
BODY = json.dumps({"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True},
                   "messages": [{"role": "user", "content": "Say something long."}]}).encode()


def _server_main(port: int) -> None:
    """The upstream: `x-bench-chunks` events, `x-bench-gap-ms` apart, then finish, usage and [DONE]."""
    from aiohttp import web

    async def completions(request: web.Request) -> web.StreamResponse:
        await request.read()
        chunks = int(request.headers.get("x-bench-chunks", "20"))
        gap = int(request.headers.get("x-bench-gap-ms", "0")) / 1000
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
        await resp.prepare(request)
        head = '{"id":"chatcmpl-b","object":"chat.completion.chunk","created":1,"model":"gpt-4o",'
        for i in range(chunks):
            if i and gap:
                await asyncio.sleep(gap)
            await resp.write(f'data: {head}"choices":[{{"index":0,"delta":{{"content":"tok{i} "}},'
                             f'"finish_reason":null}}],"usage":null}}\n\n'.encode())
        await resp.write(f'data: {head}"choices":[{{"index":0,"delta":{{}},"finish_reason":"stop"}}],'
                         f'"usage":null}}\n\n'.encode())
        await resp.write(f'data: {head}"choices":[],"usage":{{"prompt_tokens":{INPUT_TOKENS},'
                         f'"completion_tokens":{chunks},"total_tokens":{INPUT_TOKENS + chunks}}}}}\n\n'.encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    _uvloop()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def _uvloop() -> None:
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass


async def _load(port: int, seconds: float, concurrency: int, chunks: int, gap_ms: int) -> dict:
    import aiohttp
    first: list[float] = []
    whole: list[float] = []
    events = errors = 0
    headers = {"content-type": "application/json", "x-bench-chunks": str(chunks), "x-bench-gap-ms": str(gap_ms)}
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        async def one() -> None:
            nonlocal events, errors
            started = time.perf_counter()
            try:
                async with s.post(url, data=BODY, headers=headers) as r:
                    if r.status != 200:
                        errors += 1
                        await r.read()
                        return
                    head = await r.content.readuntil(b"\n\n")
                    got_first = time.perf_counter()
                    rest = await r.read()
            except aiohttp.ClientError:
                errors += 1
                return
            n = 1 + rest.count(b"\n\n")
            if n != chunks + 3 or not head.startswith(b"data: ") or not rest.endswith(b"data: [DONE]\n\n"):
                errors += 1
                return
            events += n
            first.append(got_first - started)
            whole.append(time.perf_counter() - started)

        await one()                          # warm-up: connections and the sidecar's first request
        first.clear()
        whole.clear()
        events = 0
        stop = time.monotonic() + seconds

        async def worker() -> None:
            while time.monotonic() < stop:
                await one()
        began = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - began
    return {"completions": len(whole), "errors": errors, "completions_per_s": round(len(whole) / elapsed, 1),
            "events_per_s": round(events / elapsed), "first_chunk_ms": _pcts(first), "last_chunk_ms": _pcts(whole)}


def _pcts(values: list[float]) -> dict:
    values = sorted(values)

    def at(p: float) -> float | None:
        return round(values[min(len(values) - 1, int(p * len(values)))] * 1000, 3) if values else None
    return {"p50": at(0.50), "p99": at(0.99)}


def _counted_tokens(admin: int) -> int:
    status, body = http_get(f"http://127.0.0.1:{admin}/metrics")
    if status != 200:
        return -1
    return sum(int(float(v)) for v in re.findall(rb'^sidecar_llm_tokens_total\{[^}]*\} (\S+)$', body, re.M))


WORKLOADS = {"paced": (PACED_CHUNKS, PACED_GAP_MS), "flood": (FLOOD_CHUNKS, 0)}


def run(seconds: float, concurrency: int, out: Path) -> dict:
    gen_cpu, sut_cpu = cpus()
    upstream, listen, admin, health = free_port(), free_port(), free_port(), free_port()
    server = spawn([sys.executable, "-c", f"from bench.llm_stream import _server_main; _server_main({upstream})"],
                    gen_cpu, cwd=ROOT)
    sidecar = None
    result: dict = {"seconds": seconds, "concurrency": concurrency, "load_before": round(os.getloadavg()[0], 2),
                    "workloads": {}}
    try:
        wait_port(upstream, proc=server)
        with tempfile.TemporaryDirectory(prefix="sidecar-llm-bench-") as tmp:
            policy = sidecar_overhead(Path(tmp), "sidecar-llm", listen, admin, health, upstream, cache=False,
                                      tokens_per_minute=10**12)
            sidecar = spawn([sys.executable, "-m", "sidecar", "run", "-c", str(policy)], sut_cpu, cwd=ROOT,
                             env=bare_env())
            wait_port(listen, proc=sidecar)
            os.sched_setaffinity(0, {gen_cpu})
            _uvloop()
            expected = 0
            for name, (chunks, gap_ms) in WORKLOADS.items():
                direct = asyncio.run(_load(upstream, seconds, concurrency, chunks, gap_ms))
                through = asyncio.run(_load(listen, seconds, concurrency, chunks, gap_ms))
                # every completion through the sidecar, the warm-up included, reported its usage
                expected += (through["completions"] + 1) * (INPUT_TOKENS + chunks)
                result["workloads"][name] = {"chunks": chunks, "gap_ms": gap_ms, "direct": direct, "sidecar": through}
            counted = _counted_tokens(admin)
            result["tokens"] = {"reported": expected, "counted_by_sidecar": counted}
    finally:
        if sidecar is not None:
            stop_group(sidecar)
        stop_group(server)
    result["load_after"] = round(os.getloadavg()[0], 2)
    out.mkdir(parents=True, exist_ok=True)
    (out / "llm.json").write_text(json.dumps(result, indent=2))
    (out / "llm.md").write_text(render(result))
    return result


def render(r: dict) -> str:
    lines = [f"Streamed chat completions (SSE), {r['concurrency']} concurrent streams, {r['seconds']:g} s per row; "
             f"load average {r['load_before']} before, {r['load_after']} after", "",
             "| workload | path | completions/s | events/s | first chunk p50 ms | p99 ms | last chunk p50 ms | "
             "p99 ms | errors |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, w in r["workloads"].items():
        label = f"{name} ({w['chunks']} chunks, {w['gap_ms']} ms apart)"
        for path in ("direct", "sidecar"):
            x = w[path]
            lines.append(f"| {label} | {path} | {x['completions_per_s']} | {x['events_per_s']} | "
                         f"{x['first_chunk_ms']['p50']} | {x['first_chunk_ms']['p99']} | {x['last_chunk_ms']['p50']} | "
                         f"{x['last_chunk_ms']['p99']} | {x['errors']} |")
    paced = r["workloads"].get("paced")
    if paced and paced["direct"]["first_chunk_ms"]["p50"] is not None and paced["sidecar"]["first_chunk_ms"]["p50"] is not None:
        added = paced["sidecar"]["first_chunk_ms"]["p50"] - paced["direct"]["first_chunk_ms"]["p50"]
        lines += ["", f"First chunk, added by the sidecar at the median (paced): {added:.3f} ms"]
    t = r.get("tokens")
    if t:
        lines += ["", f"Tokens counted by the sidecar: {t['counted_by_sidecar']} "
                      f"(its completions reported {t['reported']})"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.llm_stream", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    result = run(args.seconds, args.concurrency, args.out)
    print(render(result))
    ok = all(w["sidecar"]["completions"] and not w["sidecar"]["errors"] for w in result["workloads"].values())
    return 0 if ok and result["tokens"]["counted_by_sidecar"] == result["tokens"]["reported"] else 1


if __name__ == "__main__":
    sys.exit(main())
