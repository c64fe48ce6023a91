"""The OpenTelemetry sink: finished request records become OTLP spans, off the request path.

The data plane never calls OpenTelemetry. It hands a finished `RequestRecord` to `request_finished`;
only then do we decide whether to export it, and if so build `ReadableSpan`s directly (no Tracer, no
context propagation machinery) and give them to a `BatchSpanProcessor`, whose worker thread talks to the
collector. So a healthy unsampled request costs one sampler call, and an unreachable collector costs
the data plane nothing.

    request span  (INTERNAL, named after the route; parent = the caller's span from `traceparent`)
      ├─ event `sidecar.decision`   one per DecisionRecord, at its time
      ├─ try span   (CLIENT, `{method}`, HTTP client semconv)   one per TryRecord, fallback calls included
      └─ ...
    `sidecar.decision` span         a decision outside any request (health checks, config reloads)

Sampling (SPEC "Traces"): a request with any decision is always exported, whatever the sampler or the
caller's sampled flag. The configured sampler (OTEL_TRACES_SAMPLER, default parentbased_traceidratio at
the policy's `sample_ratio`) decides only healthy requests, on the trace id like `TraceIdRatioBased`, so
every replica and every hop agree. It decides once, when the request arrives (`samples`, the data
plane's head sampler): the answer is the `sampled` flag sent upstream in `traceparent` and kept in the
record, and the export follows it.

Collector outages are handled in `export.py`; the policy and `OTEL_*` environment are read in
`otelconfig.py`; the exporters (`exporters.py`) write each batch's protobuf with `wire.py`.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from sidecar.core.decisions import Decision, DecisionRecord
from sidecar.grpc_rules import GrpcCode
from sidecar.telemetry.genai import LlmCall
from sidecar.policy.model import Telemetry
from sidecar.telemetry.export import _gate, _GuardedExporter, _install_gate
from sidecar.telemetry.otelconfig import (
    Sampler, _make_exporter, _resource, make_sampler, resolve_target, sampler_from_env,
)
from sidecar.telemetry.records import RequestRecord, TryRecord, url_text
from sidecar.telemetry.redact import redact
from sidecar.telemetry.tracecontext import new_span_id, new_trace_id

log = logging.getLogger("sidecar.telemetry.otel")

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_OK = Status(StatusCode.UNSET)
_EVENT = "sidecar.decision"
# Decisions that happen after their request has finished (a queued write delivered or given up later):
# exported as their own span in the request's trace, since the request span is already gone.
_AFTER_REQUEST = frozenset({Decision.QUEUE_DELIVERED, Decision.QUEUE_EXPIRED})


def _sidecar_version() -> str:
    try:
        from importlib.metadata import version
        return version("sidecar")
    except Exception:  # noqa: BLE001 - not installed (running from a checkout)
        return "0"


_SCOPE = InstrumentationScope("sidecar", _sidecar_version())


# --- span building -------------------------------------------------------------------------------

def _decision_attributes(d: DecisionRecord) -> dict:
    attrs = {"sidecar.decision": str(d.decision), "sidecar.route": d.route, "sidecar.reason": d.reason}
    if d.upstream is not None:
        attrs["sidecar.upstream"] = d.upstream
    if d.breaker_state is not None:
        attrs["sidecar.breaker.state"] = d.breaker_state
    if d.budget_remaining is not None:
        attrs["sidecar.retry.budget_remaining"] = d.budget_remaining
    if d.fallback_target is not None:
        attrs["sidecar.fallback.target"] = d.fallback_target
    if d.policy_version is not None:
        attrs["sidecar.policy.version"] = d.policy_version
    return attrs


def _trace_state(header: str) -> TraceState | None:
    """The caller's `tracestate`, or None when malformed (the SDK would log a warning per request)."""
    _gate.local.quiet = True
    try:
        return TraceState.from_header([header]) or None
    except Exception:  # noqa: BLE001 - a bad header from the caller is dropped, never fatal
        return None
    finally:
        _gate.local.quiet = False


def _scrubbed(url: str) -> str:
    """`url.full` without credential-like query values (`?api_key=...`, `&token=...`); userinfo was
    already dropped when the record was made. Only exported spans pay for it."""
    return redact(url) if "=" in url else url


def _error(description: str) -> Status:
    return Status(StatusCode.ERROR, description)


def _llm_answer(r: RequestRecord) -> LlmCall | None:
    """The LLM try whose answer the app got (the last one with usage), else the last LLM try."""
    last = None
    for t in reversed(r.tries):
        if t.llm is not None:
            if t.llm.has_usage:
                return t.llm
            last = last or t.llm
    return last


def _genai_attributes(attrs: dict, llm: LlmCall, start_ns: int) -> None:
    """OpenTelemetry GenAI semantic conventions (semantic-conventions-genai, the `gen_ai.client.inference`
    span: `gen_ai.provider.name`, which replaced `gen_ai.system` in 2025, and
    `gen_ai.response.time_to_first_chunk`)."""
    attrs["gen_ai.operation.name"] = llm.operation
    attrs["gen_ai.provider.name"] = llm.provider
    if llm.request_model is not None:
        attrs["gen_ai.request.model"] = llm.request_model
    if llm.max_tokens is not None:
        attrs["gen_ai.request.max_tokens"] = llm.max_tokens
    if llm.stream:
        attrs["gen_ai.request.stream"] = True
    if llm.response_model is not None:
        attrs["gen_ai.response.model"] = llm.response_model
    if llm.response_id is not None:
        attrs["gen_ai.response.id"] = llm.response_id
    if llm.finish_reasons:
        attrs["gen_ai.response.finish_reasons"] = tuple(llm.finish_reasons)
    if llm.input_tokens is not None:
        attrs["gen_ai.usage.input_tokens"] = llm.input_tokens
    if llm.output_tokens is not None:
        attrs["gen_ai.usage.output_tokens"] = llm.output_tokens
    if llm.cache_read_tokens is not None:
        attrs["gen_ai.usage.cache_read.input_tokens"] = llm.cache_read_tokens
    if llm.cache_write_tokens is not None:
        attrs["gen_ai.usage.cache_write.input_tokens"] = llm.cache_write_tokens
    if llm.first_chunk_ns:
        attrs["gen_ai.response.time_to_first_chunk"] = max(0, llm.first_chunk_ns - start_ns) / 1e9
    cost = llm.cost()
    if cost is not None:
        attrs["sidecar.llm.cost"] = cost


class _HashedResource(Resource):
    """A resource whose hash is computed once. The OTLP encoder groups spans by resource, and
    `Resource.__hash__` JSON-dumps every attribute on each call: once per exported span, about a
    seventh of the encoding time. Ours never changes after start."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource.attributes, resource.schema_url)
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash


class OtelSink:
    """A `TelemetrySink` exporting OTLP spans through a `BatchSpanProcessor`."""

    def __init__(self, exporter: SpanExporter, *, resource: Resource | None = None,
                 sampler: Sampler | None = None, target: str = "the collector",
                 probe_every: float = 5.0) -> None:
        _install_gate()
        self.resource = _HashedResource(resource if resource is not None else Resource.create({}))
        self.sample: Sampler = sampler or make_sampler("parentbased_traceidratio", 0.05)
        self.exporter = _GuardedExporter(exporter, target, probe_every)
        self.processor = BatchSpanProcessor(self.exporter)
        self._on_end: Callable[[ReadableSpan], None] = self.processor.on_end
        # The processor's queue, when this SDK version exposes it as a bounded deque: checked before
        # building spans, so a backlog (collector down) costs a len() instead of spans and a log record
        # per dropped span. Without it, the SDK drops on its own and the log gate keeps that quiet.
        queue = getattr(getattr(self.processor, "_batch_processor", None), "_queue", None)
        self._queue = queue if isinstance(queue, deque) and queue.maxlen else None
        self.queue_full_drops = 0
        self._closed = False

    # -- TelemetrySink ---------------------------------------------------------------------------

    def request_finished(self, record: RequestRecord) -> None:
        # The only work for a healthy unsampled request: two truth tests. The head decision was made
        # when it arrived (`samples`), so what is exported agrees with the flag sent upstream.
        if not record.decisions and not record.sampled:
            return
        if not self._room():
            return
        on_end = self._on_end
        for span in self.spans_for(record):
            on_end(span)

    def decision(self, record: DecisionRecord) -> None:
        # A request's decisions travel with its RequestRecord; only those outside one become spans here.
        if (record.trace_id is None or record.decision in _AFTER_REQUEST) and self._room():
            self._on_end(self._decision_span(record))

    def _room(self) -> bool:
        queue = self._queue
        if queue is not None and len(queue) >= queue.maxlen:
            self.queue_full_drops += 1
            _gate.queue_full()
            return False
        return True

    # -- lifecycle -------------------------------------------------------------------------------

    def samples(self, trace_id: str, parent_span_id: str | None, caller_sampled: bool) -> bool:
        """The head decision for a healthy request: the `sampled` flag to propagate upstream, which
        `request_finished` then follows (records carry it as `RequestRecord.sampled`)."""
        return self.sample(trace_id, parent_span_id, caller_sampled)

    def force_flush(self, timeout: float = 5.0) -> bool:
        """Export what is queued; blocks the calling thread (call it from an executor in async code)."""
        return self._bounded(self.processor.force_flush, timeout)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Flush and stop, in at most about `timeout` seconds even when the collector is unreachable."""
        if self._closed:
            return
        self._closed = True
        self._on_end = _discard
        if not self._bounded(self.processor.shutdown, timeout):
            self.exporter.shutdown()   # interrupts a retry backoff; queued spans are lost
            log.warning("trace export to %s did not finish within %.1fs at shutdown; queued spans dropped",
                        self.exporter.target, timeout)

    @staticmethod
    def _bounded(fn: Callable[[], object], timeout: float) -> bool:
        outcome: list[object] = []
        worker = threading.Thread(target=lambda: outcome.append(fn()), name="otel-flush", daemon=True)
        worker.start()
        worker.join(timeout)
        return bool(outcome) and outcome[0] is not False

    # -- records -> spans ------------------------------------------------------------------------

    def spans_for(self, r: RequestRecord) -> list[ReadableSpan]:
        trace_id = int(r.trace_id, 16)
        state = _trace_state(r.tracestate) if r.tracestate else None
        ctx = SpanContext(trace_id, int(r.span_id, 16), False, _SAMPLED, state)
        parent = (SpanContext(trace_id, int(r.parent_span_id, 16), True, _SAMPLED, state)
                  if r.parent_span_id else None)
        end_ns = r.end_ns or time.time_ns()

        attrs: dict = {
            "http.request.method": r.method,
            "url.full": _scrubbed(url_text(r.url)),
            "sidecar.route": r.route,
            "sidecar.listener": r.listener,
            "sidecar.policy.version": r.policy_version,
            "sidecar.attempts": r.attempts,
        }
        if r.status:
            attrs["http.response.status_code"] = r.status
        if r.upstream is not None:
            attrs["sidecar.upstream"] = r.upstream
        if r.relayed is not None:            # one span per relayed connection, with its bytes each way
            attrs["sidecar.relayed"] = r.relayed
            attrs["sidecar.bytes_sent"] = r.bytes_up
            attrs["sidecar.bytes_received"] = r.bytes_down
        status = _OK
        error_type = r.error_type or (str(r.status) if r.status >= 500 else None)
        if r.grpc_status is not None:
            error_type = error_type or _rpc_attributes(attrs, url_text(r.url), r.grpc_status)
        if error_type is not None:
            attrs["error.type"] = error_type
            status = _error(error_type)

        answer = _llm_answer(r)
        if answer is not None:
            _genai_attributes(attrs, answer, r.start_ns)
            if r.llm_model is not None:
                attrs["gen_ai.request.model"] = r.llm_model       # what the app asked for
            if answer.request_model is not None:
                attrs["sidecar.llm.sent_model"] = answer.request_model   # after json_map / translation

        events: list[Event] = []
        if r.decisions:
            # Distinct decision names in order, as in x-sidecar-degraded: searchable in Jaeger's tag query.
            attrs["sidecar.decisions"] = tuple(dict.fromkeys(str(d.decision) for d in r.decisions))
            times = r.decision_ns
            for i, d in enumerate(r.decisions):
                at = times[i] if i < len(times) else int(d.at * 1e9)
                events.append(Event(_EVENT, _decision_attributes(d), at))

        spans = [ReadableSpan(
            r.route, context=ctx, parent=parent, resource=self.resource, attributes=attrs, events=events,
            kind=SpanKind.INTERNAL, status=status, start_time=r.start_ns, end_time=end_ns,
            instrumentation_scope=_SCOPE)]
        for t in r.tries:
            spans.append(self._try_span(t, trace_id, ctx, end_ns))
        return spans

    def _try_span(self, t: TryRecord, trace_id: int, parent: SpanContext, fallback_end: int) -> ReadableSpan:
        attrs: dict = {
            "http.request.method": t.method,
            "url.full": _scrubbed(url_text(t.url)),
            "server.address": t.server_address,
            "server.port": t.server_port,
            "sidecar.upstream": t.upstream,
        }
        if t.status is not None:
            attrs["http.response.status_code"] = t.status
        if t.resend_count > 0:
            attrs["http.request.resend_count"] = t.resend_count
        if t.fallback_target is not None:
            attrs["sidecar.fallback.target"] = t.fallback_target
        if t.llm is not None:
            _genai_attributes(attrs, t.llm, t.start_ns)
        # HTTP client semconv: error.type is the failure, else the status code for 4xx/5xx, and a CLIENT
        # span's status is Error for both.
        status = _OK
        error_type = t.error_type or (str(t.status) if t.status is not None and t.status >= 400 else None)
        if t.grpc_status is not None:
            error_type = error_type or _rpc_attributes(attrs, url_text(t.url), t.grpc_status)
        if error_type is not None:
            attrs["error.type"] = error_type
            status = _error(error_type)
        return ReadableSpan(
            t.method, context=SpanContext(trace_id, int(t.span_id, 16), False, _SAMPLED),
            parent=parent, resource=self.resource, attributes=attrs, kind=SpanKind.CLIENT, status=status,
            start_time=t.start_ns, end_time=t.end_ns or fallback_end, instrumentation_scope=_SCOPE)

    def _decision_span(self, d: DecisionRecord) -> ReadableSpan:
        at = int(d.at * 1e9)
        attrs = _decision_attributes(d)
        if d.trace_id is not None:
            trace_id = int(d.trace_id, 16)
            parent = SpanContext(trace_id, int(d.span_id, 16), False, _SAMPLED) if d.span_id else None
        else:
            trace_id, parent = int(new_trace_id(), 16), None
        ctx = SpanContext(trace_id, int(new_span_id(), 16), False, _SAMPLED)
        return ReadableSpan(
            _EVENT, context=ctx, parent=parent, resource=self.resource, attributes=attrs,
            events=[Event(_EVENT, dict(attrs), at)], kind=SpanKind.INTERNAL, status=_OK,
            start_time=at, end_time=at, instrumentation_scope=_SCOPE)

    # -- configuration ---------------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: Telemetry, env: Mapping[str, str] = os.environ) -> OtelSink | None:
        """The sink the policy and the `OTEL_*` environment ask for, or None when tracing is off.

        Off: OTEL_SDK_DISABLED=true, OTEL_TRACES_EXPORTER=none, or no endpoint anywhere. The environment
        wins over the policy. The exporters themselves still read the variables the SDK leaves to them
        (OTEL_EXPORTER_OTLP_*_HEADERS, _TIMEOUT, _COMPRESSION, _CERTIFICATE) and OTEL_BSP_* from the
        process environment; `Resource.create` reads OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME.
        """
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return None
        exporter_name = env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
        if exporter_name == "none":
            return None
        if exporter_name not in ("otlp", ""):
            log.warning("OTEL_TRACES_EXPORTER=%s is not supported; using otlp", exporter_name)
        target = resolve_target(cfg, env)
        if target is None:
            return None
        protocol, endpoint = target
        sampler_name, sampler = sampler_from_env(cfg, env)
        sink = cls(_make_exporter(protocol, endpoint, env), resource=_resource(cfg, env), sampler=sampler,
                   target=endpoint)
        log.info("exporting traces to %s over %s; healthy requests sampled by %s, degraded ones always",
                 endpoint, protocol, sampler_name)
        return sink


def _discard(span: ReadableSpan) -> None:
    """Stands in for `processor.on_end` after shutdown, so late requests log nothing."""


def _rpc_attributes(attrs: dict, url: str, code: int) -> str | None:
    """The RPC semantic conventions for a gRPC call (path `/package.Service/Method`); returns the
    error type for a status other than OK (the RPC conventions count every non-OK status as an error)."""
    attrs["rpc.system"] = "grpc"
    parts = urlsplit(url).path.strip("/").split("/")
    if len(parts) == 2:
        attrs["rpc.service"], attrs["rpc.method"] = parts
    attrs["rpc.grpc.status_code"] = code
    if code == 0:
        return None
    try:
        return GrpcCode(code).name
    except ValueError:
        return str(code)
