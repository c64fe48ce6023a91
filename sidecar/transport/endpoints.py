"""The live endpoint sets of balanced upstreams: who they are (listed or from DNS), their health, their pools.

    EndpointTarget     where one endpoint's tries go: origin, Host, TLS name, headers; also its pool key
    EndpointRegistry   one `core.endpoints.EndpointSet` per balanced upstream, kept across reloads; runs
                       DNS discovery and the per-endpoint health checks

An upstream with one `url` and no discovery is not here at all: its requests take the single-endpoint
path with no balancing cost. Each endpoint gets its own connection pool (the
transport keys pools by origin), so a removed endpoint's pool is closed once its requests drained,
and an HTTP/2 pool can take an endpoint's place without the balancer knowing.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from multidict import CIMultiDict
from yarl import URL

from sidecar.core.authority import bracketed
from sidecar.core.clock import Clock
from sidecar.core.decisions import Decision, DecisionRecord
from sidecar.core.endpoints import EndpointEvent, EndpointSet
from sidecar.core.health import HealthState
from sidecar.exchange.calls import url_of
from sidecar.policy.model import TlsConfig, Upstream
from sidecar.transport.discovery import DnsDiscovery
from sidecar.transport.errors import UpstreamFailure

log = logging.getLogger("sidecar.endpoints")

DRAIN = 60.0                     # seconds a removed endpoint's pool lives on for requests still in flight


@dataclass(frozen=True, slots=True, eq=False)
class EndpointTarget:
    """One endpoint as the transport sees it. `name`, `origin`, `connect_timeout`, `max_connections`
    and `tls` make its pool key, as an `Upstream`'s do."""
    upstream: str
    key: str                     # host:port, the endpoint's label
    scheme: str
    host: str                    # what to connect to (an IP for DNS endpoints; [v6] bracketed)
    port: int
    base_path: str
    host_header: str
    server_hostname: str | None  # TLS name to verify (the Service's, for DNS endpoints)
    headers: tuple[tuple[str, str], ...]
    connect_timeout: float
    max_connections: int
    tls: TlsConfig
    protocol: str = "auto"       # the upstream's http1 | h2c | h2 | auto
    origin: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "origin", f"{self.scheme}://{self.host}:{self.port}")

    @property
    def name(self) -> str:
        return f"{self.upstream} {self.key}"

    def url(self, path_qs: str) -> URL:
        return url_of(f"{self.origin}{self.base_path}{path_qs}")

    def with_headers(self, headers: CIMultiDict[str]) -> CIMultiDict[str]:
        """`headers` as sent to this endpoint: its Host, and its own headers (an API key) on top of
        them. A copy when that changes anything (`headers` itself is left as it was), else `headers`.
        Every try to an endpoint (the live path's, a queued write's, a health check) is built here."""
        if not self.headers and headers.get("Host") == self.host_header:
            return headers
        headers = headers.copy()
        headers["Host"] = self.host_header
        for key, value in self.headers:
            headers[key] = value
        return headers

    @property
    def same_pool_as(self) -> tuple:
        return (self.origin, self.connect_timeout, self.max_connections, self.tls, self.server_hostname)


def _host_header(scheme: str, host: str, port: int) -> str:
    return host if port == (443 if scheme == "https" else 80) else f"{host}:{port}"


def _merge(base: tuple[tuple[str, str], ...], over: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """The upstream's headers with the endpoint's on top (names compared case-insensitively)."""
    names = {k.lower() for k, _ in over}
    return tuple((k, v) for k, v in base if k.lower() not in names) + over


def static_targets(up: Upstream) -> list[tuple[str, int, str, EndpointTarget]]:
    out, seen = [], set()
    for e in up.endpoints:
        key = f"{e.host}:{e.port}"
        if key in seen:                          # same host:port twice (other paths): still two endpoints
            key = f"{key}#{len(out) + 1}"
        seen.add(key)
        out.append((key, e.weight, "static", EndpointTarget(
            upstream=up.name, key=key, scheme=e.scheme, host=e.host, port=e.port, base_path=e.base_path,
            host_header=_host_header(e.scheme, e.host, e.port), server_hostname=up.tls.server_name,
            headers=_merge(up.headers, e.headers), connect_timeout=up.connect_timeout,
            max_connections=up.max_connections, tls=up.tls, protocol=up.protocol)))
    return out


def dns_targets(up: Upstream, addresses: list[str]) -> list[tuple[str, int, str, EndpointTarget]]:
    out = []
    for address in addresses:
        host = bracketed(address)
        key = f"{host}:{up.port}"
        out.append((key, 1, "dns", EndpointTarget(
            upstream=up.name, key=key, scheme=up.scheme, host=host, port=up.port, base_path=up.base_path,
            host_header=_host_header(up.scheme, up.host, up.port),
            server_hostname=up.tls.server_name or up.host.strip("[]"), headers=up.headers,
            connect_timeout=up.connect_timeout, max_connections=up.max_connections, tls=up.tls,
            protocol=up.protocol)))
    return out


class Group:
    """One balanced upstream: its set, its discovery and health-check tasks."""
    __slots__ = ("up", "set", "discovery", "tasks", "health")

    def __init__(self, up: Upstream) -> None:
        self.up = up
        self.set = EndpointSet(up.name, up.balance, up.outlier)
        self.discovery: DnsDiscovery | None = None
        self.tasks: list[asyncio.Task] = []
        self.health: dict[str, HealthState] = {}

    async def first_answer(self, within: float) -> None:
        """A just-started sidecar with DNS discovery and no endpoint yet: wait up to `within` seconds
        for DNS's first answer (or first failure), so that its first requests are not failed for it."""
        discovery = self.discovery
        if self.set.endpoints or discovery is None or discovery.resolved.is_set():
            return
        try:
            async with asyncio.timeout(max(0.0, within)):
                await discovery.resolved.wait()
        except TimeoutError:
            pass


class EndpointRegistry:
    def __init__(self, transport, sink, clock: Clock) -> None:
        self.transport = transport
        self.sink = sink
        self.clock = clock
        self.groups: dict[str, Group] = {}
        self.started = False

    def get(self, name: str) -> Group | None:
        return self.groups.get(name)

    # -- membership across reloads -------------------------------------------------------------------
    def sync(self, upstreams: dict[str, Upstream]) -> None:
        """Take a (re)loaded policy's upstreams: sets are kept by name, their endpoints by key."""
        wanted = {name: up for name, up in upstreams.items() if up.balanced}
        for name in [n for n in self.groups if n not in wanted]:
            self._drop(self.groups.pop(name))
        for name, up in wanted.items():
            group = self.groups.get(name)
            if group is not None and _discovery_key(group.up) != _discovery_key(up):
                self._drop(self.groups.pop(name))
                group = None
            if group is None:
                group = self.groups[name] = Group(up)
            else:
                group.up = up
                group.set.configure(up.balance, up.outlier)
            if up.discovery == "dns":
                if group.discovery is not None:
                    self._apply(group, dns_targets(up, group.discovery.addresses))
            else:
                self._apply(group, static_targets(up))
            if self.started:
                self._start_group(group)

    def targets(self) -> list[EndpointTarget]:
        """Every live endpoint's target (their pools are kept across a reload)."""
        return [ep.target for group in self.groups.values() for ep in group.set.endpoints]

    def start(self) -> None:
        self.started = True
        for group in self.groups.values():
            self._start_group(group)

    def close(self) -> None:
        for group in self.groups.values():
            self._drop(group, retire=False)
        self.groups.clear()

    def _start_group(self, group: Group) -> None:
        up = group.up
        loop = asyncio.get_running_loop()
        if up.discovery == "dns" and group.discovery is None:
            group.discovery = DnsDiscovery(up, lambda addresses, g=group: self._on_dns(g, addresses))
            group.tasks.append(loop.create_task(group.discovery.run()))
        checking = any(t.get_name() == "health" for t in group.tasks if not t.done())
        if up.health_check is not None and not checking:
            task = loop.create_task(self._health_loop(group))
            task.set_name("health")
            group.tasks.append(task)

    def _drop(self, group: Group, retire: bool = True) -> None:
        for task in group.tasks:
            task.cancel()
        group.tasks.clear()
        if retire:
            for ep in group.set.endpoints:
                self.transport.retire(ep.target, DRAIN)

    def _on_dns(self, group: Group, addresses: list[str]) -> None:
        added, removed = self._apply(group, dns_targets(group.up, addresses))
        if added or removed:
            log.info("upstream %s: endpoints %s (added %s, removed %s)", group.up.name,
                     ", ".join(ep.key for ep in group.set.endpoints), added or "none", removed or "none")

    def _apply(self, group: Group, members) -> tuple[list[str], list[str]]:
        old = {ep.key: ep.target for ep in group.set.endpoints}
        added, removed = group.set.update(members, self.clock.monotonic())
        for key in removed:                      # connections to a removed endpoint drain, then close
            self.transport.retire(old[key], DRAIN)
            group.health.pop(key, None)
        for key, _, _, target in members:        # an endpoint whose pool settings changed: old pool drains
            prev = old.get(key)
            if prev is not None and prev is not target and prev.same_pool_as != target.same_pool_as:
                self.transport.retire(prev, DRAIN)
        return added, removed

    # -- active health checks, per endpoint -----------------------------------------------------------
    async def _health_loop(self, group: Group) -> None:
        while True:
            up = group.up
            check = up.health_check
            if check is None:
                return
            eps = list(group.set.endpoints)
            results = await asyncio.gather(*(probe(self.transport, check, ep.target) for ep in eps))
            for ep, ok in zip(eps, results):
                state = group.health.get(ep.key)
                if state is None or state.check != check:
                    state = group.health[ep.key] = HealthState(check)
                flipped = state.record(ok)
                if flipped is not None and group.set.set_health(ep.key, flipped):
                    what = "passing its health check again" if flipped else \
                        f"{check.unhealthy_after} health checks failed on {check.path}"
                    log.warning("upstream %s endpoint %s is %s", up.name, ep.key,
                                "healthy" if flipped else "unhealthy")
                    self.background(up.name, EndpointEvent(
                        Decision.ENDPOINT_RESTORED if flipped else Decision.ENDPOINT_EJECTED, ep.key, what))
            await asyncio.sleep(check.interval)

    # -- decisions not tied to one request ------------------------------------------------------------
    def background(self, upstream: str, event: EndpointEvent, policy_version: str | None = None) -> None:
        self.sink.decision(DecisionRecord(decision=event.decision, route="-", upstream=upstream,
                                          reason=f"{event.endpoint}: {event.reason}", at=time.time(),
                                          policy_version=policy_version))

    # -- /status ---------------------------------------------------------------------------------------
    def status(self) -> dict:
        now, wall = self.clock.monotonic(), self.clock.time()
        out = {}
        for name, group in self.groups.items():
            up = group.up
            doc: dict = {"balance": up.balance, "discovery": up.discovery,
                         "endpoints": group.set.snapshot(now, wall)}
            if group.discovery is not None:
                doc["dns"] = {"host": up.host, "refresh": up.refresh, "addresses": group.discovery.addresses,
                              "failing": group.discovery.failing, "last_error": group.discovery.last_error}
            out[name] = doc
        return out


def _discovery_key(up: Upstream) -> tuple:
    return (up.discovery, up.host, up.port, up.resolver, up.refresh) if up.discovery == "dns" else ("none",)


async def probe(transport, check, target: EndpointTarget) -> bool:
    """True when the endpoint answered its health check with a 2xx or 3xx within the timeout."""
    headers = target.with_headers(CIMultiDict({"User-Agent": "sidecar-health-check"}))
    try:
        resp = await transport.send(target, "GET", target.url(check.path), headers, None, timeout=check.timeout,
                                    read_idle=check.timeout, server_hostname=target.server_hostname)
    except UpstreamFailure:
        return False
    try:
        return 200 <= resp.status < 400
    finally:
        resp.release()
