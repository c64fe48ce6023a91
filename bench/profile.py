"""Profile the sidecar under saturation: `python -m bench.profile [--seconds 10] [--path /small]`.

Starts the static nginx upstream and the sidecar (the overhead policy), drives it with wrk from core 0,
and records it with py-spy (`pip install py-spy`): a flame graph (or speedscope / raw collapsed stacks)
in bench/results/profile-sidecar.*. With uvloop the coroutine stacks are rooted at whichever coroutine
the loop resumed, so read self time rather than the tree.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from bench import configs
from bench.loadgen import wrk
from bench.systems import cpus, free_port, nginx_proc, sidecar_proc

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--path", default="/small")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--format", default="flamegraph", choices=["flamegraph", "speedscope", "raw"])
    p.add_argument("--endpoints", type=int, default=1, help="the upstream as this many endpoints")
    args = p.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists() and shutil.which(spy) is None:
        print("py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 1
    gen, sut = cpus()
    with tempfile.TemporaryDirectory(prefix="sidecar-profile-") as tmp:
        tmp = Path(tmp)
        up = free_port()
        upstream = nginx_proc("upstream", configs.upstream_nginx(tmp / "up", up), up, gen, tmp).start()
        port, admin, health = free_port(), free_port(), free_port()
        (tmp / "sc").mkdir()
        policy = configs.sidecar_overhead(tmp / "sc", "sidecar", port, admin, health, up,
                                          endpoints=args.endpoints)
        sidecar = sidecar_proc("sidecar", policy, port, admin, sut, tmp).start()
        try:
            url = f"http://127.0.0.1:{port}{args.path}"
            wrk(url, duration=2, cpu=gen)                      # warm-up
            RESULTS.mkdir(exist_ok=True)
            ext = {"flamegraph": "svg", "speedscope": "json", "raw": "txt"}[args.format]
            out = RESULTS / f"profile-sidecar{'-%dep' % args.endpoints if args.endpoints > 1 else ''}.{ext}"
            result = {}
            t = threading.Thread(target=lambda: result.update(wrk(url, duration=args.seconds + 1, cpu=gen)))
            t.start()
            subprocess.run([spy, "record", "-p", str(sidecar.popen.pid), "-d", str(args.seconds), "-r",
                            str(args.rate), "-f", args.format, "-o", str(out), "--nonblocking"],
                           check=False, capture_output=True)
            t.join()
            print(f"{result.get('rps', 0):.0f} req/s under py-spy; profile: {out}")
        finally:
            sidecar.stop()
            upstream.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
