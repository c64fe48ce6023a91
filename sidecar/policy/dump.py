"""Records -> plain data in the policy file's own shape, for `explain`, `/config` and `Policy.redacted`.

Durations and sizes are formatted back (`30s`, `64KiB`), so what an operator reads is what they would
write; loading the output again gives equal records (a test holds it to that). With `redact=True`, every
upstream header value becomes "<redacted>" and every string holding a `${VAR}` value from the
environment has that value replaced.
"""
from __future__ import annotations

import json
from typing import overload

from sidecar.policy.conditions import Conditions
from sidecar.policy.model import (
    BreakerPolicy, CachePolicy, FallbackPolicy, FallbackTarget, FaultPolicy, Match, OutlierPolicy, Policy,
    QueuePolicy, RateLimitPolicy,
    RetryPolicy, Rewrite, Route, StaticResponse, Upstream,
)
from sidecar.policy.units import format_duration as _d, format_size as _size

REDACTED = "<redacted>"

Data = dict[str, object]   # a mapping in the policy file's shape (JSON-able)


def policy_data(policy: Policy, *, redact: bool = True) -> Data:
    data = {
        "version": policy.version,
        "listeners": [_drop_none({"name": l.name, "mode": l.mode, "port": l.port, "bind": l.bind,
                                  "upstream": l.upstream}) for l in policy.listeners],
        "admin": {"bind": policy.admin.bind, "port": policy.admin.port},
        "health": {"bind": policy.health.bind, "port": policy.health.port},
        "telemetry": {"service_name": policy.telemetry.service_name,
                      "traces": {"endpoint": policy.telemetry.traces.endpoint,
                                 "protocol": policy.telemetry.traces.protocol,
                                 "sample_ratio": _num(policy.telemetry.traces.sample_ratio)}},
        "unmatched": policy.unmatched,
        "upstreams": {name: upstream_data(u, redact=redact) for name, u in policy.upstreams.items()},
        "defaults": route_data(policy.defaults, identity=False),
        "routes": [route_data(r, nulls=True) for r in policy.routes],
        "state_dir": policy.state_dir,
    }
    if policy.llm.prices:
        data["llm"] = {"prices": {m: {"input_per_million": _num(i), "output_per_million": _num(o)}
                                  for m, i, o in policy.llm.prices}}
    return scrub(data, policy.secrets) if redact else data


def _rate_limit(limit: RateLimitPolicy) -> Data:
    out: Data = {}
    if limit.per_second is not None:
        out.update(per_second=_num(limit.per_second), burst=limit.burst)
    if limit.tokens_per_minute is not None:
        out["tokens_per_minute"] = limit.tokens_per_minute
    if limit.key is not None:
        out["key"] = f"header:{limit.key}"
        out["max_keys"] = limit.max_keys
    if limit.store != "local":
        out["store"] = limit.store
    return out


# The shape that goes in comes out: a mapping stays a mapping (`policy_data`), a string a string (messages).
@overload
def scrub(data: Data, secrets: tuple[str, ...]) -> Data: ...
@overload
def scrub(data: str, secrets: tuple[str, ...]) -> str: ...
@overload
def scrub(data: object, secrets: tuple[str, ...]) -> object: ...
def scrub(data: object, secrets: tuple[str, ...]) -> object:
    """Every occurrence of a secret in a string value replaced by "<redacted>"."""
    if isinstance(data, dict):
        return {k: scrub(v, secrets) for k, v in data.items()}
    if isinstance(data, list):
        return [scrub(v, secrets) for v in data]
    if isinstance(data, str):
        for secret in secrets:            # longest first (see load.py), so no fragment survives
            data = data.replace(secret, REDACTED)
    return data


def upstream_data(u: Upstream, *, redact: bool) -> Data:
    out: Data = {}
    if u.endpoints:
        out["endpoints"] = [_drop_empty({"url": e.url, "weight": e.weight,
                                         "headers": {k: REDACTED if redact else v for k, v in e.headers}})
                            for e in u.endpoints]
    else:
        out["url"] = u.url
    out["connect_timeout"] = _d(u.connect_timeout)
    out["max_connections"] = u.max_connections
    if u.headers:
        out["headers"] = {k: REDACTED if redact else v for k, v in u.headers}
    if u.health_check:
        h = u.health_check
        out["health_check"] = {"path": h.path, "interval": _d(h.interval), "timeout": _d(h.timeout),
                               "unhealthy_after": h.unhealthy_after, "healthy_after": h.healthy_after}
    out["tls"] = _drop_none({"ca_file": u.tls.ca_file, "verify": u.tls.verify, "server_name": u.tls.server_name})
    # Balancing keys only where they mean something: a balanced upstream, or a value someone wrote.
    if u.discovery == "dns":
        out["discovery"] = u.discovery
        out["refresh"] = _d(u.refresh)
    if u.resolver:
        out["resolver"] = {"servers": list(u.resolver)}
    if u.balanced or u.balance != "ewma":
        out["balance"] = u.balance
    o = u.outlier
    if u.balanced or o != OutlierPolicy():
        out["outlier"] = {"consecutive_failures": o.consecutive_failures, "eject_for": _d(o.eject_for),
                          "max_eject_for": _d(o.max_eject_for), "max_ejected": f"{_num(o.max_ejected)}%"}
    return out


def route_data(r: Route, *, identity: bool = True, nulls: bool = False) -> Data:
    """A route as policy data; `identity=False` leaves out name, match and upstream (as in `defaults`).

    `nulls=True` writes a feature that is off as `null`, as a route must to switch off what its
    `defaults` turn on: then the data loads back to the same route.
    """
    out: Data = {}
    if identity:
        out["name"] = r.name
        if (match := match_data(r.match)):
            out["match"] = match
        if r.upstream is not None:
            out["upstream"] = r.upstream
        if r.split:
            out["split"] = [{"upstream": t.upstream, "weight": t.weight} for t in r.split]
    out["timeout"] = _d(r.timeout)
    if r.per_try_timeout is not None or nulls:
        out["per_try_timeout"] = None if r.per_try_timeout is None else _d(r.per_try_timeout)
    for key, dump in (("retry", _retry), ("breaker", _breaker), ("concurrency", lambda c: {"max": c.max}),
                      ("hedge", lambda h: {"delay": _d(h.delay), "max_extra": h.max_extra}),
                      ("cache", _cache), ("fallback", _fallback),
                      ("queue", _queue),
                      ("fault", _fault),
                      ("rate_limit", _rate_limit)):
        value = getattr(r, key)
        if value is not None or nulls:
            out[key] = None if value is None else dump(value)
    out["mode"] = r.mode
    out["allow_internal"] = r.allow_internal
    return out


def match_data(m: Match) -> Data:
    headers = []
    for h in m.headers:
        test = ({"exact": h.exact} if h.exact is not None else
                {"regex": h.regex.pattern} if h.regex is not None else {"present": h.present})
        headers.append({"name": h.name, **test})
    return _drop_none({"host": m.host, "path": m.path, "path_prefix": m.path_prefix,
                       "path_regex": m.path_regex.pattern if m.path_regex is not None else None,
                       "methods": sorted(m.methods) if m.methods is not None else None,
                       "headers": headers or None})


def conditions_data(c: Conditions) -> list[object]:
    return [*sorted(c.names), *sorted(c.statuses),
            *({"json": ".".join(j.path), "equals": j.equals} for j in c.json)]


def _retry(r: RetryPolicy) -> Data:
    out: Data = {"max_retries": r.max_retries, "when": conditions_data(r.when)}
    if r.methods is not None:
        out["methods"] = sorted(r.methods)
    out["backoff"] = {"base": _d(r.backoff.base), "max": _d(r.backoff.max)}
    out["respect_retry_after"] = r.respect_retry_after
    out["max_body"] = _size(r.max_body)
    out["budget"] = None if r.budget is None else {
        "ratio": _num(r.budget.ratio), "min_per_second": _num(r.budget.min_per_second),
        "window": _d(r.budget.window)}
    return out


def _breaker(b: BreakerPolicy) -> Data:
    return {"consecutive_failures": b.consecutive_failures, "failure_rate": b.failure_rate,
            "min_requests": b.min_requests, "window": _d(b.window),
            "slow_call": None if b.slow_call is None else {"duration": _d(b.slow_call.duration),
                                                          "rate": _num(b.slow_call.rate)},
            "open_for": _d(b.open_for), "max_open_for": _d(b.max_open_for),
            "half_open_requests": b.half_open_requests}


def _cache(c: CachePolicy) -> Data:
    return {"ttl": _d(c.ttl), "stale_if_error": _d(c.stale_if_error),
            "stale_while_revalidate": _d(c.stale_while_revalidate), "key": list(c.key),
            "statuses": sorted(c.statuses), "max_entries": c.max_entries, "max_bytes": _size(c.max_bytes),
            "max_body": _size(c.max_body), "store": c.store,
            "warm": [{"path": w.path, "every": _d(w.every)} for w in c.warm]}


def _fallback(f: FallbackPolicy) -> Data:
    out: Data = {"when": conditions_data(f.when)}
    if f.hedge is not None:
        out["hedge"] = _d(f.hedge)
    out["targets"] = [_target(t) for t in f.targets]
    return out


def _target(t: FallbackTarget) -> Data:
    if t.kind == "cache":
        return {"cache": "stale"}
    if t.kind == "static" and t.static is not None:
        return {"static": _static(t.static)}
    out: Data = {"upstream": t.upstream}
    if t.rewrite is not None:
        out["rewrite"] = _rewrite(t.rewrite)
    return out


def _rewrite(r: Rewrite) -> Data:
    json_map = {}
    for m in r.json_map:
        json_map[".".join(m.path)] = {**dict(m.mapping), **({"*": m.default} if m.has_default else {})}
    return _drop_empty({"translate": r.translate,
                        "max_tokens": r.max_tokens if r.translate else None, "path": r.path, "headers": dict(r.set_headers), "remove_headers": list(r.remove_headers),
                        "json_map": json_map,
                        "json_set": {".".join(path): value for path, value in r.json_set}})


def _static(s: StaticResponse) -> Data:
    out: Data = {"status": s.status}
    headers = dict(s.headers)
    if s.content_type == "application/json":
        try:
            return {**out, **({"headers": headers} if headers else {}), "json": json.loads(s.body)}
        except ValueError:
            pass
    if s.content_type is not None:
        headers["content-type"] = s.content_type
    if headers:
        out["headers"] = headers
    out["body"] = s.body.decode("utf-8", "replace")
    return out


def _fault(f: FaultPolicy) -> Data:
    out: Data = {}
    if f.abort is not None:
        out["abort"] = {"status": f.abort.status, "percent": _num(f.abort.percent)}
    if f.delay is not None:
        out["delay"] = {"duration": _d(f.delay.duration), "percent": _num(f.delay.percent)}
    if f.header is not None:
        out["header"] = _drop_none({"name": f.header[0], "value": f.header[1]})
    return out


def _queue(q: QueuePolicy) -> Data:
    out = {"when": conditions_data(q.when), "max_items": q.max_items, "max_age": _d(q.max_age), "store": q.store}
    if q.store != "state_dir":
        out["visibility_timeout"] = _d(q.visibility_timeout)
    if q.handoff is not None:
        out["handoff"] = q.handoff
    return out


def _num(x: float) -> float | int:
    """1.0 reads better as 1, and loads back equal."""
    return int(x) if float(x).is_integer() else x


def _drop_none(d: Data) -> Data:
    return {k: v for k, v in d.items() if v is not None}


def _drop_empty(d: Data) -> Data:
    return {k: v for k, v in d.items() if v not in (None, {}, [])}
