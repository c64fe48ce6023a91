"""W3C traceparent parsing and formatting (https://www.w3.org/TR/trace-context/)."""
from __future__ import annotations

import re

import pytest

from sidecar.telemetry.tracecontext import format_traceparent, new_span_id, new_trace_id, parse_traceparent

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


def test_parses_the_spec_example():
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-01") == (TRACE, SPAN, True)
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-00") == (TRACE, SPAN, False)


def test_sampled_is_bit_zero_of_the_flags():
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-03") == (TRACE, SPAN, True)
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-02") == (TRACE, SPAN, False)


def test_surrounding_whitespace_is_tolerated():
    assert parse_traceparent(f" 00-{TRACE}-{SPAN}-01\t") == (TRACE, SPAN, True)


def test_future_version_may_carry_more_fields():
    assert parse_traceparent(f"01-{TRACE}-{SPAN}-01-what-the-future-holds") == (TRACE, SPAN, True)
    assert parse_traceparent(f"cc-{TRACE}-{SPAN}-00") == (TRACE, SPAN, False)


@pytest.mark.parametrize("value", [
    None, "", "garbage",
    f"00-{TRACE}-{SPAN}-01-extra",                 # version 00 has exactly four fields
    f"ff-{TRACE}-{SPAN}-01",                       # forbidden version
    f"00-{'0' * 32}-{SPAN}-01",                    # all-zero trace id
    f"00-{TRACE}-{'0' * 16}-01",                   # all-zero parent id
    f"00-{TRACE.upper()}-{SPAN}-01",               # upper-case hex is not allowed
    f"00-{TRACE[:-1]}-{SPAN}-01",                  # short trace id
    f"00-{TRACE}-{SPAN}0-01",                      # long parent id
    f"00-{TRACE}-{SPAN}-1",                        # short flags
    f"0-{TRACE}-{SPAN}-01",
    f"00_{TRACE}_{SPAN}_01",
    f"01-{TRACE}-{SPAN}-01extra",                  # future fields must follow a dash
    f"00-{TRACE}-{SPAN}-zz",
])
def test_invalid_values_are_rejected(value):
    assert parse_traceparent(value) is None


def test_new_ids_are_lower_hex_of_the_right_length_and_distinct():
    traces = {new_trace_id() for _ in range(1000)}
    spans = {new_span_id() for _ in range(1000)}
    assert len(traces) == 1000 and len(spans) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{32}", t) for t in traces)
    assert all(re.fullmatch(r"[0-9a-f]{16}", s) for s in spans)


def test_format_round_trips():
    trace, span = new_trace_id(), new_span_id()
    assert format_traceparent(trace, span, True) == f"00-{trace}-{span}-01"
    assert parse_traceparent(format_traceparent(trace, span, False)) == (trace, span, False)
