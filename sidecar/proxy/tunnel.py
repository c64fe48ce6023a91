"""CONNECT tunnels through the proxy listener: connect-level policy only (SPEC "Listeners").

The tunnel's bytes are opaque (usually TLS), so only the connection is governed: the connect timeout,
the route's breaker on connect failures, and a trace of the attempt. The app's connection is taken over
from aiohttp's HTTP protocol once `200 Connection established` is sent, and joined to the upstream's by
the relay (relay.py) until both sides closed.
"""
from __future__ import annotations

import asyncio
import time

from aiohttp import web

from sidecar.core.decisions import Decision
from sidecar.pipeline.exchange import record_decision
from sidecar.proxy.relay import Relay
from sidecar.proxy.takeover import app_released, app_tail, app_transport
from sidecar.telemetry.records import RequestRecord, TryRecord
from sidecar.telemetry.tracecontext import new_span_id, new_trace_id
from sidecar.transport.egress import EgressRefused, refused_target, resolve_checked

CONNECT_TIMEOUT = 5.0
RELAY_IDLE_TIMEOUT = 3600.0              # a tunnel with no byte either way for an hour is closed


def _error(status: int, text: str) -> web.Response:
    return web.json_response({"error": text, "route": None, "decisions": []}, status=status)


async def tunnel(gen, request: web.BaseRequest) -> web.StreamResponse:
    host, _, port_text = request.raw_path.rpartition(":")   # authority-form: host:port
    host = host.strip("[]")
    if not host or not port_text.isdigit():
        return _error(400, "CONNECT needs host:port")
    port = int(port_text)
    route = gen.router.match("CONNECT", host, "", request.headers) or gen.policy.defaults
    if gen.policy.unmatched == "deny" and route is gen.policy.defaults:
        return _error(403, "no route matches this CONNECT and unmatched is deny")
    own_ports = None if route.allow_internal else frozenset(gen.own_ports)
    internal = refused_target(host, port, own_ports) if own_ports is not None else None
    if internal is not None:
        return _error(403, f"{internal}; a route must allow_internal")
    name = f"{host}:{port}"
    upstream = gen.policy.upstreams.get(route.upstream) if route.upstream else None
    timeout = upstream.connect_timeout if upstream else CONNECT_TIMEOUT
    trace_id = new_trace_id()
    record = RequestRecord(trace_id=trace_id, span_id=new_span_id(), parent_span_id=None,
                           caller_sampled=False, tracestate=None, route=route.name, upstream=name,
                           method="CONNECT", url=name, listener="proxy", policy_version=gen.policy.digest,
                           start_ns=time.time_ns(), sampled=gen.head_sampler(trace_id, None, False))
    state = gen.states.get(route.name)
    breaker = state.breaker(name) if state is not None else None
    try_rec = TryRecord(span_id=new_span_id(), upstream=name, method="CONNECT", url=name,
                        server_address=host, server_port=port, start_ns=time.time_ns())
    record.tries.append(try_rec)
    if breaker is not None:
        admitted, _ = breaker.admit()
        if not admitted:
            record_decision(gen.sink, record, Decision.BREAKER_OPEN, "connect breaker open", upstream=name)
            record.status = 503
            _finish(gen, record)
            return _error(503, f"circuit breaker for {name} is open")
    started = gen.clock.monotonic()
    relay = Relay(idle_timeout=RELAY_IDLE_TIMEOUT)
    try:
        await asyncio.wait_for(_open(host, port, own_ports, relay.upstream_protocol), timeout)
    except EgressRefused as exc:             # a name that resolves to metadata or to the sidecar
        if breaker is not None:
            breaker.release()
        record.status = 403
        _finish(gen, record)
        return _error(403, exc.strerror or str(exc))
    except (OSError, asyncio.TimeoutError) as exc:
        relay.close()
        try_rec.error_type = "timeout" if isinstance(exc, asyncio.TimeoutError) else "connect-failure"
        try_rec.end_ns = time.time_ns()
        if breaker is not None:
            transition = breaker.record(False, gen.clock.monotonic() - started)
            if transition is not None and transition.new.value == "open":
                record_decision(gen.sink, record, Decision.BREAKER_OPENED, transition.reason, upstream=name)
        record.status = 502
        record.error_type = try_rec.error_type
        _finish(gen, record)
        return _error(502, f"CONNECT to {name} failed: {try_rec.error_type}")
    if breaker is not None:
        breaker.record(True, gen.clock.monotonic() - started)
    try_rec.status = 200
    record.status = 200
    try:
        transport = app_transport(request)
        transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        relay.attach_app(transport, app_tail(request))
        await gen.relays.run(relay)
    finally:
        relay.close()
        try_rec.end_ns = time.time_ns()
        record.relayed, record.bytes_up, record.bytes_down = "tunnel", relay.bytes_up, relay.bytes_down
        _finish(gen, record)
    return app_released(request)


async def _open(host: str, port: int, own_ports: frozenset[int] | None, protocol) -> None:
    """Connect; unless the route allows internal targets, only to addresses the egress guard passed."""
    loop = asyncio.get_running_loop()
    if own_ports is None:
        await loop.create_connection(protocol, host, port)
        return
    error: OSError | None = None
    for addr in await resolve_checked(host, port, own_ports):
        try:
            await loop.create_connection(protocol, addr, port)
            return
        except OSError as exc:
            error = exc
    raise error or OSError(f"{host}: no address")


def _finish(gen, record: RequestRecord) -> None:
    record.end_ns = time.time_ns()
    gen.sink.request_finished(record)
