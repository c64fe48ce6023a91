"""Golden signals and fallback shares from finished request records, with a fake clock."""
from sidecar.llm.usage import LlmCall
from sidecar.telemetry.records import RequestRecord, TryRecord
from sidecar.telemetry.signals import Signals, answer_source


class Clock:
    def __init__(self) -> None:
        self.now = 10_000.0

    def __call__(self) -> float:
        return self.now


def record(route="chat", status=200, upstream="openai", latency=0.010, tries=None, error_type=None):
    r = RequestRecord(trace_id="0" * 32, span_id="1" * 16, parent_span_id=None, caller_sampled=False,
                      tracestate=None, route=route, upstream=upstream, method="POST", url="http://x/",
                      listener="l", policy_version="v", start_ns=0, end_ns=int(latency * 1e9), status=status,
                      error_type=error_type)
    r.tries = tries if tries is not None else [try_(upstream, status)]
    return r


def try_(upstream, status, fallback_target=None, tokens=None):
    t = TryRecord(span_id="2" * 16, upstream=upstream, method="POST", url="http://x/", server_address="x",
                  server_port=80, start_ns=0, end_ns=5_000_000, status=status, fallback_target=fallback_target,
                  error_type=str(status) if status >= 500 else None)
    if tokens is not None:
        t.llm = LlmCall(provider="openai", operation="chat", api="chat.completions",
                        input_tokens=tokens[0], output_tokens=tokens[1])
    return t


def route(snapshot, name):
    return next(r for r in snapshot["routes"] if r["name"] == name)


def test_success_rate_rps_latency_and_tokens_over_the_last_minute():
    clock = Clock()
    s = Signals(clock)
    clock.now += 60                            # the sink has been up a whole minute
    for i in range(90):
        s.request_finished(record(latency=0.010 if i < 80 else 0.500,
                                  tries=[try_("openai", 200, tokens=(10, 20))]))
    for _ in range(10):
        s.request_finished(record(status=503, tries=[try_("openai", 503)]))
    snap = s.snapshot()
    chat = route(snap, "chat")
    assert chat["requests"] == 100 and chat["rps"] == round(100 / 60, 3)
    assert chat["success_rate"] == 0.9
    assert 8 <= chat["latency_ms"]["p50"] <= 12.5          # bucketed: within 25 %
    assert 400 <= chat["latency_ms"]["p99"] <= 625
    assert chat["tokens_per_min"] == 90 * 30
    up = next(u for u in snap["upstreams"] if u["name"] == "openai")
    assert up["success_rate"] == 0.9 and up["requests"] == 100
    assert chat["spark"]["rps"][-1] > 0 and chat["spark"]["success"][-1] == 0.9
    clock.now += 61                            # the minute slid past
    assert route(s.snapshot(), "chat")["requests"] == 0
    assert route(s.snapshot(), "chat")["success_rate"] is None


def test_fallback_shares_over_the_hour():
    clock = Clock()
    s = Signals(clock)
    for _ in range(6):
        s.request_finished(record())
    for _ in range(3):
        s.request_finished(record(upstream="backup", tries=[try_("openai", 503),
                                                            try_("backup", 200, "upstream:backup")]))
    s.request_finished(record(upstream="static", tries=[try_("openai", 503)]))
    clock.now += 30 * 60
    shares = s.snapshot()["fallback"]["routes"][0]
    assert shares["answers"] == 10
    assert shares["shares"] == {"primary": 0.6, "upstream:backup": 0.3, "static": 0.1}
    clock.now += 31 * 60                       # an hour after: forgotten
    assert s.snapshot()["fallback"]["routes"] == []


def test_answer_sources():
    assert answer_source(record(upstream="cache", tries=[])) == "cache"
    assert answer_source(record(upstream="breaker-open", status=503, tries=[])) == "failed"
    assert answer_source(record()) == "primary"
