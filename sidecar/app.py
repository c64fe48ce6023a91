"""Process assembly: telemetry sinks, the runtime, the admin and health servers, the policy watcher,
and the signals (SIGHUP reloads; SIGTERM drains, a second SIGTERM exits at once)."""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from dataclasses import dataclass, field

from aiohttp import web

from sidecar.admin.app import admin_app, health_app
from sidecar.admin.events import EventHub
from sidecar.core.authority import authority
from sidecar.policy.errors import CertError, PolicyError
from sidecar.policy.load import load_policy
from sidecar.policy.model import Policy
from sidecar.proxy.guard import GuardedAppRunner
from sidecar.queue import QueueError, open_queues, uses_state_dir
from sidecar.runtime import Runtime
from sidecar.telemetry.metrics import Metrics
from sidecar.telemetry.signals import Signals
from sidecar.telemetry.otel import OtelSink

log = logging.getLogger("sidecar")
WATCH_INTERVAL = 1.0
YOUNG_GC_THRESHOLD = 5_000          # CPython's default is 700; see settle_gc


def settle_gc() -> None:
    """Once started: what start-up built (modules, policy, pools) lives as long as the process, so it is
    frozen out of the cyclic GC, whose full passes over it paused the loop ~20 ms every ~0.4 s at 5k req/s
    (<1 ms after). And the young generation is collected when YOUNG_GC_THRESHOLD more objects are alive
    than at the last pass, not 700: the objects of 64 requests in flight crossed 700 every ~9 ms at 5k
    req/s, each pass took ~0.4 ms and found next to nothing (31 objects in 10 s) -- 8 us a request, ~4 %
    of the CPU. With 5,000: one pass in 10 s, 0.7 ms. Cycles are still collected once that many pile up."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])


@dataclass
class Sidecar:
    runtime: Runtime
    metrics: Metrics
    hub: EventHub
    signals: Signals
    otel: OtelSink | None = None
    runners: list[web.AppRunner] = field(default_factory=list)
    tasks: list[asyncio.Task] = field(default_factory=list)

    async def stop(self, drain_timeout: float = 0.0) -> None:
        if drain_timeout > 0:
            await self.runtime.drain(drain_timeout)
        for task in self.tasks:
            task.cancel()
        await self.runtime.close()
        if self.otel is not None:
            self.otel.shutdown()             # flushes the last spans
        for runner in self.runners:
            await runner.cleanup()


async def _tick(signals: Signals) -> None:
    while True:
        await asyncio.sleep(1.0)
        try:
            signals.tick()
        except Exception:  # noqa: BLE001 - the dashboard's numbers must not stop the sidecar
            logging.getLogger("sidecar.telemetry").exception("golden signals reading failed")


async def start(policy: Policy, *, reuse_port: bool = False, admin: bool = True, watch: bool = True,
                **runtime_kwargs) -> Sidecar:
    holder: list[Runtime] = []
    metrics = Metrics(lambda: holder[0].metrics_state() if holder else {})
    hub = EventHub()
    signals = Signals(metrics)               # golden signals: read from the metrics' counters each second
    sinks = [metrics, hub]
    otel = OtelSink.from_config(policy.telemetry)
    if otel is not None:
        sinks.append(otel)
    queue = await open_queues(policy)        # store-and-forward: None unless a route has `queue:`
    runtime = Runtime(policy, sinks=sinks, queue=queue, head_sampler=otel.samples if otel else None,
                      **runtime_kwargs)
    holder.append(runtime)
    if queue is not None:
        queue.start(runtime)                 # writes left from before a restart start going out now
    sidecar = Sidecar(runtime, metrics, hub, signals, otel)
    await runtime.start_listeners(reuse_port=reuse_port)
    if admin:
        sidecar.runners.append(await _serve(admin_app(runtime, metrics, hub, signals), policy.admin.bind, policy.admin.port))
        if (policy.health.bind, policy.health.port) != (policy.admin.bind, policy.admin.port):
            sidecar.runners.append(await _serve(health_app(runtime), policy.health.bind, policy.health.port))
    sidecar.tasks.append(asyncio.get_running_loop().create_task(_tick(signals)))
    if watch:
        sidecar.tasks.append(asyncio.get_running_loop().create_task(watch_policy(runtime)))
    return sidecar



async def _serve(app: web.Application, bind: str, port: int) -> web.AppRunner:
    runner = GuardedAppRunner(app, access_log=None, handle_signals=False)   # proxy/guard.py
    await runner.setup()
    await web.TCPSite(runner, bind, port, reuse_address=True).start()
    return runner


def _fingerprint(path: str) -> tuple | None:
    """What changes when a file is edited in place, replaced, or swapped by a ConfigMap `..data` link."""
    try:
        st = os.stat(path)
        # ctime too: `cp -p` and rsync rewrite a file in place keeping its size and mtime
        return os.path.realpath(path), st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size
    except OSError:
        return None


async def watch_policy(runtime: Runtime, interval: float = WATCH_INTERVAL) -> None:
    """Polls the policy file: robust to symlink swaps and editors' rename-on-save, needs no inotify."""
    seen = _fingerprint(runtime.policy.source)
    # The file may have changed since it was loaded (while the listeners bound): catch up once.
    # A reload of unchanged bytes is a no-op.
    await _reload_from_watcher(runtime)
    while True:
        await asyncio.sleep(interval)
        now = _fingerprint(runtime.policy.source)
        if now is not None and now != seen:
            seen = now                       # taken before the read: a later write is seen next poll
            await _reload_from_watcher(runtime)


async def _reload_from_watcher(runtime: Runtime) -> None:
    try:
        await runtime.reload(trigger="file")
    except Exception:  # noqa: BLE001 - the watcher must outlive any one reload
        log.exception("policy reload from the file watcher failed")


def run_forever(policy: Policy, *, workers: int = 1, drain_timeout: float = 20.0) -> int:
    """Serve until SIGTERM. With `workers` > 1, that many processes share the listeners through
    SO_REUSEPORT (the kernel spreads connections); the first one also serves the admin API."""
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is optional on exotic platforms
        pass
    if workers <= 1:
        return asyncio.run(_main(policy, drain_timeout))
    if uses_state_dir(policy):
        log.error("--workers > 1 is not supported with state_dir store-and-forward queues (one delivery loop "
                  "per state_dir); `queue: {store: redis://...}` works with any number")
        return 1
    children = []
    for _ in range(workers - 1):
        pid = os.fork()
        if pid == 0:                         # a worker: listeners only, no admin API, no watcher
            os._exit(asyncio.run(_main(policy, drain_timeout, reuse_port=True, admin=False)))
        children.append(pid)

    def forward(signum, _frame) -> None:
        for child in children:
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    code = asyncio.run(_main(policy, drain_timeout, reuse_port=True, admin=True, children=forward))
    for child in children:
        os.waitpid(child, 0)
    return code


async def _main(policy: Policy, drain_timeout: float, *, reuse_port: bool = False, admin: bool = True,
                children=None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    terms = 0

    def on_term() -> None:
        nonlocal terms
        terms += 1
        if children is not None:
            children(signal.SIGTERM, None)
        if terms > 1:
            log.warning("second SIGTERM: exiting now")
            os._exit(0)
        stop.set()

    def on_hup() -> None:
        if children is not None:
            children(signal.SIGHUP, None)
        loop.create_task(sidecar.runtime.reload(trigger="SIGHUP"))

    try:
        sidecar = await start(policy, reuse_port=reuse_port, admin=admin)
    except (QueueError, CertError) as exc:   # e.g. a state_dir that cannot be created: say so, exit 1
        log.error("cannot start: %s", exc)
        return 1
    settle_gc()
    loop.add_signal_handler(signal.SIGTERM, on_term)
    loop.add_signal_handler(signal.SIGINT, on_term)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    listeners = ", ".join(f"{lst.name}={lst.mode}@{authority(lst.bind, lst.port)}" for lst in policy.listeners)
    log.info("sidecar ready: policy %s (%s); listeners %s; admin %s", policy.digest, policy.source,
             listeners, authority(policy.admin.bind, policy.admin.port))
    await stop.wait()
    log.info("SIGTERM: draining for up to %gs", drain_timeout)
    await sidecar.stop(drain_timeout=drain_timeout)
    log.info("drained; bye")
    return 0


def serve(policy_path: str, *, workers: int = 1, drain_timeout: float = 20.0, log_level: str = "info") -> int:
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        policy = load_policy(policy_path)
    except PolicyError as exc:
        for problem in exc.problems:
            print(problem, flush=True)
        return 1
    return run_forever(policy, workers=workers, drain_timeout=drain_timeout)
