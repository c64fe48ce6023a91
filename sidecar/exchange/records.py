"""The one place a `RequestRecord` is made: for a request from the app, for the sidecar's own requests
(cache warming, queue delivery, CONNECT tunnels), and for a background follow-up of a request
(a stale-while-revalidate refresh) in the same trace.

The head sampling decision is taken here, once, when the record is made: it is the `sampled` flag
every try of the request sends upstream and the one the trace export follows.
"""
from __future__ import annotations

import time

from yarl import URL

from sidecar.exchange.context import Context
from sidecar.telemetry.records import RequestRecord, TryRecord
from sidecar.telemetry.tracecontext import new_span_id, new_trace_id

# (trace_id, parent span id, the caller's sampled flag), as `traceparent` carries them
TraceParent = tuple[str, "str | None", bool]


def request_record(ctx: Context, *, route: str, listener: str, method: str, url: str | URL,
                   parent: TraceParent | None = None, tracestate: str | None = None,
                   upstream: str | None = None, tries: list[TryRecord] | None = None,
                   start_ns: int | None = None) -> RequestRecord:
    """A new request's record; `parent` continues the caller's trace, else a trace starts here."""
    trace_id, parent_id, caller_sampled = parent if parent is not None else (new_trace_id(), None, False)
    return RequestRecord(
        trace_id=trace_id, span_id=new_span_id(), parent_span_id=parent_id, caller_sampled=caller_sampled,
        tracestate=tracestate, route=route, upstream=upstream, method=method, url=url, listener=listener,
        policy_version=ctx.policy.digest, start_ns=time.time_ns() if start_ns is None else start_ns,
        tries=tries if tries is not None else [],
        sampled=ctx.head_sampler(trace_id, parent_id, caller_sampled))


def follow_up_record(parent: RequestRecord, *, listener: str, method: str) -> RequestRecord:
    """A request the sidecar makes on behalf of `parent` after answering it: a child span in its trace,
    exported by the same head decision."""
    return RequestRecord(
        trace_id=parent.trace_id, span_id=new_span_id(), parent_span_id=parent.span_id,
        caller_sampled=parent.caller_sampled, tracestate=parent.tracestate, route=parent.route,
        upstream=None, method=method, url=parent.url, listener=listener,
        policy_version=parent.policy_version, start_ns=time.time_ns(), sampled=parent.sampled)
