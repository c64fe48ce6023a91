"""Resilience outcomes: the same fault scenarios for the direct call, nginx, HAProxy and the sidecar.

Per (round, scenario, system): the system starts fresh (no breaker or cache state carried over), the
upstream roles are set, one warm-up second runs at the scenario's rate (unrecorded: breakers and passive
checks get to react, as they would in production), the upstream counters are zeroed, then the measured
run. Success = a 200 answer (no static fallback is configured anywhere, so a 200 is a real answer: from
an upstream or a cache). Amplification = upstream requests (primary + backup, health checks excluded)
per client request.

    0 healthy      both roles healthy (the reference p99 for scenario 2)
    1 flaky        primary answers 20 % of requests with 503
    2 down         primary refuses connections, backup healthy
    3 slow         5 % of primary answers take 2 s
    4 failing      primary answers every request with 503 (retry storm), backup healthy
    5 cache        primary and backup down, after the cache was warmed (entries expired: only
                   stale-on-error answers can succeed)
    6 replica      one of the three primary replicas answers every request with 503 (nginx: `max_fails`,
                   HAProxy: `observe layer7` + checks, the sidecar: outlier ejection); `bad share` is the
                   share of upstream requests that reached the bad replica. `direct` here is the app
                   calling the Service through an L4 balancer (HAProxy `mode tcp`, `balance random`:
                   kube-proxy's behaviour), not one replica
"""
from __future__ import annotations

import asyncio
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import configs
from bench.loadgen import open_loop
from bench.overhead import cache_available
from bench.systems import (Proc, cpus, free_port, haproxy_proc, nginx_proc, python_proc, sidecar_proc,
                           upstream_mode, upstream_stats)

KEYS = [f"/item/{i}" for i in range(1000)]
WARM_KEYS = [f"/warm/{i}" for i in range(1000)]   # the warm-up never touches measured keys
SCENARIOS = {
    "healthy": ("0 healthy", {"primary": {}, "backup": {}}),
    "flaky": ("1 primary 20% 503", {"primary": {"fail": 0.2}, "backup": {}}),
    "down": ("2 primary down, backup up", {"primary": {"down": 1}, "backup": {}}),
    "slow": ("3 5% of answers take 2 s", {"primary": {"slow": 0.05, "slow_ms": 2000}, "backup": {}}),
    "failing": ("4 primary 100% 503", {"primary": {"fail": 1.0}, "backup": {}}),
    "cache": ("5 all down, warm cache", {"primary": {"down": 1}, "backup": {"down": 1}}),
    "replica": ("6 one of 3 replicas 503", {"primary": {"bad": 1}, "backup": {}}),
}
RESET = {"fail": 0, "slow": 0, "down": 0, "bad": -1}


@dataclass
class Plan:
    rounds: int
    rate: int
    duration: float
    warmup: float
    scenarios: tuple[str, ...]
    systems: tuple[str, ...]


FULL = Plan(rounds=2, rate=200, duration=6, warmup=1, scenarios=tuple(SCENARIOS),
            systems=("direct", "nginx", "haproxy", "sidecar"))
QUICK = Plan(rounds=1, rate=100, duration=2, warmup=0.5, scenarios=tuple(SCENARIOS),
             systems=("direct", "nginx", "haproxy", "sidecar"))
SMOKE = Plan(rounds=1, rate=50, duration=0.5, warmup=0.2, scenarios=("healthy", "flaky", "replica"),
             systems=("direct", "sidecar"))


@dataclass
class Outcomes:
    plan: Plan
    systems: list[str]
    runs: dict = field(default_factory=dict)     # scenario -> system -> [ {success, p50, p99, amp, ...} ]
    skipped: dict = field(default_factory=dict)


def run(plan: Plan, tmp: Path, log) -> Outcomes:
    gen_cpu, sut_cpu = cpus()
    primary = [free_port() for _ in range(3)]
    backup, control = free_port(), free_port()
    upstream = python_proc("scenario-upstream", ["bench.upstream", "--primary", ",".join(map(str, primary)),
                                                 "--backup", str(backup), "--control", str(control)],
                           control, gen_cpu, tmp).start()
    systems = [s for s in plan.systems if s not in ("nginx", "haproxy") or shutil.which(s)]
    out = Outcomes(plan, systems, skipped={s: "not installed" for s in plan.systems if s not in systems})
    cache = cache_available()
    try:
        for rnd in range(plan.rounds):
            for scenario in plan.scenarios:
                order = systems[rnd % len(systems):] + systems[:rnd % len(systems)]
                for name in order:
                    res = _one(name, scenario, plan, tmp, primary, backup, control, sut_cpu, cache)
                    out.runs.setdefault(scenario, {}).setdefault(name, []).append(res)
                    log(f"    {SCENARIOS[scenario][0]:28} {name:8} success {res['success'] * 100:6.2f}%  "
                        f"p50 {_ms(res['p50'])} p99 {_ms(res['p99'])} ms  amplification {res['amp']:.2f}x"
                        + (f"  bad share {res['bad_share'] * 100:.2f}%" if scenario == "replica" else ""))
    finally:
        upstream.stop()
    return out


def _ms(v: float | None) -> str:
    return "    -" if v is None else f"{v:7.2f}"


def _start(name: str, tmp: Path, primary: list[int], backup: int, cpu: int, cache: bool,
           scenario: str = "") -> tuple[Proc | None, int]:
    if name == "direct" and scenario != "replica":
        return None, primary[0]              # every replica behaves alike: one stands for the Service
    port = free_port()
    d = tmp / f"sc-{name}-{port}"
    d.mkdir(parents=True)
    if name == "direct":                     # one bad replica: the app calls the Service, kube-proxy style
        proc = haproxy_proc(name, configs.haproxy_l4_service(d, port, primary), port, cpu, tmp)
    elif name == "nginx":
        proc = nginx_proc(name, configs.nginx_scenario(d, port, primary, backup), port, cpu, tmp)
    elif name == "haproxy":
        proc = haproxy_proc(name, configs.haproxy_scenario(d, port, primary, backup), port, cpu, tmp)
    else:
        admin, health = free_port(), free_port()
        policy = configs.sidecar_scenario(d, port, admin, health, primary, backup, cache=cache)
        proc = sidecar_proc(name, policy, port, admin, cpu, tmp)
    return proc.start(), port


def _one(name: str, scenario: str, plan: Plan, tmp: Path, primary: list[int], backup: int, control: int,
         cpu: int, cache: bool) -> dict:
    for role in ("primary", "backup"):
        upstream_mode(control, role, **RESET)
    proc, port = _start(name, tmp, primary, backup, cpu, cache, scenario)
    try:
        if scenario == "cache":
            # Warm every key, then let the entries expire: only stale-on-error answers can succeed.
            asyncio.run(open_loop("127.0.0.1", port, KEYS, 1000, len(KEYS) / 1000, drain=5))
            time.sleep(configs.CACHE_TTL_S + 0.5)
        for role, knobs in SCENARIOS[scenario][1].items():
            if knobs:
                upstream_mode(control, role, **knobs)
        if plan.warmup:
            asyncio.run(open_loop("127.0.0.1", port, WARM_KEYS, plan.rate, plan.warmup, drain=12))
        upstream_mode(control, "primary")          # no-op, but orders the counters after the warm-up
        before = upstream_stats(control)
        res = asyncio.run(open_loop("127.0.0.1", port, KEYS, plan.rate, plan.duration, drain=12))
        after = upstream_stats(control)
    finally:
        if proc is not None:
            proc.stop()
        for role in ("primary", "backup"):
            upstream_mode(control, role, **RESET)
    upstream_load = sum(after[r] - before[r] for r in ("primary", "backup"))
    bad = after.get("bad", 0) - before.get("bad", 0)
    s = res.summary()
    return {"success": res.ok / res.sent if res.sent else 0.0, "p50": s["p50"], "p99": s["p99"],
            "p999": s["p999"], "amp": upstream_load / res.sent if res.sent else 0.0, "sent": res.sent,
            "ok": res.ok, "errors": res.errors, "primary": after["primary"] - before["primary"],
            "backup": after["backup"] - before["backup"], "statuses": s["statuses"],
            "bad_share": bad / upstream_load if upstream_load else 0.0}
