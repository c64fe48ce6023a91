"""OtelSink against real OTLP receivers on loopback: what a collector decodes is what we assert on."""
from __future__ import annotations

import logging
import socket
import threading

import grpc
import pytest

from sidecar.core.decisions import Decision, DecisionRecord
from sidecar.policy.model import Telemetry, TracesConfig
from sidecar.telemetry.otel import OtelSink, make_sampler, resolve_target
from sidecar.telemetry.records import RequestRecord, TryRecord
from sidecar.telemetry.tracecontext import new_span_id, new_trace_id

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
T0 = 1_700_000_000_000_000_000


def telemetry(endpoint: str | None = None, protocol: str = "grpc", ratio: float = 0.0,
              service: str = "shop-sidecar") -> Telemetry:
    return Telemetry(service_name=service, traces=TracesConfig(endpoint=endpoint, protocol=protocol,
                                                               sample_ratio=ratio))


def http_env(receiver, **extra) -> dict:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            **extra}


def grpc_env(receiver, **extra) -> dict:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", **extra}


def decision(kind: Decision, trace_id: str | None = None, span_id: str | None = None, **kw) -> DecisionRecord:
    base = dict(route="chat", upstream="openai", reason="503 from upstream", at=(T0 + 5_000_000) / 1e9)
    base.update(kw)
    return DecisionRecord(kind, trace_id=trace_id, span_id=span_id, **base)


def healthy(trace_id: str | None = None, *, parent: str | None = None,
            sampled: bool = False) -> RequestRecord:
    r = RequestRecord(
        trace_id=trace_id or new_trace_id(), span_id=new_span_id(), parent_span_id=parent,
        caller_sampled=sampled, tracestate=None, route="chat", upstream="openai", method="POST",
        url="https://api.openai.com/v1/chat/completions", listener="egress", policy_version="abc123",
        start_ns=T0, end_ns=T0 + 40_000_000, status=200, attempts=1)
    r.tries.append(TryRecord(span_id=new_span_id(), upstream="openai", method="POST",
                             url="https://api.openai.com/v1/chat/completions",
                             server_address="api.openai.com",
                             server_port=443, start_ns=T0 + 1_000, end_ns=T0 + 39_000_000, status=200))
    return r


def degraded(trace_id: str | None = None, *, parent: str | None = None, sampled: bool = False,
             tracestate: str | None = None) -> RequestRecord:
    """A retry then a fallback: three tries, three decisions."""
    trace_id = trace_id or new_trace_id()
    span_id = new_span_id()
    r = RequestRecord(
        trace_id=trace_id, span_id=span_id, parent_span_id=parent, caller_sampled=sampled,
        tracestate=tracestate, route="chat", upstream="backup-llm", method="POST",
        url="https://api.openai.com/v1/chat/completions", listener="egress", policy_version="abc123",
        start_ns=T0, end_ns=T0 + 90_000_000, status=200, attempts=3)
    url = "https://api.openai.com/v1/chat/completions"
    r.tries += [
        TryRecord(new_span_id(), "openai", "POST", url, "api.openai.com", 443, T0 + 1_000,
                  end_ns=T0 + 10_000_000, status=503, error_type="503"),
        TryRecord(new_span_id(), "openai", "POST", url, "api.openai.com", 443, T0 + 20_000_000,
                  resend_count=1, end_ns=T0 + 30_000_000, error_type="connect-failure"),
        TryRecord(new_span_id(), "backup-llm", "POST", "https://llm-backup.internal/v1/chat/completions",
                  "llm-backup.internal", 443, T0 + 40_000_000, end_ns=T0 + 89_000_000, status=200,
                  fallback_target="upstream:backup-llm"),
    ]
    r.decisions += [
        decision(Decision.RETRY, trace_id, span_id, budget_remaining=4.5, policy_version="abc123"),
        decision(Decision.BREAKER_OPENED, trace_id, span_id, breaker_state="open",
                 reason="5 consecutive failures"),
        decision(Decision.FALLBACK, trace_id, span_id, fallback_target="upstream:backup-llm",
                 reason="retries-exhausted"),
    ]
    r.decision_ns += [T0 + 15_000_000, T0 + 31_000_000, T0 + 35_000_000]
    return r


@pytest.fixture
def sinks():
    made: list[OtelSink] = []
    yield made
    for sink in made:
        sink.shutdown(timeout=2)


def finish(sink: OtelSink, record: RequestRecord) -> None:
    """What the data plane does: the head decision when the request arrives, the record when it ends."""
    record.sampled = sink.samples(record.trace_id, record.parent_span_id, record.caller_sampled)
    sink.request_finished(record)


def make(sinks, cfg: Telemetry, env: dict) -> OtelSink:
    sink = OtelSink.from_config(cfg, env)
    assert sink is not None
    sinks.append(sink)
    return sink


# --- span shape --------------------------------------------------------------------------------

def test_degraded_request_becomes_request_span_try_spans_and_decision_events(otlp_http_receiver, sinks):
    sink = make(sinks, telemetry(), http_env(otlp_http_receiver))
    record = degraded(CALLER_TRACE, parent=CALLER_SPAN, sampled=True)
    finish(sink, record)
    assert sink.force_flush()

    spans = otlp_http_receiver.wait_for_spans(4, where=lambda s: s.trace_id == CALLER_TRACE)
    [req] = [s for s in spans if s.span_id == record.span_id]
    assert req.name == "chat" and req.kind == "INTERNAL"
    assert req.parent_span_id == CALLER_SPAN                      # the caller's span from traceparent
    assert (req.start_ns, req.end_ns) == (record.start_ns, record.end_ns)
    assert req.attributes == {
        "http.request.method": "POST", "url.full": "https://api.openai.com/v1/chat/completions",
        "http.response.status_code": 200, "sidecar.route": "chat", "sidecar.upstream": "backup-llm",
        "sidecar.listener": "egress", "sidecar.policy.version": "abc123", "sidecar.attempts": 3,
        "sidecar.decisions": ("retry", "breaker_opened", "fallback"),
    }
    assert req.status == "UNSET"
    assert req.scope == "sidecar"

    events = req.events_named("sidecar.decision")
    assert [e.time_ns for e in events] == record.decision_ns
    assert events[0].attributes == {
        "sidecar.decision": "retry", "sidecar.route": "chat", "sidecar.upstream": "openai",
        "sidecar.reason": "503 from upstream", "sidecar.retry.budget_remaining": 4.5,
        "sidecar.policy.version": "abc123"}
    assert events[1].attributes["sidecar.breaker.state"] == "open"
    assert events[1].attributes["sidecar.reason"] == "5 consecutive failures"
    assert events[2].attributes["sidecar.fallback.target"] == "upstream:backup-llm"
    assert "sidecar.breaker.state" not in events[0].attributes

    tries = sorted((s for s in spans if s.kind == "CLIENT"), key=lambda s: s.start_ns)
    assert [t.span_id for t in tries] == [t.span_id for t in record.tries]
    assert all(t.parent_span_id == record.span_id and t.name == "POST" for t in tries)
    first, second, fallback = tries
    assert first.attributes == {
        "http.request.method": "POST", "url.full": "https://api.openai.com/v1/chat/completions",
        "server.address": "api.openai.com", "server.port": 443, "http.response.status_code": 503,
        "error.type": "503", "sidecar.upstream": "openai"}
    assert first.status == "ERROR"
    assert "http.request.resend_count" not in first.attributes     # only on resends
    assert second.attributes["http.request.resend_count"] == 1
    assert second.attributes["error.type"] == "connect-failure"
    assert "http.response.status_code" not in second.attributes
    assert fallback.attributes["sidecar.fallback.target"] == "upstream:backup-llm"
    assert fallback.attributes["server.address"] == "llm-backup.internal"
    assert fallback.status == "UNSET" and "error.type" not in fallback.attributes


def test_failed_request_span_has_error_status_and_type(otlp_grpc_receiver, sinks):
    sink = make(sinks, telemetry(), grpc_env(otlp_grpc_receiver))
    record = degraded()
    record.status, record.error_type, record.upstream = 503, "retries-exhausted", None
    finish(sink, record)
    sink.force_flush()
    [req] = otlp_grpc_receiver.wait_for_spans(1, where=lambda s: s.span_id == record.span_id)
    assert req.status == "ERROR" and req.status_message == "retries-exhausted"
    assert req.attributes["error.type"] == "retries-exhausted"
    assert req.attributes["http.response.status_code"] == 503
    assert "sidecar.upstream" not in req.attributes


def test_new_trace_has_no_parent_and_keeps_tracestate(otlp_http_receiver, sinks):
    sink = make(sinks, telemetry(), http_env(otlp_http_receiver))
    record = degraded(parent=CALLER_SPAN, tracestate="vendor=abc,other=1")
    root = degraded()
    finish(sink, record)
    finish(sink, root)
    sink.force_flush()
    [req] = otlp_http_receiver.wait_for_spans(1, where=lambda s: s.span_id == record.span_id)
    assert req.trace_state == "vendor=abc,other=1"
    [root_span] = otlp_http_receiver.wait_for_spans(1, where=lambda s: s.span_id == root.span_id)
    assert root_span.parent_span_id is None


def test_malformed_tracestate_is_dropped_quietly(otlp_http_receiver, sinks, caplog):
    sink = make(sinks, telemetry(), http_env(otlp_http_receiver))
    record = degraded(parent=CALLER_SPAN, tracestate="not a valid=member=at all")
    finish(sink, record)
    sink.force_flush()
    [req] = otlp_http_receiver.wait_for_spans(1, where=lambda s: s.span_id == record.span_id)
    assert req.trace_state == "" and req.parent_span_id == CALLER_SPAN
    assert export_warnings(caplog) == []


def test_background_decision_is_a_standalone_span(otlp_grpc_receiver, sinks):
    sink = make(sinks, telemetry(), grpc_env(otlp_grpc_receiver))
    sink.decision(decision(Decision.BREAKER_OPENED, reason="health check failed twice", breaker_state="open",
                           policy_version="abc123"))
    sink.decision(decision(Decision.CONFIG_REJECTED, route="", upstream=None,
                           reason="policy.yaml:12:3: unknown key 'retyr'"))
    # A request's own decision travels with its RequestRecord, not on its own.
    sink.decision(decision(Decision.RETRY, new_trace_id(), new_span_id()))
    sink.force_flush()

    spans = otlp_grpc_receiver.wait_for_spans(2)
    assert len(otlp_grpc_receiver.spans) == 2
    by_decision = {s.attributes["sidecar.decision"]: s for s in spans}
    breaker = by_decision["breaker_opened"]
    assert breaker.name == "sidecar.decision" and breaker.kind == "INTERNAL"
    assert breaker.parent_span_id is None
    [event] = breaker.events
    assert event.name == "sidecar.decision"
    assert abs(event.time_ns - (T0 + 5_000_000)) < 1_000        # `at` is float seconds
    assert event.attributes == {
        "sidecar.decision": "breaker_opened", "sidecar.route": "chat", "sidecar.upstream": "openai",
        "sidecar.reason": "health check failed twice", "sidecar.breaker.state": "open",
        "sidecar.policy.version": "abc123"}
    rejected = by_decision["config_rejected"]
    assert "sidecar.upstream" not in rejected.events[0].attributes
    assert rejected.trace_id != breaker.trace_id


def test_late_queue_decision_joins_the_request_trace(otlp_http_receiver, sinks):
    sink = make(sinks, telemetry(), http_env(otlp_http_receiver))
    trace_id, span_id = new_trace_id(), new_span_id()
    sink.decision(decision(Decision.QUEUE_DELIVERED, trace_id, span_id, reason="delivered after 3 tries"))
    sink.force_flush()
    [span] = otlp_http_receiver.wait_for_spans(1)
    assert (span.trace_id, span.parent_span_id) == (trace_id, span_id)
    assert span.events[0].attributes["sidecar.decision"] == "queue_delivered"


# --- sampling ----------------------------------------------------------------------------------

def test_ratio_zero_drops_healthy_but_exports_degraded(otlp_http_receiver, sinks):
    sink = make(sinks, telemetry(ratio=0.0), http_env(otlp_http_receiver))
    calm, bad = healthy(), degraded()
    finish(sink, calm)
    finish(sink, bad)
    sink.force_flush()
    otlp_http_receiver.wait_for_spans(4, where=lambda s: s.trace_id == bad.trace_id)
    assert otlp_http_receiver.trace(calm.trace_id) == []


def test_caller_not_sampled_does_not_stop_a_degraded_export(otlp_http_receiver, sinks):
    sink = make(sinks, telemetry(ratio=1.0), http_env(otlp_http_receiver))
    calm = healthy(parent=CALLER_SPAN, sampled=False)          # parent-based: the caller said no
    bad = degraded(parent=CALLER_SPAN, sampled=False)
    finish(sink, calm)
    finish(sink, bad)
    sink.force_flush()
    otlp_http_receiver.wait_for_spans(4, where=lambda s: s.trace_id == bad.trace_id)
    assert otlp_http_receiver.trace(calm.trace_id) == []


def test_caller_sampled_exports_a_healthy_request_at_ratio_zero(otlp_http_receiver, sinks):
    sink = make(sinks, telemetry(ratio=0.0), http_env(otlp_http_receiver))
    calm = healthy(parent=CALLER_SPAN, sampled=True)
    finish(sink, calm)
    sink.force_flush()
    spans = otlp_http_receiver.wait_for_spans(2, where=lambda s: s.trace_id == calm.trace_id)
    assert {s.kind for s in spans} == {"INTERNAL", "CLIENT"}
    [req] = [s for s in spans if s.kind == "INTERNAL"]
    assert "sidecar.decisions" not in req.attributes and req.events == []


def test_always_off_sampler_from_env_still_exports_degraded(otlp_http_receiver, sinks):
    sink = make(sinks, telemetry(ratio=1.0), http_env(otlp_http_receiver, OTEL_TRACES_SAMPLER="always_off"))
    calm, bad = healthy(parent=CALLER_SPAN, sampled=True), degraded()
    finish(sink, calm)
    finish(sink, bad)
    sink.force_flush()
    otlp_http_receiver.wait_for_spans(1, where=lambda s: s.trace_id == bad.trace_id)
    assert otlp_http_receiver.trace(calm.trace_id) == []


def test_sampler_arg_from_env_overrides_policy_ratio(otlp_http_receiver, sinks):
    sink = make(sinks, telemetry(ratio=0.0),
                http_env(otlp_http_receiver, OTEL_TRACES_SAMPLER="traceidratio", OTEL_TRACES_SAMPLER_ARG="1"))
    calm = healthy(parent=CALLER_SPAN, sampled=False)           # not parent-based: the ratio decides
    finish(sink, calm)
    sink.force_flush()
    otlp_http_receiver.wait_for_spans(2, where=lambda s: s.trace_id == calm.trace_id)


def test_the_export_follows_the_head_decision_the_record_carries(otlp_http_receiver, sinks):
    """The flag sent upstream in traceparent and the export agree: the sink does not decide again."""
    sink = make(sinks, telemetry(ratio=1.0), http_env(otlp_http_receiver))
    told_no, told_yes = healthy(), healthy()
    told_no.sampled, told_yes.sampled = False, True
    sink.request_finished(told_no)
    sink.request_finished(told_yes)
    sink.force_flush()
    otlp_http_receiver.wait_for_spans(2, where=lambda s: s.trace_id == told_yes.trace_id)
    assert otlp_http_receiver.trace(told_no.trace_id) == []


def test_ratio_sampler_agrees_with_the_sdk_on_the_trace_id():
    from opentelemetry.sdk.trace.sampling import Decision as SdkDecision, TraceIdRatioBased
    for ratio in (0.0, 0.05, 0.5, 0.999, 1.0):
        ours, sdk = make_sampler("traceidratio", ratio), TraceIdRatioBased(ratio)
        for _ in range(2000):
            tid = new_trace_id()
            expected = sdk.should_sample(None, int(tid, 16), "x").decision is SdkDecision.RECORD_AND_SAMPLE
            assert ours(tid, None, False) is expected


def test_parent_based_samplers_follow_the_caller():
    on, off = make_sampler("parentbased_always_on", 0), make_sampler("parentbased_always_off", 0)
    tid = new_trace_id()
    assert on(tid, None, False) and not off(tid, None, True)            # no parent: the root sampler
    assert not on(tid, CALLER_SPAN, False) and off(tid, CALLER_SPAN, True)
    with pytest.raises(ValueError):
        make_sampler("jaeger_remote", 0)


# --- configuration from the policy and OTEL_* --------------------------------------------------

def test_disabled_or_no_endpoint_means_no_sink():
    cfg = telemetry("http://jaeger:4317")
    assert OtelSink.from_config(telemetry(None), {}) is None
    assert OtelSink.from_config(cfg, {"OTEL_SDK_DISABLED": "true"}) is None
    assert OtelSink.from_config(cfg, {"OTEL_SDK_DISABLED": "TRUE"}) is None
    assert OtelSink.from_config(cfg, {"OTEL_TRACES_EXPORTER": "none"}) is None


def test_endpoint_and_protocol_resolution():
    cfg = telemetry("http://jaeger:4317")
    assert resolve_target(cfg, {}) == ("grpc", "http://jaeger:4317")
    assert resolve_target(telemetry("jaeger:4317"), {}) == ("grpc", "http://jaeger:4317")
    assert resolve_target(telemetry("http://jaeger:4318", "http/protobuf"), {}) == (
        "http/protobuf", "http://jaeger:4318/v1/traces")
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/",
           "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    assert resolve_target(cfg, env) == ("http/protobuf", "http://collector:4318/v1/traces")
    env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = "http://collector:4318/custom"
    assert resolve_target(cfg, env) == ("http/protobuf", "http://collector:4318/custom")
    env = {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
           "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}
    assert resolve_target(cfg, env) == ("grpc", "http://collector:4317")
    assert resolve_target(telemetry(None), {}) is None


def test_env_protocol_http_wins_over_policy_grpc(otlp_http_receiver, otlp_grpc_receiver, sinks):
    cfg = telemetry(otlp_grpc_receiver.endpoint, protocol="grpc")
    sink = make(sinks, cfg, http_env(otlp_http_receiver))
    bad = degraded()
    finish(sink, bad)
    sink.force_flush()
    otlp_http_receiver.wait_for_spans(4)
    assert otlp_http_receiver.paths[0] == "/v1/traces"             # appended to the base endpoint
    assert otlp_grpc_receiver.spans == []


def test_env_protocol_grpc_wins_over_policy_http(otlp_http_receiver, otlp_grpc_receiver, sinks):
    cfg = telemetry(otlp_http_receiver.endpoint, protocol="http/protobuf")
    sink = make(sinks, cfg, grpc_env(otlp_grpc_receiver))
    sink.request_finished(degraded())
    sink.force_flush()
    otlp_grpc_receiver.wait_for_spans(4)
    assert otlp_http_receiver.paths == []


def test_policy_endpoint_is_used_without_env(otlp_grpc_receiver, sinks):
    sink = make(sinks, telemetry(otlp_grpc_receiver.endpoint, protocol="grpc"), {})
    sink.request_finished(degraded())
    sink.force_flush()
    otlp_grpc_receiver.wait_for_spans(4)


def test_traces_endpoint_is_used_as_is(otlp_http_receiver, sinks):
    env = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{otlp_http_receiver.endpoint}/otlp/traces",
           "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}
    sink = make(sinks, telemetry(), env)
    sink.request_finished(degraded())
    sink.force_flush()
    otlp_http_receiver.wait_for_spans(4)
    assert set(otlp_http_receiver.paths) == {"/otlp/traces"}


def test_service_name_and_resource_attributes_from_env(otlp_grpc_receiver, sinks, monkeypatch):
    monkeypatch.setenv("OTEL_SERVICE_NAME", "checkout-egress")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=staging,k8s.pod.name=shop-7f%2C1")
    sink = make(sinks, telemetry(), grpc_env(otlp_grpc_receiver, OTEL_SERVICE_NAME="checkout-egress"))
    sink.request_finished(degraded())
    sink.force_flush()
    [span, *_] = otlp_grpc_receiver.wait_for_spans(4)
    assert span.resource["service.name"] == "checkout-egress"
    assert span.resource["deployment.environment"] == "staging"
    assert span.resource["k8s.pod.name"] == "shop-7f,1"
    assert span.resource["telemetry.sdk.name"] == "opentelemetry"


def test_service_name_from_policy_when_env_is_silent(otlp_grpc_receiver, sinks, monkeypatch):
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    sink = make(sinks, telemetry(service="shop-sidecar"), grpc_env(otlp_grpc_receiver))
    sink.request_finished(degraded())
    sink.force_flush()
    [span, *_] = otlp_grpc_receiver.wait_for_spans(4)
    assert span.resource["service.name"] == "shop-sidecar"


def test_resource_attributes_service_name_beats_policy(otlp_grpc_receiver, sinks, monkeypatch):
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attrs")
    sink = make(sinks, telemetry(service="shop-sidecar"), grpc_env(otlp_grpc_receiver))
    sink.request_finished(degraded())
    sink.force_flush()
    [span, *_] = otlp_grpc_receiver.wait_for_spans(4)
    assert span.resource["service.name"] == "from-attrs"


# --- a collector that is down ------------------------------------------------------------------

def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_unreachable_collector_is_logged_once(sinks, caplog, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "1")      # seconds, as the Python SDK reads it
    caplog.set_level(logging.DEBUG)
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{closed_port()}",
           "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    sink = make(sinks, telemetry(), env)
    sink.exporter.probe_every = 0          # every flush really tries the collector

    for _ in range(3):
        for _ in range(20):
            sink.request_finished(degraded())
        assert sink.force_flush(timeout=10)
    warnings = export_warnings(caplog)
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert warnings[0].name == "sidecar.telemetry.otel"
    message = warnings[0].getMessage()
    assert "failed" in message and env["OTEL_EXPORTER_OTLP_ENDPOINT"] in message
    assert sink.exporter.failing and sink.exporter.dropped == 240
    sink.exporter.probe_every = 3600       # teardown's shutdown then drops at once


def test_hung_collector_costs_the_data_plane_nothing(otlp_grpc_receiver, sinks):
    sink = make(sinks, telemetry(), grpc_env(otlp_grpc_receiver))
    otlp_grpc_receiver.stall()
    sink.request_finished(degraded())
    flusher = threading.Thread(target=sink.force_flush, kwargs={"timeout": 10})
    flusher.start()                        # the export now waits on the collector
    records = [degraded() for _ in range(500)]
    for record in records:
        finish(sink, record)
    # every call returned while the export was still stuck on the collector: none waited for it
    assert flusher.is_alive()
    otlp_grpc_receiver.resume()
    flusher.join()
    sink.force_flush()
    otlp_grpc_receiver.wait_for_spans(501 * 4)


def test_failure_logged_once_then_once_again_after_recovery(otlp_http_receiver, sinks, caplog):
    caplog.set_level(logging.INFO)
    sink = make(sinks, telemetry(), http_env(otlp_http_receiver))
    sink.exporter.probe_every = 0
    otlp_http_receiver.fail_status = 400                         # not retryable: fails at once

    def round_trip() -> None:
        sink.request_finished(degraded())
        sink.force_flush()

    round_trip()
    round_trip()
    round_trip()
    assert [r.getMessage()[:40] for r in export_warnings(caplog)] == [
        f"trace export to {otlp_http_receiver.traces_url} failed"[:40]]
    assert "400" in export_warnings(caplog)[0].getMessage()      # the SDK's reason, kept

    otlp_http_receiver.fail_status = None
    round_trip()
    otlp_http_receiver.wait_for_spans(4)
    messages = [r.getMessage() for r in export_warnings(caplog)]
    assert len(messages) == 2 and "recovered" in messages[1] and "12 spans were dropped" in messages[1]

    otlp_http_receiver.fail_status = 400
    round_trip()
    round_trip()
    assert len(export_warnings(caplog)) == 3 and "failed" in export_warnings(caplog)[2].getMessage()


def test_failing_exporter_skips_batches_between_probes(otlp_grpc_receiver, sinks, caplog):
    sink = make(sinks, telemetry(), grpc_env(otlp_grpc_receiver))
    otlp_grpc_receiver.fail_code = grpc.StatusCode.INVALID_ARGUMENT        # not retryable
    sink.exporter.probe_every = 3600
    for _ in range(3):
        sink.request_finished(degraded())
        sink.force_flush()
    assert len(otlp_grpc_receiver.requests) == 0
    assert sink.exporter.failing and sink.exporter.dropped == 12
    assert len(export_warnings(caplog)) == 1


def test_full_queue_drops_cheaply_and_logs_once(otlp_grpc_receiver, sinks, caplog, monkeypatch):
    from sidecar.telemetry import otel
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "8")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "8")
    monkeypatch.setattr(otel._gate, "_queue_full_logged_at", None)
    sink = make(sinks, telemetry(), grpc_env(otlp_grpc_receiver))
    otlp_grpc_receiver.stall()
    # 8 spans queued plus at most one batch of 8 stuck in the exporter: 4 of 20 records fit.
    for _ in range(20):
        sink.request_finished(degraded())
    sink.decision(decision(Decision.UPSTREAM_UNHEALTHY))
    assert sink.queue_full_drops >= 17
    otlp_grpc_receiver.resume()
    sink.force_flush()
    otlp_grpc_receiver.wait_for_spans(8)
    warnings = [r.getMessage() for r in export_warnings(caplog)]
    assert len(warnings) == 1 and "queue is full" in warnings[0]


def test_shutdown_is_bounded_when_the_collector_is_down(sinks, monkeypatch, caplog):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "30")
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{closed_port()}",
           "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    sink = OtelSink.from_config(telemetry(), env)
    sink.request_finished(degraded())
    stopper = threading.Thread(target=sink.shutdown, kwargs={"timeout": 0.5})
    stopper.start()
    stopper.join(30)
    assert not stopper.is_alive(), "shutdown hung on a dead collector"
    assert [r.name for r in export_warnings(caplog)] == ["sidecar.telemetry.otel"]   # "did not finish"
    sink.request_finished(degraded())      # after shutdown: ignored, no error
    sink.decision(decision(Decision.CONFIG_RELOADED))


def test_shutdown_flushes_what_is_queued(otlp_grpc_receiver):
    sink = OtelSink.from_config(telemetry(), grpc_env(otlp_grpc_receiver))
    sink.request_finished(degraded())
    sink.shutdown(timeout=5)
    assert len(otlp_grpc_receiver.spans) == 4


def test_healthy_unsampled_request_is_cheap(otlp_grpc_receiver, sinks):
    sink = make(sinks, telemetry(ratio=0.0), grpc_env(otlp_grpc_receiver))
    record = healthy()

    def must_not_build(_record):
        raise AssertionError("spans were built for a healthy unsampled request")
    sink.spans_for = must_not_build        # the cheap path never builds a span
    for _ in range(1000):
        finish(sink, record)
    sink.force_flush()
    assert otlp_grpc_receiver.spans == []


def test_credential_like_query_values_are_scrubbed_from_span_urls(otlp_http_receiver, sinks):
    sink = make(sinks, telemetry(ratio=1.0), http_env(otlp_http_receiver))
    record = healthy()
    record.url = "https://api.example.com/v1/search?q=shoes&api_key=sk-live-123456&access_token=abcdef"
    record.tries[0].url = record.url
    finish(sink, record)
    assert sink.force_flush()
    spans = otlp_http_receiver.wait_for_spans(2, where=lambda s: s.trace_id == record.trace_id)
    expected = "https://api.example.com/v1/search?q=shoes&api_key=<redacted>&access_token=<redacted>"
    assert [s.attributes["url.full"] for s in spans] == [expected, expected]
