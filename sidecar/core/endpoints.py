"""An upstream's endpoints as one live set: who may take the next try, and what each answer teaches.

No I/O: the pipeline passes `now` (monotonic seconds) and the rng, and turns the `EndpointEvent`s
returned here into decisions. An endpoint is out of rotation while it is

    ejected       outlier detection (core/outlier.py): consecutive failures
    unhealthy     its active health check fails (with the upstream's hysteresis)
    cooling down  it answered 429 with Retry-After: no request until that time (LiteLLM's cooldown)
    tried         already tried by this request, when another endpoint is left (Envoy's previous_hosts)

Panic (Envoy's panic threshold): when more endpoints are ejected or unhealthy than `max_ejected`
allows, or none is left, the balancer ignores ejection and health and balances over the whole set --
better to spread load over endpoints that may be failing than to pile it on one or refuse it all. The
one exception: when every endpoint fails its active health check, nothing is sent (as for an upstream
with one endpoint), so the fallback chain answers at once instead of after a try to a dead pod.

The breaker judges the upstream, not one pod: a failure of one endpoint while another endpoint's last
answer was good is that endpoint's outlier business, and the route's breaker does not count it
(`counts_for_breaker`). When every endpoint is failing, failures count and the breaker opens.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Collection, NamedTuple, Sequence

from sidecar.core.balance import Balance, Balancer, PeakEwma
from sidecar.core.decisions import Decision
from sidecar.core.outlier import Outlier, ejection_cap
from sidecar.policy.model import OutlierPolicy

DEFAULT_OUTLIER = OutlierPolicy()
MAX_COOLDOWN = 3600.0          # a Retry-After longer than an hour is not taken at its word

# Why a pick left the steady state: the reasons of the decisions it makes (a live try's and a queued
# delivery's alike).
ALL_UNHEALTHY = "every endpoint fails its active health check"
NONE_USABLE = "every endpoint is ejected or failing its health check"


def cooling_reason(wait: float) -> str:
    return f"every endpoint is cooling down for another {wait:.1f}s"


@dataclass(eq=False, slots=True)
class EndpointState:
    key: str                               # "host:port": the endpoint's label (/status, metrics, header)
    weight: int
    source: str                            # static | dns
    target: object                         # the transport's record for it (url, headers): opaque here
    ewma: PeakEwma
    outlier: Outlier = field(default_factory=Outlier)
    in_flight: int = 0
    healthy: bool = True                   # active health check verdict
    cooldown_until: float = 0.0            # monotonic; no request before it (429 + Retry-After)
    last_ok: bool | None = None            # its last answer: good, failed, or none yet
    requests: int = 0                      # tries sent to it (share of traffic on /status)

    @property
    def usable(self) -> bool:
        return self.healthy and self.outlier.ejected_until is None


@dataclass(frozen=True, slots=True)
class EndpointEvent:
    decision: Decision                     # endpoint_ejected / endpoint_restored / endpoint_cooldown
    endpoint: str
    reason: str


class Pick(NamedTuple):
    endpoint: EndpointState | None         # None: every endpoint fails its checks, or is cooling down
    panic: bool                            # balanced over all, ignoring ejection and health
    none_usable: bool                      # every endpoint ejected or unhealthy
    restored: tuple[EndpointEvent, ...]    # ejections that ended since the last pick
    cooled_until: float | None             # when endpoint is None: the earliest end of a cooldown
    all_unhealthy: bool = False            # every endpoint fails its active health check


class EndpointSet:
    """The endpoints of one upstream and their live state; survives reloads and DNS changes by key."""

    def __init__(self, name: str, balance: Balance, outlier: OutlierPolicy | None) -> None:
        self.name = name
        self.outlier = outlier or DEFAULT_OUTLIER
        self.balancer = Balancer(balance)
        self.endpoints: list[EndpointState] = []
        self._by_key: dict[str, EndpointState] = {}
        self._uniform = True                   # every weight equal: the balancers' cheaper draw
        # The steady state, kept up to date so that a first try need not look at every endpoint:
        # `_calm` -- every endpoint healthy and not ejected, as last seen (an ejection or a failed
        # check clears it; `pick` sets it again once all are back); `_cool_until` -- the latest
        # end of a cooldown (monotonic).
        self._calm = False
        self._cool_until = 0.0

    # -- membership ----------------------------------------------------------------------------------
    def configure(self, balance: Balance, outlier: OutlierPolicy | None) -> None:
        """A reload: new balancer or outlier settings, the endpoints' state kept."""
        self.outlier = outlier or DEFAULT_OUTLIER
        if balance != self.balancer.kind:
            self.balancer = Balancer(balance)

    def update(self, members: Sequence[tuple[str, int, str, object]], now: float) -> tuple[list[str], list[str]]:
        """Make the set `members` ((key, weight, source, target) each); endpoints that stay keep their
        state (ejection, latency, in-flight). Returns the keys added and removed."""
        old = self._by_key
        fresh: dict[str, EndpointState] = {}
        for key, weight, source, target in members:
            ep = old.get(key)
            if ep is None:
                ep = EndpointState(key=key, weight=weight, source=source, target=target, ewma=PeakEwma(now))
            else:
                ep.weight, ep.source, ep.target = weight, source, target
            fresh[key] = ep
        added = [k for k in fresh if k not in old]
        removed = [k for k in old if k not in fresh]
        self._by_key = fresh
        self.endpoints = list(fresh.values())
        self._uniform = len({ep.weight for ep in self.endpoints}) <= 1
        self._settle()
        self.balancer.forget(set(fresh))
        return added, removed

    def get(self, key: str) -> EndpointState | None:
        return self._by_key.get(key)

    def __len__(self) -> int:
        return len(self.endpoints)

    # -- the request path ----------------------------------------------------------------------------
    def pick(self, now: float, rng: random.Random, tried: Collection[str] = (),
             ignore_health: bool = False) -> Pick:
        eps = self.endpoints
        if not tried:
            ep = self.pick_steady(now, rng)
            if ep is not None:
                return Pick(ep, False, False, (), None)
        restored: tuple[EndpointEvent, ...] = ()
        usable = []
        for ep in eps:
            if ep.outlier.ejected_until is not None and ep.outlier.restore_due(now):
                restored += (EndpointEvent(Decision.ENDPOINT_RESTORED, ep.key, "ejection time over"),)
            if ep.healthy and ep.outlier.ejected_until is None:
                usable.append(ep)
        out = len(eps) - len(usable)
        self._calm = out == 0 and bool(eps)
        panic = out > 0 and (not usable or out > ejection_cap(len(eps), self.outlier))
        pool = eps if panic else usable
        if not usable:
            pool = eps if ignore_health else [ep for ep in eps if ep.healthy]
            if not pool:
                return Pick(None, False, True, restored, None, all_unhealthy=True)
        ready = [ep for ep in pool if ep.cooldown_until <= now]
        if not ready:
            cooled = min((ep.cooldown_until for ep in pool), default=None)
            return Pick(None, panic, not usable, restored, cooled)
        if tried:
            untried = [ep for ep in ready if ep.key not in tried]
            if untried:
                ready = untried
        ep = self.balancer.pick(ready, rng, now, self._uniform)
        return Pick(ep, panic, not usable, restored, None)

    def pick_steady(self, now: float, rng: random.Random) -> EndpointState | None:
        """The steady state's pick, for a first try: every endpoint in rotation and ready. None when
        any is out or cooling down (then `pick` decides, with panic, restores and cooldowns)."""
        if not self._calm or now < self._cool_until:
            return None
        return self.balancer.pick(self.endpoints, rng, now, self._uniform)

    def _settle(self) -> None:
        """Look at every endpoint again: is the set calm, and until when does a cooldown last?"""
        eps = self.endpoints
        self._calm = bool(eps) and all(ep.healthy and ep.outlier.ejected_until is None for ep in eps)
        self._cool_until = max((ep.cooldown_until for ep in eps), default=0.0)

    def panic_reason(self) -> str:
        return f"more than {self.outlier.max_ejected:g}% of {len(self)} endpoints out: balancing over all"

    def start(self, ep: EndpointState) -> None:
        ep.in_flight += 1
        ep.requests += 1

    def finish(self, ep: EndpointState, ok: bool | None, latency: float | None, now: float,
               done: bool = True) -> EndpointEvent | None:
        """A try's answer (or failure) is in: `ok` True (answered), False (failed: 5xx, connect failure,
        reset, timeout), None (no verdict: cancelled, or a 429). `latency` feeds the EWMA. `done=False`:
        a streamed body is still flowing, it stays in flight until `done(ep)`."""
        if done and ep.in_flight > 0:
            ep.in_flight -= 1
        # A failure may only raise the estimate: a replica that fails fast must not look fast and
        # draw the traffic in (the "black hole" of latency-aware balancing).
        if latency is not None and (ok is not False or latency > ep.ewma.rtt):
            ep.ewma.observe(latency, now)
        if ok is None:
            return None
        ep.last_ok = ok
        if ok:
            ep.outlier.success()
            return None
        if len(self.endpoints) <= 1 or self._by_key.get(ep.key) is not ep:
            return None                        # a set of one, or an endpoint DNS dropped: not ejected
        duration = ep.outlier.failure(self.outlier, now)
        if duration is None:
            return None
        self._calm = False
        return EndpointEvent(Decision.ENDPOINT_EJECTED, ep.key,
                             f"{self.outlier.consecutive_failures} consecutive failures; ejected for {duration:g}s")

    def answered(self, ep: EndpointState, status: int, latency: float, now: float,
                 retry_after: float | None = None, done: bool = True) -> EndpointEvent | None:
        """A try's answer is in (the live path's and a queued write's alike): a 5xx counts against `ep`
        for outlier detection; a 429 is no verdict, and with a Retry-After (`retry_after`, seconds) cools
        `ep` alone down for that long; any other status is a good answer."""
        if status >= 500:
            return self.finish(ep, False, latency, now, done=done)
        if status == 429:
            self.finish(ep, None, latency, now, done=done)
            if retry_after is not None and retry_after > 0:
                return self.cool_down(ep, retry_after, now)
            return None
        return self.finish(ep, True, latency, now, done=done)

    def done(self, ep: EndpointState) -> None:
        """A streamed answer's body ended (or was cut, or dropped): the try leaves the in-flight count."""
        if ep.in_flight > 0:
            ep.in_flight -= 1

    def cool_down(self, ep: EndpointState, seconds: float, now: float) -> EndpointEvent:
        """A 429 with Retry-After: this endpoint alone takes no request for that long."""
        seconds = min(max(0.0, seconds), MAX_COOLDOWN)
        ep.cooldown_until = max(ep.cooldown_until, now + seconds)
        self._cool_until = max(self._cool_until, ep.cooldown_until)
        return EndpointEvent(Decision.ENDPOINT_COOLDOWN, ep.key, f"429 with Retry-After {seconds:g}s")

    def others_ready(self, ep: EndpointState, now: float) -> bool:
        """Is another endpoint usable and not cooling down? (Then a Retry-After is this endpoint's alone.)"""
        return any(o is not ep and o.usable and o.cooldown_until <= now for o in self.endpoints)

    def counts_for_breaker(self, ep: EndpointState) -> bool:
        """Does a failure of `ep` count against the route's breaker? Not while another endpoint in
        rotation answered well last: then `ep` is an outlier, not the upstream."""
        for other in self.endpoints:
            if other is not ep and other.last_ok and other.usable:
                return False
        return True

    def set_health(self, key: str, healthy: bool) -> bool:
        """An active check flipped `key`'s health; False when the endpoint is no longer in the set."""
        ep = self._by_key.get(key)
        if ep is None:
            return False
        ep.healthy = healthy
        self._settle()
        return True

    # -- for /status and metrics ---------------------------------------------------------------------
    def snapshot(self, now: float, wall: float) -> list[dict[str, object]]:
        total = sum(ep.requests for ep in self.endpoints) or 1
        out = []
        for ep in self.endpoints:
            until = ep.outlier.ejected_until
            state = state_of(ep, now)
            out.append({
                "endpoint": ep.key, "state": state, "source": ep.source, "weight": ep.weight,
                "in_flight": ep.in_flight, "ewma_ms": round(ep.ewma.estimate(now) * 1000, 3),
                "ejected_until": None if until is None else round(wall + (until - now), 3),
                "ejections": ep.outlier.ejections,
                "cooldown_until": round(wall + (ep.cooldown_until - now), 3) if ep.cooldown_until > now else None,
                "requests": ep.requests, "share": round(ep.requests / total, 4),
            })
        return out


STATES = ("active", "ejected", "unhealthy", "cooldown")


def state_of(ep: EndpointState, now: float) -> str:
    if ep.outlier.ejected_until is not None and now < ep.outlier.ejected_until:
        return "ejected"
    if not ep.healthy:
        return "unhealthy"
    if ep.cooldown_until > now:
        return "cooldown"
    return "active"
