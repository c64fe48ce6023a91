"""Overhead: every system in front of the same static upstream, measured alternately, several rounds.

Workloads (each one runs every applicable system before the next workload; rounds repeat the lot with
the system order rotated, so drift on the machine hits every system alike):
    sat:<body>         wrk, 64 connections, closed loop: requests/s, and the SUT's CPU use on its core
    rate:<rps>:<body>  open-loop generator at a fixed rate: p50 / p99 / p99.9 from the scheduled time
Bodies: small (86 B), big (64 KiB), cached (a cache-hit route; systems without a cache skip it).
"""
from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import configs
from bench.loadgen import open_loop, wrk
from bench.systems import (Proc, cpus, free_port, haproxy_proc, http_get, nginx_proc, python_proc,
                           sidecar_proc)

PATHS = {"small": ["/small"], "big": ["/big"], "cached": [f"/cached/{i}" for i in range(100)]}
CACHING = {"nginx", "haproxy", "sidecar"}
# Compared in back-to-back pairs (`_pair`): (reference, system). Tracing's cost, and the targets
# against the bare aiohttp proxy, one endpoint and three.
PAIRED = (("sidecar", "sidecar+otlp"), ("aiohttp", "sidecar"), ("aiohttp", "sidecar-3ep"))


@dataclass
class Plan:
    rounds: int
    sat_duration: float
    rate_duration: float
    sat_bodies: tuple[str, ...]
    rates: tuple[tuple[int, str], ...]          # (rps, body)
    systems: tuple[str, ...]
    rss_entries: int = 10_000
    conns: int = 64
    pairs: int = 0                              # back-to-back pairs per comparison (see PAIRED, _pair)
    pair_duration: float = 3


QUICK = Plan(rounds=2, sat_duration=2, rate_duration=1.0, sat_bodies=("small",),
             rates=((1000, "small"),),
             systems=("direct", "nginx", "haproxy", "aiohttp", "sidecar", "sidecar-3ep", "sidecar+otlp"),
             rss_entries=10_000,
             pairs=2, pair_duration=1)
FULL = Plan(rounds=3, sat_duration=4, rate_duration=4, sat_bodies=("small", "big", "cached"),
            rates=((100, "small"), (1000, "small"), (5000, "small"), (1000, "big"), (1000, "cached")),
            systems=("direct", "nginx", "haproxy", "aiohttp", "sidecar", "sidecar-3ep", "sidecar+otlp"),
            pairs=10)
SMOKE = Plan(rounds=1, sat_duration=1, rate_duration=1, sat_bodies=("small",), rates=((200, "small"),),
             systems=("direct", "nginx", "haproxy", "aiohttp", "sidecar", "sidecar+otlp"), rss_entries=200,
             conns=8, pairs=1, pair_duration=1)


@dataclass
class Overhead:
    plan: Plan
    systems: list[str]
    sat: dict = field(default_factory=dict)      # body -> system -> [ {rps, cpu, ...} ]
    rate: dict = field(default_factory=dict)     # (rps, body) -> system -> [summary]
    memory: dict = field(default_factory=dict)   # system -> {rss_mib, peak_mib}
    cache_fill: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)  # system -> reason
    otlp_received: dict = field(default_factory=dict)
    # "a/b" -> [{"first": system, a: {rps, per_cpu_s, ...}, b: {...}}]: the back-to-back pairs
    pairs: dict = field(default_factory=dict)


def cache_available() -> bool:
    try:
        import sidecar.pipeline.cache  # noqa: F401
    except ImportError:
        return False
    return True


class Bench:
    def __init__(self, plan: Plan, tmp: Path, log) -> None:
        self.plan = plan
        self.tmp = tmp
        self.log = log
        self.gen_cpu, self.sut_cpu = cpus()
        self.procs: dict[str, Proc] = {}
        self.ports: dict[str, int] = {}
        self.cache = cache_available()

    def start(self, want: tuple[str, ...]) -> list[str]:
        import shutil
        tmp, g, s = self.tmp, self.gen_cpu, self.sut_cpu
        up = free_port()
        if shutil.which("nginx") is None:
            raise RuntimeError("the static upstream needs nginx (bench/install.sh installs it)")
        self.upstream = nginx_proc("upstream", configs.upstream_nginx(tmp / "upstream", up), up, g, tmp).start()
        self.ports["direct"] = up
        started = ["direct"] if "direct" in want else []
        for name in want:
            if name == "direct":
                continue
            port = free_port()
            try:
                if name in ("nginx", "haproxy") and shutil.which(name) is None:
                    raise FileNotFoundError(f"{name} is not installed")
                if name == "nginx":
                    proc = nginx_proc(name, configs.nginx_proxy(_mk(tmp / name), port, up), port, s, tmp)
                elif name == "haproxy":
                    proc = haproxy_proc(name, configs.haproxy_proxy(_mk(tmp / name), port, up), port, s, tmp)
                elif name == "aiohttp":
                    proc = python_proc(name, ["bench.passthrough", str(port), str(up)], port, s, tmp)
                else:
                    otlp = None
                    if name == "sidecar+otlp":
                        otlp = free_port()
                        self.otlp = python_proc("otlp", ["bench.otlp_sink", str(otlp)], otlp, g, tmp).start()
                        self.procs["otlp"] = self.otlp
                    admin, health = free_port(), free_port()
                    # sidecar-3ep: the same full policy with the upstream as three endpoints (one
                    # balanced set over the same server), the cost of balancing per request
                    policy = configs.sidecar_overhead(_mk(tmp / name.replace("+", "-")), name.replace("+", "-"),
                                                      port, admin, health, up, otlp, cache=self.cache,
                                                      endpoints=3 if name == "sidecar-3ep" else 1)
                    proc = sidecar_proc(name, policy, port, admin, s, tmp)
                self.procs[name] = proc.start()
                self.ports[name] = port
                started.append(name)
            except (OSError, RuntimeError, TimeoutError) as exc:
                self.log(f"  {name}: skipped ({exc})")
                self.skipped[name] = str(exc)
        return started

    skipped: dict = {}

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.stop()
        self.upstream.stop()


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _rotate(items: list[str], k: int) -> list[str]:
    k %= max(1, len(items))
    return items[k:] + items[:k]


def run(plan: Plan, tmp: Path, log) -> Overhead:
    bench = Bench(plan, tmp, log)
    bench.skipped = {}
    systems = bench.start(plan.systems)
    out = Overhead(plan, systems, skipped=bench.skipped)
    try:
        _measure(bench, plan, systems, out, log)
    finally:
        bench.stop()
    return out


def _applies(system: str, body: str, cache: bool) -> bool:
    if body != "cached":
        return True
    return system in CACHING or (system.startswith("sidecar") and cache and system == "sidecar")


def _measure(bench: Bench, plan: Plan, systems: list[str], out: Overhead, log) -> None:
    url = lambda name, body: f"http://127.0.0.1:{bench.ports[name]}{PATHS[body][0]}"  # noqa: E731
    # Warm-up: pools filled, caches primed, first-request imports done; not recorded.
    for name in systems:
        for body in (*plan.sat_bodies, "cached"):
            if _applies(name, body, bench.cache) and (body != "cached" or bench.cache):
                asyncio.run(open_loop("127.0.0.1", bench.ports[name], PATHS[body], 1000, 0.3, conns=8))
    for rnd in range(plan.rounds):
        order = _rotate(systems, rnd)
        log(f"  round {rnd + 1}/{plan.rounds}: {', '.join(order)}")
        for body in plan.sat_bodies:
            for name in order:
                if not _applies(name, body, bench.cache):
                    continue
                res = _saturate(bench, name, url(name, body), plan.sat_duration, plan.conns)
                out.sat.setdefault(body, {}).setdefault(name, []).append(res)
                log(f"    sat {body:6} {name:13} {res['rps']:9.0f} req/s  cpu {_pct(res['cpu'])}"
                    f"  non2xx {res['non2xx']} err {res['errors']}")
        for rps, body in plan.rates:
            for name in order:
                if not _applies(name, body, bench.cache):
                    continue
                res = asyncio.run(open_loop("127.0.0.1", bench.ports[name], PATHS[body], rps,
                                            plan.rate_duration, conns=min(64, max(8, rps // 100))))
                s = res.summary()
                out.rate.setdefault(f"{rps}:{body}", {}).setdefault(name, []).append(s)
                log(f"    {rps:5}/s {body:6} {name:13} p50 {s['p50']:.3f} p99 {s['p99']:.3f} "
                    f"p99.9 {s['p999']:.3f} ms  ok {s['ok']}/{s['sent']}  (gen lag p99 {s['lag_p99']:.3f})")
    paired = [(a, b) for a, b in PAIRED if {a, b} <= set(systems)]
    for i in range(plan.pairs):             # the comparisons interleaved: drift meets each alike
        for a, b in paired:
            out.pairs.setdefault(f"{a}/{b}", []).append(_pair(bench, plan, a, b, i, url, log))
    for name in systems:
        proc = bench.procs.get(name)
        if proc is not None:
            out.memory[name] = proc.memory()
    if "sidecar" in bench.procs and bench.cache:
        out.cache_fill = _fill_cache(bench, plan.rss_entries, log)
    if "otlp" in bench.procs:
        out.otlp_received = _json(http_get(f"http://127.0.0.1:{bench.procs['otlp'].port}/stats")[1])


def _saturate(bench: Bench, name: str, target: str, duration: float, conns: int) -> dict:
    proc = bench.procs.get(name)
    cpu0 = proc.cpu_seconds() if proc else 0.0
    t0 = time.monotonic()
    res = wrk(target, duration=duration, conns=conns, cpu=bench.gen_cpu)
    wall = time.monotonic() - t0
    cpu_s = proc.cpu_seconds() - cpu0 if proc else None
    res["cpu"] = cpu_s / wall if proc else None
    # Requests per CPU-second of the SUT: robust to other load on the machine stealing its core.
    res["per_cpu_s"] = res["requests"] / cpu_s if cpu_s else None
    res.pop("raw", None)
    return res


def _pair(bench: Bench, plan: Plan, a: str, b: str, i: int, url, log) -> dict:
    """`b` against `a` in the `i`th back-to-back pair of saturation runs.

    The differences these answer (tracing's cost; the sidecar against the bare aiohttp proxy) are a few
    per cent, while this kind of machine drifts by ±10 % between runs a minute apart, more than the
    rounds above can average out. So the two systems run right after each other, the order flipped
    every pair, and the report quotes the median of the pairs' ratios.
    """
    order = [a, b] if i % 2 == 0 else [b, a]
    pair: dict = {"first": order[0]}
    for name in order:
        pair[name] = _saturate(bench, name, url(name, "small"), plan.pair_duration, plan.conns)
    log(f"    pair {i + 1}/{plan.pairs}: {a} {pair[a]['rps']:7.0f} vs {b} {pair[b]['rps']:7.0f} req/s "
        f"({pair[b]['rps'] / pair[a]['rps']:.3f}x)")
    return pair


def _fill_cache(bench: Bench, entries: int, log) -> dict:
    """Peak RSS with `entries` cache entries: fill them at a fixed rate, then read the sidecar's memory."""
    proc = bench.procs["sidecar"]
    paths = [f"/cached/fill-{i}" for i in range(entries)]
    rps = 4000 if entries >= 4000 else 500
    res = asyncio.run(open_loop("127.0.0.1", bench.ports["sidecar"], paths, rps, entries / rps, conns=32))
    status, body = http_get(f"http://127.0.0.1:{proc.extra['admin']}/status")
    cached = None
    if status == 200:
        for route in _json(body).get("routes", []):
            if route.get("name") == "cached" and route.get("cache"):
                cached = route["cache"].get("entries")
    mem = proc.memory()
    log(f"  cache fill: {res.ok}/{res.sent} ok, entries {cached}, RSS {mem['rss_mib']:.1f} MiB, "
        f"peak {mem['peak_mib']:.1f} MiB")
    return {"requested": entries, "ok": res.ok, "entries": cached, **mem}


def _json(body: bytes) -> dict:
    import json
    try:
        return json.loads(body)
    except ValueError:
        return {}


def _pct(v: float | None) -> str:
    return "   -" if v is None else f"{v * 100:3.0f}%"


def median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None
