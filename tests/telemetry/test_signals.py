"""Golden signals and fallback shares, differenced from the metrics' counters with a fake clock."""
from sidecar.telemetry.genai import LlmCall
from sidecar.telemetry.metrics import Metrics, answer_source
from sidecar.telemetry.records import RequestRecord, TryRecord
from sidecar.telemetry.signals import Signals


class Clock:
    def __init__(self) -> None:
        self.now = 10_000.0

    def __call__(self) -> float:
        return self.now


def record(route="chat", status=200, upstream="openai", latency=0.010, tries=None, error_type=None):
    r = RequestRecord(trace_id="0" * 32, span_id="1" * 16, parent_span_id=None, caller_sampled=False,
                      tracestate=None, route=route, upstream=upstream, method="POST", url="http://x/",
                      listener="l", policy_version="v", start_ns=1, end_ns=1 + int(latency * 1e9),
                      status=status, error_type=error_type)
    r.tries = tries if tries is not None else [try_(upstream, status)]
    return r


def try_(upstream, status, fallback_target=None, tokens=None):
    t = TryRecord(span_id="2" * 16, upstream=upstream, method="POST", url="http://x/", server_address="x",
                  server_port=80, start_ns=1, end_ns=5_000_001, status=status, fallback_target=fallback_target,
                  error_type=str(status) if status >= 500 else None)
    if tokens is not None:
        t.llm = LlmCall(provider="openai", operation="chat", api="chat.completions",
                        input_tokens=tokens[0], output_tokens=tokens[1])
    return t


def row(snapshot, kind, name):
    return next(r for r in snapshot[kind] if r["name"] == name)


def setup():
    clock = Clock()
    metrics = Metrics(process_metrics=False)
    return clock, metrics, Signals(metrics, clock)


def test_success_rate_rps_latency_and_tokens_over_the_last_minute():
    clock, metrics, signals = setup()
    for i in range(50):                        # a minute ago: outside the coming window
        metrics.request_finished(record(status=503, tries=[try_("openai", 503)]))
    for _ in range(61):
        clock.now += 1
        signals.tick()
    for i in range(90):
        metrics.request_finished(record(latency=0.007 if i < 80 else 0.400,
                                        tries=[try_("openai", 200, tokens=(10, 20))]))
    for _ in range(10):
        metrics.request_finished(record(status=503, tries=[try_("openai", 503)]))
    snap = signals.snapshot()
    chat = row(snap, "routes", "chat")
    assert chat["requests"] == 100 and chat["rps"] == round(100 / 60, 3)
    assert chat["success_rate"] == 0.9
    assert 5 <= chat["latency_ms"]["p50"] <= 10          # interpolated in the (5 ms, 10 ms] bucket
    assert 250 <= chat["latency_ms"]["p99"] <= 500
    assert chat["tokens_per_min"] == 90 * 30
    up = row(snap, "upstreams", "openai")
    assert up["success_rate"] == 0.9 and up["requests"] == 100
    assert chat["spark"]["rps"][-1] == 20.0 and chat["spark"]["success"][-1] == 0.9
    assert chat["spark"]["success"][0] is None
    for _ in range(61):                        # the minute slides past with no traffic
        clock.now += 1
        signals.tick()
    chat = row(signals.snapshot(), "routes", "chat")
    assert chat["requests"] == 0 and chat["success_rate"] is None and chat["tokens_per_min"] == 0


def test_a_young_sidecar_divides_by_its_uptime():
    clock, metrics, signals = setup()
    clock.now += 10
    for _ in range(20):
        metrics.request_finished(record())
    assert row(signals.snapshot(), "routes", "chat")["rps"] == 2.0


def test_fallback_shares_over_the_hour():
    clock, metrics, signals = setup()
    for _ in range(6):
        metrics.request_finished(record())
    for _ in range(3):
        metrics.request_finished(record(upstream="backup", tries=[try_("openai", 503),
                                                                  try_("backup", 200, "upstream:backup")]))
    metrics.request_finished(record(upstream="static", tries=[try_("openai", 503)]))
    for _ in range(30):
        clock.now += 60
        signals.tick()
    shares = signals.snapshot()["fallback"]["routes"][0]
    assert shares["answers"] == 10
    assert shares["shares"] == {"primary": 0.6, "upstream:backup": 0.3, "static": 0.1}
    for _ in range(31):                        # an hour after: forgotten
        clock.now += 60
        signals.tick()
    assert signals.snapshot()["fallback"]["routes"] == []


def test_answer_sources():
    assert answer_source(record(upstream="cache", tries=[])) == "cache"
    assert answer_source(record(upstream="breaker-open", status=503, tries=[])) == "failed"
    assert answer_source(record()) == "primary"


def test_endpoints_of_a_balanced_upstream():
    clock, metrics, signals = setup()
    for i in range(10):
        t = try_("orders", 503 if i < 2 else 200)
        t.endpoint = "10.0.0.1:80" if i % 2 else "10.0.0.2:80"
        metrics.request_finished(record(upstream="orders", status=t.status, tries=[t]))
    clock.now += 10
    rows = {r["name"]: r for r in signals.snapshot()["endpoints"]}
    assert rows["orders/10.0.0.2:80"]["success_rate"] == 0.8 and rows["orders/10.0.0.2:80"]["requests"] == 5
    assert rows["orders/10.0.0.1:80"]["success_rate"] == 0.8
    assert rows["orders/10.0.0.1:80"]["latency_ms"]["p50"] is None
