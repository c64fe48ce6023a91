"""`python -m bench --quick | --full | --smoke`: overhead tables, resilience outcomes, plots.

    --quick   overhead only, every system side by side, 2 rounds of short runs (under a minute)
    --full    overhead (3 rounds: saturation small/64 KiB/cache hit; 100, 1,000, 5,000 req/s) and the
              six resilience scenarios (2 rounds); about 15 minutes
    --smoke   a tiny load through the whole harness (the CI smoke test): shape, not timings
Results (--full): bench/results/{overhead,scenarios,targets}.md, results.json and *.png; --quick and
--smoke write to bench/results/quick/ and bench/results/smoke/ (or --out DIR).
Core layout: load generator, upstream and OTLP dummy on core 0; the system under test alone on core 1.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from bench import machine, overhead, report, scenarios
from bench.systems import cpus

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true")
    mode.add_argument("--full", action="store_true")
    mode.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="results directory (default bench/results)")
    p.add_argument("--systems", help="comma-separated subset of: direct,nginx,haproxy,aiohttp,sidecar,sidecar-3ep,sidecar+otlp")
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--skip-scenarios", action="store_true")
    p.add_argument("--scenarios", action="store_true", help="also run the scenarios in --quick mode")
    p.add_argument("--rounds", type=int)
    p.add_argument("--pairs", type=int, help="back-to-back pairs per comparison (and --pair-seconds each run)")
    p.add_argument("--pair-seconds", type=float)
    p.add_argument("--replot", type=Path, metavar="DIR",
                   help="re-render the tables and plots from DIR/results.json, measuring nothing")
    args = p.parse_args(argv)
    if args.replot:
        return _write(*report.load_json(args.replot / "results.json"), args.replot, "full")

    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    gen_cpu, sut_cpu = cpus()
    m_cores = {"gen_cpu": gen_cpu, "sut_cpu": sut_cpu}     # cpus() reads the affinity narrowed next
    os.sched_setaffinity(0, {gen_cpu})          # the harness and its load generator stay off the SUT core

    if args.smoke:
        o_plan, s_plan = overhead.SMOKE, scenarios.SMOKE
    elif args.full:
        o_plan, s_plan = overhead.FULL, scenarios.FULL
    else:
        o_plan, s_plan = overhead.QUICK, (scenarios.QUICK if args.scenarios else None)
    if args.skip_scenarios:
        s_plan = None
    if args.systems:
        wanted = tuple(args.systems.split(","))
        o_plan = _replace(o_plan, systems=tuple(x for x in wanted if x in overhead.FULL.systems))
        if s_plan:
            s_plan = _replace(s_plan, systems=tuple(x for x in wanted if x in scenarios.FULL.systems))
    if args.rounds:
        o_plan = _replace(o_plan, rounds=args.rounds)
        if s_plan:
            s_plan = _replace(s_plan, rounds=args.rounds)

    if args.pairs is not None:
        o_plan = _replace(o_plan, pairs=args.pairs)
    if args.pair_seconds:
        o_plan = _replace(o_plan, pair_duration=args.pair_seconds)

    # --full owns bench/results/; the quicker modes write beside it so they never overwrite it.
    out = args.out or (RESULTS if args.full else RESULTS / ("smoke" if args.smoke else "quick"))
    out.mkdir(parents=True, exist_ok=True)
    m = machine.describe()
    print(machine.render(m))
    print(f"Cores: load generator + upstream on CPU {gen_cpu}, system under test on CPU {sut_cpu} (taskset)")
    started = time.monotonic()
    o = s = None
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-") as tmp:
        tmp = Path(tmp)
        if not args.skip_overhead:
            print("\n== overhead ==")
            o = overhead.run(o_plan, tmp, _log)
        if s_plan is not None:
            print("\n== resilience scenarios ==")
            s = scenarios.run(s_plan, tmp, _log)

    m["load_after"] = os.getloadavg()[0]
    m.update(m_cores)
    print(f"load average at the end {m['load_after']:.2f} (anything above ~1 means other work shared the cores)")
    _write(o, s, m, out, "full" if args.full else "smoke" if args.smoke else "quick")
    print(f"\nresults in {out} ({time.monotonic() - started:.0f} s)")
    return 0


def _write(o, s, m: dict, out: Path, mode: str) -> int:
    gen_cpu, sut_cpu = m.get("gen_cpu", 0), m.get("sut_cpu", 1)
    md = [f"# Benchmark results ({mode})", "", machine.render(m), "",
          f"Cores: load generator + upstream on CPU {gen_cpu}, system under test alone on CPU {sut_cpu}.", ""]
    if o is not None:
        text = report.overhead_tables(o)
        print("\n" + text)
        (out / "overhead.md").write_text("\n".join(md) + "\n" + text + "\n")
    if s is not None:
        text = report.scenario_table(s)
        print("\n" + text)
        (out / "scenarios.md").write_text("\n".join(md) + "\n" + text + "\n")
    rows = report.targets(o, s)
    if rows:
        text = "### Targets\n\n" + report.table(["target", "measured", ""], rows)
        print("\n" + text)
        (out / "targets.md").write_text("\n".join(md) + "\n" + text + "\n")
    report.dump_json(o, s, m, out / "results.json")
    for png in report.plots(o, s, out):
        print(f"plot: {png}")
    return 0


def _replace(plan, **kw):
    import dataclasses
    return dataclasses.replace(plan, **kw)


def _log(msg: str) -> None:
    print(msg, flush=True)


if __name__ == "__main__":
    sys.exit(main())
