"""Soak: a real sidecar process under a fixed request rate for N minutes, with faults upstream.

    python -m bench.soak [--minutes 10] [--rate 40] [--seed 1]        (`make soak`; not in CI)
    python -m bench.soak --fleet ...   two sidecars, one Redis, pod deaths (`make soak-fleet`; soak_fleet.py)

On loopback only. The sidecar runs as `python -m sidecar run` in front of an upstream that this script
serves and breaks on purpose:
  - per request: 503s, resets before the answer, resets mid-body, delays past the per-try timeout;
  - a restart of the upstream (down for a few seconds) at 35% and 75% of the run;
  - a policy reload every minute (the file rewritten, then POST /reload; a third of a short run);
  - a `kill -9` of the sidecar at 55% of the run, then a restart on the same state_dir.
Reads go through retry, breaker and a static fallback; writes (POST /orders) through retry and the
store-and-forward queue, so a write answered 202 must reach the upstream even across the kill -9.

It checks, and exits non-zero when one fails: every request got an answer (those cut by the kill -9
itself are counted apart), no queued write was lost, and neither RSS nor open descriptors grew. It
prints requests sent/answered, answers by class, and RSS and fds at the start and end of each sidecar
process's life. Self-contained: the standard library, aiohttp and the sidecar package only.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from bench.systems import free_port

MiB = 1024 * 1024
RSS_GROWTH_LIMIT = 48 * MiB
FD_GROWTH_LIMIT = 24
CLIENT_TIMEOUT = 12.0                    # beyond the longest route timeout: past it a request "hung"


def proc_stats(pid: int) -> dict:
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    return {"rss": rss, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


# -- the faulty upstream -----------------------------------------------------------------------------
class FaultyUpstream:
    def __init__(self, port: int, rng: random.Random) -> None:
        self.port = port
        self.rng = rng
        self.delivered: set[str] = set()           # order ids of writes the upstream took
        self.faults = collections.Counter()
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        roll = self.rng.random()
        if roll < 0.08:
            self.faults["503"] += 1
            return web.json_response({"error": "overloaded"}, status=503)
        if roll < 0.12:
            self.faults["reset-before-answer"] += 1
            request.transport.abort()
            return web.Response()
        if roll < 0.16:
            self.faults["delay"] += 1
            await asyncio.sleep(self.rng.uniform(0.3, 1.5))
        if request.method == "POST":
            order = json.loads(body)["id"]
            self.delivered.add(order)
            return web.json_response({"stored": order})
        if roll < 0.19:
            self.faults["reset-mid-body"] += 1
            resp = web.StreamResponse(headers={"content-length": "65536"})
            await resp.prepare(request)
            await resp.write(b"x" * 4096)
            request.transport.abort()
            return resp
        return web.Response(body=b"y" * self.rng.choice((16, 1024, 32 * 1024)))

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.2)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


# -- the sidecar process -------------------------------------------------------------------------------
POLICY = """\
version: 1
listeners:
  - {{name: api, mode: reverse, port: {api}, upstream: flaky}}
  - {{name: egress, mode: proxy, port: {egress}}}
admin: {{bind: 127.0.0.1, port: {admin}}}
health: {{bind: 127.0.0.1, port: {health}}}
state_dir: {state}
upstreams:
  flaky: {{url: "http://127.0.0.1:{upstream}", connect_timeout: 500ms}}
defaults: {{timeout: 5s}}
routes:
  - name: writes
    match: {{path_prefix: /orders, methods: [POST]}}
    upstream: flaky
    timeout: 3s
    retry: {{max_retries: 1, methods: [POST], when: [connect-failure, reset, 503], backoff: {{base: 20ms, max: 100ms}}}}
    breaker: {{consecutive_failures: 5, open_for: 2s}}
    queue: {{when: [breaker-open, retries-exhausted], max_items: 100000, max_age: 1h}}
  - name: reads
    match: {{path_prefix: /}}
    upstream: flaky
    timeout: {read_timeout}
    per_try_timeout: 800ms
    retry: {{max_retries: 2, when: [connect-failure, reset, timeout, 502, 503, 504], backoff: {{base: 20ms, max: 200ms}}}}
    breaker: {{consecutive_failures: 10, open_for: 2s}}
    fallback:
      when: [breaker-open, retries-exhausted, timeout, 5xx]
      targets: [{{static: {{status: 200, json: {{degraded: true}}}}}}]
"""


class Sidecar:
    def __init__(self, workdir: Path, ports: dict) -> None:
        self.workdir = workdir
        self.ports = ports
        self.policy = workdir / "policy.yaml"
        self.log = open(workdir / "sidecar.log", "ab")
        self.proc: subprocess.Popen | None = None
        self.generation = 0

    def write_policy(self, read_timeout: str) -> None:
        tmp = self.policy.with_suffix(".tmp")
        tmp.write_text(POLICY.format(read_timeout=read_timeout, state=self.workdir / "state", **self.ports))
        os.replace(tmp, self.policy)

    async def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "sidecar", "run", "-c", str(self.policy)],
                                     stdout=self.log, stderr=self.log)
        self.generation += 1
        async with aiohttp.ClientSession() as s:
            for _ in range(200):
                await asyncio.sleep(0.05)
                try:
                    async with s.get(f"http://127.0.0.1:{self.ports['admin']}/readyz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    continue
        raise RuntimeError(f"the sidecar did not become ready; see {self.workdir / 'sidecar.log'}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(25)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()

    def stats(self) -> dict:
        return proc_stats(self.proc.pid)


# -- load -----------------------------------------------------------------------------------------------
class Tally:
    def __init__(self) -> None:
        self.sent = 0
        self.answered = 0
        self.classes = collections.Counter()
        self.decisions = collections.Counter()
        self.unanswered = collections.Counter()    # client-side failures outside the kill window
        self.cut_by_kill = 0
        self.queued: set[str] = set()              # order ids answered 202
        self.stored: set[str] = set()              # order ids answered 200 by the upstream itself


async def one_request(session: aiohttp.ClientSession, base: str, tally: Tally, rng: random.Random,
                      kill_window: list[bool], seq: int) -> None:
    write = rng.random() < 0.25
    order = f"o{seq}"
    tally.sent += 1
    try:
        if write:
            ctx = session.post(f"{base}/orders", json={"id": order})
        else:
            ctx = session.get(f"{base}/items/{seq % 50}")
        async with ctx as r:
            tally.answered += 1                    # the status line is the answer
            try:
                await r.read()
                cut = ""
            except aiohttp.ClientPayloadError:     # the upstream reset after the first byte: by design,
                cut = " cut mid-body"              # the app sees the cut (no retry after the first byte)
            degraded = r.headers.get("x-sidecar-degraded", "")
            for decision in filter(None, degraded.split(",")):
                tally.decisions[decision] += 1
            kind = "write" if write else "read"
            if r.status == 202:
                tally.queued.add(order)
                tally.classes[f"{kind} 202 queued"] += 1
            elif write and r.status == 200:
                tally.stored.add(order)
                tally.classes[f"{kind} 200"] += 1
            else:
                tally.classes[f"{kind} {r.status}{' degraded' if degraded else ''}{cut}"] += 1
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        if kill_window[0]:
            tally.cut_by_kill += 1
        else:
            tally.unanswered[type(exc).__name__] += 1


async def soak(minutes: float, rate: float, seed: int) -> int:
    rng = random.Random(seed)
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-soak-"))
    ports = {name: free_port() for name in ("api", "egress", "admin", "health", "upstream")}
    upstream = FaultyUpstream(ports["upstream"], random.Random(seed + 1))
    await upstream.start()
    sidecar = Sidecar(workdir, ports)
    sidecar.write_policy("2s")
    await sidecar.start()
    tally = Tally()
    lives: list[dict] = []
    kill_window = [False]
    reloads = {"ok": 0, "failed": 0}
    duration = minutes * 60
    base = f"http://127.0.0.1:{ports['api']}"
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
    connector = aiohttp.TCPConnector(limit=400)
    print(f"soak: {minutes:g} min at {rate:g} req/s; work dir {workdir}", flush=True)

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        async def warm() -> dict:
            for i in range(50):
                await one_request(session, base, Tally(), rng, kill_window, -1 - i)
            await asyncio.sleep(1)
            return sidecar.stats()

        life = {"start": await warm()}
        started = time.monotonic()
        every = min(60.0, duration / 3)            # a reload a minute (more often in a short run)
        events = sorted([(0.35 * duration, "restart-upstream"), (0.75 * duration, "restart-upstream"),
                         (0.55 * duration, "kill-9")] +
                        [(t * every, "reload") for t in range(1, int(duration / every) + 1) if t * every < duration])
        tasks: set[asyncio.Task] = set()
        seq = 0
        next_report = 30.0

        async def run_event(kind: str) -> None:
            nonlocal life
            if kind == "restart-upstream":
                print(f"  {time.monotonic() - started:6.1f}s upstream restart (down 3s)", flush=True)
                await upstream.stop()
                await asyncio.sleep(3)
                await upstream.start()
            elif kind == "reload":
                sidecar.write_policy(rng.choice(["2s", "2500ms", "1800ms"]))
                try:
                    async with session.post(f"http://127.0.0.1:{ports['admin']}/reload") as r:
                        reloads["ok" if r.status == 200 else "failed"] += 1
                except aiohttp.ClientError:
                    reloads["failed"] += 1
            elif kind == "kill-9":
                life["end"] = sidecar.stats()
                lives.append(life)
                print(f"  {time.monotonic() - started:6.1f}s kill -9 of the sidecar, restart", flush=True)
                kill_window[0] = True
                sidecar.kill9()
                await asyncio.sleep(0.5)
                await sidecar.start()
                await asyncio.sleep(1)           # in-flight requests of the dead process are settled
                kill_window[0] = False
                life = {"start": await warm()}

        event_task: asyncio.Task | None = None
        while (now := time.monotonic() - started) < duration:
            if events and now >= events[0][0] and (event_task is None or event_task.done()):
                event_task = asyncio.ensure_future(run_event(events.pop(0)[1]))
            if not kill_window[0] or (event_task is not None and event_task.done()):
                seq += 1
                task = asyncio.ensure_future(one_request(session, base, tally, rng, kill_window, seq))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if now >= next_report:
                next_report += 30
                print(f"  {now:6.1f}s sent {tally.sent} answered {tally.answered} in flight {len(tasks)}",
                      flush=True)
            await asyncio.sleep(1 / rate)
        if event_task is not None:
            await event_task
        await asyncio.gather(*tasks, return_exceptions=True)
        # Let the queue drain: every 202 must reach the upstream.
        drained = False
        for _ in range(120):
            async with session.get(f"http://127.0.0.1:{ports['admin']}/status") as r:
                depth = ((await r.json()).get("queue") or {}).get("depth", 0)
            if depth == 0 and tally.queued <= upstream.delivered:
                drained = True
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(1)
        life["end"] = sidecar.stats()
        lives.append(life)

    sidecar.stop()
    await upstream.stop()
    lost = tally.queued - upstream.delivered
    stored_lost = tally.stored - upstream.delivered

    print("\n== soak results ==")
    print(f"requests sent {tally.sent}, answered {tally.answered}, cut by the kill -9 {tally.cut_by_kill}, "
          f"unanswered otherwise {sum(tally.unanswered.values())} {dict(tally.unanswered) or ''}")
    print("answers by class:")
    for name, count in sorted(tally.classes.items()):
        print(f"  {name:28s} {count}")
    print("degradation decisions seen by the app:")
    for name, count in tally.decisions.most_common():
        print(f"  {name:28s} {count}")
    print(f"upstream faults injected: {dict(upstream.faults)}")
    print(f"policy reloads: {reloads}")
    print(f"queued writes: {len(tally.queued)} answered 202, delivered {len(tally.queued & upstream.delivered)}, "
          f"lost {len(lost)}; queue drained: {drained}")
    ok = True
    for i, life in enumerate(lives, 1):
        s, e = life["start"], life["end"]
        print(f"sidecar process {i}: RSS {s['rss'] / MiB:.1f} -> {e['rss'] / MiB:.1f} MiB, "
              f"open fds {s['fds']} -> {e['fds']}")
        if e["rss"] - s["rss"] > RSS_GROWTH_LIMIT or e["fds"] - s["fds"] > FD_GROWTH_LIMIT:
            ok = False
    log_text = (workdir / "sidecar.log").read_text(errors="replace")
    tracebacks = log_text.count("Traceback")
    print(f"sidecar log: {workdir / 'sidecar.log'} ({tracebacks} tracebacks)")
    failures = []
    if sum(tally.unanswered.values()):
        failures.append("requests without an answer")
    if lost or stored_lost:
        failures.append(f"{len(lost) + len(stored_lost)} acknowledged writes lost")
    if not ok:
        failures.append("RSS or descriptor growth")
    if tracebacks:
        failures.append("tracebacks in the sidecar log")
    print("PASS" if not failures else "FAIL: " + "; ".join(failures))
    return 0 if not failures else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to run (default 10)")
    parser.add_argument("--rate", type=float, default=40.0, help="requests per second (default 40)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fleet", action="store_true",
                        help="two sidecars, one Redis, pod-style deaths (bench/soak_fleet.py)")
    args = parser.parse_args(argv)
    if args.fleet:
        from bench.soak_fleet import fleet_soak
        return asyncio.run(fleet_soak(args.minutes, args.rate, args.seed))
    return asyncio.run(soak(args.minutes, args.rate, args.seed))


if __name__ == "__main__":
    sys.exit(main())
