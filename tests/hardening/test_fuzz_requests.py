"""Hypothesis over raw request bytes sent to a running sidecar (the policy loader has its own fuzzing
in tests/policy). Properties: every connection gets well-formed HTTP/1.x answers or is closed, within a
bounded time; no answer is a bare 500 or a traceback; the process stays healthy after each input.

The sidecar runs on its own event loop in a thread, so each example is plain blocking socket I/O.
SIDECAR_FUZZ_EXAMPLES=5000 for a deeper run than CI's."""
from __future__ import annotations

import asyncio
import os
import re
import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from sidecar.proxy import guard

from .kit import EchoUpstream, Ports, policy_text, start_sidecar

HEADER_TIMEOUT = 1.0
WINDOW = 6.0                             # an input must be answered or closed within this


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    saved = guard.HEADER_TIMEOUT, guard.IDLE_TIMEOUT
    guard.HEADER_TIMEOUT, guard.IDLE_TIMEOUT = HEADER_TIMEOUT, 2.0
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="sidecar-under-fuzz", daemon=True)
    thread.start()

    def run(coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    upstream = run(EchoUpstream().start())
    ports = Ports()
    sc = run(start_sidecar(tmp_path_factory.mktemp("fuzz"),
                           policy_text(ports, upstream.url, "defaults: {timeout: 1s}\n")))
    try:
        yield ports, upstream, sc
    finally:
        run(sc.stop())
        run(upstream.stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
        guard.HEADER_TIMEOUT, guard.IDLE_TIMEOUT = saved


_STATUS = re.compile(rb"HTTP/(?:1\.[01]|0\.9|2\.0) (\d{3}) [^\r\n]*\r\n")


def _answers(data: bytes) -> list[int] | None:
    """The statuses of the complete responses at the start of `data`; None when it is not HTTP."""
    statuses = []
    while data:
        m = _STATUS.match(data)
        if m is None:
            return None
        head_end = data.find(b"\r\n\r\n", m.end() - 2)
        if head_end < 0:
            return statuses                      # a partial head: the caller reads more
        head = data[:head_end].lower()
        statuses.append(int(m.group(1)))
        length = re.search(rb"\r\ncontent-length: *(\d+)", head)
        body_start = head_end + 4
        if length:
            data = data[body_start + int(length.group(1)):]
        elif b"transfer-encoding: chunked" in head:
            end = data.find(b"\r\n0\r\n\r\n", body_start - 2)
            if end < 0:
                return statuses
            data = data[end + 7:]
        else:
            data = b""                           # until close
    return statuses


def converse(port: int, payload: bytes) -> tuple[bytes, bool]:
    """Send `payload`, read until the server closes or has been quiet after an answer."""
    deadline = time.monotonic() + WINDOW
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        try:
            s.sendall(payload)
        except OSError:
            pass                                  # the server may refuse and close mid-send
        while time.monotonic() < deadline:
            answered = bool(_answers(received))
            s.settimeout(0.3 if answered else max(0.05, deadline - time.monotonic()))
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                if answered:
                    return received, False        # answered, kept alive: fine
                continue
            except OSError:
                return received, True
            if not chunk:
                return received, True
            received += chunk
    return received, False


def healthy(ports: Ports) -> bool:
    data, _ = converse(ports.reverse, b"GET /health-probe HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    return data.startswith(b"HTTP/1.1 200")


TOKENS = [b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE", b"get",
          b"G ET", b"\x00", b"PRI", b""]
TARGETS = [b"/", b"/a?b=c", b"*", b"http://127.0.0.1:1/x", b"//x", b"/%00", b"/a b", b"/\xff", b"a:1",
           b"/" + b"a" * 9000, b"http://[::1]:0/", b"http://169.254.169.254/"]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.1 ", b"http/1.1", b"HTTP/1.10", b""]
NAMES = [b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Upgrade", b"Expect",
         b"Authorization", b"Cookie", b"X-A", b"Transfer-Encoding ", b" Host", b"Content-Length\x00", b""]
VALUES = [b"a", b"0", b"5", b"-1", b"1, 1", b"chunked", b"gzip, chunked", b"chunked, identity", b"close",
          b"keep-alive, Upgrade", b"websocket", b"100-continue", b"\x01", b"a\rb", b"x" * 9000, b""]
EOLS = [b"\r\n", b"\n", b"\r", b" \r\n", b"\r\n "]
BODIES = [b"", b"hello", b"0\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n", b"zz\r\n", b"5\r\nhel",
          b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n", b"\x16\x03\x01"]

# Wild: any token anywhere, mostly refused by the parser at once.
wild = st.builds(
    lambda method, target, version, eol, headers, eol2, body: (
        method + b" " + target + (b" " + version if version else b"") + eol
        + b"".join(n + b": " + v + e for n, v, e in headers) + eol2 + body),
    st.sampled_from(TOKENS) | st.binary(max_size=8),
    st.sampled_from(TARGETS) | st.binary(min_size=1, max_size=40),
    st.sampled_from(VERSIONS),
    st.sampled_from(EOLS),
    st.lists(st.tuples(st.sampled_from(NAMES) | st.binary(max_size=12),
                       st.sampled_from(VALUES) | st.binary(max_size=24),
                       st.sampled_from(EOLS)), max_size=8),
    st.sampled_from(EOLS),
    st.sampled_from(BODIES) | st.binary(max_size=64),
)


@st.composite
def valid_request(draw) -> bytes:
    """A well-formed request (`{UP}` stands for the upstream's origin on the proxy listener)."""
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"]))   # no HEAD: its
    # answer declares a length it does not carry, which `_answers` cannot tell apart
    path = b"/" + draw(st.text("abcxyz0123/._-~%", max_size=20)).encode()
    query = draw(st.sampled_from([b"", b"?a=1", b"?a=1&b=%20"]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    headers = [(b"Host", b"app.local")]
    headers += draw(st.lists(st.tuples(st.sampled_from([b"Accept", b"X-Trace", b"Cookie", b"Authorization",
                                                        b"Connection", b"Expect", b"Te", b"Upgrade"]),
                                       st.sampled_from([b"*/*", b"v", b"close", b"keep-alive", b"trailers",
                                                        b"100-continue", b"h2c", b"Bearer t0k"])), max_size=3))
    body = draw(st.binary(max_size=200)) if method in (b"POST", b"PUT", b"PATCH") else b""
    framing = draw(st.sampled_from(["length", "chunked", "none"])) if body else "none"
    if framing == "length":
        headers.append((b"Content-Length", str(len(body)).encode()))
    elif framing == "chunked" and version == b"HTTP/1.1":
        headers.append((b"Transfer-Encoding", b"chunked"))
        cut = draw(st.integers(0, len(body)))
        parts = [p for p in (body[:cut], body[cut:]) if p]
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    else:
        body = b""
    head = method + b" {UP}" + path + query + b" " + version + b"\r\n"
    head += b"".join(n + b": " + v + b"\r\n" for n, v in headers)
    return head + b"\r\n" + body


def _mutate(data: bytes, kind: str, pos: int, byte: int) -> bytes:
    pos = pos % (len(data) + 1)
    head_end = data.find(b"\r\n\r\n")
    if kind == "insert":
        return data[:pos] + bytes([byte]) + data[pos:]
    if kind == "replace" and data:
        pos = min(pos, len(data) - 1)
        return data[:pos] + bytes([byte]) + data[pos + 1:]
    if kind == "delete" and data:
        return data[:pos] + data[pos + 1:]
    if kind == "truncate":
        return data[:max(1, pos)]
    if head_end < 0:
        return data
    extra = {
        "cl-te": b"\r\nTransfer-Encoding: chunked\r\nContent-Length: 3",
        "dup-cl": b"\r\nContent-Length: 0\r\nContent-Length: 7",
        "dup-host": b"\r\nHost: other.example",
        "fold": b"\r\n folded-line",
        "bad-te": b"\r\nTransfer-Encoding: chunked, identity",
        "lf-only": b"\nX-Lf: 1",
        "big": b"\r\nX-Big: " + b"b" * 9000,
    }.get(kind)
    if extra is not None:
        return data[:head_end] + extra + data[head_end:]
    if kind == "smuggle-tail":
        return data + b"GET /second HTTP/1.1\r\nHost: app.local\r\nContent-Length: 5\r\n\r\n"
    return data


MUTATIONS = ["insert", "replace", "delete", "truncate", "cl-te", "dup-cl", "dup-host", "fold", "bad-te",
             "lf-only", "big", "smuggle-tail"]
mutated = st.builds(
    lambda req, muts: __import__("functools").reduce(lambda d, m: _mutate(d, *m), muts, req),
    valid_request(),
    st.lists(st.tuples(st.sampled_from(MUTATIONS), st.integers(0, 10_000), st.integers(0, 255)), max_size=2))
raw_inputs = mutated | mutated | wild | st.binary(min_size=1, max_size=256) | \
    st.lists(mutated, min_size=2, max_size=3).map(b"".join)


@settings(max_examples=int(os.environ.get("SIDECAR_FUZZ_EXAMPLES", "200")), deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(payload=raw_inputs, listener=st.sampled_from(["reverse", "proxy"]))
def test_any_bytes_get_http_answers_or_a_close_never_a_crash(live, payload, listener):
    ports, upstream, sc = live
    origin = upstream.url.encode() if listener == "proxy" else b""
    data, closed = converse(getattr(ports, listener), payload.replace(b"{UP}", origin))
    statuses = _answers(data)
    event(f"answers: {statuses[:3] if statuses else statuses}, closed: {closed}")
    assert statuses is not None, f"not an HTTP answer: {data[:200]!r}"
    assert data == b"" or statuses, f"a partial answer: {data[:200]!r}"
    assert statuses or closed, "no answer and the connection still open after the window"
    assert 500 not in statuses, f"a bare 500: {data[:300]!r}"
    assert b"Traceback" not in data
    assert healthy(ports), "the sidecar stopped answering after this input"


def test_after_the_fuzz_the_process_is_healthy_and_holds_no_connections(live):
    ports, upstream, sc = live
    assert healthy(ports)
    deadline = time.monotonic() + 5
    servers = [entry[1] for entry in sc.runtime._servers.values()]
    while time.monotonic() < deadline and any(server.connections for server in servers):
        time.sleep(0.2)
    assert not any(server.connections for server in servers), "connections outlived the idle timeout"
