"""Process assembly: telemetry sinks, the runtime, the admin and health servers, the policy watcher,
and the signals (SIGHUP reloads; SIGTERM drains, a second SIGTERM exits at once)."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass, field

from aiohttp import web

from sidecar.admin.app import admin_app, health_app
from sidecar.admin.events import EventHub
from sidecar.policy.model import Policy
from sidecar.runtime import Runtime
from sidecar.telemetry.metrics import Metrics
from sidecar.telemetry.otel import OtelSink

log = logging.getLogger("sidecar")
WATCH_INTERVAL = 1.0


@dataclass
class Sidecar:
    runtime: Runtime
    metrics: Metrics
    hub: EventHub
    runners: list[web.AppRunner] = field(default_factory=list)
    tasks: list[asyncio.Task] = field(default_factory=list)

    async def stop(self, drain_timeout: float = 0.0) -> None:
        if drain_timeout > 0:
            await self.runtime.drain(drain_timeout)
        for task in self.tasks:
            task.cancel()
        await self.runtime.close()
        for runner in self.runners:
            await runner.cleanup()


async def start(policy: Policy, *, reuse_port: bool = False, admin: bool = True, watch: bool = True,
                **runtime_kwargs) -> Sidecar:
    holder: list[Runtime] = []
    metrics = Metrics(lambda: holder[0].metrics_state() if holder else {})
    hub = EventHub()
    sinks = [metrics, hub]
    otel = OtelSink.from_config(policy.telemetry)
    if otel is not None:
        sinks.append(otel)
    runtime = Runtime(policy, sinks=sinks, attach_cache=_cache_feature(), **runtime_kwargs)
    holder.append(runtime)
    sidecar = Sidecar(runtime, metrics, hub)
    await runtime.start_listeners(reuse_port=reuse_port)
    if admin:
        sidecar.runners.append(await _serve(admin_app(runtime, metrics, hub), policy.admin.bind, policy.admin.port))
        if (policy.health.bind, policy.health.port) != (policy.admin.bind, policy.admin.port):
            sidecar.runners.append(await _serve(health_app(runtime), policy.health.bind, policy.health.port))
    if watch:
        sidecar.tasks.append(asyncio.get_running_loop().create_task(watch_policy(runtime)))
    return sidecar


def _cache_feature():
    """The response cache binds a store to each cached route's state (kept across reloads)."""
    try:
        from sidecar.pipeline.cache import attach_cache
    except ImportError:  # the cache layer is not built yet
        return None
    return attach_cache


async def _serve(app: web.Application, bind: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, bind, port, reuse_address=True).start()
    return runner


def _fingerprint(path: str) -> tuple | None:
    """What changes when a file is edited in place, replaced, or swapped by a ConfigMap `..data` link."""
    try:
        st = os.stat(path)
        return os.path.realpath(path), st.st_ino, st.st_mtime_ns, st.st_size
    except OSError:
        return None


async def watch_policy(runtime: Runtime, interval: float = WATCH_INTERVAL) -> None:
    """Polls the policy file: robust to symlink swaps and editors' rename-on-save, needs no inotify."""
    seen = _fingerprint(runtime.policy.source)
    while True:
        await asyncio.sleep(interval)
        now = _fingerprint(runtime.policy.source)
        if now is not None and now != seen:
            seen = now
            await runtime.reload(trigger="file")


def run_forever(policy: Policy, *, workers: int = 1, drain_timeout: float = 20.0) -> int:
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is optional on exotic platforms
        pass
    return asyncio.run(_main(policy, drain_timeout))


async def _main(policy: Policy, drain_timeout: float) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    terms = 0

    def on_term() -> None:
        nonlocal terms
        terms += 1
        if terms > 1:
            log.warning("second SIGTERM: exiting now")
            os._exit(0)
        stop.set()

    sidecar = await start(policy)
    loop.add_signal_handler(signal.SIGTERM, on_term)
    loop.add_signal_handler(signal.SIGINT, on_term)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(sidecar.runtime.reload(trigger="SIGHUP")))
    listeners = ", ".join(f"{lst.name}={lst.mode}@{lst.bind}:{lst.port}" for lst in policy.listeners)
    log.info("sidecar ready: policy %s (%s); listeners %s; admin %s:%s", policy.digest, policy.source,
             listeners, policy.admin.bind, policy.admin.port)
    await stop.wait()
    log.info("SIGTERM: draining for up to %gs", drain_timeout)
    await sidecar.stop(drain_timeout=drain_timeout)
    log.info("drained; bye")
    return 0
