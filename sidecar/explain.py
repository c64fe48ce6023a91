"""`sidecar explain -c FILE METHOD URL [-H 'Name: value']...`: which route a request would take, and the
policy it would get after `defaults`, printed as YAML with durations and sizes as an operator writes them.

    route: chat                 # or `route: null` and `unmatched: passthrough|deny`
    line: 31                    # where the route starts in FILE
    upstream: openai            # null: the request's original destination
    destination: https://api.openai.com:443
    cache_url: upstream://openai/v1/models   # with `cache:`: the URL its cache keys hold (core/cache.py)
    policy: {timeout: 30s, retry: {...}, ...}
    listeners:                  # how each listener carries this URL (README "What each listener carries")
      egress: relayed with connect-level policy (CONNECT tunnel, route chat-tls) ...
"""
from __future__ import annotations

import sys
from urllib.parse import urlsplit

import yaml
from multidict import CIMultiDict
from yarl import URL

from sidecar.core.authority import bracketed
from sidecar.core.cache import canonical_url

from sidecar.policy.dump import route_data, scrub
from sidecar.policy.errors import PolicyError
from sidecar.policy.load import load_policy
from sidecar.policy.match import Router
from sidecar.policy.model import Policy, Route, Upstream
from sidecar.policy.units import format_duration


def explain_command(policy_path: str, method: str, url: str, header_strings: list[str]) -> int:
    try:
        policy = load_policy(policy_path)
    except PolicyError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    try:
        headers = parse_headers(header_strings)
        parts = urlsplit(url)
        parts.port                                  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        print(f"sidecar explain: {exc}", file=sys.stderr)
        return 1
    authority = parts.netloc.rpartition("@")[2] or headers.get("host", "")
    route = Router(policy).match(method, authority, parts.path or "/", headers)
    path_qs = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    out = explain(policy, route, parts.scheme or "http", authority, path_qs)
    out["listeners"] = carried(policy, parts.scheme or "http", parts.hostname or "")
    sys.stdout.write(yaml.dump(out, Dumper=_Dumper,
                               sort_keys=False, default_flow_style=False, allow_unicode=True))
    return 0


class _Dumper(yaml.SafeDumper):
    """Lists of scalars on one line (`when: [reset, 503]`), as the policy files write them."""

    def represent_list(self, data: list) -> yaml.Node:
        flat = all(not isinstance(item, (dict, list)) for item in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flat)


    def represent_text(self, data: str) -> yaml.Node:
        style = "|" if "\n" in data else None     # a static body reads as written
        return self.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(list, _Dumper.represent_list)
_Dumper.add_representer(str, _Dumper.represent_text)


def parse_headers(lines: list[str]) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"bad header {line!r}: expected 'Name: value'")
        headers.add(name.strip(), value.strip())
    return headers


def explain(policy: Policy, route: Route | None, scheme: str, authority: str, path_qs: str = "/") -> dict:
    out: dict = {"route": route.name if route else None}
    if route is None:
        out["unmatched"] = policy.unmatched
        if policy.unmatched == "deny":
            return out                              # 403: no policy applies
        route = policy.defaults
    else:
        out["line"] = route.line
    upstream = policy.upstreams.get(route.upstream) if route.upstream else None
    out["upstream"] = route.upstream
    if route.split:
        out["split"] = [{"upstream": t.upstream, "weight": t.weight,
                         "destination": _destination(policy.upstreams[t.upstream])} for t in route.split]
    else:
        out["destination"] = _destination(upstream) if upstream else _origin(scheme, authority)
    if upstream is not None and upstream.balanced:
        out["balance"] = upstream.balance
    if route.cache is not None and not route.split and (upstream is not None or _origin(scheme, authority)):
        out["cache_url"] = canonical_url(URL(f"{scheme}://{authority}{path_qs}", encoded=True),
                                         upstream.name if upstream else None)
    out["policy"] = route_data(route, identity=False)
    return scrub(out, policy.secrets)               # type: ignore[return-value]


def _destination(up: Upstream) -> str | list[dict]:
    """Where an upstream's requests go: its url, its listed endpoints, or what DNS will say."""
    if up.discovery == "dns":
        return f"{up.origin} (every A/AAAA record of {up.host}, re-resolved every {format_duration(up.refresh)})"
    if up.endpoints:
        return [{"url": e.url, "weight": e.weight} for e in up.endpoints]
    return up.url


def carried(policy: Policy, scheme: str, host: str) -> dict[str, str]:
    """Per listener: is a call to this URL governed (the full route policy), relayed with connect-level
    policy (connect timeout, breaker on connect failures, a span; no retry, fallback or cache), or not
    carried at all."""
    router = Router(policy)
    connect_route = router.match("CONNECT", host, "", {})
    if connect_route is None:
        relay_route = "no route: denied (unmatched: deny)" if policy.unmatched == "deny" else "route default"
    else:
        relay_route = f"route {connect_route.name}"
    tls = scheme in ("https", "wss")
    out: dict[str, str] = {}
    for lst in policy.listeners:
        intercepted = lst.intercept is not None and lst.intercept.lists(host)
        if scheme in ("http", "ws"):
            what = {"proxy": "governed (absolute-form request through HTTP_PROXY)",
                    "reverse": f"governed (when the app's base URL is this listener; sent to upstream "
                               f"{lst.upstream})",
                    "transparent": "governed (HTTP/1.1, routed on Host)"}[lst.mode]
        elif tls and intercepted:
            what = "governed (HTTPS intercepted: TLS terminated with the sidecar's CA, the route policy applies)"
        elif tls:
            what = {"proxy": f"relayed with connect-level policy (CONNECT tunnel, {relay_route})",
                    "reverse": "not carried: a reverse listener takes plain HTTP (the sidecar originates "
                               "TLS to an https:// upstream)",
                    "transparent": f"relayed with connect-level policy (TLS routed on SNI, {relay_route})"}[lst.mode]
        else:
            what = {"proxy": f"relayed with connect-level policy if the client sends CONNECT ({relay_route})",
                    "reverse": "not carried: a reverse listener takes HTTP only",
                    "transparent": f"relayed with connect-level policy (TCP, routed on the address, "
                                   f"{relay_route})"}[lst.mode]
        out[lst.name] = what
    return out


def _origin(scheme: str, authority: str) -> str | None:
    """The original destination of a request that names no upstream."""
    try:
        parts = urlsplit(f"//{authority}")
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host:
        return None
    return f"{scheme}://{bracketed(host)}:{port or (443 if scheme == 'https' else 80)}"
