"""What the numbers came from: CPU, cores, kernel, and the versions of everything measured."""
from __future__ import annotations

import os
import platform
import re
import subprocess


def _cmd(args: list[str]) -> str:
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    return (p.stdout + p.stderr).strip().splitlines()[0] if (p.stdout + p.stderr).strip() else "?"


def describe() -> dict:
    cpu = "?"
    try:
        m = re.search(r"model name\s*:\s*(.*)", open("/proc/cpuinfo").read())
        cpu = m.group(1).strip() if m else "?"
    except OSError:
        pass
    import aiohttp
    try:
        import uvloop
        uv = uvloop.__version__
    except ImportError:
        uv = "-"
    mem = "?"
    try:
        kb = int(re.search(r"MemTotal:\s*(\d+)", open("/proc/meminfo").read()).group(1))
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, AttributeError):
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory": mem, "kernel": platform.release(),
        "python": platform.python_version(), "aiohttp": aiohttp.__version__, "uvloop": uv,
        "nginx": _cmd(["nginx", "-v"]).replace("nginx version: ", ""),
        "haproxy": _cmd(["haproxy", "-v"]).split(" - ")[0].replace("HAProxy version ", ""),
        "wrk": _cmd(["wrk", "-v"]).split(" Copyright")[0],
        "load_before": os.getloadavg()[0],
    }


def render(m: dict) -> str:
    return (f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory']}, Linux {m['kernel']}; "
            f"Python {m['python']}, aiohttp {m['aiohttp']}, uvloop {m['uvloop']}, nginx {m['nginx']}, "
            f"HAProxy {m['haproxy']}, {m['wrk']}; load average at start {m['load_before']:.2f}")
