"""The running sidecar: the current policy generation, listeners, admin API, reloads and drain.

A generation (`exchange.context.Context`) is everything built from one policy load (router, route
stacks, route state bindings) plus the long-lived services (transport, telemetry, clock). Requests hold
the generation they started with, so a reload never changes a request mid-flight; the swap itself is
one attribute assignment.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
import weakref

from aiohttp import web

from sidecar.core.authority import authority
from sidecar.core.clock import SYSTEM_CLOCK, Clock
from sidecar.core.decisions import Decision, DecisionRecord
from sidecar.core.health import HealthState
from sidecar.exchange.context import Context, HeadSampler, Services, Sleep, WriteQueue
from sidecar.exchange.state import StateRegistry
from sidecar.fleet.link import Links
from sidecar.fleet.limits import limiter_factory
from sidecar.pipeline.generation import build_generation
from sidecar.policy.errors import PolicyError, Problem
from sidecar.policy.load import load_policy
from sidecar.policy.model import Listener, Policy
from sidecar.proxy.guard import SERVER_LIMITS, GuardedServer
from sidecar.proxy.h2server import drain as drain_h2
from sidecar.proxy.h2server import install as install_h2
from sidecar.proxy.relay import Relays
from sidecar.proxy.server import ListenerHandler
from sidecar.proxy.sniff import Front
from sidecar.telemetry.records import FanoutSink, TelemetrySink
from sidecar.telemetry.redact import install_log_redaction
from sidecar.transport.client import Transport
from sidecar.transport.endpoints import EndpointRegistry

log = logging.getLogger("sidecar")



class Runtime:
    def __init__(self, policy: Policy, *, clock: Clock = SYSTEM_CLOCK, rng: random.Random | None = None,
                 sleep: Sleep = asyncio.sleep, sinks: list[TelemetrySink] | None = None,
                 queue: WriteQueue | None = None, head_sampler: HeadSampler | None = None) -> None:
        self.clock = clock
        self.transport = Transport()
        self.links = Links(clock)            # Redis connections for shared limits and queues, one per URL
        self.registry = StateRegistry(clock, limiter_factory(clock, self.links))
        self.health: dict[str, HealthState] = {}
        self.queue = queue                   # sidecar.queue.DurableQueue, when a route has `queue:`
        self.relays = Relays()               # tunnels, upgrades, passthrough: SIGTERM reaches them here
        self._interceptors: dict = {}        # (listener name, Intercept) -> Interceptor
        self.sink = FanoutSink(list(sinks or []))
        self.endpoints = EndpointRegistry(self.transport, self.sink, clock)
        self.endpoints.sync(policy.upstreams)
        # head_sampler: the `sampled` flag sent upstream (the trace exporter's head decision); none
        # given: "not sampled".
        self.services = Services(transport=self.transport, sink=self.sink, clock=clock,
                                 rng=rng or random.Random(), sleep=sleep, health=self.health, queue=queue,
                                 relays=self.relays, endpoints=self.endpoints,
                                 **({"head_sampler": head_sampler} if head_sampler is not None else {}))
        gen, binding = build_generation(policy, self.services, self.registry, self.current,
                                        interceptors=self._interceptors_for(policy))
        binding.commit()
        self.gen: Context = gen
        install_log_redaction(self)          # every log record, aiohttp's too, scrubbed of secrets
        self.started_at = time.time()
        self.last_reload_error: str | None = None
        self.reloads = {"success": 0, "failure": 0}
        self.ready = False
        self.draining = False
        self._servers: dict[str, tuple[Listener, web.Server, asyncio.AbstractServer]] = {}
        self.h2_connections: weakref.WeakSet = weakref.WeakSet()   # HTTP/2 app connections, for drain
        install_h2()                         # the sniffing front hands HTTP/2 connections to h2server
        self._tasks: list[asyncio.Task] = []
        self._health_tasks: dict[str, asyncio.Task] = {}
        self._reload_lock = asyncio.Lock()
        self._reuse_port = False             # --workers: every process binds each listener (SO_REUSEPORT)

    def current(self) -> Context:
        """The running generation: what a request starting now runs with."""
        return self.gen

    @property
    def policy(self) -> Policy:
        return self.gen.policy

    def _interceptors_for(self, policy: Policy) -> dict[str, object]:
        """HTTPS interception per listener (proxy/intercept.py); a CA that cannot be loaded fails the load."""
        return {lst.name: self.interceptor(lst, policy.state_dir) for lst in policy.listeners
                if lst.intercept is not None}

    def interceptor(self, listener: Listener, state_dir: str):
        """The listener's Interceptor, kept across reloads while its hosts and CA are unchanged (so are
        its cached leaf certificates)."""
        from sidecar.proxy.certs import load_or_create
        from sidecar.proxy.intercept import Interceptor
        intercept = listener.intercept
        key = (listener.name, intercept)
        held = self._interceptors.get(key)
        if held is None:
            authority = load_or_create(intercept.ca_cert_file, intercept.ca_key_file, state_dir)
            held = self._interceptors[key] = Interceptor(self, authority, intercept)
        return held

    # -- listeners ---------------------------------------------------------------------------------
    async def _bind(self, listener: Listener, reuse_port: bool = False) -> tuple[web.Server, asyncio.AbstractServer]:
        # header-read and idle timeouts, header size cap, no echo of bad lines: see proxy/guard.py
        handler = ListenerHandler(self.current, listener)
        server = GuardedServer(handler, access_log=None, **SERVER_LIMITS)
        server.listener_handler = handler    # a reload changes the listener's settings here, in place
        # The first bytes pick the protocol (HTTP/1, HTTP/2, TLS or TCP passthrough): see proxy/sniff.py
        server.front = Front(self, listener, server, server.header_timeout)
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(server.front, listener.bind, listener.port, reuse_address=True,
                                       reuse_port=reuse_port or None, backlog=1024)
        return server, srv

    async def start_listeners(self, reuse_port: bool = False) -> None:
        self._reuse_port = reuse_port        # a listener added by a reload is shared the same way
        for listener in self.policy.listeners:
            server, srv = await self._bind(listener, reuse_port)
            self._servers[listener.name] = (listener, server, srv)
        self._sync_health_checks()
        self.endpoints.start()
        self.ready = True

    def bound_port(self, name: str) -> int:
        return self._servers[name][2].sockets[0].getsockname()[1]

    async def _bind_new_listeners(self, policy: Policy) -> dict:
        """Bind every listener address the new policy adds; one failure refuses the whole change.

        Listeners are matched by address: one whose (bind, port) stays keeps its socket and only takes
        its new settings (name, mode, upstream) in `_commit_listeners`. Nothing is closed here, so a
        refusal leaves the old listeners serving untouched."""
        held = {(lst.bind, lst.port) for lst, _, _ in self._servers.values()}
        opened: dict[tuple[str, int], tuple[web.Server, asyncio.AbstractServer]] = {}
        try:
            for lst in policy.listeners:
                addr = (lst.bind, lst.port)
                if addr in held:
                    continue
                moving = [authority(b, p) for b, p in held if p == lst.port]
                if moving:                   # Linux refuses the second bind while the first listens
                    raise OSError(f"listener {lst.name}: moving {moving[0]} to {authority(lst.bind, lst.port)} "
                                  "on the same port needs a restart")
                opened[addr] = await self._bind(lst, self._reuse_port)
        except OSError as exc:
            self._close_bound(opened)
            raise PolicyError([Problem(policy.source, 1, 1, f"listener change refused: {exc}")]) from exc
        return opened

    @staticmethod
    def _close_bound(opened: dict) -> None:
        for _, srv in opened.values():
            srv.close()

    def _commit_listeners(self, policy: Policy, opened: dict) -> None:
        """Synchronous, so the listeners and the generation change in one step of the loop."""
        current = {(lst.bind, lst.port): (server, srv) for lst, server, srv in self._servers.values()}
        servers: dict[str, tuple[Listener, web.Server, asyncio.AbstractServer]] = {}
        for lst in policy.listeners:
            addr = (lst.bind, lst.port)
            if addr in current:
                server, srv = current.pop(addr)
                server.listener_handler.listener = lst   # same socket; the next request sees the change
                server.front.listener = lst
            else:
                server, srv = opened[addr]
            servers[lst.name] = (lst, server, srv)
        for server, srv in current.values():   # addresses the policy dropped: stop accepting, drain
            srv.close()
            task = asyncio.get_running_loop().create_task(server.shutdown(10.0))
            self._tasks.append(task)
            task.add_done_callback(self._tasks.remove)
        self._servers = servers

    # -- reload ------------------------------------------------------------------------------------
    async def reload(self, path: str | None = None, trigger: str = "file") -> tuple[bool, str | None]:
        # One at a time: the file watcher, SIGHUP and POST /reload may fire together, and two reloads
        # binding the same new listener would refuse each other.
        async with self._reload_lock:
            return await self._reload(path or self.policy.source, trigger)

    async def _reload(self, path: str, trigger: str) -> tuple[bool, str | None]:
        old = self.policy
        try:
            policy = load_policy(path)
            if (policy.admin, policy.health) != (old.admin, old.health):
                raise PolicyError([Problem(path, 1, 1, "admin and health endpoints change only on restart")])
            if policy.digest == old.digest:
                if self.last_reload_error is not None:   # e.g. a bad edit reverted: nothing to report now
                    log.info("policy file is back to the running version %s", old.digest)
                    self.last_reload_error = None
                return True, None
            opened = await self._bind_new_listeners(policy)
            try:
                gen, binding = build_generation(policy, self.services, self.registry, self.current,
                                                interceptors=self._interceptors_for(policy))
            except Exception as exc:  # noqa: BLE001 - a bug, but the old policy must keep serving
                self._close_bound(opened)
                log.exception("building policy %s failed", policy.digest)
                raise PolicyError([Problem(path, 1, 1, f"policy could not be applied: {exc!r}")]) from exc
            self._commit_listeners(policy, opened)
            binding.commit()                 # live state moves over in the same loop step as the swap
            self.gen = gen
            self.endpoints.sync(policy.upstreams)   # sets kept by upstream name, endpoints by address
            await self.transport.retain(policy.upstreams, self.endpoints.targets())
            self._sync_health_checks()
        except PolicyError as exc:
            message = "; ".join(str(p) for p in exc.problems)
            self.last_reload_error = message
            self.reloads["failure"] += 1
            log.error("policy reload (%s) rejected, keeping version %s: %s", trigger, old.digest, message)
            self._background(Decision.CONFIG_REJECTED, message[:500])
            return False, message
        self.last_reload_error = None
        if self.queue is None and policy.queues_writes:
            log.warning("policy %s adds a store-and-forward queue: it takes effect on the next restart "
                        "(the queue's state_dir is opened at start); until then those writes are not queued",
                        policy.digest)
        self.reloads["success"] += 1
        log.info("policy reloaded (%s): version %s -> %s", trigger, old.digest, policy.digest)
        self._background(Decision.CONFIG_RELOADED, f"{trigger}: {old.digest} -> {policy.digest}")
        return True, None

    def _background(self, decision: Decision, reason: str, route: str = "-", upstream: str | None = None,
                     breaker_state: str | None = None) -> None:
        self.sink.decision(DecisionRecord(decision=decision, route=route, upstream=upstream, reason=reason,
                                          at=time.time(), breaker_state=breaker_state,
                                          policy_version=self.policy.digest))

    # -- active health checks ----------------------------------------------------------------------
    def _sync_health_checks(self) -> None:
        # A balanced upstream's checks run per endpoint (transport/endpoints.py), not here.
        wanted = {name: up for name, up in self.policy.upstreams.items()
                  if up.health_check is not None and not up.balanced}
        for name in [n for n in self._health_tasks if n not in wanted]:
            self._health_tasks.pop(name).cancel()
            self.health.pop(name, None)
        for name, up in wanted.items():
            if name not in self._health_tasks:
                self.health.setdefault(name, HealthState(up.health_check))
                self._health_tasks[name] = asyncio.get_running_loop().create_task(self._health_loop(name))

    async def _health_loop(self, name: str) -> None:
        from sidecar.transport.health import probe
        while True:
            up = self.policy.upstreams.get(name)
            if up is None or up.health_check is None:
                return
            ok = await probe(self.transport, up)
            state = self.health.get(name)
            if state is None:
                return
            flipped = state.record(ok)
            if flipped is not None:
                decision = Decision.UPSTREAM_HEALTHY if flipped else Decision.UPSTREAM_UNHEALTHY
                reason = "health check passing again" if flipped else \
                    f"{up.health_check.unhealthy_after} health checks failed on {up.health_check.path}"
                log.warning("upstream %s is %s", name, "healthy" if flipped else "unhealthy")
                self._background(decision, reason, upstream=name, breaker_state="closed" if flipped else "open")
            await asyncio.sleep(up.health_check.interval)

    # -- status ------------------------------------------------------------------------------------
    def status(self) -> dict:
        gen = self.gen
        routes = []
        for route in [*gen.policy.routes, gen.policy.defaults]:
            state = gen.states[route.name]
            routes.append({
                "name": route.name,
                "upstream": route.upstream,
                "mode": route.mode,
                "breakers": {name: br.snapshot() for name, br in state.breakers.items()},
                # breakers are created on a route's first call: the policy lets /status show one before
                "breaker_policy": dataclasses.asdict(route.breaker) if route.breaker else None,
                "retry_budget_remaining": state.budget.remaining() if state.budget else None,
                "in_flight": state.concurrency.in_flight if state.concurrency else None,
                "concurrency_max": route.concurrency.max if route.concurrency else None,
                "cache": state.cache.stats() if state.cache is not None else None,
                "tokens_per_minute": state.tokens.stats() if state.tokens is not None else None,
                "rate_limit": state.limiter.stats() if state.limiter is not None else None,
            })
        return {
            "policy": {"version": gen.policy.digest, "source": gen.policy.source,
                       "last_reload_error": self.last_reload_error, "reloads": dict(self.reloads)},
            "ready": self.ready and not self.draining,
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "routes": routes,
            "upstreams": {name: {"healthy": h.healthy} for name, h in self.health.items()},
            "endpoints": self.endpoints.status(),
            "connection_pools": self.transport.stats(),
            "queue": self.queue.stats() if self.queue is not None else None,
            "listeners": [{"name": lst.name, "mode": lst.mode, "bind": lst.bind, "port": lst.port}
                          for lst, _, _ in self._servers.values()],
        }

    def metrics_state(self) -> dict:
        gen = self.gen
        breakers, budgets = [], []
        cache_entries = 0
        for name, state in gen.states.items():
            for up, br in state.breakers.items():
                breakers.append({"route": name, "upstream": up, "state": br.state.value})
            if state.budget is not None:
                budgets.append({"route": name, "remaining": state.budget.remaining()})
            cache = state.cache
            if cache is not None:
                cache_entries += cache.entries()
        queue = self.queue.stats() if self.queue is not None else {}
        endpoints = [{"upstream": name, "endpoint": e["endpoint"], "state": e["state"]}
                     for name, doc in self.endpoints.status().items() for e in doc["endpoints"]]
        return {"breakers": breakers, "budgets": budgets, "cache_entries": cache_entries, "endpoints": endpoints,
                "queue_depth": queue.get("depth", 0), "queue_oldest_age": queue.get("oldest_age", 0.0),
                "policy_version": gen.policy.digest}

    # -- lifecycle ---------------------------------------------------------------------------------
    async def drain(self, timeout: float) -> None:
        """SIGTERM: readiness fails, listeners stop accepting, in-flight requests finish (bounded)."""
        self.draining = True
        for _, _, srv in self._servers.values():
            srv.close()
        self.relays.drain()
        await asyncio.gather(*(server.shutdown(timeout) for _, server, _ in self._servers.values()),
                             drain_h2(self.h2_connections, timeout), return_exceptions=True)

    async def close(self) -> None:
        for task in [*self._tasks, *self._health_tasks.values()]:
            task.cancel()
        self.endpoints.close()
        for _, server, srv in self._servers.values():
            srv.close()
        self._servers.clear()
        if self.queue is not None:
            await self.queue.close()
        for state in self.registry.all():    # cache stores: pending writes, Redis connections
            if state.cache is not None:
                await state.cache.close()
        await self.links.close()
        await self.transport.close()
