"""The LLM streaming benchmark runs end to end on a tiny load (no timing asserted: both paths streamed
whole completions, and the sidecar counted exactly the tokens the upstream reported)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
def test_llm_bench_runs(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.llm_stream", "--seconds", "0.5", "--concurrency", "2",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads((tmp_path / "llm.json").read_text())
    for workload in ("paced", "flood"):
        for path in ("direct", "sidecar"):
            row = doc["workloads"][workload][path]
            assert row["completions"] > 0 and row["errors"] == 0 and row["first_chunk_ms"]["p50"] is not None
    assert doc["tokens"]["counted_by_sidecar"] == doc["tokens"]["reported"] > 0
    assert "| sidecar |" in (tmp_path / "llm.md").read_text()
