"""OTLP trace requests written straight to protobuf bytes, for the exporters in `exporters.py`.

The OTLP exporters encode a batch by building a protobuf object for every span, attribute and value
(`encode_spans`): about 25 µs per span, most of what a sampled request costs the sidecar. Our spans have a
fixed, small shape, so this module writes the same `ExportTraceServiceRequest` bytes directly: the
resource and scope are encoded once, attribute keys once each, and a span is a few joins. The output is
checked field for field against the SDK's encoder (tests/telemetry/test_wire.py), and the exporters fall
back to the SDK's encoder where their hook is missing.

Wire format: https://protobuf.dev/programming-guides/encoding/ ; field numbers from
opentelemetry/proto/trace/v1/trace.proto, common/v1/common.proto and resource/v1/resource.proto.
"""
from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind

# Span.flags: the "has is_remote" bit is always set; the "is remote" bit when the parent came from a
# caller (the SDK's `_span_flags`).
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200
# SpanKind -> OTLP Span.SpanKind (OTLP numbers from 1, SPAN_KIND_UNSPECIFIED being 0).
_KIND = {kind: kind.value + 1 for kind in SpanKind}
_FIXED64 = struct.Struct("<Q").pack
_FIXED32 = struct.Struct("<I").pack
_DOUBLE = struct.Struct("<d").pack


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64          # int64: two's complement, ten bytes
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2); `tag` is (number << 3) | 2."""
    n = len(payload)
    return (bytes((tag, n)) if n < 0x80 else bytes((tag,)) + _varint(n)) + payload


def _string(tag: int, value: str | None) -> bytes:
    """proto3: an empty or absent string is not written."""
    return _field(tag, value.encode()) if value else b""


# --- attributes ----------------------------------------------------------------------------------

def _any_value(value: Any) -> bytes:
    """An `AnyValue` message body, with the same type order as the SDK's `_encode_value`."""
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _field(0x0A, value.encode())
    if isinstance(value, int):
        return b"\x18" + _varint(value)
    if isinstance(value, float):
        return b"\x21" + _DOUBLE(value)
    if isinstance(value, bytes):
        return _field(0x3A, value)
    if isinstance(value, Sequence):
        return _field(0x2A, b"".join(_field(0x0A, _any_value(v)) for v in value))
    if isinstance(value, Mapping):
        return _field(0x32, b"".join(_pair(0x0A, str(k), v) for k, v in value.items()))
    raise TypeError(f"cannot encode an attribute value of type {type(value).__name__}")


@lru_cache(maxsize=512)
def _key(key: str) -> bytes:
    return _field(0x0A, key.encode())


def _attributes(tag: int, attributes: Mapping[str, Any] | None) -> bytes:
    """Repeated `KeyValue` fields; `tag` is the field's tag in the enclosing message."""
    if not attributes:
        return b""
    return b"".join([_cached_pair(tag, k, v) if type(v) is str or type(v) is int else _pair(tag, k, v)
                     for k, v in attributes.items()])


def _pair(tag: int, key: str, value: Any) -> bytes:
    return _field(tag, _key(key) + _field(0x12, _any_value(value)))


# Most pairs repeat from span to span (route, method, upstream, address, status code, policy version),
# so whole encoded pairs of a string or int value are kept; `typed` keeps 1 and "1" (and True) apart.
_cached_pair = lru_cache(maxsize=4096, typed=True)(_pair)


# --- spans ---------------------------------------------------------------------------------------

def _flag_bits(ctx: SpanContext | None) -> int:
    return _HAS_IS_REMOTE | _IS_REMOTE if ctx is not None and ctx.is_remote else _HAS_IS_REMOTE


def _event(event) -> bytes:
    out = b"\x09" + _FIXED64(event.timestamp) + _string(0x12, event.name) + _attributes(0x1A, event.attributes)
    dropped = event.dropped_attributes
    return out + (b"\x20" + _varint(dropped) if dropped else b"")


def encode_span(span: ReadableSpan) -> bytes:
    """One `Span` message body."""
    ctx = span.context
    parent = span.parent
    trace_state = ctx.trace_state
    parts = [
        b"\x0a\x10" + ctx.trace_id.to_bytes(16, "big"),
        b"\x12\x08" + ctx.span_id.to_bytes(8, "big"),
    ]
    if trace_state:
        parts.append(_string(0x1A, ",".join(f"{k}={v}" for k, v in trace_state.items())))
    if parent is not None:
        parts.append(b"\x22\x08" + parent.span_id.to_bytes(8, "big"))
    parts.append(_string(0x2A, span.name))
    parts.append(b"\x30" + _varint(_KIND[span.kind]))
    if span.start_time:
        parts.append(b"\x39" + _FIXED64(span.start_time))
    if span.end_time:
        parts.append(b"\x41" + _FIXED64(span.end_time))
    parts.append(_attributes(0x4A, span.attributes))
    if span.dropped_attributes:
        parts.append(b"\x50" + _varint(span.dropped_attributes))
    for event in span.events:
        parts.append(_field(0x5A, _event(event)))
    if span.dropped_events:
        parts.append(b"\x60" + _varint(span.dropped_events))
    for link in span.links:
        parts.append(_field(0x6A, _link(link)))
    if span.dropped_links:
        parts.append(b"\x70" + _varint(span.dropped_links))
    status = span.status
    if status is not None:
        code = status.status_code.value
        parts.append(_field(0x7A, _string(0x12, status.description) + (b"\x18" + _varint(code) if code else b"")))
    parts.append(b"\x85\x01" + _FIXED32(_flag_bits(parent)))
    return b"".join(parts)


def _link(link) -> bytes:
    ctx = link.context
    out = (b"\x0a\x10" + ctx.trace_id.to_bytes(16, "big") + b"\x12\x08" + ctx.span_id.to_bytes(8, "big")
           + _attributes(0x22, link.attributes))
    if link.dropped_attributes:
        out += b"\x28" + _varint(link.dropped_attributes)
    return out + b"\x35" + _FIXED32(_flag_bits(ctx))


# --- the request ---------------------------------------------------------------------------------

@lru_cache(maxsize=16)
def _resource(resource: Resource) -> bytes:
    """The `ResourceSpans.resource` field: the same for every batch, so encoded once."""
    return _field(0x0A, _attributes(0x0A, resource.attributes))


@lru_cache(maxsize=16)
def _scope(scope: InstrumentationScope | None) -> bytes:
    """The `ScopeSpans.scope` field."""
    if scope is None:
        return _field(0x0A, b"")
    return _field(0x0A, _string(0x0A, scope.name) + _string(0x12, scope.version)
                  + _attributes(0x1A, scope.attributes))


def encode_request(spans: Sequence[ReadableSpan]) -> bytes:
    """An `ExportTraceServiceRequest`: spans grouped by resource, then by instrumentation scope, in
    first-seen order (as the SDK's `encode_spans` groups them)."""
    grouped: dict[Resource, dict[InstrumentationScope | None, list[bytes]]] = {}
    for span in spans:
        by_scope = grouped.setdefault(span.resource, {})
        by_scope.setdefault(span.instrumentation_scope or None, []).append(_field(0x12, encode_span(span)))
    out = []
    for resource, by_scope in grouped.items():
        body = [_resource(resource)]
        for scope, encoded in by_scope.items():
            body.append(_field(0x12, _scope(scope) + b"".join(encoded)
                               + _string(0x1A, scope.schema_url if scope is not None else None)))
        body.append(_string(0x1A, resource.schema_url))
        out.append(_field(0x0A, b"".join(body)))
    return b"".join(out)
