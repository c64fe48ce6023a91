"""What the data plane hands to telemetry when a request finishes: plain frozen records.

The hot path never touches OpenTelemetry. It notes timestamps and ids in these records; a sink turns a
finished request into spans only when it is sampled or degraded (so every degraded request is exported
and a healthy unsampled one costs almost nothing). Span ids are chosen up front so `traceparent` can be
injected into each try before its span exists.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from yarl import URL

from sidecar.core.decisions import DecisionRecord

if TYPE_CHECKING:
    from sidecar.telemetry.genai import LlmCall


def url_text(url: str | URL) -> str:
    """A record's URL as traces show it. A record keeps a URL object only when it carries no
    credentials (exchange/calls.py's `record_url`), so that only an exported span pays for the text;
    userinfo is dropped here all the same."""
    if isinstance(url, str):
        return url
    if url.raw_user is not None or url.raw_password is not None:
        url = url.with_user(None)
    return str(url)


@dataclass(slots=True)
class TryRecord:
    """One physical attempt to an upstream (retries, hedges and fallback calls each get one)."""
    span_id: str                           # 16 hex digits
    upstream: str                          # upstream name, or the original destination host:port
    method: str
    url: str | URL                         # without credentials (`record_url`); shown by `url_text`
    server_address: str
    server_port: int
    start_ns: int
    resend_count: int = 0                  # 0 for the first try of this target
    end_ns: int = 0
    status: int | None = None
    error_type: str | None = None          # connect-failure | reset | timeout | protocol-error | 5xx code
    fallback_target: str | None = None     # set for calls made by the fallback chain
    grpc_status: int | None = None         # a gRPC call's status (head or trailers), when it came
    llm: "LlmCall | None" = None           # an LLM API call: model, usage, finish reasons (sidecar/llm)
    endpoint: str | None = None            # host:port of the endpoint, for a balanced upstream
    cut: bool = False                      # the answer broke off after its head (reset, timeout mid-body)


@dataclass(slots=True)
class RequestRecord:
    """One proxied request, from the app's first byte to the last byte sent back."""
    trace_id: str                          # 32 hex digits: the caller's, or new
    span_id: str                           # this request's span
    parent_span_id: str | None             # the caller's span, from traceparent
    caller_sampled: bool
    tracestate: str | None
    route: str
    upstream: str | None                   # who answered (upstream name, "cache", "static", "queue")
    method: str
    url: str | URL                         # without credentials (`record_url`); shown by `url_text`
    listener: str
    policy_version: str
    start_ns: int
    end_ns: int = 0
    status: int = 0
    error_type: str | None = None
    cut: bool = False                      # the app got the head, then a cut body (error_type says why)
    attempts: int = 0
    tries: list[TryRecord] = field(default_factory=list)
    decisions: list[DecisionRecord] = field(default_factory=list)
    decision_ns: list[int] = field(default_factory=list)   # time of each decision, same order
    sampled: bool = False                  # the head sampling decision, propagated in traceparent
    grpc_status: int | None = None         # the gRPC status sent to the app (gRPC calls only)
    # A relayed connection (CONNECT tunnel, upgrade, transparent TLS/TCP): what kind, and its bytes.
    relayed: str | None = None             # tunnel | upgrade | tls | tcp
    bytes_up: int = 0                      # app -> upstream
    bytes_down: int = 0                    # upstream -> app
    llm_model: str | None = None           # an LLM call: the model the app asked for (before json_map)


class TelemetrySink(Protocol):
    """Implemented by the OpenTelemetry exporter, the Prometheus metrics and the admin event feed."""

    def decision(self, record: DecisionRecord) -> None: ...

    def request_finished(self, record: RequestRecord) -> None: ...


class FanoutSink:
    """Hands every record to each sink in turn; a failing sink never fails the request."""

    __slots__ = ("sinks", "_log")

    def __init__(self, sinks: list[TelemetrySink]) -> None:
        import logging
        self.sinks = list(sinks)
        self._log = logging.getLogger("sidecar.telemetry")

    def decision(self, record: DecisionRecord) -> None:
        for sink in self.sinks:
            try:
                sink.decision(record)
            except Exception:  # noqa: BLE001 - telemetry must never break the data plane
                self._log.exception("telemetry sink %r failed on a decision", sink)

    def request_finished(self, record: RequestRecord) -> None:
        for sink in self.sinks:
            try:
                sink.request_finished(record)
            except Exception:  # noqa: BLE001
                self._log.exception("telemetry sink %r failed on a request", sink)
