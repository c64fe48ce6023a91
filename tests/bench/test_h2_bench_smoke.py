"""The HTTP/2 benchmark runs end to end on a tiny load (no timing asserted: only that h2load got every
answer on all three paths, so nginx's grpc_pass and the sidecar's h2c upstream really carried them)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
def test_h2_bench_runs(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.h2_throughput", "--seconds", "1", "--clients", "2",
                           "--streams", "4", "--rate", "200", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=100, env={**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / "h2.json").read_text())["rows"]
    for path in ("direct", "nginx", "sidecar"):
        for run in (rows[path], rows[path]["paced"]):
            assert run["succeeded"] > 0 and run["failed"] == 0 and run["p50_ms"] > 0
    assert "| sidecar |" in (tmp_path / "h2.md").read_text()
