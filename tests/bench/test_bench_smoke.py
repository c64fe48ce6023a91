"""The benchmark harness runs end to end on a tiny load, so it cannot rot. No timing is asserted:
only that every stage produced numbers in the expected shape (nginx and HAProxy rows when installed)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.skipif(shutil.which("wrk") is None and not Path("/usr/bin/wrk").exists(),
                       reason="wrk is not installed (bench/install.sh)"),
    pytest.mark.skipif(shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
                       reason="the static upstream needs nginx (bench/install.sh)"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="timerfd and taskset are Linux only"),
]


@pytest.mark.timeout(240)
def test_smoke_run_produces_tables_and_json(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin"}
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "Overhead, side by side" in out and "Resilience outcomes" in out

    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["machine"]["cpu"]
    sat, rate = doc["overhead"]["sat"]["small"], doc["overhead"]["rate"]["200:small"]
    expected = ["direct", "sidecar", "sidecar+otlp", "aiohttp"] + [s for s in ("nginx", "haproxy") if shutil.which(s)
                                                   or Path(f"/usr/sbin/{s}").exists()]
    for system in expected:
        assert system in sat, f"no saturation row for {system}: {doc['overhead'].get('skipped')}"
        assert sat[system][0]["rps"] > 0
        assert system in rate
        row = rate[system][0]
        assert row["sent"] > 0 and row["ok"] == row["sent"] and row["p50"] is not None

    pairs = doc["overhead"]["pairs"]
    assert set(pairs) == {"sidecar/sidecar+otlp", "aiohttp/sidecar"}      # smoke runs no 3-endpoint sidecar
    for name, (pair,) in pairs.items():
        a, b = name.split("/")
        assert pair["first"] == a and pair[a]["rps"] > 0 and pair[b]["rps"] > 0

    runs = doc["scenarios"]["runs"]
    for scenario in ("healthy", "flaky"):
        for system in ("direct", "sidecar"):
            (run,) = runs[scenario][system]
            assert run["sent"] > 0 and 0.0 <= run["success"] <= 1.0 and run["amp"] >= 0.0
    assert runs["healthy"]["sidecar"][0]["success"] == 1.0

    overhead_md = (tmp_path / "overhead.md").read_text()
    for label in ("direct call", "sidecar (full policy)", "bare aiohttp proxy", "sidecar, tracing 5% exported",
                  "Back-to-back pairs"):
        assert label in overhead_md
    assert (tmp_path / "scenarios.md").exists() and (tmp_path / "targets.md").exists()
