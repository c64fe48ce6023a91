"""CONNECT tunnels through the proxy listener: connect-level policy only (SPEC "Listeners").

The tunnel's bytes are opaque (usually TLS), so only the connection is governed (connect.py): the
connect timeout, the route's breaker on connect failures, and a span with the bytes each way. The app's
connection is taken over from aiohttp's HTTP protocol once `200 Connection established` is sent, and
joined to the upstream's by the relay (relay.py) until both sides closed.
"""
from __future__ import annotations

import asyncio

from aiohttp import web

from sidecar.proxy.connect import deny, finish, match_host, new_record, open_relayed
from sidecar.proxy.relay import Relay
from sidecar.proxy.takeover import app_released, app_tail, app_transport
from sidecar.transport.egress import refused_target, resolve_checked


def _error(status: int, text: str) -> web.Response:
    return web.json_response({"error": text, "route": None, "decisions": []}, status=status)


async def tunnel(gen, request: web.BaseRequest, listener) -> web.StreamResponse:
    host, _, port_text = request.raw_path.rpartition(":")   # authority-form: host:port
    host = host.strip("[]")
    if not host or not port_text.isdigit():
        return _error(400, "CONNECT needs host:port")
    port = int(port_text)
    interceptor = gen.interceptors.get(listener.name)
    if interceptor is not None and interceptor.wants(host):
        # Terminated here; each decrypted request then meets the route policy (proxy/intercept.py).
        transport = app_transport(request)
        transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await interceptor.serve(listener, transport, host, port, app_tail(request))
        return app_released(request)
    route, refusal = match_host(gen, host)
    if refusal is not None:
        deny(gen, host, port, "tunnel", listener.name, refusal)
        return _error(403, "no route matches this CONNECT and unmatched is deny")
    own_ports = None if route.allow_internal else frozenset(gen.own_ports)
    internal = refused_target(host, port, own_ports) if own_ports is not None else None
    if internal is not None:
        return _error(403, f"{internal}; a route must allow_internal")
    record = new_record(gen, route.name, host, port, "tunnel", listener.name)
    relay = Relay(idle_timeout=listener.idle_timeout)
    try:
        refusal = await open_relayed(gen, route, record, host, port, relay,
                                     lambda factory: _open(host, port, own_ports, factory))
        if refusal is not None:
            relay.close()
            return _error(refusal.status, refusal.reason.replace("connect to", "CONNECT to"))
        transport = app_transport(request)
        transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        relay.attach_app(transport, app_tail(request))
        await gen.relays.run(relay)
    finally:
        relay.close()
        finish(gen, record, relay)
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
