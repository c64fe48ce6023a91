"""The Prometheus sink: render, parse back with prometheus_client's own parser, assert on the series."""
from __future__ import annotations

import logging
import os

import pytest

from prometheus_client.parser import text_string_to_metric_families

from sidecar.core.decisions import Decision, DecisionRecord
from sidecar.telemetry.metrics import Metrics
from sidecar.telemetry.records import RequestRecord, TryRecord

T0 = 1_700_000_000_000_000_000
MS = 1_000_000


def request(route="chat", status=200, tries=(), duration_ms=40, error_type=None) -> RequestRecord:
    r = RequestRecord(trace_id="4bf92f3577b34da6a3ce929d0e0e4736", span_id="00f067aa0ba902b7",
                      parent_span_id=None, caller_sampled=False, tracestate=None, route=route,
                      upstream="openai", method="POST", url="https://api.openai.com/v1/chat/completions",
                      listener="egress", policy_version="abc123", start_ns=T0, end_ns=T0 + duration_ms * MS,
                      status=status, error_type=error_type, attempts=len(tries))
    r.tries.extend(tries)
    return r


def attempt(upstream="openai", status=200, error_type=None, ms=10, end=True) -> TryRecord:
    return TryRecord("a1b2c3d4e5f60718", upstream, "POST", "https://x/", "x", 443, T0,
                     end_ns=T0 + ms * MS if end else 0, status=status, error_type=error_type)


def decision(kind: Decision, route="chat") -> DecisionRecord:
    return DecisionRecord(kind, route=route, upstream="openai", reason="because", at=T0 / 1e9)


def scrape(metrics: Metrics) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}}."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        out.setdefault(family.name, {})
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_requests_and_durations_by_route_and_code():
    m = Metrics(process_metrics=False)
    for _ in range(3):
        m.request_finished(request(status=200, duration_ms=40))
    m.request_finished(request(status=503, duration_ms=2000))
    m.request_finished(request(route="models", status=200, duration_ms=3))
    s = scrape(m)
    assert s["sidecar_requests_total"] == {
        (("code", "200"), ("route", "chat")): 3.0,
        (("code", "503"), ("route", "chat")): 1.0,
        (("code", "200"), ("route", "models")): 1.0,
    }
    assert s["sidecar_request_duration_seconds_count"][(("route", "chat"),)] == 4.0
    assert abs(s["sidecar_request_duration_seconds_sum"][(("route", "chat"),)] - 2.12) < 1e-9
    buckets = s["sidecar_request_duration_seconds_bucket"]
    assert buckets[(("le", "0.05"), ("route", "chat"))] == 3.0
    assert buckets[(("le", "2.5"), ("route", "chat"))] == 4.0
    assert buckets[(("le", "+Inf"), ("route", "models"))] == 1.0


def test_one_upstream_series_per_try_with_status_or_failure_name():
    m = Metrics(process_metrics=False)
    m.request_finished(request(status=200, tries=[
        attempt(status=503, error_type="503", ms=5),
        attempt(status=None, error_type="connect-failure", ms=1),
        attempt(upstream="backup-llm", status=200, ms=30),
        attempt(status=None, error_type=None, end=False),             # a hedge that lost: cancelled
    ]))
    s = scrape(m)
    assert s["sidecar_upstream_requests_total"] == {
        (("code", "503"), ("route", "chat"), ("upstream", "openai")): 1.0,
        (("code", "connect-failure"), ("route", "chat"), ("upstream", "openai")): 1.0,
        (("code", "200"), ("route", "chat"), ("upstream", "backup-llm")): 1.0,
        (("code", "cancelled"), ("route", "chat"), ("upstream", "openai")): 1.0,
    }
    counts = s["sidecar_upstream_request_duration_seconds_count"]
    assert counts[(("route", "chat"), ("upstream", "openai"))] == 2.0        # the unfinished try is not timed
    assert counts[(("route", "chat"), ("upstream", "backup-llm"))] == 1.0


def test_request_without_a_status_is_counted_under_its_failure():
    m = Metrics(process_metrics=False)
    m.request_finished(request(status=0, error_type="client-disconnect"))
    assert scrape(m)["sidecar_requests_total"] == {(("code", "client-disconnect"), ("route", "chat")): 1.0}


def test_decisions_and_config_reloads():
    m = Metrics(process_metrics=False)
    s = scrape(m)
    assert s["sidecar_config_reloads_total"] == {(("result", "success"),): 0.0, (("result", "failure"),): 0.0}
    for kind in (Decision.RETRY, Decision.RETRY, Decision.FALLBACK):
        m.decision(decision(kind))
    m.decision(decision(Decision.CONFIG_RELOADED, route=""))
    m.decision(decision(Decision.CONFIG_REJECTED, route=""))
    m.decision(decision(Decision.CONFIG_REJECTED, route=""))
    s = scrape(m)
    assert s["sidecar_decisions_total"] == {
        (("decision", "retry"), ("route", "chat")): 2.0,
        (("decision", "fallback"), ("route", "chat")): 1.0,
        (("decision", "config_reloaded"), ("route", "")): 1.0,
        (("decision", "config_rejected"), ("route", "")): 2.0,
    }
    assert s["sidecar_config_reloads_total"] == {(("result", "success"),): 1.0, (("result", "failure"),): 2.0}


def test_live_state_gauges_are_read_at_scrape_time():
    state = {
        "breakers": [{"route": "chat", "upstream": "openai", "state": "open"},
                     {"route": "chat", "upstream": "backup-llm", "state": "half_open"},
                     {"route": "models", "upstream": "openai", "state": "closed"}],
        "budgets": [{"route": "chat", "remaining": 4.5}, {"route": "models", "remaining": 10}],
        "cache_entries": 42, "queue_depth": 3, "queue_oldest_age": 12.5, "policy_version": "abc123",
    }
    m = Metrics(lambda: state, process_metrics=False)
    s = scrape(m)
    assert s["sidecar_breaker_state"] == {
        (("route", "chat"), ("upstream", "openai")): 2.0,
        (("route", "chat"), ("upstream", "backup-llm")): 1.0,
        (("route", "models"), ("upstream", "openai")): 0.0,
    }
    assert s["sidecar_retry_budget_remaining"] == {(("route", "chat"),): 4.5, (("route", "models"),): 10.0}
    assert s["sidecar_cache_entries"] == {(): 42.0}
    assert s["sidecar_queue_depth"] == {(): 3.0}
    assert s["sidecar_queue_oldest_age_seconds"] == {(): 12.5}
    assert s["sidecar_policy_info"] == {(("version", "abc123"),): 1.0}

    state["breakers"][0]["state"] = "half-open"
    state["queue_depth"] = 0
    s = scrape(m)
    assert s["sidecar_breaker_state"][(("route", "chat"), ("upstream", "openai"))] == 1.0
    assert s["sidecar_queue_depth"] == {(): 0.0}


def test_without_a_provider_the_families_exist_but_are_empty():
    s = scrape(Metrics(process_metrics=False))
    for name in ("sidecar_breaker_state", "sidecar_retry_budget_remaining", "sidecar_cache_entries",
                 "sidecar_queue_depth", "sidecar_queue_oldest_age_seconds", "sidecar_policy_info",
                 "sidecar_requests", "sidecar_decisions"):
        assert s[name] == {}, name


def test_a_failing_provider_does_not_break_the_scrape_and_logs_once(caplog):
    def broken() -> dict:
        raise RuntimeError("state unavailable")
    m = Metrics(broken, process_metrics=False)
    m.request_finished(request())
    for _ in range(3):
        s = scrape(m)
    assert s["sidecar_requests_total"] == {(("code", "200"), ("route", "chat")): 1.0}
    assert s["sidecar_breaker_state"] == {}
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1


def test_label_values_are_capped():
    m = Metrics(max_label_values=2, process_metrics=False)
    m.request_finished(request(tries=[attempt(upstream=f"host{i}.example:443") for i in range(4)]))
    assert scrape(m)["sidecar_upstream_requests_total"] == {
        (("code", "200"), ("route", "chat"), ("upstream", "host0.example:443")): 1.0,
        (("code", "200"), ("route", "chat"), ("upstream", "host1.example:443")): 1.0,
        (("code", "200"), ("route", "chat"), ("upstream", "other")): 2.0,
    }


def test_openmetrics_when_the_scraper_asks_for_it():
    m = Metrics(process_metrics=False)
    m.request_finished(request())
    body, content_type = m.render("application/openmetrics-text; version=1.0.0,text/plain;q=0.5")
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")
    body, content_type = m.render()
    assert b'sidecar_requests_total{code="200",route="chat"} 1.0' in body
    assert b"_created" not in body


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="process_* metrics need /proc")
def test_process_metrics_are_included_by_default():
    body, _ = Metrics().render()
    assert b"process_resident_memory_bytes" in body
