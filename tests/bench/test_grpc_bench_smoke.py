"""The gRPC benchmark runs end to end on a tiny load (no timing asserted: only that both paths answered)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
def test_grpc_bench_runs(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.grpc_unary", "--seconds", "0.5", "--concurrency", "2",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads((tmp_path / "grpc.json").read_text())
    for path in ("direct", "sidecar"):
        assert doc[path]["calls"] > 0 and doc[path]["errors"] == 0 and doc[path]["p50_ms"] is not None
    assert "| sidecar |" in (tmp_path / "grpc.md").read_text()
