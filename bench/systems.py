"""Processes under test and around it: start pinned to a core, wait until they answer, measure, stop.

Core layout on a 2-core machine (`taskset`): core 0 runs the load generator, the upstream and the dummy
OTLP collector; core 1 runs only the system under test. Each process is started in its own session,
and stopped through that process group (never by name).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.configs import bare_env

LOADGEN_CPU = 0
SUT_CPU = 1
CLK_TCK = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parent.parent


def cpus() -> tuple[int, int]:
    """(load generator core, system-under-test core); one core machines share it."""
    n = len(os.sched_getaffinity(0))
    return (LOADGEN_CPU, SUT_CPU) if n >= 2 else (LOADGEN_CPU, LOADGEN_CPU)


_handed_out: set[int] = set()


def free_port() -> int:
    """A free loopback port, never one handed out before in this process (bind(0) may repeat one)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def wait_port(port: int, timeout: float = 15.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


@dataclass
class Proc:
    name: str
    cmd: list[str]
    port: int
    cpu: int | None
    logdir: Path
    ready_url: str | None = None
    env: dict | None = None
    popen: subprocess.Popen | None = None
    extra: dict = field(default_factory=dict)

    def start(self, timeout: float = 20.0) -> "Proc":
        cmd = list(self.cmd)
        if self.cpu is not None:
            cmd = ["taskset", "-c", str(self.cpu), *cmd]
        log = open(self.logdir / f"{self.name}.log", "ab")
        self.popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env or bare_env(),
                                      cwd=ROOT, start_new_session=True)
        log.close()
        try:
            wait_port(self.port, timeout, self.popen)
            if self.ready_url:
                deadline = time.monotonic() + timeout
                while http_get(self.ready_url)[0] != 200:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{self.name} not ready")
                    time.sleep(0.05)
        except BaseException:
            self.stop()                      # never leave a half-started process behind
            raise
        return self

    def pids(self) -> list[int]:
        if self.popen is None:
            return []
        kids = _children()
        out, todo = [], [self.popen.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo.extend(kids.get(pid, []))
        return out

    def cpu_seconds(self) -> float:
        total = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])
        return total / CLK_TCK

    def memory(self) -> dict:
        """RSS now and peak (VmHWM), summed over the process tree (nginx master + worker), in MiB."""
        rss = hwm = 0
        for pid in self.pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm += int(line.split()[1])
        return {"rss_mib": rss / 1024, "peak_mib": hwm / 1024}

    def stop(self) -> None:
        if self.popen is not None:
            stop_group(self.popen)


def spawn(args: list[str], cpu: int, **kwargs) -> subprocess.Popen:
    """A process (and its children: own session) pinned to `cpu`, stdout dropped, stderr kept."""
    return subprocess.Popen(["taskset", "-c", str(cpu), *args], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kwargs)


def stop_group(p: subprocess.Popen, wait: float = 5.0) -> None:
    """SIGTERM to the process group, SIGKILL if it is still there after `wait` seconds."""
    if p.poll() is not None:
        return
    try:
        os.killpg(p.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        p.wait(wait)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(wait)


def python_proc(name: str, module_args: list[str], port: int, cpu: int | None, logdir: Path, **kw) -> Proc:
    return Proc(name, [sys.executable, "-m", *module_args], port, cpu, logdir, **kw)


def sidecar_proc(name: str, policy: Path, port: int, admin: int, cpu: int | None, logdir: Path) -> Proc:
    exe = Path(sys.executable).with_name("sidecar")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "sidecar"]
    return Proc(name, [*cmd, "run", "-c", str(policy), "--log-level", "warning"], port, cpu, logdir,
                ready_url=f"http://127.0.0.1:{admin}/readyz", extra={"admin": admin})


def nginx_proc(name: str, conf: Path, port: int, cpu: int | None, logdir: Path) -> Proc:
    return Proc(name, ["nginx", "-c", str(conf), "-p", str(conf.parent)], port, cpu, logdir)


def haproxy_proc(name: str, conf: Path, port: int, cpu: int | None, logdir: Path) -> Proc:
    return Proc(name, ["haproxy", "-db", "-f", str(conf)], port, cpu, logdir)


def upstream_stats(control: int) -> dict:
    return json.loads(http_get(f"http://127.0.0.1:{control}/stats")[1])


def upstream_mode(control: int, role: str, **knobs) -> None:
    query = "&".join(f"{k}={v}" for k, v in knobs.items())
    status, body = http_get(f"http://127.0.0.1:{control}/mode?role={role}&{query}")
    if status != 200:
        raise RuntimeError(f"upstream control: {status} {body!r}")
