"""The ClientHello/SNI parser: real hellos from OpenSSL, and fuzzed ones (random, truncated, mutated).
Properties: never an exception; a strict prefix of a hello is NEED_MORE (never a wrong verdict)."""
from __future__ import annotations

import ssl

from hypothesis import given, settings, strategies as st

from sidecar.proxy.clienthello import NEED_MORE, NOT_HELLO, ClientHello, looks_like_tls, parse_client_hello


def real_hello(server_name: str | None, alpn: list[str] | None = None) -> bytes:
    """The first flight OpenSSL sends for this SNI and ALPN (no network: memory BIOs)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)    # no CA store to load: only the hello is wanted
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


HELLO = real_hello("api.example.com", ["h2", "http/1.1"])


def test_real_hello_gives_its_sni_and_alpn():
    assert looks_like_tls(HELLO) is True
    assert parse_client_hello(HELLO) == ClientHello("api.example.com", ("h2", "http/1.1"))
    assert parse_client_hello(real_hello("Mixed.Case.Example.")) == ClientHello("mixed.case.example", ())


def test_hello_without_sni():
    assert parse_client_hello(real_hello(None)) == ClientHello(None, ())


def test_every_strict_prefix_needs_more():
    for n in range(len(HELLO)):
        assert parse_client_hello(HELLO[:n]) is NEED_MORE, n


def test_a_hello_split_over_two_records_is_joined():
    body = HELLO[5:]
    first, second = body[:100], body[100:]
    split = b"\x16\x03\x01" + len(first).to_bytes(2, "big") + first + \
        b"\x16\x03\x01" + len(second).to_bytes(2, "big") + second
    assert parse_client_hello(split) == ClientHello("api.example.com", ("h2", "http/1.1"))


def test_not_tls():
    for data in (b"GET / HTTP/1.1\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"*1\r\n$4\r\nPING\r\n",
                 b"\x16\x02\x00", b"\x17\x03\x03\x00\x10" + b"x" * 16):
        assert parse_client_hello(data) in (NOT_HELLO,), data
    assert looks_like_tls(b"") is None and looks_like_tls(b"\x16") is None
    assert looks_like_tls(b"GET") is False


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_raise(data):
    assert parse_client_hello(data) in (NEED_MORE, NOT_HELLO) or isinstance(parse_client_hello(data), ClientHello)
    assert parse_client_hello(b"\x16\x03\x01" + data) is not None


@settings(max_examples=400, deadline=None)
@given(st.integers(0, len(HELLO) - 1), st.integers(0, 255), st.integers(0, len(HELLO)))
def test_mutated_and_truncated_hellos_never_raise(at, value, cut):
    mutated = bytearray(HELLO)
    mutated[at] = value
    for data in (bytes(mutated), bytes(mutated[:cut])):
        verdict = parse_client_hello(data)
        assert verdict in (NEED_MORE, NOT_HELLO) or isinstance(verdict, ClientHello)
        if isinstance(verdict, ClientHello) and verdict.server_name is not None:
            assert verdict.server_name == verdict.server_name.lower() and len(verdict.server_name) <= 253


@settings(max_examples=100, deadline=None)
@given(st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?){0,4}", fullmatch=True))
def test_any_host_name_roundtrips(host):
    host = "h" + host                  # never an IP literal, which clients do not send as SNI (RFC 6066 §3)
    assert parse_client_hello(real_hello(host)).server_name == host
