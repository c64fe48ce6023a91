"""Transparent mode's TLS and TCP passthrough: relayed to the original destination, connect-level policy.

What the sniffer (sniff.py) could not govern comes here with the bytes it read. The route is matched on
the ClientHello's SNI host, else on the original destination's address; the connection goes to the
original destination (SO_ORIGINAL_DST) whatever the route's upstream says, as the app asked for that
address and may be verifying its certificate. Refused connections (unmatched under `deny`, an open
breaker, a failed connect) are reset, which is what the app would have seen from an unreachable server.
"""
from __future__ import annotations

import asyncio
import logging

from sidecar.policy.model import Listener
from sidecar.proxy.connect import deny, finish, match_host, new_record, open_relayed
from sidecar.proxy.original_dst import original_destination
from sidecar.proxy.relay import Relay

log = logging.getLogger("sidecar.passthrough")


async def passthrough(gen, listener: Listener, transport: asyncio.Transport, first: bytes, kind: str,
                      server_name: str | None) -> None:
    dst = original_destination(transport)
    sockname = transport.get_extra_info("sockname")
    if dst is None or (sockname is not None and tuple(sockname[:2]) == dst):
        # Not redirected by iptables: relaying it "back where it was going" would loop into ourselves.
        log.warning("transparent listener %s: a %s connection with no original destination was closed",
                    listener.name, kind)
        transport.abort()
        return
    address, port = dst
    host = server_name or address
    route, refusal = match_host(gen, host)
    if refusal is not None:
        deny(gen, host, port, kind, listener.name, refusal)
        transport.abort()
        return
    record = new_record(gen, route.name, host, port, kind, listener.name)
    relay = Relay(idle_timeout=listener.idle_timeout)
    relay.attach_app(transport, first)
    transport.pause_reading()            # until the upstream is connected: nothing piles up meanwhile
    loop = asyncio.get_running_loop()
    try:
        refusal = await open_relayed(gen, route, record, host, port, relay,
                                     lambda factory: loop.create_connection(factory, address, port))
        if refusal is not None:
            relay.abort()                # a reset, as from an unreachable server
            return
        if not transport.is_closing():
            transport.resume_reading()
        await gen.relays.run(relay)
    finally:
        relay.close()
        finish(gen, record, relay)
