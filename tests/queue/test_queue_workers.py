"""`--workers N` is refused when any route queues writes, `defaults` included (one delivery loop per
state_dir): before, a queue set only in `defaults` slipped past the check and every worker delivered."""
import os
import signal
import subprocess
import sys
import textwrap

from harness import free_port


def test_workers_refused_when_only_defaults_queue_writes(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent(f"""
        version: 1
        listeners:
          - {{name: egress, mode: proxy, port: {free_port()}}}
        admin: {{port: {free_port()}}}
        health: {{bind: 127.0.0.1, port: {free_port()}}}
        defaults:
          queue: {{when: [breaker-open]}}
        routes: []
        state_dir: {tmp_path / "state"}
        """))
    proc = subprocess.Popen([sys.executable, "-m", "sidecar", "run", "-c", str(path), "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=30)   # a hang guard: refused, it exits at once
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)     # the workers it forked too
        out, _ = proc.communicate()
        raise AssertionError(f"--workers 2 started with a queue in defaults:\n{out}") from None
    assert proc.returncode == 1, out
    assert "--workers > 1 is not supported with state_dir store-and-forward queues" in out
