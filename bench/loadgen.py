"""Load generators: `wrk` for saturation, and an open-loop fixed-rate generator for latency.

Debian ships `wrk` but not `wrk2`, so fixed-rate latency comes from `open_loop` below, built the way
wrk2 is:
  * open loop: request i is due at t0 + i/rate whatever happened to earlier requests;
  * latency is measured from that scheduled time, not from when it was written, so a stalled system
    is charged for the requests that queued behind the stall (no coordinated omission);
  * keep-alive connections are opened before the clock starts; a due request with no idle connection
    waits for one (or a new one is dialled, up to `max_conns`), and that wait counts as latency;
  * scheduling uses a Linux timerfd (hrtimer, microsecond precision) through ctypes, because asyncio
    and libuv timers have millisecond granularity -- a 1 ms tick would add ~0.5 ms to every p50;
  * responses are parsed with bytes.find (Content-Length or chunked), no HTTP library in the way.
`lag` (send time minus scheduled time) is reported as the generator's own floor: the direct-call row
carries the same floor, which is why overheads are quoted as differences to it.
"""
from __future__ import annotations

import asyncio
import collections
import ctypes
import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field

CLOCK_MONOTONIC = 1
TFD_NONBLOCK = 0o4000
TFD_CLOEXEC = 0o2000000
TFD_TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class TimerFd:
    """An absolute CLOCK_MONOTONIC one-shot timer the event loop can watch (same clock as
    time.monotonic_ns)."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create")
        self._spec = _Itimerspec()

    def arm(self, at_ns: int) -> None:
        at_ns = max(at_ns, 1)
        self._spec.it_value.tv_sec, self._spec.it_value.tv_nsec = divmod(at_ns, 1_000_000_000)
        if self._libc.timerfd_settime(self.fd, TFD_TIMER_ABSTIME, ctypes.byref(self._spec), None) != 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime")

    def clear(self) -> None:
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class Result:
    rate: float
    duration: float
    sent: int = 0
    done: int = 0
    errors: int = 0                        # connection errors and requests unanswered at the end
    statuses: collections.Counter = field(default_factory=collections.Counter)
    headers_seen: collections.Counter = field(default_factory=collections.Counter)
    latencies_ns: list[int] = field(default_factory=list)
    lags_ns: list[int] = field(default_factory=list)
    elapsed: float = 0.0

    def percentile(self, q: float, values: list[int] | None = None) -> float | None:
        """Milliseconds; nearest-rank on the sorted sample."""
        data = self.latencies_ns if values is None else values
        if not data:
            return None
        data = sorted(data) if values is not None else data
        idx = min(len(data) - 1, max(0, int(round(q / 100 * len(data) + 0.5)) - 1))
        return data[idx] / 1e6

    def finish(self) -> None:
        self.latencies_ns.sort()
        self.lags_ns.sort()

    @property
    def ok(self) -> int:
        return sum(n for s, n in self.statuses.items() if 200 <= s < 300)

    def summary(self) -> dict:
        return {"rate": self.rate, "sent": self.sent, "done": self.done, "errors": self.errors,
                "ok": self.ok, "achieved": self.done / self.elapsed if self.elapsed else 0.0,
                "p50": self.percentile(50), "p90": self.percentile(90), "p99": self.percentile(99),
                "p999": self.percentile(99.9), "max": self.latencies_ns[-1] / 1e6 if self.latencies_ns else None,
                "lag_p50": self.percentile(50, self.lags_ns), "lag_p99": self.percentile(99, self.lags_ns),
                "statuses": dict(self.statuses)}


class _Conn(asyncio.Protocol):
    """One keep-alive connection: one request at a time, responses parsed incrementally."""

    __slots__ = ("gen", "transport", "buf", "sched", "head_len", "body_len", "chunked", "status",
                 "close_after", "busy", "watch")

    def __init__(self, gen: "_OpenLoop") -> None:
        self.gen = gen
        self.transport = None
        self.buf = bytearray()
        self.busy = False
        self.sched = 0
        self.watch = gen.watch_header
        self._reset()

    def _reset(self) -> None:
        self.head_len = -1
        self.body_len = -1
        self.chunked = False
        self.status = 0
        self.close_after = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, request: bytes, sched: int) -> None:
        self.busy = True
        self.sched = sched
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if self.head_len < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head_len = end + 4
            head = bytes(buf[:end]).lower()
            self.status = int(head[9:12])
            m = re.search(rb"\r\ncontent-length:\s*(\d+)", head)
            if m:
                self.body_len = int(m.group(1))
            elif b"\r\ntransfer-encoding: chunked" in head:
                self.chunked = True
            else:
                self.body_len = 0
            self.close_after = b"\r\nconnection: close" in head or head.startswith(b"http/1.0")
            if self.watch is not None:
                m = re.search(rb"\r\n" + self.watch + rb":\s*([^\r]*)", head)
                self.gen.result.headers_seen[m.group(1).decode() if m else ""] += 1
        if self.chunked:
            if not self._chunked_complete():
                return
            consumed = len(buf)
        else:
            consumed = self.head_len + self.body_len
            if len(buf) < consumed:
                return
        now = time.monotonic_ns()
        status = self.status
        del buf[:consumed]
        self._reset()
        self.busy = False
        self.gen.completed(self, status, now - self.sched)
        if self.close_after:
            self.transport.close()

    def _chunked_complete(self) -> bool:
        buf = self.buf
        pos = self.head_len
        while True:
            nl = buf.find(b"\r\n", pos)
            if nl < 0:
                return False
            size = int(bytes(buf[pos:nl]).split(b";")[0], 16)
            if size == 0:
                return buf.find(b"\r\n\r\n", nl) >= 0 or buf.endswith(b"0\r\n\r\n")
            pos = nl + 2 + size + 2
            if pos > len(buf):
                return False

    def connection_lost(self, exc) -> None:
        self.gen.lost(self)


class _OpenLoop:
    def __init__(self, host: str, port: int, requests: list[bytes], rate: float, duration: float,
                 conns: int, max_conns: int, drain: float, watch_header: str | None) -> None:
        self.host, self.port = host, port
        self.requests = requests
        self.rate = rate
        self.total = max(1, int(rate * duration))
        self.conns = conns
        self.max_conns = max_conns
        self.drain = drain
        self.watch_header = watch_header.lower().encode() if watch_header else None
        self.result = Result(rate=rate, duration=duration)
        self.idle: list[_Conn] = []
        self.open = 0
        self.dialling = 0
        self.backlog: collections.deque[tuple[int, int]] = collections.deque()
        self.in_flight = 0
        self.next_i = 0
        self.t0 = 0
        self.interval = int(1e9 / rate)
        self.all_done: asyncio.Future | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def _dial(self) -> None:
        self.dialling += 1
        try:
            _, conn = await self.loop.create_connection(lambda: _Conn(self), self.host, self.port)
        except OSError:
            self.dialling -= 1
            self.result.errors += 1
            if self.backlog:
                self.backlog.popleft()
                self.in_flight -= 1
                self._check_done()
            return
        self.dialling -= 1
        self.open += 1
        self._free(conn)

    def _free(self, conn: _Conn) -> None:
        if self.backlog:
            i, sched = self.backlog.popleft()
            self.result.lags_ns.append(time.monotonic_ns() - sched)
            conn.send(self.requests[i % len(self.requests)], sched)
        else:
            self.idle.append(conn)

    def completed(self, conn: _Conn, status: int, latency: int) -> None:
        r = self.result
        r.done += 1
        r.statuses[status] += 1
        r.latencies_ns.append(latency)
        self.in_flight -= 1
        if not conn.close_after:
            self._free(conn)
        self._check_done()

    def lost(self, conn: _Conn) -> None:
        self.open -= 1
        if conn in self.idle:
            self.idle.remove(conn)
        if conn.busy:
            conn.busy = False
            self.result.errors += 1
            self.in_flight -= 1
            self._check_done()
        if self.backlog and self.open + self.dialling < self.max_conns:
            self.loop.create_task(self._dial())

    def _check_done(self) -> None:
        if self.next_i >= self.total and self.in_flight <= 0 and self.all_done and not self.all_done.done():
            self.all_done.set_result(None)

    def _tick(self, timer: TimerFd) -> None:
        timer.clear()
        now = time.monotonic_ns()
        while self.next_i < self.total:
            sched = self.t0 + self.next_i * self.interval
            if sched > now:
                timer.arm(sched)
                return
            i = self.next_i
            self.next_i += 1
            self.result.sent += 1
            self.in_flight += 1
            if self.idle:
                self.result.lags_ns.append(now - sched)
                self.idle.pop().send(self.requests[i % len(self.requests)], sched)
            else:
                self.backlog.append((i, sched))
                if self.open + self.dialling < self.max_conns:
                    self.loop.create_task(self._dial())
        self.loop.remove_reader(timer.fd)
        self._check_done()

    async def run(self) -> Result:
        self.loop = asyncio.get_running_loop()
        self.all_done = self.loop.create_future()
        await asyncio.gather(*(self._dial() for _ in range(self.conns)))
        self.result.errors = 0                 # a refused pre-dial is not a request error
        timer = TimerFd()
        self.t0 = time.monotonic_ns() + 1_000_000
        start = time.monotonic()
        self.loop.add_reader(timer.fd, self._tick, timer)
        timer.arm(self.t0)
        try:
            await asyncio.wait_for(asyncio.shield(self.all_done), self.total / self.rate + self.drain)
        except asyncio.TimeoutError:
            self.result.errors += self.in_flight   # unanswered when the run ended: failures
        finally:
            self.loop.remove_reader(timer.fd)
            timer.close()
        self.result.elapsed = time.monotonic() - start
        for conn in self.idle:
            conn.transport.close()
        self.result.finish()
        return self.result


def request_bytes(host: str, port: int, path: str, method: str = "GET", headers: dict | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def open_loop(host: str, port: int, paths: list[str], rate: float, duration: float, *,
                    conns: int = 32, max_conns: int = 512, drain: float = 5.0,
                    watch_header: str | None = None) -> Result:
    """Send `rate` requests/s for `duration` s, cycling over `paths`; see the module docstring."""
    reqs = [request_bytes(host, port, p) for p in paths]
    gen = _OpenLoop(host, port, reqs, rate, duration, conns, max_conns, drain, watch_header)
    return await gen.run()


# --- wrk (saturation) ------------------------------------------------------------------------------

def _wrk_seconds(value: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)", value)
    if not m:
        return float("nan")
    return float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[m.group(2)]


def wrk(url: str, *, duration: float, conns: int = 64, threads: int = 1, cpu: int | None = 0) -> dict:
    """Closed-loop saturation with `wrk`: requests/s, latency percentiles, errors."""
    exe = shutil.which("wrk")
    if exe is None:
        raise FileNotFoundError("wrk is not installed (bench/install.sh installs it)")
    cmd = [exe, f"-t{threads}", f"-c{conns}", f"-d{max(1, round(duration))}s", "--latency", url]
    if cpu is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(cpu), *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30).stdout
    res: dict = {"rps": 0.0, "non2xx": 0, "errors": 0, "raw": out}
    m = re.search(r"Requests/sec:\s*([\d.]+)", out)
    if m:
        res["rps"] = float(m.group(1))
    m = re.search(r"(\d+) requests in", out)
    res["requests"] = int(m.group(1)) if m else 0
    m = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    if m:
        res["non2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        res["errors"] = sum(int(x) for x in m.groups())
    for q in ("50", "99"):
        m = re.search(rf"\s{q}(?:\.000)?%\s+(\S+)", out)
        if m:
            res[f"p{q}"] = _wrk_seconds(m.group(1)) * 1000
    return res
