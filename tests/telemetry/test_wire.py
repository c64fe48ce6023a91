"""wire.encode_request writes exactly the bytes the SDK's OTLP encoder serializes, and the exporters use it."""
from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from sidecar.core.decisions import Decision
from sidecar.telemetry.exporters import HttpExporter, grpc_exporter
from sidecar.telemetry.otel import OtelSink
from sidecar.telemetry.wire import encode_request

from .test_otel import CALLER_SPAN, CALLER_TRACE, decision, degraded, healthy

SAMPLED = TraceFlags(TraceFlags.SAMPLED)


class _Keep(SpanExporter):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans):
        self.spans += spans
        return SpanExportResult.SUCCESS


def sdk_bytes(spans) -> bytes:
    return encode_spans(spans).SerializeToString()


def sidecar_spans() -> list[ReadableSpan]:
    """What the sink builds: healthy and degraded requests (events, error statuses, a remote parent, a
    tracestate) and a decision outside any request."""
    sink = OtelSink(_Keep(), resource=Resource.create({"service.name": "shop-sidecar", "k8s.pod.uid": "u-1"}))
    spans = sink.spans_for(healthy())
    spans += sink.spans_for(degraded(CALLER_TRACE, parent=CALLER_SPAN, tracestate="vendor=abc,other=x:1"))
    spans.append(sink._decision_span(decision(Decision.UPSTREAM_UNHEALTHY)))
    sink.shutdown(timeout=1)
    return spans


def test_the_sidecars_spans_encode_to_the_sdks_bytes():
    spans = sidecar_spans()
    ours = encode_request(spans)
    assert ours == sdk_bytes(spans)
    decoded = ExportTraceServiceRequest.FromString(ours)
    sent = [s for rs in decoded.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert len(sent) == len(spans) == 7
    assert {s.name for s in sent} == {"chat", "POST", "sidecar.decision"}


def test_several_resources_and_scopes_are_grouped_like_the_sdk_groups_them():
    a, b = Resource.create({"service.name": "a"}), Resource({"service.name": "b"}, "https://schema/1")
    scope1 = InstrumentationScope("one", "1.0", "https://schema/scope", {"x": 1})
    scope2 = InstrumentationScope("two")
    spans = [span(resource=r, scope=s, span_id=i + 1)
             for i, (r, s) in enumerate([(a, scope1), (b, scope2), (a, scope2), (b, None), (a, scope1)])]
    assert encode_request(spans) == sdk_bytes(spans)


def span(*, attributes=None, events=(), links=(), status=None, parent=None, resource=None, scope=None,
         span_id=0x1122334455667788, kind=SpanKind.CLIENT, trace_state=None, name="GET") -> ReadableSpan:
    ctx = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, span_id, False, SAMPLED, trace_state)
    return ReadableSpan(name, context=ctx, parent=parent, resource=resource or Resource({}),
                        attributes=attributes, events=events, links=links, kind=kind,
                        status=status or Status(StatusCode.UNSET), start_time=1_700_000_000_000_000_001,
                        end_time=1_700_000_000_123_456_789, instrumentation_scope=scope)


scalars = st.one_of(
    st.text(max_size=200), st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False), st.binary(max_size=40))
values = st.one_of(scalars, st.lists(st.text(max_size=20), max_size=4), st.lists(st.integers(-5, 2**40), max_size=4),
                   st.lists(st.booleans(), max_size=3), st.lists(st.floats(allow_nan=False), max_size=3))
attribute_maps = st.dictionaries(st.text(min_size=1, max_size=30), values, max_size=8)


@settings(max_examples=300, deadline=None)
@given(attrs=attribute_maps, event_attrs=attribute_maps, link_attrs=attribute_maps,
       kind=st.sampled_from(list(SpanKind)), code=st.sampled_from(list(StatusCode)),
       description=st.one_of(st.none(), st.text(max_size=30)), remote=st.booleans(),
       with_parent=st.booleans(), name=st.text(max_size=300))
def test_any_span_encodes_to_the_sdks_bytes(attrs, event_attrs, link_attrs, kind, code, description, remote,
                                            with_parent, name):
    parent = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0x99, remote, SAMPLED) if with_parent else None
    link = Link(SpanContext(0x1, 0x2, remote, SAMPLED), link_attrs)
    s = span(attributes=attrs, events=[Event("e", event_attrs, 5)], links=[link], parent=parent, kind=kind,
             status=Status(code, description if code is StatusCode.ERROR else None), name=name,
             trace_state=TraceState([("k", "v")]) if remote else None)
    assert encode_request([s]) == sdk_bytes([s])


def test_nan_and_infinite_doubles_keep_their_bits():
    s = span(attributes={"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "-0": -0.0})
    assert encode_request([s]) == sdk_bytes([s])


def test_equal_values_of_different_types_are_not_confused_by_the_pair_cache():
    first = span(attributes={"v": 1, "w": "1"})
    second = span(attributes={"v": True, "w": 1.0})
    for s in (first, second, first):
        assert encode_request([s]) == sdk_bytes([s])


def test_the_http_exporter_encodes_on_the_wire_and_the_receiver_decodes_it(otlp_http_receiver):
    exporter = HttpExporter(endpoint=otlp_http_receiver.endpoint + "/v1/traces")
    try:
        assert exporter.encodes_on_wire
        spans = sidecar_spans()
        assert exporter.export(spans) is SpanExportResult.SUCCESS
        received = otlp_http_receiver.wait_for_spans(len(spans))
        assert sorted(s.span_id for s in received) == sorted(f"{s.context.span_id:016x}" for s in spans)
    finally:
        exporter.shutdown()


def test_the_grpc_exporter_translates_batches_with_the_wire_encoder():
    exporter = grpc_exporter("http://127.0.0.1:1", insecure=True)
    try:
        spans = sidecar_spans()
        assert exporter._translate_data(spans) == encode_spans(spans)
    finally:
        exporter.shutdown()
