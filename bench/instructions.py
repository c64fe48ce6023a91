"""Instructions per request, counted: `python -m bench.instructions [--requests 2000] [--systems ...]`.

Wall-clock throughput on a shared VM drifts by ±10-50 % between two runs a minute apart (other guests
take the CPU: watch the steal column of /proc/stat), so a 3 % change in what the sidecar does per
request cannot be seen there without dozens of pairs. The number of instructions it executes can:
each system runs under valgrind's callgrind with counting off, is warmed up with 400 requests, then
counts while h2load sends exactly `--requests` small requests over 8 keep-alive connections. Two runs
of the same tree agree to ~0.2 %.

What it counts is user-space work only (the interpreter, aiohttp's C parser, uvloop); the kernel's
share of a request (the socket calls) is not in it, so a ratio here is not a throughput ratio. Use it
to compare two trees, or one change, before measuring throughput in pairs (`python -m bench --pairs`).

Systems: `sidecar` (the full-policy route, one endpoint), `sidecar-3ep` (the same with a
three-endpoint upstream), `aiohttp` (the bare aiohttp proxy, bench/passthrough.py), `sidecar-h2` (the
full-policy route over HTTP/2: h2load speaks h2c to the reverse listener, 4 connections with 16
streams each, and the sidecar h2c to an nginx upstream; not in the default list). The sidecar's code
is this tree's (run from it, or put another tree first on PYTHONPATH). Needs valgrind and h2load
(Debian's `valgrind`, `nghttp2-client`).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import configs
from bench.systems import Proc, free_port, nginx_proc

WARM_UP = 400
CONNECTIONS = 8


def count(system: str, requests: int, tmp: Path, upstream: int) -> float:
    """Instructions per request of `system`, counted over `requests` requests after a warm-up."""
    h2 = system == "sidecar-h2"
    port, admin, health = free_port(), free_port(), free_port()
    out = tmp / f"callgrind.{system}"
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    ready = None
    if system == "aiohttp":
        cmd = [*valgrind, sys.executable, "-m", "bench.passthrough", str(port), str(upstream)]
    else:
        (tmp / system).mkdir()
        policy = configs.sidecar_overhead(tmp / system, system, port, admin, health, upstream,
                                          endpoints=3 if system == "sidecar-3ep" else 1, cache=not h2,
                                          protocol="h2c" if h2 else "auto")
        # -P: the code on PYTHONPATH (or installed), not whatever the working directory holds
        cmd = [*valgrind, sys.executable, "-P", "-m", "sidecar", "run", "-c", str(policy), "--log-level", "warning"]
        ready = f"http://127.0.0.1:{admin}/readyz"
    env = {**configs.bare_env(), "PYTHONHASHSEED": "0"}
    proc = Proc(system, cmd, port, None, tmp, ready_url=ready, env=env).start(timeout=300)
    try:
        url = f"http://127.0.0.1:{port}/small"
        _h2load(url, WARM_UP, h2)
        pid = str(proc.popen.pid)
        subprocess.run(["callgrind_control", "-i", "on", pid], capture_output=True, check=True)
        _h2load(url, requests, h2)
        subprocess.run(["callgrind_control", "-i", "off", pid], capture_output=True, check=True)
    finally:
        proc.stop()
    total = 0
    for dump in tmp.glob(f"callgrind.{system}*"):
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith(("summary:", "totals:")):
                total = max(total, int(line.split()[1]))
    if not total:
        raise RuntimeError(f"{system}: callgrind wrote no totals (see {tmp})")
    return total / requests


def _h2load(url: str, n: int, h2: bool = False) -> None:
    how = ["-c", "4", "-m", "16"] if h2 else ["--h1", "-c", str(CONNECTIONS)]
    done = subprocess.run(["h2load", *how, "-n", str(n), url], capture_output=True, text=True, check=True)
    ok = re.search(r"(\d+) succeeded", done.stdout)
    if ok is None or int(ok.group(1)) != n:
        raise RuntimeError(f"h2load: not every request succeeded:\n{done.stdout}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--systems", default="aiohttp,sidecar,sidecar-3ep")
    args = p.parse_args()
    missing = [tool for tool in ("valgrind", "callgrind_control", "h2load", "nginx")
               if shutil.which(tool) is None and shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin") is None]
    if missing:
        print(f"needs {', '.join(missing)} (apt-get install valgrind nghttp2-client nginx)", file=sys.stderr)
        return 1
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in ("aiohttp", "sidecar", "sidecar-3ep", "sidecar-h2")]
    if unknown:
        print(f"unknown system(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="sidecar-instructions-") as tmp_name:
        tmp = Path(tmp_name)
        up, up_h2 = free_port(), free_port()
        upstream = nginx_proc("upstream", configs.upstream_nginx(tmp / "up", up), up, None, tmp).start()
        upstream_h2 = None
        try:
            if "sidecar-h2" in systems:          # an h2c upstream (nginx `listen ... http2`)
                upstream_h2 = nginx_proc("upstream-h2", configs.upstream_nginx(tmp / "up-h2", up_h2, http2=True),
                                         up_h2, None, tmp).start()
            counted = {system: count(system, args.requests, tmp, up_h2 if system == "sidecar-h2" else up)
                       for system in systems}
        finally:
            upstream.stop()
            if upstream_h2 is not None:
                upstream_h2.stop()
    base = counted.get("aiohttp")
    print(f"instructions per request ({args.requests} requests, {CONNECTIONS} connections, user space only)")
    for system, n in counted.items():
        ratio = f"  {n / base:.3f}x the bare aiohttp proxy" if base and system != "aiohttp" else ""
        print(f"  {system:12} {n:>10,.0f}{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
