"""`python -m bench.grpc_unary [--seconds S] [--concurrency C] [--out DIR]`: unary gRPC calls, direct
to a grpcio server and through the sidecar (reverse listener, `protocol: h2c` upstream, one route
with a retry policy), side by side: calls/s, p50 and p99, and the sidecar's added latency per call.

The server and the client are grpcio (`grpc.aio`, generic handlers, 16-byte messages) in their own
processes on the load generator's core; the sidecar runs alone on the other core (bench/systems.py's
layout). One client channel (one HTTP/2 connection, as a gRPC client holds) carries C concurrent
calls. Results: DIR/grpc.md and DIR/grpc.json.

HTTP/2 throughput with h2load, against nginx too, is bench/h2_throughput.py.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from bench.systems import ROOT, cpus, free_port, spawn, stop_group, wait_port

SERVICE_METHOD = "/bench.Echo/Unary"


def _server_main(port: int) -> None:
    import grpc

    async def serve() -> None:
        async def unary(request: bytes, context) -> bytes:
            return request
        handler = grpc.method_handlers_generic_handler(
            "bench.Echo", {"Unary": grpc.unary_unary_rpc_method_handler(unary)})
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()
    asyncio.run(serve())


async def _load(port: int, seconds: float, concurrency: int) -> dict:
    import grpc
    latencies: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.enable_http_proxy", 0)]) as ch:
        call = ch.unary_unary(SERVICE_METHOD)
        await call(b"warm-up-message!")
        stop = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal errors
            while time.monotonic() < stop:
                started = time.perf_counter()
                try:
                    await call(b"0123456789abcdef", timeout=10)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - started)
        began = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - began
    latencies.sort()

    def pct(p: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 3) if latencies else None
    return {"calls": len(latencies), "errors": errors, "rps": round(len(latencies) / elapsed, 1),
            "p50_ms": pct(0.50), "p99_ms": pct(0.99)}


def run(seconds: float, concurrency: int, out: Path) -> dict:
    gen_cpu, sut_cpu = cpus()
    grpc_port, listen, admin, health = free_port(), free_port(), free_port(), free_port()
    server = spawn([sys.executable, "-c", f"from bench.grpc_unary import _server_main; _server_main({grpc_port})"],
                    gen_cpu, cwd=ROOT)
    sidecar = None
    try:
        wait_port(grpc_port, proc=server)
        with tempfile.TemporaryDirectory(prefix="sidecar-grpc-bench-") as tmp:
            policy = Path(tmp) / "policy.yaml"
            policy.write_text(textwrap.dedent(f"""
                version: 1
                listeners:
                  - {{name: grpc, mode: reverse, port: {listen}, upstream: echo}}
                admin: {{port: {admin}}}
                health: {{bind: 127.0.0.1, port: {health}}}
                upstreams:
                  echo: {{url: "http://127.0.0.1:{grpc_port}", protocol: h2c}}
                routes:
                  - name: unary
                    match: {{path_prefix: /bench.Echo/}}
                    upstream: echo
                    retry: {{max_retries: 2, when: [connect-failure, reset]}}
            """))
            sidecar = spawn([sys.executable, "-m", "sidecar", "run", "-c", str(policy)], sut_cpu, cwd=ROOT,
                             env={**os.environ, "OTEL_TRACES_EXPORTER": "none"})
            wait_port(listen, proc=sidecar)
            os.sched_setaffinity(0, {gen_cpu})
            direct = asyncio.run(_load(grpc_port, seconds, concurrency))
            through = asyncio.run(_load(listen, seconds, concurrency))
    finally:
        if sidecar is not None:
            stop_group(sidecar)
        stop_group(server)
    result = {"seconds": seconds, "concurrency": concurrency, "direct": direct, "sidecar": through}
    if direct["p50_ms"] is not None and through["p50_ms"] is not None:
        result["added_p50_ms"] = round(through["p50_ms"] - direct["p50_ms"], 3)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grpc.json").write_text(json.dumps(result, indent=2))
    (out / "grpc.md").write_text(render(result))
    return result


def render(r: dict) -> str:
    lines = [f"Unary gRPC, {r['concurrency']} concurrent calls on one channel, {r['seconds']:g} s each",
             "", "| path | calls/s | p50 ms | p99 ms | errors |", "|---|---:|---:|---:|---:|"]
    for name in ("direct", "sidecar"):
        row = r[name]
        lines.append(f"| {name} | {row['rps']} | {row['p50_ms']} | {row['p99_ms']} | {row['errors']} |")
    if "added_p50_ms" in r:
        lines += ["", f"Added per call at the median: {r['added_p50_ms']} ms"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.grpc_unary", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    result = run(args.seconds, args.concurrency, args.out)
    print(render(result))
    return 0 if result["sidecar"]["calls"] and not result["sidecar"]["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
