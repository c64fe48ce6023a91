"""W3C Trace Context (`traceparent`) helpers: pure, allocation-light, no OpenTelemetry import.

The data plane chooses ids up front (so `traceparent` can be injected into each try before any span
exists) and only hands finished records to telemetry. https://www.w3.org/TR/trace-context/#traceparent-header
"""
from __future__ import annotations

import random
import re

# version "-" trace-id "-" parent-id "-" trace-flags, lower-case hex only (HEXDIGLC, §3.2.2). A future
# version may append fields after a dash; version 00 may not (§3.2.4 "versioning of traceparent").
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16

# The module-level generator is reseeded after fork by the stdlib, so forked workers never share ids.
_getrandbits = random.getrandbits


def parse_traceparent(value: str | None) -> tuple[str, str, bool] | None:
    """`(trace_id, parent_span_id, sampled)` from a `traceparent` value, or None when it is invalid.

    Invalid means: wrong shape or length, upper-case hex, version `ff`, extra fields on version 00,
    an all-zero trace id or parent id. The caller then starts a new trace (§3.2.2.2, §4.3).
    """
    if not value:
        return None
    m = _TRACEPARENT.fullmatch(value.strip(" \t"))
    if m is None:
        return None
    version, trace_id, span_id, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return trace_id, span_id, bool(int(flags, 16) & 1)


def new_trace_id() -> str:
    """32 lower-case hex digits, random in all 128 bits (ratio sampling reads the low 64)."""
    bits = _getrandbits(128)
    while not bits:  # all-zero is invalid; astronomically unlikely
        bits = _getrandbits(128)
    return f"{bits:032x}"


def new_span_id() -> str:
    """16 lower-case hex digits, never all zero."""
    bits = _getrandbits(64)
    while not bits:
        bits = _getrandbits(64)
    return f"{bits:016x}"


def format_traceparent(trace_id: str, span_id: str, sampled: bool) -> str:
    """The `traceparent` value to send upstream: version 00, our span as the parent."""
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"
