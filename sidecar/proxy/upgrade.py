"""Upgraded connections (WebSocket, and any other `Upgrade` token) on every listener (SPEC "Upgrades").

The handshake is an ordinary request through the route's stack (build.py, without the cache and hedge
layers): matched, connected under the route's connect timeout, breaker and health, retried like a GET,
fallen back from. When the upstream answers `101 Switching Protocols` the sidecar relays that answer,
takes both connections over from aiohttp (takeover.py) and joins them with the relay (relay.py) until
either side closes or the listener's `idle_timeout` passes. Any other answer (a refused handshake) is
relayed as an ordinary answer and the app's connection stays HTTP (RFC 9110 §7.8).

The upgraded connection is one span (its route's), from the handshake to the close, with the bytes each
way; on SIGTERM a WebSocket gets a close frame `1001 going away` each way (RFC 6455 §7.4.1), placed
between two frames of each direction, then the connection closes; other protocols are relayed until they
end or the drain timeout does.
"""
from __future__ import annotations

import os
import time

from aiohttp import web
from aiohttp.http import HttpVersion11
from multidict import CIMultiDict

from sidecar.aiohttp_private import serialize_headers
from sidecar.exchange.headers import end_to_end
from sidecar.proxy.relay import Relay
from sidecar.proxy.takeover import app_released, app_tail, app_transport, upstream_takeover

GOING_AWAY = 1001
CLOSE_GRACE = 2.0                # after our close frames: seconds the peers get to close before we do


def upgrade_token(request: web.BaseRequest) -> str | None:
    """The `Upgrade` the app asks for (RFC 9110 §7.8), or None for an ordinary request. A request with a
    body is not upgraded (its body would have to be read first): it is served as an ordinary request."""
    upgrade = request.headers.get("upgrade")
    if not upgrade or request.version < HttpVersion11 or request.body_exists:
        return None
    connection = request.headers.get("connection", "")
    if "upgrade" not in {t.strip().lower() for t in connection.split(",")}:
        return None
    return upgrade.strip()


def request_headers(headers: CIMultiDict, token: str) -> CIMultiDict:
    """The hop-by-hop `Connection: upgrade` and `Upgrade` go on to the upstream (the rest are dropped)."""
    headers["Connection"] = "Upgrade"
    headers["Upgrade"] = token
    return headers


def is_websocket(token: str) -> bool:
    return token.split("/", 1)[0].strip().lower() == "websocket"


async def relay_upgraded(gen, listener, request: web.BaseRequest, ex, reply, token: str) -> web.StreamResponse:
    """Send the 101 to the app and relay both connections until they close. `reply.upgraded` is the
    transport's `Response` whose connection switched protocols."""
    record = ex.record
    response = reply.upgraded
    record.relayed = "upgrade"
    relay = Relay(idle_timeout=listener.idle_timeout)
    try:
        upstream, first_down = upstream_takeover(response.protocol)
        response.release()                # its pool slot: the connection is the relay's now
        headers = end_to_end(response.headers)
        headers["Connection"] = "Upgrade"
        headers["Upgrade"] = response.headers.get("upgrade", token)
        headers["x-sidecar-route"] = ex.route.name
        headers["x-sidecar-upstream"] = reply.upstream
        headers["x-sidecar-attempts"] = str(ex.attempts)
        if reply.endpoint is not None:
            headers["x-sidecar-endpoint"] = reply.endpoint
        degraded = ex.degraded_names() if ex.enforce else []
        if degraded:
            headers["x-sidecar-degraded"] = ",".join(degraded)
        app = app_transport(request)
        app.write(serialize_headers(f"HTTP/1.1 101 {response.reason or 'Switching Protocols'}", headers))
        relay.attach_upstream(upstream, first_down)
        relay.attach_app(app, app_tail(request))
        if is_websocket(token):
            WebSocketGoAway(relay)
        record.status = 101
        record.upstream = reply.upstream
        record.attempts = ex.attempts
        reply.finish(True)                # the handshake succeeded: that is the upstream's outcome
        await gen.relays.run(relay)
    except ConnectionError:
        reply.finish(None)
        raise
    finally:
        relay.close()
        reply.release()
        record.bytes_up, record.bytes_down = relay.bytes_up, relay.bytes_down
        record.end_ns = time.time_ns()
        gen.sink.request_finished(record)
    return app_released(request)


class Frames:
    """Where WebSocket frames end in one direction of the stream (RFC 6455 §5.2): headers are parsed,
    payloads skipped. Pure; `advance(data, stop)` consumes bytes up to the first frame end when `stop`."""

    __slots__ = ("head", "need")

    def __init__(self) -> None:
        self.head = b""                  # a frame header read in part
        self.need = 0                    # payload bytes of the current frame still to come

    @property
    def between(self) -> bool:
        return not self.head and self.need == 0

    def advance(self, data: bytes, stop: bool = False) -> int:
        """Consume `data` (all of it, or, with `stop`, up to the first point between two frames);
        returns how many bytes were consumed."""
        pos, size = 0, len(data)
        while pos < size:
            if stop and self.between and pos > 0:
                return pos
            if self.need:
                take = min(self.need, size - pos)
                self.need -= take
                pos += take
                continue
            head = self.head + data[pos:pos + 14]
            length = _header_length(head)
            if length is None or len(head) < length:
                self.head = head          # wait for the rest of the header
                return size if not stop else size
            used = length - len(self.head)
            self.head = b""
            pos += used
            self.need = _payload_length(head)
        return pos


def _header_length(head: bytes) -> int | None:
    if len(head) < 2:
        return None
    n = head[1] & 0x7F
    return 2 + (2 if n == 126 else 8 if n == 127 else 0) + (4 if head[1] & 0x80 else 0)


def _payload_length(head: bytes) -> int:
    n = head[1] & 0x7F
    if n == 126:
        return int.from_bytes(head[2:4], "big")
    if n == 127:
        return int.from_bytes(head[2:10], "big")
    return n


def close_frame(code: int, masked: bool) -> bytes:
    """A close frame with `code` and no reason; masked as a client's must be (RFC 6455 §5.3)."""
    payload = code.to_bytes(2, "big")
    if not masked:
        return b"\x88" + bytes([len(payload)]) + payload
    key = os.urandom(4)
    return b"\x88" + bytes([0x80 | len(payload)]) + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class WebSocketGoAway:
    """Tracks frame ends both ways; on SIGTERM (`Relays.drain`) sends `1001 going away` to the app as the
    server would and to the upstream as the client would, each between two frames of its direction, then
    forwards nothing more and closes once both peers closed or after CLOSE_GRACE."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.down = Frames()             # upstream -> app
        self.up = Frames()               # app -> upstream
        self.sent = {"app": False, "upstream": False}
        relay.upstream.boundary = self._from_upstream
        relay.app.boundary = self._from_app
        relay.on_drain = self.go_away
        self.going = False

    def _from_upstream(self, data: bytes) -> bytes:
        return self._pass(data, self.down, "app")

    def _from_app(self, data: bytes) -> bytes:
        return self._pass(data, self.up, "upstream")

    def _pass(self, data: bytes, frames: Frames, to: str) -> bytes:
        if not self.going:
            frames.advance(data)
            return data
        if self.sent[to]:
            return b""                   # after our close frame nothing more may follow
        n = frames.advance(data, stop=True) if not frames.between else 0
        if frames.between:
            self._send(to, data[:n])
            return b""
        return data

    def go_away(self) -> None:
        self.going = True
        for to, frames in (("app", self.down), ("upstream", self.up)):
            if frames.between:
                self._send(to, b"")
        self.relay.close_later(CLOSE_GRACE)

    def _send(self, to: str, before: bytes) -> None:
        self.sent[to] = True
        side = self.relay.app if to == "app" else self.relay.upstream
        side.write(before + close_frame(GOING_AWAY, masked=(to == "upstream")))
        if all(self.sent.values()):
            for end in (self.relay.app, self.relay.upstream):
                end.write_eof()
