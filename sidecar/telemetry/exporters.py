"""The SDK's OTLP exporters, with each batch encoded by `wire.py` instead of `encode_spans`.

Everything else stays the SDK's: endpoint, headers, TLS, compression, timeout and retries from the
`OTEL_EXPORTER_OTLP_*` variables. The HTTP exporter sends through its client object when this SDK
version has one (`_client.export(bytes)`); on versions without it the batch takes the SDK's own encoder,
so the output is the same either way, only slower. The gRPC exporter's hook, `_translate_data`, has been
there since its first release.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as _SdkHttpExporter
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from sidecar.telemetry.wire import encode_request

log = logging.getLogger("sidecar.telemetry.otel")


class HttpExporter(_SdkHttpExporter):
    """OTLP/HTTP protobuf."""

    @property
    def encodes_on_wire(self) -> bool:
        return callable(getattr(getattr(self, "_client", None), "export", None))

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if getattr(self, "_shutdown", False) or not self.encodes_on_wire:
            return super().export(spans)
        try:
            data = encode_request(spans)
        except Exception as exc:  # noqa: BLE001 - a bad attribute drops the batch, as the SDK's encoder does
            log.error("could not encode a batch of %d spans: %s", len(spans), exc)
            return SpanExportResult.FAILURE
        limit = getattr(self, "_max_request_size", None)
        if limit and len(data) > limit:
            log.warning("dropping a batch of %d spans: %d bytes is over the exporter's limit of %d",
                        len(spans), len(data), limit)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS if self._client.export(data).success else SpanExportResult.FAILURE


def grpc_exporter(endpoint: str, insecure: bool) -> SpanExporter:
    """OTLP/gRPC; grpc is imported only when a policy asks for it."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as SdkGrpcExporter
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    class GrpcExporter(SdkGrpcExporter):
        def _translate_data(self, data: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
            return ExportTraceServiceRequest.FromString(encode_request(data))

    return GrpcExporter(endpoint=endpoint, insecure=insecure)
