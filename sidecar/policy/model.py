"""The policy, parsed once into frozen records.

`load.py` is the only code that sees the YAML dicts; everything after it (matching, the pipeline, the
admin API) works on these objects. Durations are float seconds, sizes are int bytes, and every optional
feature of a route is either a record or ``None`` (feature off). Built once per policy load, never
mutated, so a request keeps the policy it started with across a reload.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from sidecar.policy.conditions import Conditions, Outcome

ListenerMode = Literal["proxy", "reverse", "transparent"]
Unmatched = Literal["passthrough", "deny"]

@dataclass(frozen=True, slots=True)
class Intercept:
    """HTTPS interception on a proxy or transparent listener (proxy/intercept.py)."""
    hosts: tuple[str, ...]               # exact names, or "*.suffix"
    ca_cert_file: str | None = None      # both or neither; neither: a CA generated into state_dir
    ca_key_file: str | None = None

    def lists(self, host: str) -> bool:
        """`api.openai.com` matches itself; `*.internal` matches any name under `internal` (not itself)."""
        host = host.lower().rstrip(".")
        return any(host.endswith(p[1:]) if p.startswith("*.") else host == p for p in self.hosts)


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    mode: ListenerMode
    port: int
    bind: str = "127.0.0.1"
    upstream: str | None = None          # reverse mode only
    sniff_timeout: float = 0.2           # transparent: no byte from the app this long -> relayed as TCP
    idle_timeout: float = 3600.0         # a relayed connection (tunnel, upgrade, passthrough) with no byte
    intercept: Intercept | None = None   # proxy and transparent: TLS terminated for these hosts


@dataclass(frozen=True, slots=True)
class Endpoint:
    bind: str
    port: int


@dataclass(frozen=True, slots=True)
class TracesConfig:
    endpoint: str | None = None
    protocol: str = "grpc"               # grpc | http/protobuf
    sample_ratio: float = 0.05


@dataclass(frozen=True, slots=True)
class Telemetry:
    service_name: str = "sidecar"
    traces: TracesConfig = field(default_factory=TracesConfig)


@dataclass(frozen=True, slots=True)
class LlmPolicy:
    """`llm:`: per-model prices (per million tokens), for `sidecar_llm_cost_total` and span costs.
    No price list is built in: a model without a price has no cost."""
    prices: tuple[tuple[str, float, float], ...] = ()   # (model or "*", input, output)

    def price(self, model: str | None) -> tuple[float, float] | None:
        if model is None:
            return None
        for name, per_in, per_out in self.prices:
            if name == model:
                return per_in, per_out
        return None


@dataclass(frozen=True, slots=True)
class HealthCheck:
    path: str
    interval: float = 5.0
    timeout: float = 1.0
    unhealthy_after: int = 2
    healthy_after: int = 2


@dataclass(frozen=True, slots=True)
class TlsConfig:
    ca_file: str | None = None           # extra CA bundle for the upstream's certificate
    verify: bool = True
    server_name: str | None = None


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    """Per-endpoint outlier detection (Envoy's): who is ejected, for how long, and how many at most."""
    consecutive_failures: int = 5          # 5xx, connect failures, resets, timeouts in a row
    eject_for: float = 30.0                # x the number of recent ejections of that endpoint ...
    max_eject_for: float = 300.0           # ... up to this
    max_ejected: float = 50.0              # percent of the set; past it the balancer panics


@dataclass(frozen=True, slots=True)
class UpstreamEndpoint:
    """One listed endpoint of an upstream (`endpoints: [{url, weight, headers}]`)."""
    url: str
    scheme: str
    host: str
    port: int
    base_path: str = ""
    weight: int = 1
    headers: tuple[tuple[str, str], ...] = ()   # merged over the upstream's (values may be secrets)

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


Discovery = Literal["none", "dns"]
Balance = Literal["ewma", "least-request", "round-robin", "random"]


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    url: str                             # as written, ${VAR} expanded (listed endpoints: the first one's)
    scheme: str                          # http | https
    host: str
    port: int
    base_path: str = ""                  # path prefix of `url`, without trailing slash
    connect_timeout: float = 2.0
    max_connections: int = 100           # per endpoint
    # http1 | h2c (HTTP/2 prior knowledge) | h2 (TLS, ALPN h2) | auto (https: ALPN picks; http: gRPC
    # requests h2c, others http1)
    protocol: str = "auto"
    headers: tuple[tuple[str, str], ...] = ()   # set on every request to this upstream (values may be secrets)
    health_check: HealthCheck | None = None
    tls: TlsConfig = field(default_factory=TlsConfig)
    endpoints: tuple[UpstreamEndpoint, ...] = ()   # listed endpoints; empty: `url` is the one endpoint
    discovery: Discovery = "none"        # dns: every A/AAAA record of `host`, re-resolved every `refresh`
    refresh: float = 5.0
    resolver: tuple[str, ...] = ()       # DNS servers ("ip" or "ip:port"); empty: the system's
    balance: Balance = "ewma"
    outlier: OutlierPolicy = field(default_factory=OutlierPolicy)
    # Derived once here, read per request: "scheme://host:port", and whether tries are balanced --
    # listed endpoints (even one: its own headers apply) or as many as DNS says. A plain `url` takes
    # the single-endpoint path, with no balancing cost.
    origin: str = field(init=False, repr=False, compare=False)
    balanced: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "origin", f"{self.scheme}://{self.host}:{self.port}")
        object.__setattr__(self, "balanced", self.discovery == "dns" or bool(self.endpoints))


@dataclass(frozen=True, slots=True)
class SplitTarget:
    upstream: str
    weight: int


@dataclass(frozen=True, slots=True)
class BudgetPolicy:
    ratio: float = 0.2
    min_per_second: float = 10.0
    window: float = 10.0


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    base: float = 0.025
    max: float = 0.25


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_retries: int = 2
    when: Conditions = Conditions(outcomes=frozenset({Outcome.CONNECT_FAILURE, Outcome.RESET}),
                                  statuses=frozenset({502, 503, 504}))
    methods: frozenset[str] | None = None     # None: idempotent methods (+ Idempotency-Key)
    backoff: BackoffPolicy = BackoffPolicy()
    respect_retry_after: bool = True
    max_body: int = 64 * 1024
    budget: BudgetPolicy | None = BudgetPolicy()


@dataclass(frozen=True, slots=True)
class SlowCall:
    duration: float
    rate: float


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    consecutive_failures: int | None = 5
    failure_rate: float | None = None
    min_requests: int = 20
    window: float = 30.0
    slow_call: SlowCall | None = None
    open_for: float = 30.0
    max_open_for: float = 300.0
    half_open_requests: int = 1


@dataclass(frozen=True, slots=True)
class ConcurrencyPolicy:
    max: int


@dataclass(frozen=True, slots=True)
class HedgePolicy:
    delay: float
    max_extra: int = 1


@dataclass(frozen=True, slots=True)
class WarmPath:
    path: str
    every: float


@dataclass(frozen=True, slots=True)
class CachePolicy:
    ttl: float = 60.0
    stale_if_error: float = 0.0
    stale_while_revalidate: float = 0.0
    key: tuple[str, ...] = ("method", "url")     # method | url | body | header:NAME
    statuses: frozenset[int] = frozenset({200})
    max_entries: int = 10_000
    max_bytes: int = 64 * 1024 * 1024
    max_body: int = 1024 * 1024
    store: str = "memory"                         # memory | redis://host:port/db
    warm: tuple[WarmPath, ...] = ()


@dataclass(frozen=True, slots=True)
class JsonMap:
    """`json_map: {model: {gpt-4o: backup-large, "*": backup-small}}` for one (dotted) field."""
    path: tuple[str, ...]
    mapping: tuple[tuple[str, object], ...]
    default: object | None = None
    has_default: bool = False


# Anthropic requires max_tokens; an OpenAI app often sends none. 4096 fits every current model's output
# limit and rarely cuts an answer short.
DEFAULT_MAX_TOKENS = 4096


@dataclass(frozen=True, slots=True)
class Rewrite:
    path: str | None = None
    set_headers: tuple[tuple[str, str], ...] = ()
    remove_headers: tuple[str, ...] = ()
    json_map: tuple[JsonMap, ...] = ()
    json_set: tuple[tuple[tuple[str, ...], object], ...] = ()
    translate: str | None = None           # "APP/PROVIDER", a name in sidecar.llm.translate.TRANSLATIONS
    max_tokens: int = DEFAULT_MAX_TOKENS   # sent when the app names no limit and the provider needs one

    @property
    def touches_body(self) -> bool:
        return bool(self.json_map or self.json_set)


@dataclass(frozen=True, slots=True)
class StaticResponse:
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    content_type: str | None = None


@dataclass(frozen=True, slots=True)
class FallbackTarget:
    kind: Literal["upstream", "cache", "static"]
    upstream: str | None = None
    rewrite: Rewrite | None = None
    static: StaticResponse | None = None

    @property
    def label(self) -> str:
        if self.kind == "upstream":
            return f"upstream:{self.upstream}"
        return "cache:stale" if self.kind == "cache" else "static"


@dataclass(frozen=True, slots=True)
class FallbackPolicy:
    when: Conditions
    targets: tuple[FallbackTarget, ...]
    hedge: float | None = None


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    when: Conditions
    max_items: int = 10_000
    max_age: float = 86_400.0
    store: str = "state_dir"               # state_dir (SQLite, this pod) | redis://host:port/db (shared)
    visibility_timeout: float = 30.0       # redis: a delivering replica silent this long loses its item
    handoff: str | None = None             # state_dir store: redis://... that takes undelivered writes at SIGTERM


@dataclass(frozen=True, slots=True)
class FaultAbort:
    status: int
    percent: float


@dataclass(frozen=True, slots=True)
class FaultDelay:
    duration: float
    percent: float


@dataclass(frozen=True, slots=True)
class FaultPolicy:
    abort: FaultAbort | None = None
    delay: FaultDelay | None = None
    header: tuple[str, str | None] | None = None   # only requests carrying this header (and value, if set)


@dataclass(frozen=True, slots=True)
class RateLimitPolicy:
    per_second: float | None = None        # requests: a token bucket
    burst: int = 1
    tokens_per_minute: int | None = None   # LLM tokens: a sliding minute, counted from answers' usage
    key: str | None = None                 # header name (lower-case): one bucket per value; None: one bucket
    store: str = "local"                   # local (this process) | redis://host:port/db (every replica)
    max_keys: int = 10_000                 # distinct key values kept per route (local buckets)


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    name: str                              # lower-case
    exact: str | None = None
    regex: re.Pattern[str] | None = None
    present: bool | None = None


@dataclass(frozen=True, slots=True)
class Match:
    host: str | None = None                # exact (lower-case) or "*.suffix"
    path: str | None = None
    path_prefix: str | None = None
    path_regex: re.Pattern[str] | None = None
    methods: frozenset[str] | None = None
    headers: tuple[HeaderMatch, ...] = ()


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    match: Match = Match()
    upstream: str | None = None            # None: the request's original destination
    split: tuple[SplitTarget, ...] = ()    # instead of `upstream`: a weighted traffic split
    timeout: float = 15.0
    per_try_timeout: float | None = None
    retry: RetryPolicy | None = None
    breaker: BreakerPolicy | None = None
    concurrency: ConcurrencyPolicy | None = None
    hedge: HedgePolicy | None = None
    cache: CachePolicy | None = None
    fallback: FallbackPolicy | None = None
    queue: QueuePolicy | None = None
    mode: Literal["enforce", "shadow"] = "enforce"
    fault: FaultPolicy | None = None
    rate_limit: RateLimitPolicy | None = None
    allow_internal: bool = False           # proxy mode: may reach link-local / the sidecar's own ports
    line: int = 0                          # where the route starts in the policy file


@dataclass(frozen=True, slots=True)
class Policy:
    version: int
    listeners: tuple[Listener, ...]
    admin: Endpoint
    health: Endpoint
    telemetry: Telemetry
    unmatched: Unmatched
    upstreams: dict[str, Upstream]         # not mutated after load
    defaults: Route                        # the policy for passthrough (unmatched) requests
    routes: tuple[Route, ...]
    state_dir: str
    source: str                            # the file it came from
    digest: str                            # short content hash: the policy version on spans and /status
    redacted: dict[str, Any]               # the effective policy as plain data, secrets replaced, for /config
    secrets: tuple[str, ...] = ()          # every expanded ${VAR} value, for log/trace scrubbing
    llm: LlmPolicy = LlmPolicy()

    @property
    def all_routes(self) -> tuple[Route, ...]:
        """Every route, `defaults` (the passthrough route) last."""
        return (*self.routes, self.defaults)

    @property
    def queues_writes(self) -> bool:
        """Does any route, `defaults` included, store and forward writes (`queue:`)?"""
        return any(r.queue is not None for r in self.all_routes)
