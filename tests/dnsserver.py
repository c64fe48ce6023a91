"""A real DNS server on loopback (UDP, built on dnslib) whose records a test can change or silence."""
from __future__ import annotations

import logging

from dnslib import AAAA, QTYPE, RR, A
from dnslib.server import BaseResolver, DNSHandler, DNSLogger, DNSServer


class _Records(BaseResolver):
    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.silent = False
        self.queries = 0

    def resolve(self, request, handler):
        self.queries += 1
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        for address in self.records.get(name, []):
            if ":" in address and qtype in ("AAAA", "ANY"):
                reply.add_answer(RR(request.q.qname, QTYPE.AAAA, rdata=AAAA(address), ttl=0))
            elif ":" not in address and qtype in ("A", "ANY"):
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(address), ttl=0))
        return reply


class _Handler(DNSHandler):
    def handle(self):
        resolver = self.server.resolver
        if resolver.silent:                              # no answer at all: the client times out
            resolver.queries += 1
            return
        super().handle()


class _Quiet(DNSLogger):
    def __init__(self) -> None:
        super().__init__(log="-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)


class DnsServer:
    def __init__(self) -> None:
        self.resolver = _Records()
        self._server = DNSServer(self.resolver, port=0, address="127.0.0.1", tcp=False, logger=_Quiet(),
                                 handler=_Handler)
        self._server.start_thread()
        self.port = self._server.server.server_address[1]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set(self, name: str, addresses: list[str]) -> None:
        self.resolver.records[name] = list(addresses)

    def silence(self, silent: bool = True) -> None:
        self.resolver.silent = silent

    def stop(self) -> None:
        self._server.stop()
        self._server.server.server_close()


logging.getLogger("dnslib").setLevel(logging.WARNING)
