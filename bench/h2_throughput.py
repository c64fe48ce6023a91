"""`python -m bench.h2_throughput [--seconds S] [--clients C] [--streams M] [--rate R] [--out DIR]`:
HTTP/2 throughput with h2load (Debian's nghttp2-client), small answers, three paths side by side:

    direct     h2load -> upstream nginx (`listen ... http2`: h2c with prior knowledge, /small = 86 B)
    nginx      h2load -> nginx (h2c in) -> `grpc_pass` -> the same upstream. nginx's `proxy_pass`
               speaks only HTTP/1.x to upstreams; `grpc_pass` is its one HTTP/2 upstream module and
               forwards any request (one stream per upstream connection, from a keep-alive pool)
    sidecar    h2load -> reverse listener (h2c prior knowledge) -> the "full" route of the overhead
               runs (retry + budget + breaker + concurrency, 5 % of traces sampled, none exported),
               upstream `protocol: h2c` (multiplexed)

Two runs per path, each S seconds after a 1 s warm-up: saturation (C connections with M streams in
flight each: req/s, and the CPU the proxy used per request; its latencies are queueing, C x M / req/s)
and paced (the same connections sending R req/s in all, below every path's ceiling: the latency a
request pays). h2load and the upstream share CPU 0; the proxy under test runs alone on CPU 1
(bench/systems.py). Printed and written to DIR/h2.md and DIR/h2.json, with ratios to the direct path;
latencies come from h2load's per-request log.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import configs
from bench.systems import Proc, cpus, free_port, nginx_proc, sidecar_proc

PATH = "/small"


def h2load(port: int, seconds: float, clients: int, streams: int, cpu: int, log: Path,
           rate: int | None = None) -> dict:
    """One h2load run (h2c prior knowledge): req/s as h2load reports it, latencies from its log.
    `rate`: paced at that many req/s in all (`--rps` per connection), else as fast as answers come."""
    paced = ["--rps", f"{rate / clients:g}"] if rate else []
    cmd = ["taskset", "-c", str(cpu), "h2load", "-c", str(clients), "-m", str(streams), "-t", "1", *paced,
           "-D", f"{seconds:g}", "--warm-up-time", "1", f"--log-file={log}", f"http://127.0.0.1:{port}{PATH}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    rps = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", out)
    counts = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                       r"(\d+) errored", out)
    if rps is None or counts is None:
        raise RuntimeError(f"h2load output not understood:\n{out}")
    micros = sorted(int(line.split("\t")[2]) for line in log.read_text().splitlines() if line.count("\t") >= 2)

    def pct(p: float) -> float:
        return round(micros[min(len(micros) - 1, int(p * len(micros)))] / 1000, 3)
    return {"rps": float(rps.group(1)), "done": int(counts.group(2)), "succeeded": int(counts.group(3)),
            "failed": int(counts.group(4)), "h2load": counts.group(0),   # failed includes errored
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "mean_ms": round(statistics.fmean(micros) / 1000, 3)}


def measure(proc: Proc | None, port: int, args, gen_cpu: int, log: Path) -> dict:
    """Saturation, then paced, against one path."""
    cpu0 = proc.cpu_seconds() if proc is not None else 0.0
    row = h2load(port, args.seconds, args.clients, args.streams, gen_cpu, log)
    if proc is not None:
        used = proc.cpu_seconds() - cpu0          # warm-up included: slightly pessimistic per request
        row["cpu_us_per_req"] = round(used / max(1, row["done"]) * 1e6, 1)
    row["paced"] = h2load(port, args.seconds, args.clients, args.streams, gen_cpu, log.with_suffix(".paced.log"),
                          rate=args.rate)
    return row


def run(args) -> dict:
    if shutil.which("h2load") is None:
        raise SystemExit("h2load not found: apt-get install nghttp2-client (bench/install.sh does)")
    gen_cpu, sut_cpu = cpus()
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="sidecar-h2-bench-") as tmp:
        d = Path(tmp)
        up = free_port()
        upstream = nginx_proc("upstream", configs.upstream_nginx(_mk(d / "upstream"), up, http2=True), up,
                              gen_cpu, d).start()
        try:
            rows["direct"] = measure(None, up, args, gen_cpu, d / "direct.log")
            port = free_port()
            nginx = nginx_proc("nginx", configs.nginx_h2_proxy(_mk(d / "nginx"), port, up), port, sut_cpu, d).start()
            try:
                rows["nginx"] = measure(nginx, port, args, gen_cpu, d / "nginx.log")
            finally:
                nginx.stop()
            port, admin, health = free_port(), free_port(), free_port()
            policy = configs.sidecar_overhead(_mk(d / "sidecar"), "sidecar", port, admin, health, up,
                                              cache=False, protocol="h2c")
            sidecar = sidecar_proc("sidecar", policy, port, admin, sut_cpu, d).start()
            try:
                rows["sidecar"] = measure(sidecar, port, args, gen_cpu, d / "sidecar.log")
            finally:
                sidecar.stop()
        finally:
            upstream.stop()
    result = {"seconds": args.seconds, "clients": args.clients, "streams": args.streams, "rate": args.rate,
              "load_before": args.load_before, "h2load": _version(), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "h2.json").write_text(json.dumps(result, indent=2))
    (args.out / "h2.md").write_text(render(result))
    return result


def _mk(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    return d


def _version() -> str:
    out = subprocess.run(["h2load", "--version"], capture_output=True, text=True).stdout.strip()
    return out or "?"


def render(r: dict) -> str:
    rows = r["rows"]
    base, paced_base = rows["direct"], rows["direct"]["paced"]
    lines = [f"HTTP/2 (h2c), GET {PATH} (86 B), h2load {r['clients']} connections, {r['seconds']:g} s per run after "
             f"a 1 s warm-up; {r['h2load']}; load average {r['load_before']:.2f} before", "",
             f"Saturation ({r['streams']} streams in flight per connection):", "",
             "| path | req/s | req/s vs direct | proxy CPU µs/req | p50 ms | p99 ms | failed |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name in ("direct", "nginx", "sidecar"):
        row = rows[name]
        ratio = "–" if name == "direct" else f"{row['rps'] / base['rps']:.2f}×"
        lines.append(f"| {name} | {row['rps']:,.0f} | {ratio} | {row.get('cpu_us_per_req', '–')} | {row['p50_ms']} | "
                     f"{row['p99_ms']} | {row['failed']} |")
    lines += ["", f"Paced at {r['rate']:,} req/s in all:", "",
              "| path | req/s | p50 ms | p99 ms | mean ms | p50 vs direct | p99 vs direct | failed |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ("direct", "nginx", "sidecar"):
        row = rows[name]["paced"]
        ratios = ("–", "–") if name == "direct" else (
            f"{row['p50_ms'] / paced_base['p50_ms']:.1f}× (+{row['p50_ms'] - paced_base['p50_ms']:.3f})",
            f"{row['p99_ms'] / paced_base['p99_ms']:.1f}× (+{row['p99_ms'] - paced_base['p99_ms']:.3f})")
        lines.append(f"| {name} | {row['rps']:,.0f} | {row['p50_ms']} | {row['p99_ms']} | {row['mean_ms']} | "
                     f"{ratios[0]} | {ratios[1]} | {row['failed']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.h2_throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--clients", type=int, default=4, help="HTTP/2 connections")
    p.add_argument("--streams", type=int, default=16, help="streams in flight per connection")
    p.add_argument("--rate", type=int, default=500, help="req/s in all for the paced run")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    args.load_before = os.getloadavg()[0]
    result = run(args)
    print(render(result))
    runs = [r for row in result["rows"].values() for r in (row, row["paced"])]
    return 0 if all(run["succeeded"] and not run["failed"] for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
