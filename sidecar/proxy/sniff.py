"""The connection-level front of reverse and transparent listeners: the first bytes decide who speaks.

    first bytes                                 reverse listener          transparent listener
    an HTTP/1.x request line                    aiohttp's HTTP/1 server   aiohttp's HTTP/1 server
    the HTTP/2 preface (PRI * HTTP/2.0 ...)     H2 hook, else HTTP/1 (*)  H2 hook, else TCP relay
    a TLS ClientHello                           HTTP/1 (a 400, as today)  TLS relay by SNI, connect-level policy
    anything else                               HTTP/1 (a 400, as today)  TCP relay, connect-level policy
    nothing within `sniff_timeout` (200ms)      (waits: header timeout)   TCP relay (server speaks first)

(*) aiohttp's HTTP/1 server then refuses the preface with a 505, as before sniffing existed.

Proxy listeners do not sniff (a CONNECT says what follows): their connections go to HTTP/1 at once.
Only the first bytes are read here; nothing is consumed. Once decided, the connection's protocol is
replaced (`transport.set_protocol`) and the new protocol gets `connection_made` and every byte read so
far, so it cannot tell it came second. Proxy listeners do not sniff: a CONNECT says what follows.

## The HTTP/2 hook (filled by the HTTP/2 issue)

    from sidecar.proxy import sniff

    def h2_protocol(conn: sniff.Sniffed) -> asyncio.Protocol:
        ...                               # a protocol serving HTTP/2 on conn.transport
    sniff.register_h2(h2_protocol)

`register_h2(factory)` installs one factory for the process (`register_h2(None)` removes it). It is
called with a `Sniffed` record (the transport, the listener, the runtime, the original destination in
transparent mode, the ALPN protocol and SNI host when the connection was TLS-intercepted) and returns
an `asyncio.Protocol`; the front then calls `set_protocol`, `connection_made(transport)` and
`data_received(first_bytes)` on it (the preface included). The same factory serves h2 negotiated by
ALPN on intercepted TLS (`ALPN_PROTOCOLS` then offers "h2" first).
"""
from __future__ import annotations

import asyncio
import logging
import re
import weakref
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Protocol

from sidecar.exchange.context import Context

from sidecar.policy.model import Listener
from sidecar.proxy.clienthello import NEED_MORE, ClientHello, looks_like_tls, parse_client_hello
from sidecar.proxy.original_dst import original_destination

log = logging.getLogger("sidecar.sniff")

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_SNIFF = 64 * 1024 + 16           # a ClientHello may be this large; past it, decide with what we have
MAX_REQUEST_LINE = 8190              # the HTTP/1 server's own limit (guard.SERVER_LIMITS)
# RFC 9112 §3: method SP request-target SP HTTP-version CRLF (a bare LF is tolerated, §2.2).
_REQUEST_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ [^ \r\n]+ HTTP/1\.[0-9]\r?\n")
_REQUEST_PREFIX = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}( [^ \r\n]*( (H(T(T(P(/(1(\.([0-9]\r?)?)?)?)?)?)?)?)?)?)?")


class Kind(Enum):
    HTTP1 = "http1"
    H2 = "h2"
    TLS = "tls"
    TCP = "tcp"


def classify(data: bytes, *, transparent: bool) -> Kind | None:
    """What the first bytes are; None while too few to say. Pure (tests feed it bytes)."""
    data = data.lstrip(b"\r\n")          # RFC 9112 §2.2: empty lines before a request line are ignored
    if not data:
        return None
    if data.startswith(H2_PREFACE):
        return Kind.H2
    if H2_PREFACE.startswith(data):
        return None
    if not transparent:                  # a reverse listener speaks HTTP: its server answers the rest
        return Kind.HTTP1
    tls = looks_like_tls(data)
    if tls is None:
        return None
    if tls:
        return Kind.TLS
    line_end = data.find(b"\n")
    if line_end >= 0:
        return Kind.HTTP1 if _REQUEST_LINE.match(data, 0, line_end + 1) else Kind.TCP
    if len(data) <= MAX_REQUEST_LINE and _REQUEST_PREFIX.fullmatch(data):
        return None                      # a request line so far, not all of it yet
    return Kind.TCP


class Host(Protocol):
    """What a listener's connections need of the process serving them (sidecar.runtime.Runtime)."""
    h2_connections: "weakref.WeakSet[Any]"   # HTTP/2 app connections, for the drain on SIGTERM

    def current(self) -> Context:
        """The running policy generation."""
        ...


@dataclass(frozen=True, slots=True)
class Sniffed:
    """What a protocol taking over a sniffed connection is told."""
    transport: asyncio.Transport
    first: bytes                         # every byte read so far; the new protocol receives them
    listener: Listener
    host: Host                           # the serving process: its current generation, its HTTP/2 set
    original_dst: tuple[str, int] | None = None    # transparent mode: where the app was connecting
    alpn: str | None = None              # intercepted TLS: the protocol ALPN agreed
    server_name: str | None = None       # intercepted TLS: the SNI host
    server_port: int | None = None       # intercepted TLS: the CONNECT's port


H2Factory = Callable[[Sniffed], asyncio.Protocol]
_h2_factory: H2Factory | None = None
ALPN_PROTOCOLS = ["http/1.1"]            # offered on intercepted TLS; register_h2 puts "h2" first


def register_h2(factory: H2Factory | None) -> None:
    """Install (or, with None, remove) the protocol factory for HTTP/2 connections."""
    global _h2_factory
    _h2_factory = factory
    ALPN_PROTOCOLS[:] = ["h2", "http/1.1"] if factory is not None else ["http/1.1"]


def h2_factory() -> H2Factory | None:
    return _h2_factory


def take_over(transport: asyncio.Transport, protocol: asyncio.Protocol, first: bytes) -> None:
    """Hand the connection to `protocol` as if it had been there from the start."""
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    if first:
        protocol.data_received(first)


class Front:
    """Per listener: the HTTP/1 protocol factory, and what to do with everything else."""

    def __init__(self, host: Host, listener: Listener, http_factory: Callable[[], asyncio.Protocol],
                 header_timeout: float) -> None:
        self.host = host
        self.listener = listener         # replaced in place by a reload (runtime._commit_listeners)
        self.http_factory = http_factory
        self.header_timeout = header_timeout
        self.tasks: set[asyncio.Task] = set()

    def __call__(self) -> "Sniffer":
        return Sniffer(self)

    @property
    def transparent(self) -> bool:
        return self.listener.mode == "transparent"

    def http(self, transport: asyncio.Transport, first: bytes, accepted_at: float) -> None:
        proto = self.http_factory()
        proto.accepted_at = accepted_at  # the header timeout counts from the accept, sniffing included
        take_over(transport, proto, first)

    def h2(self, transport: asyncio.Transport, first: bytes, accepted_at: float) -> None:
        factory = _h2_factory
        if factory is None:
            if self.transparent:
                self.relay(transport, first, Kind.TCP, None)
            else:
                self.http(transport, first, accepted_at)   # refused there (505), as before sniffing
            return
        dst = original_destination(transport) if self.transparent else None
        take_over(transport, factory(Sniffed(transport, first, self.listener, self.host, dst)), first)

    def relay(self, transport: asyncio.Transport, first: bytes, kind: Kind, hello: ClientHello | None) -> None:
        from sidecar.proxy.passthrough import passthrough   # import cycle: passthrough uses the pipeline
        gen = self.host.current()
        name = hello.server_name if hello is not None else None
        interceptor = gen.interceptors.get(self.listener.name) if name else None
        if interceptor is not None and interceptor.wants(name):
            dst = original_destination(transport)
            work = interceptor.serve(self.listener, transport, name, dst[1] if dst else 443, first)
        else:
            work = passthrough(gen, self.listener, transport, first, kind.value, name)
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


def _partial_kind(buf: bytes) -> Kind:
    """What an undecided start most likely is when the sniff timeout ends the wait."""
    data = buf.lstrip(b"\r\n")
    if not data:
        return Kind.TCP                  # silence: a server-speaks-first protocol
    if H2_PREFACE.startswith(data):
        return Kind.H2                   # the hook, or TCP without one
    if looks_like_tls(data):
        return Kind.TLS
    return Kind.HTTP1                    # a request line so far: the HTTP server's header timeout applies


class Sniffer(asyncio.Protocol):
    """A connection's first protocol: buffers until the bytes say what they are, then hands over."""

    __slots__ = ("front", "transport", "buf", "timer", "accepted_at", "done")

    def __init__(self, front: Front) -> None:
        self.front = front
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.timer: asyncio.TimerHandle | None = None
        self.accepted_at = 0.0
        self.done = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        loop = asyncio.get_running_loop()
        self.accepted_at = loop.time()
        front = self.front
        if front.listener.mode == "proxy":   # absolute-form and CONNECT: always HTTP/1
            self.done = True
            front.http(transport, b"", self.accepted_at)
            return
        wait = front.listener.sniff_timeout if front.transparent else front.header_timeout
        self.timer = loop.call_later(wait, self._timeout)

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        self.buf += data
        kind = classify(self.buf, transparent=self.front.transparent)
        hello = None
        if kind is Kind.TLS:
            hello = parse_client_hello(self.buf)
            if hello is NEED_MORE and len(self.buf) < MAX_SNIFF:
                return
            hello = hello if isinstance(hello, ClientHello) else None
        elif kind is None and len(self.buf) < MAX_SNIFF:
            return
        self._decide(kind or Kind.TCP, hello)

    def eof_received(self) -> bool:
        if not self.done:                 # the app sent all it will before we could tell: decide now
            front = self.front
            kind = classify(self.buf, transparent=front.transparent) or Kind.TCP
            if not front.transparent or kind is Kind.HTTP1:
                self.done = True
                self._cancel()
                self.transport.close()    # a request line cut short: nothing to serve
                return False
            self._decide(kind, self._hello(kind))
            return True                   # the relay passes the EOF on once its upstream is connected
        return False

    def connection_lost(self, exc) -> None:
        self._cancel()
        self.done = True

    def _timeout(self) -> None:
        self.timer = None
        if self.done or self.transport is None or self.transport.is_closing():
            return
        front = self.front
        if not front.transparent:        # a reverse client that never finished its first line
            front.http(self.transport, self.buf, self.accepted_at)
            self.done = True
            return
        kind = classify(self.buf, transparent=True)
        if kind is None:                 # silence (server speaks first), or a partial line, preface or hello
            kind = _partial_kind(self.buf)
        self._decide(kind, self._hello(kind))

    def _hello(self, kind: Kind) -> ClientHello | None:
        if kind is not Kind.TLS:
            return None
        hello = parse_client_hello(self.buf)
        return hello if isinstance(hello, ClientHello) else None

    def _cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _decide(self, kind: Kind, hello: ClientHello | None) -> None:
        self.done = True
        self._cancel()
        transport, first, front = self.transport, self.buf, self.front
        self.buf = b""
        if kind is Kind.HTTP1:
            front.http(transport, first, self.accepted_at)
        elif kind is Kind.H2:
            front.h2(transport, first, self.accepted_at)
        else:
            front.relay(transport, first, kind, hello)
