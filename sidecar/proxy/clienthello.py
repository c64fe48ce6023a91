"""A TLS ClientHello, read from the first bytes of a connection: its SNI host and ALPN offers.

Pure: bytes in, a verdict out, no I/O (h11's shape). Every length is checked against what is left
before it is used, so a truncated, oversized or hostile record gives `NEED_MORE` or `NOT_HELLO`, never
an exception. The wire format is RFC 8446 §4.1.2 (TLS 1.3; 1.0-1.2 are the same up to the extensions),
SNI RFC 6066 §3, ALPN RFC 7301 §3.1. A ClientHello may span several handshake records (large
post-quantum key shares do): they are joined up to `MAX_HELLO` bytes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

HANDSHAKE = 0x16                 # TLSPlaintext.type
CLIENT_HELLO = 0x01              # HandshakeType
EXT_SERVER_NAME = 0x0000
EXT_ALPN = 0x0010
MAX_RECORD = 16384 + 2048        # TLSPlaintext.length may not exceed 2^14 (+ slack for old stacks)
MAX_HELLO = 64 * 1024            # a ClientHello larger than this is not waited for
_HOST = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*")


class Verdict(Enum):
    NEED_MORE = "need-more"      # a ClientHello so far, but not all of it yet
    NOT_HELLO = "not-hello"      # not a TLS ClientHello (or a broken one)


NEED_MORE = Verdict.NEED_MORE
NOT_HELLO = Verdict.NOT_HELLO


@dataclass(frozen=True, slots=True)
class ClientHello:
    server_name: str | None      # the SNI host name, lower-case, no trailing dot; None when absent or invalid
    alpn: tuple[str, ...]        # protocols offered, in the client's order


def looks_like_tls(data: bytes) -> bool | None:
    """True when the bytes start a TLS handshake record, False when they cannot, None: too few to say."""
    if not data:
        return None
    if data[0] != HANDSHAKE:
        return False
    if len(data) < 2:
        return None
    return data[1] == 0x03       # record-layer major version: SSL 3.0 / TLS 1.x all use 3


def parse_client_hello(data: bytes) -> ClientHello | Verdict:
    message = _handshake_message(data)
    if isinstance(message, Verdict):
        return message
    return _hello(message)


def _handshake_message(data: bytes) -> bytes | Verdict:
    """The first handshake message, reassembled from consecutive handshake records."""
    payload = bytearray()
    pos = 0
    while True:
        if len(data) - pos < 5:
            head = data[pos:pos + 2]
            if (head and head[0] != HANDSHAKE) or (len(head) == 2 and head[1] != 0x03):
                return NOT_HELLO
            return NEED_MORE if len(payload) < MAX_HELLO else NOT_HELLO
        ctype, major, length = data[pos], data[pos + 1], int.from_bytes(data[pos + 3:pos + 5], "big")
        if ctype != HANDSHAKE or major != 0x03 or length == 0 or length > MAX_RECORD:
            return NOT_HELLO
        end = pos + 5 + length
        if end > len(data):
            if len(payload) + length > MAX_HELLO:
                return NOT_HELLO
            return NEED_MORE
        payload += data[pos + 5:end]
        pos = end
        if len(payload) >= 4:
            if payload[0] != CLIENT_HELLO:
                return NOT_HELLO
            size = int.from_bytes(payload[1:4], "big")
            if size > MAX_HELLO:
                return NOT_HELLO
            if len(payload) >= 4 + size:
                return bytes(payload[4:4 + size])
        if len(payload) > MAX_HELLO:
            return NOT_HELLO


class _Reader:
    """Bounds-checked reads over a buffer; `ok` turns False on the first read past the end."""

    __slots__ = ("buf", "pos", "end", "ok")

    def __init__(self, buf: bytes, pos: int = 0, end: int | None = None) -> None:
        self.buf, self.pos, self.end, self.ok = buf, pos, len(buf) if end is None else end, True

    def take(self, n: int) -> bytes:
        if not self.ok or n < 0 or self.pos + n > self.end:
            self.ok = False
            return b""
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int) -> int:
        raw = self.take(n)
        return int.from_bytes(raw, "big") if self.ok else 0

    def vector(self, len_bytes: int) -> "_Reader":
        n = self.uint(len_bytes)
        start = self.pos
        self.take(n)
        return _Reader(self.buf, start, self.pos) if self.ok else _Reader(b"", 0, 0)

    @property
    def left(self) -> int:
        return self.end - self.pos


def _hello(body: bytes) -> ClientHello | Verdict:
    r = _Reader(body)
    r.take(2 + 32)                     # legacy_version, random
    r.vector(1)                        # legacy_session_id
    r.vector(2)                        # cipher_suites
    r.vector(1)                        # legacy_compression_methods
    if not r.ok:
        return NOT_HELLO
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    if r.left == 0:                    # no extensions (SSL 3.0-era clients): no SNI
        return ClientHello(None, ())
    extensions = r.vector(2)
    if not r.ok:
        return NOT_HELLO
    while extensions.left > 0:
        kind = extensions.uint(2)
        data = extensions.vector(2)
        if not extensions.ok:
            return NOT_HELLO
        if kind == EXT_SERVER_NAME:
            server_name = _server_name(data)
        elif kind == EXT_ALPN:
            alpn = _alpn(data)
    return ClientHello(server_name, alpn)


def _server_name(ext: _Reader) -> str | None:
    names = ext.vector(2)
    while ext.ok and names.ok and names.left > 0:
        name_type = names.uint(1)
        name = names.vector(2)
        if not names.ok:
            return None
        if name_type == 0:             # host_name
            return _host(name.take(name.left))
    return None


def _host(raw: bytes) -> str | None:
    try:
        host = raw.decode("ascii").lower().rstrip(".")
    except UnicodeDecodeError:
        return None
    if not host or len(host) > 253 or not _HOST.fullmatch(host):
        return None
    return host


def _alpn(ext: _Reader) -> tuple[str, ...]:
    protocols = ext.vector(2)
    out = []
    while protocols.ok and protocols.left > 0:
        name = protocols.vector(1)
        if not protocols.ok:
            return ()
        out.append(name.take(name.left).decode("latin-1"))
    return tuple(out)
