"""Fleet soak: two sidecars sharing one Redis (AOF, appendfsync always), dying the way pods die.

    python -m bench.soak --fleet [--minutes 2] [--rate 40] [--seed 1]      (`make soak-fleet`; not in CI)

Both sidecars serve the same policy: writes (POST /orders) through retry and a queue in Redis
(`queue: {store: redis://...}`), reads through retry, a breaker, a static fallback and a global rate
limit in Redis. The upstream is the soak's faulty one (503s, resets, delays) and is down for a few
seconds at 35% and 75% of the run. At 20%, 45% and 70% one of the sidecars (in turn) is killed like a
deleted pod: SIGKILL, its state_dir wiped, a new process started on fresh state — while the other keeps
serving. Writes answered 202 by a pod that then died must still reach the upstream, delivered by
whichever pod is alive.

It checks, and exits non-zero when one fails: 0 accepted writes lost, every request answered (those sent
to a pod while it was dead are counted apart), no tracebacks in the logs. It prints each write's fate
(202 then delivered, how many delivered more than once — same Idempotency-Key, by design after a kill).
"""
from __future__ import annotations

import asyncio
import collections
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from bench.soak import CLIENT_TIMEOUT, FaultyUpstream, Tally, one_request
from bench.systems import free_port

POLICY = """\
version: 1
listeners:
  - {{name: api, mode: reverse, port: {api}, upstream: flaky}}
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
    queue: {{when: [breaker-open, retries-exhausted], max_items: 100000, max_age: 1h, store: "{redis}", visibility_timeout: 3s}}
  - name: reads
    match: {{path_prefix: /}}
    upstream: flaky
    timeout: 2s
    per_try_timeout: 800ms
    retry: {{max_retries: 2, when: [connect-failure, reset, timeout, 502, 503, 504], backoff: {{base: 20ms, max: 200ms}}}}
    breaker: {{consecutive_failures: 10, open_for: 2s}}
    rate_limit: {{per_second: 1000, burst: 1000, store: "{redis}"}}
    fallback:
      when: [breaker-open, retries-exhausted, timeout, 5xx, rate-limited]
      targets: [{{static: {{status: 200, json: {{degraded: true}}}}}}]
"""


class CountingUpstream(FaultyUpstream):
    """The soak's faulty upstream, also counting how often each write arrived."""

    def __init__(self, port: int, rng: random.Random) -> None:
        super().__init__(port, rng)
        self.arrivals: collections.Counter[str] = collections.Counter()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        response = await super().handle(request)
        body = getattr(response, "body", None)
        if request.method == "POST" and isinstance(body, bytes) and body.startswith(b'{"stored"'):
            self.arrivals[json.loads(body)["stored"]] += 1
        return response


class Redis:
    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (apt-get install redis-server)")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Pod:
    def __init__(self, workdir: Path, name: str, upstream: int, redis: str) -> None:
        self.name = name
        self.dir = workdir / name
        self.dir.mkdir()
        self.ports = {k: free_port() for k in ("api", "admin", "health")}
        self.state = self.dir / "state"
        self.policy = self.dir / "policy.yaml"
        self.policy.write_text(POLICY.format(state=self.state, upstream=upstream, redis=redis, **self.ports))
        self.log = open(self.dir / "sidecar.log", "ab")
        self.proc: subprocess.Popen | None = None
        self.dead = [False]
        self.lives = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.ports['api']}"

    async def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "sidecar", "run", "-c", str(self.policy)],
                                     stdout=self.log, stderr=self.log)
        self.lives += 1
        async with aiohttp.ClientSession() as s:
            for _ in range(600):
                await asyncio.sleep(0.05)
                try:
                    async with s.get(f"http://127.0.0.1:{self.ports['admin']}/readyz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    continue
        raise RuntimeError(f"sidecar {self.name} did not become ready; see {self.dir / 'sidecar.log'}")

    async def delete_pod(self) -> None:
        """SIGKILL and the emptyDir gone, then a new pod (fresh state) in its place."""
        self.dead[0] = True
        self.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(self.proc.wait)
        shutil.rmtree(self.state, ignore_errors=True)
        await asyncio.sleep(0.5)
        await self.start()
        await asyncio.sleep(0.5)
        self.dead[0] = False

    async def depth(self, session: aiohttp.ClientSession) -> int:
        async with session.get(f"http://127.0.0.1:{self.ports['admin']}/status") as r:
            return ((await r.json()).get("queue") or {}).get("depth", 0)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(25)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


async def fleet_soak(minutes: float, rate: float, seed: int) -> int:
    rng = random.Random(seed)
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-fleet-soak-"))
    redis = Redis(workdir)
    upstream = CountingUpstream(free_port(), random.Random(seed + 1))
    await upstream.start()
    pods = [Pod(workdir, name, upstream.port, redis.url) for name in ("a", "b")]
    await asyncio.gather(*(pod.start() for pod in pods))
    tallies = [Tally() for _ in pods]
    duration = minutes * 60
    print(f"fleet soak: {minutes:g} min at {rate:g} req/s over {len(pods)} sidecars, one redis-server "
          f"(AOF, appendfsync always); work dir {workdir}", flush=True)
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
    events = sorted([(0.35 * duration, "restart-upstream"), (0.75 * duration, "restart-upstream"),
                     (0.20 * duration, "delete-pod"), (0.45 * duration, "delete-pod"),
                     (0.70 * duration, "delete-pod")])
    deaths = 0
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=400)) as session:
        started = time.monotonic()

        async def run_event(kind: str) -> None:
            nonlocal deaths
            if kind == "restart-upstream":
                print(f"  {time.monotonic() - started:6.1f}s upstream down for 3s", flush=True)
                await upstream.stop()
                await asyncio.sleep(3)
                await upstream.start()
            else:
                pod = pods[deaths % len(pods)]
                deaths += 1
                print(f"  {time.monotonic() - started:6.1f}s pod {pod.name} deleted (SIGKILL, state_dir "
                      f"wiped), a new one started", flush=True)
                await pod.delete_pod()

        tasks: set[asyncio.Task] = set()
        running: set[asyncio.Task] = set()
        seq = 0
        while (now := time.monotonic() - started) < duration:
            if events and now >= events[0][0]:
                task = asyncio.ensure_future(run_event(events.pop(0)[1]))
                running.add(task)
                task.add_done_callback(running.discard)
            seq += 1
            i = seq % len(pods)
            task = asyncio.ensure_future(one_request(session, pods[i].base, tallies[i], rng, pods[i].dead, seq))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(1 / rate)
        await asyncio.gather(*running, *tasks, return_exceptions=True)
        queued = set().union(*(t.queued for t in tallies))
        stored = set().union(*(t.stored for t in tallies))
        drained = False
        for _ in range(240):
            depths = [await pod.depth(session) for pod in pods]
            if max(depths) == 0 and queued <= set(upstream.arrivals):
                drained = True
                break
            await asyncio.sleep(0.5)
    for pod in pods:
        pod.stop()
    await upstream.stop()
    redis.stop()

    delivered = set(upstream.arrivals)
    lost = (queued | stored) - delivered
    twice = sum(1 for order in queued if upstream.arrivals[order] > 1)
    sent = sum(t.sent for t in tallies)
    answered = sum(t.answered for t in tallies)
    cut = sum(t.cut_by_kill for t in tallies)
    unanswered = collections.Counter()
    classes = collections.Counter()
    for t in tallies:
        unanswered.update(t.unanswered)
        classes.update(t.classes)
    print("\n== fleet soak results ==")
    print(f"requests sent {sent}, answered {answered}, sent to a pod while it was being replaced {cut}, "
          f"unanswered otherwise {sum(unanswered.values())} {dict(unanswered) or ''}")
    for name, count in sorted(classes.items()):
        print(f"  {name:28s} {count}")
    print(f"pod deletions: {deaths}; upstream faults injected: {dict(upstream.faults)}")
    print(f"writes answered 202: {len(queued)}, delivered {len(queued & delivered)}, lost {len(lost)}, "
          f"delivered more than once (same Idempotency-Key) {twice}; writes answered 200 directly "
          f"{len(stored)}; queue drained: {drained}")
    tracebacks = sum((pod.dir / "sidecar.log").read_text(errors="replace").count("Traceback") for pod in pods)
    reclaims = sum((pod.dir / "sidecar.log").read_text(errors="replace").count("reclaimed") for pod in pods)
    print(f"claims taken over from dead pods: {reclaims}; tracebacks in the logs: {tracebacks}; "
          f"logs under {workdir}")
    failures = []
    if lost:
        failures.append(f"{len(lost)} accepted writes lost")
    if not drained:
        failures.append("the shared queue did not drain")
    if sum(unanswered.values()):
        failures.append("requests without an answer")
    if tracebacks:
        failures.append("tracebacks in the sidecar logs")
    print("PASS" if not failures else "FAIL: " + "; ".join(failures))
    return 0 if not failures else 1
