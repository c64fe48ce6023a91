"""Connect-level policy: what governs a connection whose bytes the sidecar does not read.

CONNECT tunnels (tunnel.py) and transparent TLS/TCP passthrough (passthrough.py) both come here: the
route is matched on the host alone (the CONNECT authority, the ClientHello's SNI, or the original
destination's address), `unmatched: deny` is honoured, the connect is bounded by the route upstream's
`connect_timeout` (else CONNECT_TIMEOUT), the route's breaker judges connect failures per target, and
the connection is one span (`relayed`: tunnel | tls | tcp) with the bytes each way.

`open_relayed` returns a `Refusal` (status and reason, in HTTP terms; passthrough turns it into a
reset) or None once the relay's upstream side is connected. The caller runs the relay and calls
`finish` when it ends.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from sidecar.core.authority import authority
from sidecar.core.decisions import Decision
from sidecar.core.breaker import transition_decision
from sidecar.exchange.context import Context
from sidecar.exchange.records import request_record
from sidecar.exchange.types import record_decision
from sidecar.policy.model import Route
from sidecar.proxy.relay import Relay
from sidecar.telemetry.records import RequestRecord, TryRecord
from sidecar.telemetry.tracecontext import new_span_id
from sidecar.transport.egress import EgressRefused

CONNECT_TIMEOUT = 5.0

Opener = Callable[[Callable[[], asyncio.Protocol]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int                          # 403 denied, 502 connect failed, 503 breaker open
    reason: str


def match_host(gen, host: str) -> tuple[Route | None, Refusal | None]:
    """The route for a connection to `host` (no method, path or headers to match on)."""
    route = gen.router.match("CONNECT", host, "", {}) or gen.policy.defaults
    if gen.policy.unmatched == "deny" and route is gen.policy.defaults:
        return None, Refusal(403, f"no route matches a connection to {host} and unmatched is deny")
    return route, None


def deny(gen, host: str, port: int, kind: str, listener: str, refusal: Refusal) -> None:
    """Trace an unmatched connection refused under `unmatched: deny`."""
    record = new_record(gen, "unmatched", host, port, kind, listener)
    record_decision(gen.sink, record, Decision.UNMATCHED_DENIED, refusal.reason)
    record.status = refusal.status
    finish(gen, record)


def new_record(gen: Context, route: str, host: str, port: int, kind: str, listener: str) -> RequestRecord:
    name = authority(host, port)
    record = request_record(gen, route=route, listener=listener, method=kind.upper(), url=name, upstream=name)
    record.relayed = kind
    return record


async def open_relayed(gen, route: Route, record: RequestRecord, host: str, port: int, relay: Relay,
                       opener: Opener) -> Refusal | None:
    """Connect the relay's upstream side under the route's connect-level policy."""
    name = authority(host, port)
    upstream = gen.policy.upstreams.get(route.upstream) if route.upstream else None
    timeout = upstream.connect_timeout if upstream else CONNECT_TIMEOUT
    state = gen.states.get(route.name)
    breaker = state.breaker(name) if state is not None else None
    try_rec = TryRecord(span_id=new_span_id(), upstream=name, method=record.method, url=name,
                        server_address=host, server_port=port, start_ns=time.time_ns())
    record.tries.append(try_rec)
    if breaker is not None:
        admitted, _ = breaker.admit()
        if not admitted:
            record_decision(gen.sink, record, Decision.BREAKER_OPEN, "connect breaker open", upstream=name)
            record.status = 503
            try_rec.end_ns = time.time_ns()
            return Refusal(503, f"circuit breaker for {name} is open")
    started = gen.clock.monotonic()
    try:
        await asyncio.wait_for(opener(relay.upstream_protocol), timeout)
    except EgressRefused as exc:             # a name that resolves to metadata or to the sidecar
        if breaker is not None:
            breaker.release()
        record.status = 403
        try_rec.end_ns = time.time_ns()
        return Refusal(403, exc.strerror or str(exc))
    except (OSError, asyncio.TimeoutError) as exc:
        try_rec.error_type = "timeout" if isinstance(exc, asyncio.TimeoutError) else "connect-failure"
        try_rec.end_ns = time.time_ns()
        if breaker is not None:
            transition = breaker.record(False, gen.clock.monotonic() - started)
            if transition is not None and transition.new.value == "open":
                record_decision(gen.sink, record, transition_decision(transition), transition.reason,
                                upstream=name)
        record.status = 502
        record.error_type = try_rec.error_type
        return Refusal(502, f"connect to {name} failed: {try_rec.error_type}")
    except BaseException:
        if breaker is not None:
            breaker.release()
        raise
    if breaker is not None:
        breaker.record(True, gen.clock.monotonic() - started)
    try_rec.status = 200
    record.status = 200
    return None


def finish(gen, record: RequestRecord, relay: Relay | None = None) -> None:
    now = time.time_ns()
    if relay is not None:
        record.bytes_up, record.bytes_down = relay.bytes_up, relay.bytes_down
        for t in record.tries:
            if not t.end_ns:
                t.end_ns = now
    record.end_ns = now
    gen.sink.request_finished(record)
