"""What a request may use: one typed `Context` per policy generation, handed to every layer on the
`Exchange` (httpcore carries what a request needs on the request; nothing is looked up by `hasattr`).

    Services   the long-lived parts, one set per process: transport, telemetry sink, clock, randomness,
               sleep, upstream health, the store-and-forward queue, the head sampler
    Context    one policy generation: the policy, each route's live state and built stack, plus the
               services. Built whole before it serves (pipeline/generation.py), then swapped in at once;
               a request keeps the context it started with across a reload.

The transport and the queue are seen through the small protocols below, so a layer test can hand in
a fake transport (httpx's MockTransport idea) and this package imports nothing above it.
"""
from __future__ import annotations

import random
from collections.abc import AsyncIterable, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from sidecar.core.clock import Clock
from sidecar.core.health import HealthState
from sidecar.policy.match import Router
from sidecar.policy.model import Policy, TlsConfig, Upstream
from sidecar.telemetry.records import TelemetrySink

if TYPE_CHECKING:
    from aiohttp import StreamReader

    from sidecar.exchange.state import RouteState
    from sidecar.exchange.types import Call, Exchange, Reply

Sleep = Callable[[float], Awaitable[None]]
# (trace_id, parent_span_id, caller_sampled) -> the `sampled` flag sent upstream
HeadSampler = Callable[[str, "str | None", bool], bool]
# A route's stack, or what is under a layer (its `next`): an async function, so a layer may run it as a
# task (hedging races one try against the next).
Handler = Callable[["Exchange", "Call"], Coroutine[Any, Any, "Reply"]]
EgressGuard = frozenset[int]                 # the sidecar's own ports, refused as destinations


class UpstreamResponse(Protocol):
    """An upstream's answer once its head arrived; the body is read from `content`."""
    @property
    def status(self) -> int: ...
    @property
    def headers(self) -> CIMultiDictProxy[str]: ...
    @property
    def content(self) -> StreamReader: ...
    def release(self) -> None: ...


class Target(Protocol):
    """Where a try goes, as the transport reads it (its pool key and how to speak to it): an `Upstream`,
    or one endpoint of a balanced one (transport/endpoints.py's `EndpointTarget`)."""
    @property
    def name(self) -> str: ...
    @property
    def origin(self) -> str: ...
    @property
    def connect_timeout(self) -> float: ...
    @property
    def max_connections(self) -> int: ...
    @property
    def tls(self) -> TlsConfig: ...
    @property
    def protocol(self) -> str: ...


class Transport(Protocol):
    """The whole transport contract: one method (httpx's `handle_async_request`). `target` None: the
    request's original destination."""
    async def send(self, target: Target | None, method: str, url: URL, headers: CIMultiDict[str],
                   body: bytes | AsyncIterable[bytes] | None, *, timeout: float, read_idle: float,
                   server_hostname: str | None = None,
                   guard: EgressGuard | None = None) -> UpstreamResponse: ...


class WriteQueue(Protocol):
    """Store-and-forward (sidecar/queue): takes a write, answers 202, delivers it later."""
    async def accept(self, ex: Exchange, reason: str) -> Reply | None: ...


class EndpointGroups(Protocol):
    """Balanced upstreams' endpoint sets (transport/endpoints.py's EndpointRegistry)."""
    def get(self, name: str) -> Any: ...
    def background(self, upstream: str, event: Any, policy_version: str) -> None: ...


class RelayRegistry(Protocol):
    """The byte relays alive in this process (proxy/relay.py: tunnels, upgrades), so SIGTERM reaches them."""
    async def run(self, relay: Any) -> None: ...


def _never_sampled(trace_id: str, parent_span_id: str | None, caller_sampled: bool) -> bool:
    return False


@dataclass(frozen=True, slots=True)
class Services:
    transport: Transport
    sink: TelemetrySink
    clock: Clock
    rng: random.Random
    sleep: Sleep
    health: Mapping[str, HealthState]        # by upstream name, for upstreams with a health_check
    relays: RelayRegistry
    endpoints: EndpointGroups
    queue: WriteQueue | None = None          # None unless a route queues writes
    head_sampler: HeadSampler = _never_sampled


class Context:
    """One policy generation and the services it runs on. Immutable once built."""

    __slots__ = ("policy", "router", "states", "handlers", "upgrade_handlers", "replay_limits", "own_ports",
                 "services", "transport", "sink", "clock", "rng", "sleep", "health", "queue", "head_sampler",
                 "relays", "endpoints", "interceptors")

    def __init__(self, policy: Policy, services: Services, *, states: Mapping[str, RouteState],
                 handlers: Mapping[str, Handler], upgrade_handlers: Mapping[str, Handler],
                 replay_limits: Mapping[str, int], interceptors: Mapping[str, Any]) -> None:
        self.policy = policy
        self.router = Router(policy)
        self.states = states                 # by route name (`defaults` included)
        self.handlers = handlers             # each route's stack, composed once (pipeline/build.py)
        self.upgrade_handlers = upgrade_handlers   # the same for Upgrade handshakes (proxy/upgrade.py)
        self.replay_limits = replay_limits   # request body bytes buffered for replay, per route
        self.interceptors = interceptors     # HTTPS interception per listener name (proxy/intercept.py)
        self.own_ports: EgressGuard = frozenset(
            {lst.port for lst in policy.listeners} | {policy.admin.port, policy.health.port})
        self.services = services
        # The services, one attribute away on the hot path.
        self.transport = services.transport
        self.sink = services.sink
        self.clock = services.clock
        self.rng = services.rng
        self.sleep = services.sleep
        self.health = services.health
        self.queue = services.queue
        self.head_sampler = services.head_sampler
        self.relays = services.relays
        self.endpoints = services.endpoints

    def upstream(self, name: str) -> Upstream:
        return self.policy.upstreams[name]
