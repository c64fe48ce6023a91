"""Request-smuggling and malformed-request corpus: each case is a raw request the sidecar must refuse
with the given status, closing the connection, without a byte of it reaching the upstream.

`{target}` becomes `/smuggle` on the reverse listener and `http://127.0.0.1:PORT/smuggle` on the proxy
listener; `{host}` the Host value. Sources: RFC 9112 §2.2, §3, §5, §6, §7.1; the CL.TE / TE.CL / TE.TE
families (Linhart et al. 2005, Kettle 2019); llhttp's strict-mode test corpus.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    name: str
    raw: bytes
    status: int
    why: str
    listeners: tuple[str, ...] = ("reverse", "proxy")   # where the bytes are a refused HTTP/1 request

    def render(self, target: str, host: str) -> bytes:
        return self.raw.replace(b"{target}", target.encode()).replace(b"{host}", host.encode())


def _h(head: str, body: bytes = b"") -> bytes:
    return head.replace("\n", "\r\n").encode() + body


POST = "POST {target} HTTP/1.1\nHost: {host}\n"
CASES = [
    # -- Content-Length / Transfer-Encoding framing (RFC 9112 §6.1, §6.3) -----------------------
    Case("cl-te", _h(POST + "Content-Length: 6\nTransfer-Encoding: chunked\n\n", b"0\r\n\r\nG"), 400,
         "CL.TE: front and back disagree on where the body ends"),
    Case("te-cl", _h(POST + "Transfer-Encoding: chunked\nContent-Length: 3\n\n", b"8\r\nSMUGGLED\r\n0\r\n\r\n"),
         400, "TE.CL"),
    Case("cl-cl-different", _h(POST + "Content-Length: 4\nContent-Length: 5\n\n", b"abcde"), 400,
         "two Content-Length values"),
    Case("cl-cl-same", _h(POST + "Content-Length: 4\nContent-Length: 4\n\n", b"abcd"), 400,
         "duplicate Content-Length, even equal"),
    Case("cl-list", _h(POST + "Content-Length: 4, 4\n\n", b"abcd"), 400, "list-valued Content-Length"),
    Case("cl-negative", _h(POST + "Content-Length: -1\n\n"), 400, "negative length"),
    Case("cl-plus", _h(POST + "Content-Length: +4\n\n", b"abcd"), 400, "signed length"),
    Case("cl-hex", _h(POST + "Content-Length: 0x4\n\n", b"abcd"), 400, "hex length"),
    Case("cl-inner-space", _h(POST + "Content-Length: 1 0\n\n", b"abcd"), 400, "space inside the number"),
    Case("cl-empty", _h(POST + "Content-Length: \n\n"), 400, "empty length"),
    Case("cl-overflow", _h(POST + "Content-Length: 99999999999999999999999\n\n"), 400, "overflowing length"),
    Case("te-space-before-colon", _h(POST + "Transfer-Encoding : chunked\n\n", b"0\r\n\r\n"), 400,
         "TE.TE: whitespace before the colon (RFC 9112 §5.1 MUST reject)"),
    Case("te-obs-fold", _h(POST + "Transfer-Encoding:\n chunked\n\n", b"0\r\n\r\n"), 400, "TE.TE: folded value"),
    Case("te-xchunked", _h(POST + "Transfer-Encoding: xchunked\n\n", b"0\r\n\r\n"), 400, "TE.TE: unknown coding"),
    Case("te-chunked-not-last", _h(POST + "Transfer-Encoding: chunked, gzip\n\n", b"0\r\n\r\n"), 400,
         "chunked must be the final coding"),
    Case("te-twice", _h(POST + "Transfer-Encoding: chunked\nTransfer-Encoding: chunked\n\n", b"0\r\n\r\n"), 400,
         "chunked applied twice"),
    Case("te-identity", _h(POST + "Transfer-Encoding: identity\n\n"), 400, "identity is no transfer coding"),
    Case("te-http10", _h("POST {target} HTTP/1.0\nHost: {host}\nTransfer-Encoding: chunked\n\n", b"0\r\n\r\n"),
         400, "Transfer-Encoding in HTTP/1.0: faulty framing (RFC 9112 §6.1)"),
    # -- chunked framing (RFC 9112 §7.1) ---------------------------------------------------------
    Case("chunk-size-invalid", _h(POST + "Transfer-Encoding: chunked\n\n", b"zz\r\nabc\r\n0\r\n\r\n"), 400, "size"),
    Case("chunk-size-negative", _h(POST + "Transfer-Encoding: chunked\n\n", b"-3\r\nabc\r\n0\r\n\r\n"), 400, "size"),
    Case("chunk-size-0x", _h(POST + "Transfer-Encoding: chunked\n\n", b"0x3\r\nabc\r\n0\r\n\r\n"), 400, "size"),
    Case("chunk-size-space", _h(POST + "Transfer-Encoding: chunked\n\n", b"3 \r\nabc\r\n0\r\n\r\n"), 400,
         "whitespace after the size"),
    Case("chunk-size-overflow", _h(POST + "Transfer-Encoding: chunked\n\n", b"ffffffffffffffffff\r\nabc\r\n"), 400,
         "size overflow"),
    Case("chunk-bare-lf", _h(POST + "Transfer-Encoding: chunked\n\n", b"3\nabc\n0\n\n"), 400, "bare LF in chunks"),
    Case("chunk-data-too-long", _h(POST + "Transfer-Encoding: chunked\n\n", b"3\r\nabcdef\r\n0\r\n\r\n"), 400,
         "chunk longer than its size"),
    Case("chunk-ext-ctl", _h(POST + "Transfer-Encoding: chunked\n\n", b"3;\x00\r\nabc\r\n0\r\n\r\n"), 400,
         "control character in a chunk extension"),
    Case("chunk-trailer-bad", _h(POST + "Transfer-Encoding: chunked\n\n", b"3\r\nabc\r\n0\r\nX Bad: y\r\n\r\n"),
         400, "malformed trailer"),
    # -- header syntax (RFC 9112 §5) ----------------------------------------------------------------
    Case("obs-fold", _h("GET {target} HTTP/1.1\nHost: {host}\nX-A: b\n c\n\n"), 400, "obs-fold (§5.2)"),
    Case("header-space-before-colon", _h("GET {target} HTTP/1.1\nHost: {host}\nX-A : b\n\n"), 400, "§5.1"),
    Case("header-no-colon", _h("GET {target} HTTP/1.1\nHost: {host}\nGarbage\n\n"), 400, "no colon"),
    Case("header-nul", _h("GET {target} HTTP/1.1\nHost: {host}\nX-A: b\x00c\n\n"), 400, "NUL in a value"),
    Case("header-bare-cr", _h("GET {target} HTTP/1.1\nHost: {host}\nX-A: b\rc\n\n"), 400, "bare CR (§2.2)"),
    Case("header-bare-lf", b"GET {target} HTTP/1.1\nHost: {host}\n\n", 400, "bare LF line ends"),
    Case("host-duplicate", _h("GET {target} HTTP/1.1\nHost: {host}\nHost: other.example\n\n"), 400, "§3.2"),
    Case("host-missing", _h("GET {target} HTTP/1.1\n\n"), 400, "HTTP/1.1 without Host (§3.2)"),
    Case("host-userinfo", _h("GET {target} HTTP/1.1\nHost: a@evil.example\n\n"), 400, "invalid Host value"),
    Case("host-space", _h("GET {target} HTTP/1.1\nHost: a b\n\n"), 400, "invalid Host value"),
    # -- request line (RFC 9112 §3) -----------------------------------------------------------------
    Case("method-invalid", _h("G@T {target} HTTP/1.1\nHost: {host}\n\n"), 400, "not a token"),
    Case("method-lowercase", _h("get {target} HTTP/1.1\nHost: {host}\n\n"), 400, "methods are case-sensitive"),
    Case("method-leading-space", _h(" GET {target} HTTP/1.1\nHost: {host}\n\n"), 400, "leading whitespace"),
    Case("target-space", _h("GET /a b HTTP/1.1\nHost: {host}\n\n"), 400, "space in the target"),
    Case("target-ctl", _h("GET /a\x01b HTTP/1.1\nHost: {host}\n\n"), 400, "control character in the target"),
    Case("target-relative", _h("GET abc HTTP/1.1\nHost: {host}\n\n"), 400, "no origin-form"),
    Case("version-invalid", _h("GET {target} HTTP/9.9\nHost: {host}\n\n"), 400, "unknown version"),
    Case("version-lowercase", _h("GET {target} http/1.1\nHost: {host}\n\n"), 400, "HTTP-name is case-sensitive"),
    Case("version-2", _h("GET {target} HTTP/2.0\nHost: {host}\n\n"), 505, "HTTP/2 on an HTTP/1 port"),
    Case("version-0.9", b"GET /\r\n\r\n", 505, "HTTP/0.9 has no headers and no framing"),
    # reverse and transparent listeners take it as HTTP/2 (tests/http2/test_h2_hostile.py)
    Case("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, "prior-knowledge HTTP/2 on the proxy listener",
         ("proxy",)),
    Case("tls-on-plain-port", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, 400,
         "a TLS ClientHello"),
    # -- sizes ----------------------------------------------------------------------------------------
    Case("request-line-too-long", _h("GET /" + "a" * 9000 + " HTTP/1.1\nHost: {host}\n\n"), 414,
         "RFC 9112 §3: 414 for a target longer than the server parses"),
    Case("header-too-long", _h("GET {target} HTTP/1.1\nHost: {host}\nX-Big: " + "b" * 9000 + "\n\n"), 431,
         "RFC 6585 §5"),
    Case("too-many-headers", _h("GET {target} HTTP/1.1\nHost: {host}\n"
                                + "".join(f"X-{i}: v\n" for i in range(200)) + "\n"), 431, "over max_headers"),
    Case("headers-total-too-large", _h("GET {target} HTTP/1.1\nHost: {host}\n"
                                       + "".join(f"X-{i}: {'v' * 700}\n" for i in range(100)) + "\n"), 431,
         "each line fits, their sum (70 KB) does not"),
]
