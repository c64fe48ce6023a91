"""The transport's one exception, and the one place aiohttp's client exceptions are translated.

    UpstreamFailure(kind)        kind is a `retry.when` / `fallback.when` name:
      connect-failure            refused, unreachable, DNS, TLS handshake, connect timeout
      reset                      the peer closed or reset before (or while) answering
      timeout                    no response headers within the try's time
      protocol-error             the peer answered something that is not HTTP

Everything above the transport sees only `UpstreamFailure`, re-raised `from` the original (httpx style).
"""
from __future__ import annotations

import asyncio
import re
import ssl

import aiohttp
from aiohttp import http_exceptions

from sidecar.policy.conditions import Outcome
from sidecar.telemetry.redact import redact


class UpstreamFailure(Exception):
    __slots__ = ("kind", "detail", "endpoint")

    def __init__(self, kind: Outcome, detail: str) -> None:
        self.kind = Outcome(kind)            # one of TRANSPORT_FAILURES
        super().__init__(f"{self.kind}: {detail}")
        self.detail = detail
        self.endpoint: str | None = None     # a balanced upstream's endpoint that failed (pipeline/balance.py)


def translate(exc: BaseException) -> UpstreamFailure:
    """Map a client-side exception to the failure kind that retry, breaker and fallback act on."""
    if isinstance(exc, UpstreamFailure):
        return exc
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamFailure(Outcome.CONNECT_FAILURE, "connect timeout")
    if isinstance(exc, (aiohttp.ClientConnectorError, ssl.SSLError, aiohttp.ClientSSLError)):
        return UpstreamFailure(Outcome.CONNECT_FAILURE, _short(exc))
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return UpstreamFailure(Outcome.TIMEOUT, "no response in time")
    if isinstance(exc, (aiohttp.ClientResponseError, http_exceptions.HttpProcessingError)):
        return UpstreamFailure(Outcome.PROTOCOL_ERROR, _short(exc))
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError,
                        aiohttp.ClientConnectionError, ConnectionError, OSError)):
        return UpstreamFailure(Outcome.RESET, _short(exc))
    if isinstance(exc, aiohttp.ClientError):
        return UpstreamFailure(Outcome.PROTOCOL_ERROR, _short(exc))
    raise exc


def connect_failure(exc: BaseException, context: str) -> UpstreamFailure:
    """A failure to open a connection: refused, unreachable, DNS, TLS handshake, egress guard."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, ssl.SSLError) \
        else _short(exc)
    return UpstreamFailure(Outcome.CONNECT_FAILURE, f"{context}: {redact(str(reason))[:200]}")


# Where a parser error starts quoting the peer's raw bytes: `...: b'HTTX/1.1 200'` or `bytearray(b'...`.
_QUOTED_BYTES = re.compile(r"\\n|:?\s*(?:bytearray\()?b['\"]")


def _short(exc: BaseException) -> str:
    """One clean line: no raw bytes from the wire, no URL (it may hold credentials), secrets scrubbed.
    The reason reaches the app's error body, decision events and logs."""
    if isinstance(exc, (aiohttp.ClientResponseError, http_exceptions.HttpProcessingError)) and exc.message:
        text = str(exc.message)
    else:
        text = str(exc) or type(exc).__name__
    line = _QUOTED_BYTES.split(text.strip().splitlines()[0] if text.strip() else text, maxsplit=1)[0]
    return redact(line.rstrip(" :.").replace('"', "'"))[:200] or type(exc).__name__
