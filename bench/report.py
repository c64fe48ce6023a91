"""Tables (stdout and Markdown) and plots (PNG) from the medians of the rounds."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from bench.overhead import Overhead, median
from bench.scenarios import SCENARIOS, Outcomes

LABELS = {"direct": "direct call", "nginx": "nginx", "haproxy": "HAProxy", "aiohttp": "bare aiohttp proxy",
          "sidecar": "sidecar (full policy)", "sidecar-3ep": "sidecar (full policy, 3 endpoints)",
          "sidecar+otlp": "sidecar, tracing 5% exported"}


def _f(v, fmt: str = "{:.2f}", none: str = "-") -> str:
    return none if v is None else fmt.format(v)


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


# --- overhead ------------------------------------------------------------------------------------

def sat_median(o: Overhead, body: str, system: str, key: str = "rps"):
    return median([r.get(key) for r in o.sat.get(body, {}).get(system, [])])


def rate_median(o: Overhead, key: str, system: str, q: str):
    return median([r.get(q) for r in o.rate.get(key, {}).get(system, [])])


def _ratios(pair: dict, a: str, b: str) -> tuple[float, float | None]:
    """(throughput, per-CPU-second) of `b` over `a` in one back-to-back pair."""
    x, y = pair[a], pair[b]
    per_cpu = y["per_cpu_s"] / x["per_cpu_s"] if x.get("per_cpu_s") and y.get("per_cpu_s") else None
    return y["rps"] / x["rps"], per_cpu


def versus(o: Overhead, a: str, b: str) -> tuple[float, float | None, int] | None:
    """(throughput, per-CPU-second, pairs) of `b` over `a`: the medians of the back-to-back pairs' ratios
    when they were run (overhead._pair; pairs > 0), else the ratio of the rounds' medians (pairs 0)."""
    pairs = o.pairs.get(f"{a}/{b}")
    if pairs:
        ratios = [_ratios(p, a, b) for p in pairs]
        return median([r for r, _ in ratios]), median([e for _, e in ratios if e is not None]), len(pairs)
    x, y = sat_median(o, "small", a), sat_median(o, "small", b)
    if not (x and y):
        return None
    ex, ey = sat_median(o, "small", a, "per_cpu_s"), sat_median(o, "small", b, "per_cpu_s")
    return y / x, (ey / ex if ex and ey else None), 0


def pairs_table(o: Overhead) -> str:
    rows = []
    for name, pairs in o.pairs.items():
        a, b = name.split("/")
        for i, p in enumerate(pairs, 1):
            ratio, per_cpu = _ratios(p, a, b)
            rows.append([f"{LABELS.get(b, b)} / {LABELS.get(a, a)}", str(i), LABELS.get(p["first"], p["first"]),
                         _f(p[a]["rps"], "{:,.0f}"), _f(p[b]["rps"], "{:,.0f}"), f"{ratio:.3f}x",
                         _f(per_cpu, "{:.3f}x")])
        ratio, per_cpu, _ = versus(o, a, b)
        rows.append(["", "median", "", "", "", f"**{ratio:.3f}x**", _f(per_cpu, "{:.3f}x")])
    return (f"### Back-to-back pairs ({o.plan.pair_duration:g} s saturation runs each, order flipped every pair)\n\n"
            + table(["comparison", "pair", "ran first", "reference req/s", "system req/s", "throughput ratio",
                     "ratio per CPU-second"], rows))


def overhead_tables(o: Overhead) -> str:
    parts = []
    # Side by side: saturation and the 1,000/s latency of the small body.
    ref_rate = next((k for k in o.rate if k.endswith(":small") and k.startswith("1000")), None) \
        or next(iter(o.rate), None)
    direct_sat = sat_median(o, "small", "direct")
    headers = ["system", "sat. req/s (small)", "x direct", "SUT CPU", "req/CPU-s"]
    if ref_rate:
        rps = ref_rate.split(":")[0]
        headers += [f"p50 @{rps}/s ms", "p99 ms", "p99.9 ms", "+p50 vs direct", "+p99 vs direct"]
    headers += ["RSS MiB (peak)"]
    rows = []
    for name in o.systems:
        rps = sat_median(o, "small", name)
        row = [LABELS.get(name, name), _f(rps, "{:,.0f}"), _f(rps / direct_sat if rps and direct_sat else None),
               _f(sat_median(o, "small", name, "cpu"), "{:.0%}"),
               _f(sat_median(o, "small", name, "per_cpu_s"), "{:,.0f}")]
        if ref_rate:
            p = {q: rate_median(o, ref_rate, name, q) for q in ("p50", "p99", "p999")}
            d = {q: rate_median(o, ref_rate, "direct", q) for q in ("p50", "p99")}
            row += [_f(p["p50"], "{:.3f}"), _f(p["p99"], "{:.3f}"), _f(p["p999"], "{:.3f}"),
                    _f(p["p50"] - d["p50"] if None not in (p["p50"], d["p50"]) else None, "{:+.3f}"),
                    _f(p["p99"] - d["p99"] if None not in (p["p99"], d["p99"]) else None, "{:+.3f}")]
        mem = o.memory.get(name)
        row.append(_f(mem["peak_mib"], "{:.1f}") if mem else "-")
        rows.append(row)
    parts.append("### Overhead, side by side (medians of %d rounds)\n\n" % o.plan.rounds + table(headers, rows))

    if len(o.sat) > 1:
        bodies = list(o.sat)
        rows = []
        for name in o.systems:
            row = [LABELS.get(name, name)]
            for body in bodies:
                rps, ref = sat_median(o, body, name), sat_median(o, body, "direct")
                row += [_f(rps, "{:,.0f}"), _f(rps / ref if rps and ref else None),
                        _f(sat_median(o, body, name, "cpu"), "{:.0%}"),
                        _f(sat_median(o, body, name, "per_cpu_s"), "{:,.0f}")]
            rows.append(row)
        headers = ["system"] + [h for b in bodies for h in (f"{b} req/s", "x direct", "CPU", "req/CPU-s")]
        parts.append("### Saturation throughput (wrk, 64 connections, SUT on one core)\n\n" + table(headers, rows))

    rows = []
    for key in o.rate:
        rps, body = key.split(":")
        d50, d99 = rate_median(o, key, "direct", "p50"), rate_median(o, key, "direct", "p99")
        for name in o.systems:
            if name not in o.rate[key]:
                continue
            p50, p99, p999 = (rate_median(o, key, name, q) for q in ("p50", "p99", "p999"))
            ok = sum(r["ok"] for r in o.rate[key][name])
            sent = sum(r["sent"] for r in o.rate[key][name])
            rows.append([f"{int(rps):,}/s", body, LABELS.get(name, name), _f(p50, "{:.3f}"), _f(p99, "{:.3f}"),
                         _f(p999, "{:.3f}"), _f(p50 / d50 if p50 and d50 else None),
                         _f(p99 / d99 if p99 and d99 else None), f"{ok / sent:.2%}" if sent else "-"])
    if rows:
        parts.append("### Latency at fixed rates (open loop, from the scheduled send time, ms)\n\n" + table(
            ["rate", "body", "system", "p50", "p99", "p99.9", "p50 x direct", "p99 x direct", "2xx"], rows))
    if o.pairs:
        parts.append(pairs_table(o))
    if o.cache_fill:
        c = o.cache_fill
        parts.append(f"Cache fill: {c['ok']:,} of {c['requested']:,} distinct URLs answered, "
                     f"{c.get('entries')} entries held; sidecar RSS {c['rss_mib']:.1f} MiB, "
                     f"peak {c['peak_mib']:.1f} MiB over the whole run.")
    if o.skipped:
        parts.append("Skipped: " + "; ".join(f"{k} ({v})" for k, v in o.skipped.items()))
    return "\n\n".join(parts)


def targets(o: Overhead | None, s: Outcomes | None) -> list[list[str]]:
    rows = []

    def add(what, value, ok):
        rows.append([what, value, "-" if ok is None else ("PASS" if ok else "MISS")])

    if o is not None:
        sc, ngx = sat_median(o, "small", "sidecar"), sat_median(o, "small", "nginx")
        eff = {n: sat_median(o, "small", n, "per_cpu_s") for n in ("sidecar", "nginx")}
        for system, what in (("sidecar", ">= 1.0x bare aiohttp throughput"),
                             ("sidecar-3ep", ">= 1.0x bare aiohttp, three-endpoint upstream")):
            vs = versus(o, "aiohttp", system)
            if vs is not None:
                ratio, per_cpu, n = vs
                extra = f" (per CPU-second {per_cpu:.2f}x)" if per_cpu else ""
                how = f", median of {n} back-to-back pairs" if n else ""
                add(what, f"{ratio:.2f}x{extra}{how}", ratio >= 1.0)
        if sc and ngx:
            extra = f" (per CPU-second {eff['sidecar'] / eff['nginx']:.2f}x)" if eff["sidecar"] and eff["nginx"] else ""
            add(">= 0.2x nginx throughput", f"{sc / ngx:.2f}x{extra}", sc / ngx >= 0.2)
        key = "1000:small" if "1000:small" in o.rate else None
        if key and "sidecar" in o.rate[key] and "direct" in o.rate[key]:
            d50, d99 = rate_median(o, key, "direct", "p50"), rate_median(o, key, "direct", "p99")
            s50, s99 = rate_median(o, key, "sidecar", "p50"), rate_median(o, key, "sidecar", "p99")
            add("+p50 <= 0.5 ms at 1,000/s", f"{s50 - d50:+.3f} ms", s50 - d50 <= 0.5)
            add("+p99 <= 2 ms at 1,000/s", f"{s99 - d99:+.3f} ms", s99 - d99 <= 2.0)
        traced = versus(o, "sidecar", "sidecar+otlp")
        if traced is not None:
            ratio, per_cpu, n = traced
            extra = f" (per CPU-second {1 - per_cpu:.1%})" if per_cpu is not None else ""
            how = f", median of {n} back-to-back pairs" if n else ""
            add("tracing at 5% costs <= 5% throughput", f"{1 - ratio:.1%}{extra}{how}", 1 - ratio <= 0.05)
        peak = o.memory.get("sidecar", {}).get("peak_mib")
        if o.cache_fill:
            peak = max(peak or 0, o.cache_fill["peak_mib"])
        if peak:
            add("RSS <= 80 MB under load (10k cache entries)", f"{peak:.1f} MiB", peak * 1.048576 <= 80)
    if s is not None:
        get = lambda sc, sys, k: median([r[k] for r in s.runs.get(sc, {}).get(sys, [])])  # noqa: E731
        if "sidecar" in s.runs.get("flaky", {}):
            succ, amp = get("flaky", "sidecar", "success"), get("flaky", "sidecar", "amp")
            add("(1) >= 99.9% success, <= 1.3x upstream load", f"{succ:.2%}, {amp:.2f}x",
                succ >= 0.999 and amp <= 1.3)
        if "sidecar" in s.runs.get("down", {}) and "sidecar" in s.runs.get("healthy", {}):
            p, h = get("down", "sidecar", "p99"), get("healthy", "sidecar", "p99")
            if p and h:
                add("(2) p99 within 2x the healthy p99", f"{p:.2f} vs {h:.2f} ms ({p / h:.2f}x)", p <= 2 * h)
        if "sidecar" in s.runs.get("slow", {}) and "nginx" in s.runs.get("slow", {}):
            p, n = get("slow", "sidecar", "p99"), get("slow", "nginx", "p99")
            if p and n:
                add("(3) p99 below nginx's (hedging)", f"{p:.1f} vs {n:.1f} ms", p < n)
        if "sidecar" in s.runs.get("failing", {}):
            amp = get("failing", "sidecar", "amp")
            ngx = get("failing", "nginx", "amp") if "nginx" in s.runs["failing"] else None
            add("(4) upstream amplification <= 1.25x", f"{amp:.2f}x" + (f" (nginx {ngx:.2f}x)" if ngx else ""),
                amp <= 1.25)
    return rows


def scenario_table(s: Outcomes) -> str:
    rows = []
    for sc, by_system in s.runs.items():
        for name in s.systems:
            runs = by_system.get(name)
            if not runs:
                continue
            m = lambda k: median([r[k] for r in runs])  # noqa: E731, B023 - called at once, in this iteration
            rows.append([SCENARIOS[sc][0], LABELS.get(name, name), f"{m('success'):.2%}", _f(m("p50")),
                         _f(m("p99")), f"{m('amp'):.2f}x",
                         f"{median([r['primary'] for r in runs]):.0f} / {median([r['backup'] for r in runs]):.0f}",
                         f"{median([r.get('bad_share', 0.0) for r in runs]):.2%}" if sc == "replica" else ""])
    return (f"### Resilience outcomes ({s.plan.rate}/s for {s.plan.duration:g} s after {s.plan.warmup:g} s "
            f"warm-up, medians of {s.plan.rounds} rounds)\n\n"
            + table(["scenario", "system", "success", "p50 ms", "p99 ms", "upstream load", "primary / backup",
                     "to the bad replica"], rows))


# --- plots -------------------------------------------------------------------------------------

def plots(o: Overhead | None, s: Outcomes | None, outdir: Path) -> list[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plots: matplotlib is not installed (pip install -e '.[bench]')")
        return []
    made = []
    if o is not None and o.sat:
        bodies = list(o.sat)
        fig, ax = plt.subplots(figsize=(9, 4.5))
        width = 0.8 / max(1, len(o.systems))
        for i, name in enumerate(o.systems):
            vals = [sat_median(o, b, name) or 0 for b in bodies]
            ax.bar([j + i * width for j in range(len(bodies))], vals, width, label=LABELS.get(name, name))
        ax.set_xticks([j + width * (len(o.systems) - 1) / 2 for j in range(len(bodies))], bodies)
        ax.set_ylabel("requests/s (median)")
        ax.set_title("Saturation throughput, system under test on one core")
        ax.legend(fontsize=8)
        fig.tight_layout()
        made.append(_save(fig, outdir / "throughput.png"))
        plt.close(fig)
    if o is not None and o.rate:
        keys = [k for k in o.rate if k.endswith(":small")]
        if keys:
            fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), sharey=False)
            rates = [int(k.split(":")[0]) for k in keys]
            for ax, q, title in zip(axes, ("p50", "p99", "p999"), ("p50", "p99", "p99.9")):
                for name in o.systems:
                    ys = [rate_median(o, k, name, q) for k in keys]
                    if any(y is not None for y in ys):
                        ax.plot(rates, ys, marker="o", label=LABELS.get(name, name))
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xlabel("requests/s (open loop)")
                ax.set_ylabel("ms")
                ax.set_title(f"{title} latency, small body")
            axes[0].legend(fontsize=7)
            fig.tight_layout()
            made.append(_save(fig, outdir / "latency.png"))
            plt.close(fig)
    if s is not None and s.runs:
        scen = list(s.runs)
        fig, axes = plt.subplots(1, 3, figsize=(14, 4.5))
        width = 0.8 / max(1, len(s.systems))
        for ax, key, title, scale in zip(axes, ("success", "p99", "amp"),
                                         ("success rate", "p99 latency (ms)", "upstream requests per client request"),
                                         ("linear", "log", "linear")):
            for i, name in enumerate(s.systems):
                vals = [median([r[key] for r in s.runs[sc].get(name, [])]) or 0 for sc in scen]
                ax.bar([j + i * width for j in range(len(scen))], vals, width, label=LABELS.get(name, name))
            ax.set_xticks([j + width * (len(s.systems) - 1) / 2 for j in range(len(scen))],
                          [SCENARIOS[sc][0].split(" ", 1)[0] for sc in scen])
            ax.set_xlabel("scenario")
            ax.set_yscale(scale)
            ax.set_title(title)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        made.append(_save(fig, outdir / "scenarios.png"))
        plt.close(fig)
    return made


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def dump_json(o: Overhead | None, s: Outcomes | None, machine: dict, path: Path) -> None:
    doc = {"machine": machine}
    if o is not None:
        doc["overhead"] = {"plan": dataclasses.asdict(o.plan), "systems": o.systems, "sat": o.sat,
                           "rate": o.rate, "memory": o.memory, "cache_fill": o.cache_fill,
                           "skipped": o.skipped, "otlp_received": o.otlp_received,
                           "pairs": o.pairs}
    if s is not None:
        doc["scenarios"] = {"plan": dataclasses.asdict(s.plan), "systems": s.systems, "runs": s.runs,
                            "skipped": s.skipped}
    path.write_text(json.dumps(doc, indent=1, default=str))


def _pairs_of(d: dict) -> dict:
    """The pairs of a results.json; one written before the comparisons were generalised has only
    tracing's, under "tracing"."""
    if "pairs" in d:
        return d["pairs"]
    return {"sidecar/sidecar+otlp": d["tracing"]} if d.get("tracing") else {}


def _renamed(plan: dict) -> dict:
    names = {"tracing_pairs": "pairs", "tracing_duration": "pair_duration"}     # before the pairs were general
    return {names.get(k, k): v for k, v in plan.items()}


def load_json(path: Path) -> tuple[Overhead | None, Outcomes | None, dict]:
    """The inverse of `dump_json`, for `python -m bench --replot DIR`."""
    from bench import overhead, scenarios
    doc = json.loads(path.read_text())
    o = s = None
    if "overhead" in doc:
        d = doc["overhead"]
        plan = overhead.Plan(**{k: tuple(tuple(x) if isinstance(x, list) else x for x in v)
                                if isinstance(v, list) else v
                                for k, v in _renamed(d["plan"]).items()}) if "plan" in d else overhead.FULL
        o = Overhead(plan, d.get("systems") or list(d["sat"].get("small", {})), sat=d["sat"], rate=d["rate"],
                     memory=d["memory"], cache_fill=d["cache_fill"], skipped=d["skipped"],
                     otlp_received=d.get("otlp_received", {}), pairs=_pairs_of(d))
    if "scenarios" in doc:
        d = doc["scenarios"]
        plan = scenarios.Plan(**{k: tuple(v) if isinstance(v, list) else v for k, v in d["plan"].items()}) \
            if "plan" in d else scenarios.FULL
        s = Outcomes(plan, d.get("systems") or list(next(iter(d["runs"].values()), {})), runs=d["runs"],
                     skipped=d["skipped"])
    return o, s, doc["machine"]
