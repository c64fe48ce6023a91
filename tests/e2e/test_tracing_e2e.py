"""Issue 5 end to end: a degraded request through the real data plane, exported to real OTLP receivers
(HTTP/protobuf and gRPC), with the caller's trace id, try spans, decision events, and the metrics scrape."""
import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


def traced_policy(port, up_url, endpoint, protocol, ratio=0.0):
    return f"""
    version: 1
    listeners: [{{name: api, mode: reverse, port: {port['reverse']}, upstream: svc}}]
    admin: {{port: {port['admin']}}}
    health: {{bind: 127.0.0.1, port: {port['health']}}}
    telemetry:
      service_name: e2e-sidecar
      traces: {{endpoint: "{endpoint}", protocol: {protocol}, sample_ratio: {ratio}}}
    upstreams:
      svc: {{url: "{up_url}"}}
    routes:
      - name: orders
        match: {{path_prefix: /}}
        upstream: svc
        retry: {{max_retries: 2, when: [503], backoff: {{base: 1ms, max: 1ms}}}}
    """


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
async def test_degraded_request_exported_healthy_one_not(upstream_factory, sidecar_factory, port, protocol,
                                                          otlp_http_receiver, otlp_grpc_receiver, monkeypatch):
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_SERVICE_NAME",
                "OTEL_SDK_DISABLED", "OTEL_TRACES_SAMPLER"):
        monkeypatch.delenv(var, raising=False)
    receiver = otlp_http_receiver if protocol == "http/protobuf" else otlp_grpc_receiver
    endpoint = receiver.traces_url if protocol == "http/protobuf" else receiver.endpoint
    seen = set()

    async def first_fails(request):
        if request.path not in seen:
            seen.add(request.path)
            return web.Response(status=503)
        return web.Response(text="ok")
    up = await upstream_factory(first_fails)
    sc = await sidecar_factory(traced_policy(port, up.url, endpoint, protocol))
    async with aiohttp.ClientSession() as s:
        # healthy and unsampled (ratio 0): not exported
        seen.add("/healthy")
        async with s.get(f"http://127.0.0.1:{port['reverse']}/healthy") as r:
            assert r.status == 200 and "x-sidecar-degraded" not in r.headers
        # degraded (a retry), with the caller's unsampled traceparent: exported anyway
        async with s.get(f"http://127.0.0.1:{port['reverse']}/degraded",
                         headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-00"}) as r:
            assert r.status == 200
            assert r.headers["x-sidecar-degraded"] == "retry"
            assert r.headers["x-sidecar-trace-id"] == CALLER_TRACE
        async with s.get(f"http://127.0.0.1:{port['admin']}/metrics") as r:
            metrics_text = await r.text()
    # the upstream saw the caller's trace id on both tries
    assert all(req["headers"]["traceparent"].split("-")[1] == CALLER_TRACE
               for req in up.requests if req["path"] == "/degraded")
    for sink in sc.runtime.sink.sinks:
        if hasattr(sink, "force_flush"):
            sink.force_flush()
    spans = receiver.wait_for_spans(3, where=lambda sp: sp.trace_id == CALLER_TRACE)
    root = next(sp for sp in spans if sp.name == "orders")
    tries = sorted((sp for sp in spans if sp.kind == "CLIENT"), key=lambda sp: sp.start_ns)
    assert root.parent_span_id == CALLER_SPAN
    assert root.resource["service.name"] == "e2e-sidecar"
    assert [t.parent_span_id for t in tries] == [root.span_id, root.span_id]
    assert [t.attributes["http.response.status_code"] for t in tries] == [503, 200]
    assert tries[1].attributes["http.request.resend_count"] == 1
    assert "http.request.resend_count" not in tries[0].attributes
    assert tries[0].attributes["server.address"] == "127.0.0.1"
    assert tries[0].attributes["url.full"].endswith("/degraded")
    # the try span ids are the ones the upstream saw in traceparent
    sent = {req["headers"]["traceparent"].split("-")[2] for req in up.requests if req["path"] == "/degraded"}
    assert sent == {t.span_id for t in tries}
    [event] = [e for e in root.events if e.name == "sidecar.decision"]
    assert event.attributes["sidecar.decision"] == "retry"
    assert event.attributes["sidecar.route"] == "orders"
    assert event.attributes["sidecar.upstream"] == "svc"
    assert event.attributes["sidecar.policy.version"] == sc.runtime.policy.digest
    assert "sidecar.retry.budget_remaining" in event.attributes
    assert not [sp for sp in receiver.spans if sp.attributes.get("url.full", "").endswith("/healthy")]
    # the same request counted in Prometheus
    families = {f.name: f for f in text_string_to_metric_families(metrics_text)}
    decisions = {(s.labels["route"], s.labels["decision"]): s.value
                 for s in families["sidecar_decisions"].samples if s.name == "sidecar_decisions_total"}
    assert decisions[("orders", "retry")] == 1
    tries_by_code = {s.labels["code"]: s.value for s in families["sidecar_upstream_requests"].samples
                     if s.name == "sidecar_upstream_requests_total" and s.labels["route"] == "orders"}
    assert tries_by_code == {"503": 1, "200": 2}
