"""Schema-valid policy data -> frozen records, with the checks a schema cannot express.

Cross-references (an `upstream` that is not defined, two listeners on one port, a regex that does not
compile, a `body_file` that cannot be read) are found by `checks.Checker`, each reported at the line of
the value at fault. `defaults` are merged under every route key by key before its records are built; a
value that came from `defaults` is reported at its line in `defaults`, since that is where the operator
must fix it.
"""
from __future__ import annotations

import json
import mimetypes
import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any, cast
from urllib.parse import urlsplit

from sidecar.grpc_rules import encode_message
from sidecar.policy import yaml12
from sidecar.policy.checks import Checker
from sidecar.policy.conditions import Conditions, parse_when
from sidecar.policy.dump import policy_data
from sidecar.policy.errors import PolicyError
from sidecar.policy.merge import deep_merge
from sidecar.policy.model import DEFAULT_MAX_TOKENS
from sidecar.policy.model import (
    BackoffPolicy, BreakerPolicy, BudgetPolicy, CachePolicy, ConcurrencyPolicy, Endpoint,
    FallbackPolicy, FallbackTarget, FaultAbort, FaultDelay, FaultPolicy, HeaderMatch, HealthCheck,
    HedgePolicy, Intercept, JsonMap, Listener, ListenerMode, LlmPolicy, Match, OutlierPolicy, Policy, QueuePolicy,
    RateLimitPolicy, RetryPolicy, Rewrite, Route, SlowCall, SplitTarget, StaticResponse, Telemetry, TlsConfig,
    TracesConfig, Unmatched, Upstream, UpstreamEndpoint, WarmPath,
)
from sidecar.policy.plain import Doc, items, mapping, number, optional_flag, optional_text, text
from sidecar.policy.yaml12 import Path

DEFAULT_STATE_DIR = "/var/lib/sidecar"
DEFAULT_LISTENER = Listener(name="egress", mode="proxy", port=15001)
DEFAULT_PORTS = {"proxy": 15001, "transparent": 15006}
DEFAULT_ADMIN = Endpoint("127.0.0.1", 15000)
DEFAULT_HEALTH = Endpoint("0.0.0.0", 15021)
# When `fallback.when` / `queue.when` are left out: the failures the SPEC's example lists.
DEFAULT_FALLBACK_WHEN = ["breaker-open", "retries-exhausted", "timeout", "concurrency-full",
                         "connect-failure", "reset", "5xx"]
DEFAULT_QUEUE_WHEN = ["breaker-open", "retries-exhausted"]

# A converter takes the value at one key (and its path, for problems) and returns the record field's value.
Convert = Callable[[object, Path], object]
# Keyword arguments for a record's constructor, as `pick` gathers them: each value is what the converter
# for that field returned, which the static type of a dict cannot tie to the field's own type; the
# constructor checks the names at run time (a misnamed field fails every test that loads a policy).
Fields = dict[str, Any]


def build_policy(doc: yaml12.Document, file: str, *, digest: str, secrets: tuple[str, ...]) -> Policy:
    builder = _Builder(doc, file)
    policy = builder.policy(digest, secrets)
    if builder.problems:
        raise PolicyError(builder.problems)
    return replace(policy, redacted=policy_data(policy, redact=True))


def _int(value: object, _: Path = ()) -> int:
    return int(number(value))         # the schema admits 3.0 as an integer


def _float(value: object, _: Path = ()) -> float:
    return float(number(value))


def _same(value: object, _: Path) -> object:
    return value


def _methods(value: object, _: Path) -> frozenset[str]:
    return frozenset(text(m).upper() for m in items(value))


def _pairs(value: object, _: Path) -> tuple[tuple[str, str], ...]:
    return tuple((k, text(v)) for k, v in mapping(value).items())


def _dotted(path: str) -> tuple[str, ...]:
    return tuple(path.split("."))


class _Builder(Checker):
    def pick(self, data: Doc, sub: Path, **convert: Convert) -> Fields:
        """Convert the keys present; absent keys are left to the dataclass defaults."""
        return {k: convert[k](v, sub + (k,)) for k, v in data.items() if k in convert}

    # --- top level ----------------------------------------------------------------------------------
    def policy(self, digest: str, secrets: tuple[str, ...]) -> Policy:
        d = self.data
        upstreams = {name: self.upstream(name, u, ("upstreams", name))
                     for name, u in mapping(d.get("upstreams") or {}).items()}
        admin = self.endpoint(d.get("admin"), DEFAULT_ADMIN)
        health = self.endpoint(d.get("health"), DEFAULT_HEALTH)
        listeners = self.listeners(d.get("listeners"))
        self.check_ports(listeners, admin, health)
        defaults_raw = mapping(d.get("defaults") or {})
        self.layers = [(("defaults",), defaults_raw)]
        defaults_line = self.doc.key_pos(("defaults",))[0] if "defaults" in d else 0
        defaults = self.route("default", defaults_raw, defaults_line)
        routes = self.routes(items(d.get("routes") or []), defaults_raw)
        self.layers = [((), d)]
        return Policy(
            version=1, listeners=listeners, admin=admin, health=health,
            telemetry=self.telemetry(d.get("telemetry") or {}),
            unmatched=cast(Unmatched, text(d.get("unmatched", "passthrough"))),   # the schema's enum
            upstreams=upstreams, defaults=defaults, routes=routes,
            state_dir=os.path.join(self.base_dir, text(d.get("state_dir", DEFAULT_STATE_DIR))),
            source=self.file, digest=digest,
            redacted={}, secrets=secrets, llm=self.llm(d.get("llm") or {}))

    def llm(self, value: object) -> LlmPolicy:
        prices = [(model, mapping(p)) for model, p in mapping(mapping(value).get("prices") or {}).items()]
        return LlmPolicy(prices=tuple((model, _float(p.get("input_per_million", 0)),
                                       _float(p.get("output_per_million", 0))) for model, p in prices))

    def endpoint(self, value: object, default: Endpoint) -> Endpoint:
        d = mapping(value or {})
        return Endpoint(bind=text(d.get("bind", default.bind)), port=_int(d.get("port", default.port)))

    def telemetry(self, value: object) -> Telemetry:
        d = mapping(value)
        traces = TracesConfig(**self.pick(mapping(d.get("traces") or {}), ("telemetry", "traces"),
                                          endpoint=_same, protocol=_same, sample_ratio=_float))
        return Telemetry(**self.pick(d, ("telemetry",), service_name=_same), traces=traces)

    def listeners(self, value: object) -> tuple[Listener, ...]:
        if value is None:
            return (DEFAULT_LISTENER,)
        listed = [mapping(d) for d in items(value)]
        modes = [cast(ListenerMode, text(d.get("mode", "proxy"))) for d in listed]   # the schema's enum
        out: list[Listener] = []
        seen: dict[str, int] = {}
        for i, d in enumerate(listed):
            sub, mode = ("listeners", i), modes[i]
            port = d.get("port", DEFAULT_PORTS.get(mode))
            name = text(d.get("name") or (mode if modes.count(mode) == 1 else f"{mode}-{port}"))
            if port is None:
                self.fail(sub, f"listener '{name}': a reverse listener needs a port")
            upstream = optional_text(d.get("upstream"))
            if mode == "reverse" and upstream is None:
                self.fail(sub, f"listener '{name}': a reverse listener needs an upstream")
            elif mode != "reverse" and upstream is not None:
                self.fail(sub + ("upstream",), f"listener '{name}': only a reverse listener has an upstream")
            elif upstream is not None:
                self.upstream_ref(upstream, sub + ("upstream",))
            if name in seen:
                self.fail(sub, f"duplicate listener name '{name}' (first at line {seen[name]})")
            seen.setdefault(name, self.doc.value_pos(sub)[0])
            extra: Fields = {}
            if "sniff_timeout" in d:
                if mode != "transparent":
                    self.fail(sub + ("sniff_timeout",), f"listener '{name}': only a transparent listener sniffs")
                extra["sniff_timeout"] = self.duration(d["sniff_timeout"], sub + ("sniff_timeout",))
            if "idle_timeout" in d:
                extra["idle_timeout"] = self.duration(d["idle_timeout"], sub + ("idle_timeout",))
            if d.get("intercept") is not None:
                if mode == "reverse":
                    self.fail(sub + ("intercept",), f"listener '{name}': interception is for proxy and "
                                                    "transparent listeners (a reverse listener's app speaks plain HTTP)")
                ic = mapping(d["intercept"])
                ca = mapping(ic.get("ca") or {})
                extra["intercept"] = Intercept(
                    hosts=tuple(text(h).lower().rstrip(".") for h in items(ic["hosts"])),
                    ca_cert_file=os.path.join(self.base_dir, text(ca["cert_file"])) if ca else None,
                    ca_key_file=os.path.join(self.base_dir, text(ca["key_file"])) if ca else None)
            out.append(Listener(name=name, mode=mode, port=_int(port or 0),
                                bind=text(d.get("bind", "127.0.0.1")), upstream=upstream, **extra))
        return tuple(out)

    def upstream(self, name: str, value: object, sub: Path) -> Upstream:
        d = mapping(value)
        listed = [self.upstream_endpoint(e, sub + ("endpoints", i))
                  for i, e in enumerate(items(d.get("endpoints", [])))]
        if "url" in d and listed:
            self.fail(sub + ("endpoints",), f"upstream '{name}': give either url or endpoints, not both")
        discovery = d.get("discovery", "none")
        if discovery == "dns" and listed:
            self.fail(sub + ("discovery",), f"upstream '{name}': discovery: dns resolves the url's host; "
                                            "list endpoints or discover them, not both")
        if "resolver" in d and discovery != "dns":
            self.fail(sub + ("resolver",), f"upstream '{name}': a resolver is used by discovery: dns only")
        first = listed[0] if listed else self.upstream_endpoint({"url": d["url"]}, sub) if "url" in d else None
        if first is None:                 # the schema reported it
            first = UpstreamEndpoint(url="http://invalid", scheme="http", host="invalid", port=80)
        kw = self.pick(d, sub, connect_timeout=self.duration, max_connections=_int, headers=_pairs,
                       protocol=_same, health_check=self.health_check, tls=self.tls, discovery=_same,
                       refresh=self.duration, balance=_same, outlier=self.outlier,
                       resolver=lambda v, _: tuple(text(s) for s in items(mapping(v)["servers"])))
        if discovery == "dns" and kw.get("refresh", 1.0) <= 0:
            self.fail(sub + ("refresh",), "refresh must be longer than 0s")
        protocol = kw.get("protocol")
        schemes = {e.scheme for e in (listed or [first])}
        if protocol == "h2" and schemes != {"https"}:
            self.fail(sub + ("protocol",), "protocol h2 negotiates HTTP/2 by TLS ALPN: it needs an https url "
                                           "(h2c is HTTP/2 in clear text)")
        if protocol == "h2c" and schemes != {"http"}:
            self.fail(sub + ("protocol",), "protocol h2c is HTTP/2 in clear text: it needs an http url "
                                           "(h2 is HTTP/2 over TLS)")
        return Upstream(name=name, url=first.url, scheme=first.scheme, host=first.host, port=first.port,
                        base_path=first.base_path, endpoints=tuple(listed) if len(listed) > 0 else (), **kw)

    def upstream_endpoint(self, value: object, sub: Path) -> UpstreamEndpoint:
        d = mapping(value)
        url = text(d["url"])
        usub = sub + ("url",)
        try:
            parts = urlsplit(url)
            port = parts.port
            host = parts.hostname or ""
        except ValueError as exc:
            self.fail(usub, f"invalid url {url!r}: {exc}")
            parts, port, host = urlsplit("http://invalid"), None, "invalid"
        if parts.query or parts.fragment:
            self.fail(usub, "an upstream url has no query or fragment")
        if parts.username is not None or parts.password is not None:
            self.fail(usub, "credentials go in the upstream's headers, not its url")
        scheme = parts.scheme.lower()
        return UpstreamEndpoint(url=url, scheme=scheme, host=f"[{host}]" if ":" in host else host,
                                port=port if port is not None else (443 if scheme == "https" else 80),
                                base_path=parts.path.rstrip("/"), weight=_int(d.get("weight", 1)),
                                headers=_pairs(d.get("headers", {}), sub))

    def outlier(self, value: object, sub: Path) -> OutlierPolicy:
        kw = self.pick(mapping(value), sub, consecutive_failures=_int, eject_for=self.duration,
                       max_eject_for=self.duration,
                       max_ejected=lambda v, _: float(v.rstrip("%")) if isinstance(v, str) else _float(v))
        return OutlierPolicy(**kw)

    def health_check(self, value: object, sub: Path) -> HealthCheck:
        return HealthCheck(**self.pick(mapping(value), sub, path=_same, interval=self.duration, timeout=self.duration,
                                       unhealthy_after=_int, healthy_after=_int))

    def tls(self, value: object, sub: Path) -> TlsConfig:
        kw = self.pick(mapping(value), sub, ca_file=_same, verify=_same, server_name=_same)
        if "ca_file" in kw:               # relative to the policy file, like body_file
            kw["ca_file"] = os.path.join(self.base_dir, kw["ca_file"])
        return TlsConfig(**kw)

    # --- routes -------------------------------------------------------------------------------------
    def routes(self, listed: list[object], defaults_raw: Doc) -> tuple[Route, ...]:
        out: list[Route] = []
        seen: dict[str, int] = {}
        for i, value in enumerate(listed):
            sub = ("routes", i)
            raw = mapping(value)
            self.layers = [(sub, raw), (("defaults",), defaults_raw)]
            name, line = text(raw["name"]), self.doc.value_pos(sub)[0]
            if name == "default":
                self.fail(("name",), "the route name 'default' is reserved for unmatched requests")
            if name in seen:
                self.fail(("name",), f"duplicate route name '{name}' (first at line {seen[name]})")
            seen.setdefault(name, line)
            out.append(self.route(name, mapping(deep_merge(defaults_raw, raw)), line))
        return tuple(out)

    def route(self, name: str, d: Doc, line: int) -> Route:
        kw = self.pick(d, (), match=self.match, upstream=self.upstream_ref, split=self.split, timeout=self.duration,
                       per_try_timeout=self.optional_duration, retry=self.retry, breaker=self.breaker,
                       concurrency=self.concurrency, hedge=self.hedge, cache=self.cache,
                       fallback=self.fallback, queue=self.queue, mode=_same, fault=self.fault,
                       rate_limit=self.rate_limit, allow_internal=_same)
        route = Route(name=name, line=line, **kw)
        if route.split and route.upstream is not None:
            self.fail(("split",), f"route '{name}': give either upstream or split, not both")
        if route.fallback and route.cache is None:
            for i, target in enumerate(route.fallback.targets):
                if target.kind == "cache":
                    self.fail(("fallback", "targets", i), "a {cache: stale} target needs a cache on the route")
        return route

    def split(self, value: object, sub: Path) -> tuple[SplitTarget, ...]:
        out = tuple(SplitTarget(upstream=self.upstream_ref(t["upstream"], sub + (i, "upstream")),
                                weight=_int(t["weight"])) for i, t in enumerate(map(mapping, items(value))))
        if out and sum(t.weight for t in out) <= 0:
            self.fail(sub, "a split needs at least one weight above 0")
        names = [t.upstream for t in out]
        for i, n in enumerate(names):
            if n in names[:i]:
                self.fail(sub + (i, "upstream"), f"upstream '{n}' is listed twice in the split")
        return out

    def match(self, value: object, sub: Path) -> Match:
        d = mapping(value)
        host = optional_text(d.get("host"))
        host = None if host is None or host == "*" else host.lower().rstrip(".")
        headers = tuple(self.header_match(h, sub + ("headers", i))
                        for i, h in enumerate(items(d.get("headers", []))))
        regex = optional_text(d.get("path_regex"))
        return Match(host=host, path=optional_text(d.get("path")), path_prefix=optional_text(d.get("path_prefix")),
                     path_regex=None if regex is None else self.regex(regex, sub + ("path_regex",)),
                     methods=_methods(d["methods"], ()) if "methods" in d else None, headers=headers)

    def header_match(self, value: object, sub: Path) -> HeaderMatch:
        d = mapping(value)
        regex = optional_text(d.get("regex"))
        return HeaderMatch(name=text(d["name"]).lower(), exact=optional_text(d.get("exact")),
                           present=optional_flag(d.get("present")),
                           regex=None if regex is None else self.regex(regex, sub + ("regex",)))

    def conditions(self, value: object, sub: Path) -> Conditions:
        return parse_when(items(value))      # the schema has checked every item

    def retry(self, value: object, sub: Path) -> RetryPolicy | None:
        if value is None:
            return None
        d = mapping(value)
        return RetryPolicy(**self.pick(
            d, sub, max_retries=_int, when=self.conditions, methods=_methods, backoff=self.backoff,
            respect_retry_after=_same, max_body=self.size, budget=self.budget))

    def backoff(self, value: object, sub: Path) -> BackoffPolicy:
        return BackoffPolicy(**self.pick(mapping(value), sub, base=self.duration, max=self.duration))

    def budget(self, value: object, sub: Path) -> BudgetPolicy | None:
        if value is None:
            return None
        d = mapping(value)
        return BudgetPolicy(**self.pick(d, sub, ratio=_float, min_per_second=_float, window=self.duration))

    def breaker(self, value: object, sub: Path) -> BreakerPolicy | None:
        if value is None:
            return None
        d = mapping(value)
        return BreakerPolicy(**self.pick(
            d, sub, consecutive_failures=lambda v, _: None if v is None else _int(v),
            failure_rate=lambda v, _: None if v is None else _float(v), min_requests=_int,
            window=self.duration, slow_call=self.slow_call, open_for=self.duration,
            max_open_for=self.duration, half_open_requests=_int))

    def slow_call(self, value: object, sub: Path) -> SlowCall | None:
        if value is None:
            return None
        d = mapping(value)
        return SlowCall(duration=self.duration(d["duration"], sub + ("duration",)), rate=_float(d["rate"]))

    def concurrency(self, value: object, sub: Path) -> ConcurrencyPolicy | None:
        return None if value is None else ConcurrencyPolicy(max=_int(mapping(value)["max"]))

    def hedge(self, value: object, sub: Path) -> HedgePolicy | None:
        if value is None:
            return None
        d = mapping(value)
        return HedgePolicy(**self.pick(d, sub, delay=self.duration, max_extra=_int))

    def cache(self, value: object, sub: Path) -> CachePolicy | None:
        if value is None:
            return None
        d = mapping(value)
        kw = self.pick(d, sub, ttl=self.duration, stale_if_error=self.duration,
                       stale_while_revalidate=self.duration, max_entries=_int, max_bytes=self.size,
                       max_body=self.size, store=_same,
                       key=lambda v, _: tuple(k if ":" not in k else "header:" + k[7:].lower()
                                              for k in map(text, items(v))),
                       statuses=lambda v, _: frozenset(_int(s) for s in items(v)))
        ttl = kw.get("ttl", CachePolicy().ttl)
        # A warm path without `every` is refreshed once per ttl: it never goes stale.
        kw["warm"] = tuple(WarmPath(path=text(w["path"]),
                                    every=self.duration(w.get("every", ttl), sub + ("warm", i)))
                           for i, w in enumerate(map(mapping, items(d.get("warm", [])))))
        return CachePolicy(**kw)

    def fallback(self, value: object, sub: Path) -> FallbackPolicy | None:
        if value is None:
            return None
        d = mapping(value)
        when = self.conditions(d.get("when", DEFAULT_FALLBACK_WHEN), sub + ("when",))
        targets = tuple(self.target(t, sub + ("targets", i)) for i, t in enumerate(items(d["targets"])))
        hedge = self.duration(d["hedge"], sub + ("hedge",)) if "hedge" in d else None
        return FallbackPolicy(when=when, targets=targets, hedge=hedge)

    def target(self, value: object, sub: Path) -> FallbackTarget:
        d = mapping(value)
        if "cache" in d:
            return FallbackTarget(kind="cache")
        if "static" in d:
            return FallbackTarget(kind="static", static=self.static(d["static"], sub + ("static",)))
        rewrite = self.rewrite(d["rewrite"], sub + ("rewrite",)) if "rewrite" in d else None
        return FallbackTarget(kind="upstream", upstream=self.upstream_ref(d["upstream"], sub + ("upstream",)),
                              rewrite=rewrite)

    def rewrite(self, value: object, sub: Path) -> Rewrite:
        d = mapping(value)
        maps = tuple(JsonMap(path=_dotted(field), default=m.get("*"), has_default="*" in m,
                             mapping=tuple((k, v) for k, v in m.items() if k != "*"))
                     for field, m in ((f, mapping(m)) for f, m in mapping(d.get("json_map", {})).items()))
        sets = tuple((_dotted(field), v) for field, v in mapping(d.get("json_set", {})).items())
        return Rewrite(path=optional_text(d.get("path")), set_headers=_pairs(d.get("headers", {}), sub),
                       remove_headers=tuple(text(h).lower() for h in items(d.get("remove_headers", []))),
                       json_map=maps, json_set=sets, translate=optional_text(d.get("translate")),
                       max_tokens=_int(d.get("max_tokens", DEFAULT_MAX_TOKENS)))

    def static(self, value: object, sub: Path) -> StaticResponse:
        d = mapping(value)
        given = _pairs(d.get("headers", {}), sub)
        headers = tuple((k, v) for k, v in given if k.lower() != "content-type")
        content_type = next((v for k, v in given if k.lower() == "content-type"), None)
        body = b""
        if "grpc_status" in d:          # a gRPC error, trailers-only: HTTP 200 with the status in the head
            if "message" in d:
                headers += (("grpc-message", encode_message(text(d["message"]))),)
            return StaticResponse(status=200, headers=(("grpc-status", str(_int(d["grpc_status"]))), *headers),
                                  content_type=content_type or "application/grpc")
        if "message" in d:
            self.fail(sub + ("message",), "message goes with grpc_status (a gRPC error answer)")
        if "json" in d:
            body = json.dumps(d["json"], separators=(",", ":"), ensure_ascii=False).encode()
            content_type = content_type or "application/json"
        elif "body" in d:
            body = text(d["body"]).encode()
        elif "body_file" in d:
            name = text(d["body_file"])
            body = self.body_file(name, sub + ("body_file",))
            content_type = content_type or mimetypes.guess_type(name)[0]
        return StaticResponse(status=_int(d.get("status", 200)), headers=headers, body=body,
                              content_type=content_type)

    def queue(self, value: object, sub: Path) -> QueuePolicy | None:
        if value is None:
            return None
        d = mapping(value)
        kw = self.pick(d, sub, max_items=_int, max_age=self.duration, store=_same,
                       visibility_timeout=self.duration, handoff=_same)
        return QueuePolicy(when=self.conditions(d.get("when", DEFAULT_QUEUE_WHEN), sub + ("when",)), **kw)

    def fault(self, value: object, sub: Path) -> FaultPolicy | None:
        if value is None:
            return None
        d = mapping(value)
        abort, delay, header = (mapping(d.get(k) or {}) for k in ("abort", "delay", "header"))
        return FaultPolicy(
            abort=FaultAbort(_int(abort["status"]), _float(abort["percent"])) if abort else None,
            delay=FaultDelay(self.duration(delay["duration"], sub + ("delay", "duration")),
                             _float(delay["percent"])) if delay else None,
            header=(text(header["name"]).lower(), optional_text(header.get("value"))) if header else None)

    def rate_limit(self, value: object, sub: Path) -> RateLimitPolicy | None:
        if value is None:
            return None
        d = mapping(value)
        key = optional_text(d.get("key"))
        limit = RateLimitPolicy(tokens_per_minute=_int(d["tokens_per_minute"]) if "tokens_per_minute" in d else None,
                                store=text(d.get("store", "local")), max_keys=_int(d.get("max_keys", 10_000)),
                                key=key[len("header:"):].lower() if key else None)
        if "per_second" not in d:
            return limit
        per_second = _float(d["per_second"])
        # Without `burst`, a bucket holds one second's worth (at least one request).
        burst = _int(d["burst"]) if "burst" in d else max(1, round(per_second))
        return replace(limit, per_second=per_second, burst=burst)
