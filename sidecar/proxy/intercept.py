"""Opt-in HTTPS interception (SPEC "HTTPS interception"): a CONNECT to a listed host is answered
`200`, then the sidecar is the TLS server for that host, with a leaf certificate its CA signs
(certs.py), and every decrypted request goes through the route policy like a plain one: retries,
breakers, fallbacks with rewrites, caching. The upstream side is TLS again, verified as usual (the
system CAs, or the upstream's `tls.ca_file`). Hosts not listed keep the opaque tunnel.

    app --CONNECT h:443--> listener --200--> [TLS as h, leaf from our CA] --> HTTP/1.1 handler --> policy
                                                                  (ALPN h2 -> sniff.register_h2's hook)

An app that does not trust the CA fails its handshake; the sidecar logs one line and closes.
"""
from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from yarl import URL

from sidecar.core.authority import bracketed
from sidecar.policy.model import Intercept, Listener
from sidecar.exchange.replies import json_error
from sidecar.proxy import sniff
from sidecar.proxy.certs import Authority, Leaves
from sidecar.proxy.guard import SERVER_LIMITS, GuardedServer
from sidecar.proxy.server import ListenerHandler, _origin_form
from sidecar.proxy.takeover import serve_tls

log = logging.getLogger("sidecar.intercept")
HANDSHAKE_TIMEOUT = 10.0


class InterceptedHandler(ListenerHandler):
    """The listener's handler for one intercepted connection: requests arrive in origin form and mean
    `https://HOST:PORT` of the CONNECT."""

    def __init__(self, serving: sniff.Host, listener: Listener, host: str, port: int) -> None:
        super().__init__(serving.current, listener)
        self.host, self.port = host, port

    def _target(self, gen, request: web.BaseRequest):
        if request.method == "CONNECT":
            return json_error(405, "CONNECT inside an intercepted connection", None, [])
        host = bracketed(self.host)
        authority = host if self.port == 443 else f"{host}:{self.port}"
        try:
            return URL(f"https://{authority}{_origin_form(request.raw_path)}", encoded=True), None, None
        except ValueError:
            return json_error(400, "bad request target", None, [])


class Interceptor:
    """One per listener with `intercept`: which hosts are terminated, and their certificates."""

    def __init__(self, serving: sniff.Host, authority: Authority, intercept: Intercept) -> None:
        self.serving = serving
        self.intercept = intercept
        self.leaves = Leaves(authority, sniff.ALPN_PROTOCOLS)

    def wants(self, host: str) -> bool:
        return self.intercept.lists(host)

    async def serve(self, listener: Listener, transport: asyncio.Transport, host: str, port: int,
                    first: bytes = b"") -> None:
        """Be the TLS server for `host` on `transport` (whose ClientHello may be in `first`), then serve
        the decrypted requests (HTTP/1.1, or HTTP/2 when ALPN agreed on h2) until the connection closes.
        Returns only then: the CONNECT's caller releases aiohttp's hold on the socket afterwards, and
        aiohttp closes it as it lets go."""
        server = GuardedServer(InterceptedHandler(self.serving, listener, host, port), access_log=None,
                                **SERVER_LIMITS)
        loop = asyncio.get_running_loop()
        ready = loop.create_future()

        def secured(tls_transport: asyncio.Transport) -> asyncio.Protocol:
            ssl_object = tls_transport.get_extra_info("ssl_object")
            alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
            factory = sniff.h2_factory()
            if alpn == "h2" and factory is not None:
                return factory(sniff.Sniffed(tls_transport, b"", listener, self.serving, None, alpn, host, port))
            return server()

        try:
            tls = serve_tls(transport, self.leaves.context(host), first, secured, ready,
                            handshake_timeout=HANDSHAKE_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - a certificate that cannot be made: refuse this one
            log.warning("intercept %s: no certificate (%s); connection closed", host, type(exc).__name__)
            transport.abort()
            return
        try:
            await ready
        except (OSError, asyncio.TimeoutError, ConnectionError) as exc:
            # Usually an app that does not trust the sidecar's CA: one line, no traceback.
            reason = getattr(exc, "reason", None) or type(exc).__name__
            log.warning("intercept %s:%d: TLS handshake with the app failed (%s); does the app trust the "
                        "sidecar's CA?", host, port, reason)
            tls.raw.abort()
            return
        try:
            await tls.ended
        finally:
            if tls.transport is not None and not tls.transport.is_closing():
                tls.transport.close()
