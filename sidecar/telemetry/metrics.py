"""The Prometheus sink: request, try and decision counters, and live-state gauges read at scrape time.

Series (SPEC "Admin API", plus the try-level ones an Envoy user looks for):

    sidecar_requests_total{route,code}                      code: the status sent to the app, or what
                                                            cut its body after the head (reset, timeout)
    sidecar_request_duration_seconds{route}                 histogram
    sidecar_decisions_total{route,decision}                 the decision vocabulary
    sidecar_upstream_requests_total{route,upstream,code}    one per try; code: status or failure name
                                                            (a body cut after a 2xx-4xx head: the failure)
    sidecar_upstream_request_duration_seconds{route,upstream}
    sidecar_config_reloads_total{result}                    success | failure
    sidecar_relayed_connections_total{route,kind}           tunnel | upgrade | tls | tcp, once closed
    sidecar_relayed_bytes_total{route,kind,direction}       direction: up (app->upstream) | down
    sidecar_answers_total{route,source}                     primary | upstream:NAME (fallback) | cache | static...
    sidecar_grpc_requests_total{route,grpc_code}            gRPC calls, by the status the app got (OK, UNAVAILABLE...)
    sidecar_llm_requests_total{route,upstream,model,outcome}   LLM tries: success | rate_limited | client_error |
                                                            server_error | a failure name (reset, timeout...)
    sidecar_llm_tokens_total{route,upstream,model,kind}     kind: input | output, from the answers' usage
    sidecar_llm_cost_total{route,upstream,model}            with `llm.prices` only
    sidecar_llm_time_to_first_token_seconds{route,upstream,model}   histogram, streamed answers
    sidecar_breaker_state{route,upstream}                   0 closed, 1 half-open, 2 open   } filled at
    sidecar_retry_budget_remaining{route}                                                   } scrape time
    sidecar_cache_entries, sidecar_queue_depth, sidecar_queue_oldest_age_seconds            } from the
    sidecar_policy_info{version}                            always 1                        } state provider

Labels are route and upstream names from the policy, decision names and status codes: never a path.
Upstream names of passthrough traffic (the original destination) and LLM model names (they come from
requests and answers) are capped, see `_Capped`.
"""
from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, ProcessCollector, disable_created_metrics
from prometheus_client.exposition import CONTENT_TYPE_LATEST, choose_encoder, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from sidecar.core.decisions import Decision, DecisionRecord
from sidecar.grpc_rules import GrpcCode
from sidecar.telemetry.genai import LlmCall
from sidecar.telemetry.records import RequestRecord, TryRecord

log = logging.getLogger("sidecar.telemetry.metrics")

StateProvider = Callable[[], dict]

# Request latencies run from sub-millisecond cache hits to whole-route timeouts of tens of seconds.
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BREAKER_STATES = {"closed": 0.0, "half_open": 1.0, "half-open": 1.0, "open": 2.0}
OTHER = "other"
LOCAL_SOURCES = frozenset({"cache", "static", "queue", "fault"})
ENDPOINT_STATES = ("active", "ejected", "unhealthy", "cooldown")   # core.endpoints.STATES
MAX_ENDPOINT_LABELS = 256        # endpoint label values per upstream (DNS churn); then "other"
MAX_ENDPOINT_SERIES = 4096       # endpoint rows in sidecar_endpoint_state


class _Capped:
    """Passes the first `limit` distinct label values through and maps the rest to "other".

    Route and upstream names come from the policy, but a passthrough request's upstream is its original
    destination: an application calling many hosts must not grow the series without bound.
    """

    __slots__ = ("limit", "seen")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self.seen:
            return value
        if len(self.seen) >= self.limit:
            return OTHER
        self.seen.add(value)
        return value


class Metrics:
    """A `TelemetrySink` with its own registry; `render()` is the body of `GET /metrics`."""

    def __init__(self, state_provider: StateProvider | None = None, *, max_label_values: int = 500,
                 max_models: int = 50, process_metrics: bool = True) -> None:
        # `*_created` series double the page and no dashboard reads them (process-wide switch; the
        # sidecar is the process).
        disable_created_metrics()
        self.registry = CollectorRegistry()
        reg = self.registry
        self._decisions = Counter("sidecar_decisions", "Degradation decisions, by route and decision.",
                                  ["route", "decision"], registry=reg)
        self._reloads = Counter("sidecar_config_reloads", "Policy reloads, by result.", ["result"],
                                registry=reg)
        self._reload_ok = self._reloads.labels("success")
        self._reload_failed = self._reloads.labels("failure")
        # Requests and tries are counted in plain dicts on the event loop (no locks, no label lookups)
        # and turned into families only when scraped: the per-request cost is a few dict operations.
        self._hot = _HotPath()
        reg.register(self._hot)
        reg.register(_LiveState(state_provider))
        if process_metrics:
            ProcessCollector(registry=reg)

        self._route = _Capped(max_label_values)
        self._upstream = _Capped(max_label_values)
        self._model = _Capped(max_models)
        self._decision_children: dict[tuple[str, str], object] = {}
        self._endpoints: dict[str, _Capped] = {}

    def _endpoint(self, upstream: str, endpoint: str) -> str:
        """Endpoint labels are bounded per upstream: DNS churn cannot grow the series without limit."""
        capped = self._endpoints.get(upstream)
        if capped is None:
            capped = self._endpoints[upstream] = _Capped(MAX_ENDPOINT_LABELS)
        return capped(endpoint)

    # -- TelemetrySink ---------------------------------------------------------------------------

    def request_finished(self, record: RequestRecord) -> None:
        hot = self._hot
        route = self._route(record.route)
        if record.listener != "queue":      # a queued write's later delivery is not an answer to the app
            code = _code(record.status or None, record.error_type, record.cut, "none")
            key = (route, code)
            hot.requests[key] = hot.requests.get(key, 0) + 1
            if record.end_ns:
                hist = hot.durations.get(route)
                if hist is None:
                    hist = hot.durations[route] = _Histogram()
                hist.observe((record.end_ns - record.start_ns) / 1e9)
            akey = (route, answer_source(record))
            hot.answers[akey] = hot.answers.get(akey, 0) + 1
        if record.grpc_status is not None:
            gkey = (route, record.grpc_status)
            hot.grpc[gkey] = hot.grpc.get(gkey, 0) + 1
        if record.relayed is not None:
            rkey = (route, record.relayed)
            hot.relayed[rkey] = hot.relayed.get(rkey, 0) + 1
            up, down = hot.relayed_bytes.get(rkey, (0, 0))
            hot.relayed_bytes[rkey] = (up + record.bytes_up, down + record.bytes_down)
        for t in record.tries:
            code = _code(t.status, t.error_type, t.cut, "cancelled")
            upstream = self._upstream(t.upstream)
            tkey = (route, upstream, code)
            hot.tries[tkey] = hot.tries.get(tkey, 0) + 1
            if t.endpoint is not None:
                ekey = (upstream, t.endpoint, code)
                n = hot.endpoint_tries.get(ekey)
                if n is None:                       # a new series, or one capped to "other"
                    ekey = (upstream, self._endpoint(t.upstream, t.endpoint), code)
                    n = hot.endpoint_tries.get(ekey, 0)
                hot.endpoint_tries[ekey] = n + 1
            if t.end_ns:
                hkey = (route, upstream)
                hist = hot.try_durations.get(hkey)
                if hist is None:
                    hist = hot.try_durations[hkey] = _Histogram()
                hist.observe((t.end_ns - t.start_ns) / 1e9)
            if t.llm is not None:
                self._llm_try(route, upstream, t, t.llm)

    def _llm_try(self, route: str, upstream: str, t: TryRecord, llm: LlmCall) -> None:
        """An LLM try is counted when its answer carried usage, or when it failed; a 2xx answer without
        usage is not an LLM answer after all (an HTML page, a truncated stream): nothing is counted."""
        if llm.has_usage and t.error_type is None and t.status is not None and t.status < 400:
            outcome = "success"
        elif t.status == 429:
            outcome = "rate_limited"
        elif t.status is not None and 400 <= t.status < 500:
            outcome = "client_error"
        elif t.status is not None and t.status >= 500:
            outcome = "server_error"
        elif t.error_type is not None:
            outcome = t.error_type
        else:
            return
        hot = self._hot
        model = self._model(llm.model or "unknown")
        key = (route, upstream, model, outcome)
        hot.llm_requests[key] = hot.llm_requests.get(key, 0) + 1
        if not llm.has_usage:
            return
        for kind, n in (("input", llm.input_tokens), ("output", llm.output_tokens)):
            if n:
                tkey = (route, upstream, model, kind)
                hot.llm_tokens[tkey] = hot.llm_tokens.get(tkey, 0) + n
        cost = llm.cost()
        if cost is not None:
            ckey = (route, upstream, model)
            hot.llm_cost[ckey] = hot.llm_cost.get(ckey, 0.0) + cost
        if llm.first_chunk_ns:
            hkey = (route, upstream, model)
            hist = hot.llm_ttft.get(hkey)
            if hist is None:
                hist = hot.llm_ttft[hkey] = _Histogram()
            hist.observe(max(0, llm.first_chunk_ns - t.start_ns) / 1e9)

    def decision(self, record: DecisionRecord) -> None:
        key = (self._route(record.route), str(record.decision))
        child = self._decision_children.get(key)
        if child is None:
            child = self._decision_children[key] = self._decisions.labels(*key)
        child.inc()
        if record.decision == Decision.CONFIG_RELOADED:
            self._reload_ok.inc()
        elif record.decision == Decision.CONFIG_REJECTED:
            self._reload_failed.inc()

    # -- readings for the golden signals (telemetry/signals.py) -----------------------------------

    def cumulative(self) -> Cumulative:
        """The counters kept so far, summed per route and per upstream: what the golden signals
        difference over time. Costs a pass over the hot-path dicts; called once a second."""
        hot = self._hot
        routes: dict[str, Totals] = {}
        upstreams: dict[str, Totals] = {}
        for (route, code), n in list(hot.requests.items()):
            t = _totals(routes, route)
            t.requests += n
            if not isinstance(code, int) or code >= 500:
                t.failures += n
        for route, hist in list(hot.durations.items()):
            _add_counts(_totals(routes, route).latency, hist.counts)
        for (route, upstream, code), n in list(hot.tries.items()):
            t = _totals(upstreams, upstream)
            t.requests += n
            if not isinstance(code, int) or code >= 500:
                t.failures += n
        for (route, upstream), hist in list(hot.try_durations.items()):
            _add_counts(_totals(upstreams, upstream).latency, hist.counts)
        for (route, upstream, _model, _kind), n in list(hot.llm_tokens.items()):
            _totals(routes, route).tokens += n
            _totals(upstreams, upstream).tokens += n
        for (route, upstream, _model), value in list(hot.llm_cost.items()):
            _totals(routes, route).cost += value
            _totals(upstreams, upstream).cost += value
        answers: dict[str, dict[str, int]] = {}
        for (route, source), n in list(hot.answers.items()):
            answers.setdefault(route, {})[source] = n
        endpoints: dict[str, Totals] = {}  # "upstream/host:port": tries only (latency is the balancer's)
        for (upstream, endpoint, code), n in list(hot.endpoint_tries.items()):
            t = _totals(endpoints, f"{upstream}/{endpoint}")
            t.requests += n
            if not isinstance(code, int) or code >= 500:
                t.failures += n
        return Cumulative(routes, upstreams, answers, endpoints)

    # -- exposition ------------------------------------------------------------------------------

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """(body, content type): Prometheus text, or OpenMetrics when the scraper's Accept asks for it."""
        if accept:
            encoder, content_type = choose_encoder(accept)
            return encoder(self.registry), content_type
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _code(status: int | None, error_type: str | None, cut: bool, missing: str) -> int | str:
    """The `code` label: the status, or the failure's name when there is none or the body broke off
    after a head below 500 (a 200 whose stream was cut is no success: Linkerd counts a reset stream as
    a failure too). A cut 5xx stays its status: a failure either way, and one series."""
    if status is not None and not (cut and status < 500):
        return status
    return error_type or missing


@dataclass(slots=True)
class Totals:
    """Cumulative counts for one route or upstream (latency: counts per `BUCKETS` bucket, +Inf last)."""
    requests: int = 0
    failures: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    tokens: int = 0
    cost: float = 0.0


@dataclass(slots=True)
class Cumulative:
    routes: dict[str, Totals]
    upstreams: dict[str, Totals]
    answers: dict[str, dict[str, int]]     # route -> source -> answers
    endpoints: dict[str, Totals] = field(default_factory=dict)


def _totals(table: dict[str, Totals], key: str) -> Totals:
    t = table.get(key)
    if t is None:
        t = table[key] = Totals()
    return t


def _add_counts(into: list[int], counts: list[int]) -> None:
    for i, n in enumerate(counts):
        into[i] += n


def answer_source(record: RequestRecord) -> str:
    """primary | upstream:NAME (a fallback target) | cache | static | queue | fault | failed"""
    who = record.upstream
    if who in LOCAL_SOURCES:
        return who
    for t in reversed(record.tries):
        if t.upstream == who and t.status is not None:
            return t.fallback_target or "primary"
    return "failed"                        # the sidecar's own error answer: nothing could answer


class _Histogram:
    """Bucket counts and a sum; cumulated only at scrape time."""
    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)   # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(BUCKETS, value)] += 1   # bucket i holds values <= BUCKETS[i]
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, count in zip((*map(str, BUCKETS), "+Inf"), self.counts):
            running += count
            out.append((bound, running))
        return out


class _HotPath:
    """The per-request series, kept in dicts by `Metrics.request_finished` and exported on scrape."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, object], int] = {}
        self.durations: dict[str, _Histogram] = {}
        self.tries: dict[tuple[str, str, object], int] = {}
        self.try_durations: dict[tuple[str, str], _Histogram] = {}
        self.relayed: dict[tuple[str, str], int] = {}
        self.answers: dict[tuple[str, str], int] = {}
        self.relayed_bytes: dict[tuple[str, str], tuple[int, int]] = {}
        self.llm_requests: dict[tuple[str, str, str, str], int] = {}
        self.grpc: dict[tuple[str, int], int] = {}
        self.llm_tokens: dict[tuple[str, str, str, str], int] = {}
        self.llm_cost: dict[tuple[str, str, str], float] = {}
        self.llm_ttft: dict[tuple[str, str, str], _Histogram] = {}
        self.endpoint_tries: dict[tuple[str, str, object], int] = {}

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        requests = CounterMetricFamily("sidecar_requests", "Requests answered, by route and status code.",
                                       labels=["route", "code"])
        for (route, code), n in list(self.requests.items()):
            requests.add_metric([route, str(code)], n)
        duration = HistogramMetricFamily(
            "sidecar_request_duration_seconds",
            "Time from the request to the last byte of the answer, by route.", labels=["route"])
        for route, hist in list(self.durations.items()):
            duration.add_metric([route], hist.buckets(), hist.total)
        tries = CounterMetricFamily(
            "sidecar_upstream_requests",
            "Tries to upstreams (retries, hedges and fallback calls included), by route, upstream and "
            "status code or failure (connect-failure, reset, timeout...).", labels=["route", "upstream", "code"])
        for (route, upstream, code), n in list(self.tries.items()):
            tries.add_metric([route, upstream, str(code)], n)
        try_duration = HistogramMetricFamily("sidecar_upstream_request_duration_seconds",
                                             "Duration of one try to an upstream.", labels=["route", "upstream"])
        for (route, upstream), hist in list(self.try_durations.items()):
            try_duration.add_metric([route, upstream], hist.buckets(), hist.total)
        relayed = CounterMetricFamily(
            "sidecar_relayed_connections", "Relayed connections (CONNECT tunnels, upgrades, transparent "
            "TLS and TCP) once closed, by route and kind.", labels=["route", "kind"])
        relayed_bytes = CounterMetricFamily(
            "sidecar_relayed_bytes", "Bytes relayed on closed connections, by route, kind and direction "
            "(up: app to upstream).", labels=["route", "kind", "direction"])
        for (route, kind), n in list(self.relayed.items()):
            relayed.add_metric([route, kind], n)
        for (route, kind), (up, down) in list(self.relayed_bytes.items()):
            relayed_bytes.add_metric([route, kind, "up"], up)
            relayed_bytes.add_metric([route, kind, "down"], down)
        answers = CounterMetricFamily(
            "sidecar_answers", "Answers to the app by route and source: primary, a fallback target "
            "(upstream:NAME), cache, static, queue, fault, or failed (nothing could answer).",
            labels=["route", "source"])
        for (route, source), n in list(self.answers.items()):
            answers.add_metric([route, source], n)
        endpoint_tries = CounterMetricFamily(
            "sidecar_endpoint_requests", "Tries to each endpoint of a balanced upstream, by upstream, "
            "endpoint (host:port) and status code or failure.", labels=["upstream", "endpoint", "code"])
        for (upstream, endpoint, code), n in list(self.endpoint_tries.items()):
            endpoint_tries.add_metric([upstream, endpoint, str(code)], n)
        families = [requests, duration, tries, try_duration, answers, relayed, relayed_bytes, endpoint_tries]
        if self.grpc:
            grpc = CounterMetricFamily("sidecar_grpc_requests", "gRPC calls answered, by route and the "
                                       "gRPC status sent to the app (OK, UNAVAILABLE...).", labels=["route", "grpc_code"])
            for (route, code), n in list(self.grpc.items()):
                grpc.add_metric([route, _grpc_name(code)], n)
            families.append(grpc)
        if self.llm_requests:
            families.extend(self._llm_families())
        return families

    def _llm_families(self) -> list[Metric]:
        requests = CounterMetricFamily("sidecar_llm_requests", "LLM API tries, by route, upstream, model "
                                       "and outcome.", labels=["route", "upstream", "model", "outcome"])
        for key, n in list(self.llm_requests.items()):
            requests.add_metric(list(key), n)
        tokens = CounterMetricFamily("sidecar_llm_tokens", "LLM tokens, from the answers' usage.",
                                     labels=["route", "upstream", "model", "kind"])
        for key, n in list(self.llm_tokens.items()):
            tokens.add_metric(list(key), n)
        families: list[Metric] = [requests, tokens]
        if self.llm_cost:
            cost = CounterMetricFamily("sidecar_llm_cost", "LLM cost from the policy's llm.prices "
                                       "(its currency).", labels=["route", "upstream", "model"])
            for ckey, value in list(self.llm_cost.items()):
                cost.add_metric(list(ckey), value)
            families.append(cost)
        ttft = HistogramMetricFamily("sidecar_llm_time_to_first_token_seconds",
                                     "Time from sending an LLM request to its answer's first streamed event.",
                                     labels=["route", "upstream", "model"])
        for hkey, hist in list(self.llm_ttft.items()):
            ttft.add_metric(list(hkey), hist.buckets(), hist.total)
        families.append(ttft)
        return families


class _LiveState:
    """A custom collector: gauges for state owned elsewhere (breakers, budgets, cache, queue, policy),
    read from the provider at scrape time so they can never drift from the truth."""

    def __init__(self, provider: StateProvider | None) -> None:
        self.provider = provider
        self._failing = False

    def describe(self) -> Iterable[Metric]:
        return self._families({})

    def collect(self) -> Iterable[Metric]:
        state: dict = {}
        if self.provider is not None:
            try:
                state = self.provider() or {}
                self._failing = False
            except Exception:  # noqa: BLE001 - a scrape must not fail because one source did
                if not self._failing:
                    log.exception("metrics state provider failed; live-state gauges are empty")
                self._failing = True
        return self._families(state)

    @staticmethod
    def _families(state: dict) -> list[Metric]:
        breakers = GaugeMetricFamily("sidecar_breaker_state",
                                     "Circuit breaker state per route and upstream: 0 closed, 1 half-open, "
                                     "2 open.", labels=["route", "upstream"])
        for b in state.get("breakers", ()):
            value = BREAKER_STATES.get(str(b.get("state", "")).lower())
            if value is not None:
                breakers.add_metric([str(b.get("route", "")), str(b.get("upstream") or "")], value)
        budgets = GaugeMetricFamily("sidecar_retry_budget_remaining",
                                    "Retries the route's budget allows right now.", labels=["route"])
        for b in state.get("budgets", ()):
            if b.get("remaining") is not None:
                budgets.add_metric([str(b.get("route", ""))], float(b["remaining"]))
        endpoints = GaugeMetricFamily(
            "sidecar_endpoint_state", "Each endpoint of a balanced upstream: 1 for its current state "
            "(active, ejected, unhealthy, cooldown), 0 for the others.", labels=["upstream", "endpoint", "state"])
        for e in state.get("endpoints", ())[:MAX_ENDPOINT_SERIES]:
            for name in ENDPOINT_STATES:
                endpoints.add_metric([str(e["upstream"]), str(e["endpoint"]), name], 1.0 if e["state"] == name else 0.0)
        families: list[Metric] = [breakers, budgets, endpoints]
        for name, key, doc in (
            ("sidecar_cache_entries", "cache_entries", "Entries in the response cache."),
            ("sidecar_queue_depth", "queue_depth", "Writes waiting in the store-and-forward queue."),
            ("sidecar_queue_oldest_age_seconds", "queue_oldest_age",
             "Age of the oldest write waiting in the queue."),
        ):
            family = GaugeMetricFamily(name, doc)
            if state.get(key) is not None:
                family.add_metric([], float(state[key]))
            families.append(family)
        info = GaugeMetricFamily("sidecar_policy_info", "The policy version being served (always 1).",
                                 labels=["version"])
        if state.get("policy_version"):
            info.add_metric([str(state["policy_version"])], 1.0)
        families.append(info)
        return families


def _grpc_name(code: int) -> str:
    try:
        return GrpcCode(code).name
    except ValueError:
        return str(code)
