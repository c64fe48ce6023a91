"""`sidecar explain -c FILE METHOD URL [-H 'Name: value']...`: which route a request would take, and the
policy it would get after `defaults`, printed as YAML with durations and sizes as an operator writes them.

    route: chat                 # or `route: null` and `unmatched: passthrough|deny`
    line: 31                    # where the route starts in FILE
    upstream: openai            # null: the request's original destination
    destination: https://api.openai.com:443
    policy: {timeout: 30s, retry: {...}, ...}
"""
from __future__ import annotations

import sys
from urllib.parse import urlsplit

import yaml
from multidict import CIMultiDict

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
        parts.port                                  # raises ValueError for a bad port
    except ValueError as exc:
        print(f"sidecar explain: {exc}", file=sys.stderr)
        return 1
    authority = parts.netloc.rpartition("@")[2] or headers.get("host", "")
    route = Router(policy).match(method, authority, parts.path or "/", headers)
    sys.stdout.write(yaml.dump(explain(policy, route, parts.scheme or "http", authority), Dumper=_Dumper,
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


def explain(policy: Policy, route: Route | None, scheme: str, authority: str) -> dict:
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
    out["policy"] = route_data(route, identity=False)
    return scrub(out, policy.secrets)               # type: ignore[return-value]


def _destination(up: Upstream) -> str | list[dict]:
    """Where an upstream's requests go: its url, its listed endpoints, or what DNS will say."""
    if up.discovery == "dns":
        return f"{up.origin} (every A/AAAA record of {up.host}, re-resolved every {format_duration(up.refresh)})"
    if up.endpoints:
        return [{"url": e.url, "weight": e.weight} for e in up.endpoints]
    return up.url


def _origin(scheme: str, authority: str) -> str | None:
    """The original destination of a request that names no upstream."""
    try:
        parts = urlsplit(f"//{authority}")
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host:
        return None
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{port or (443 if scheme == 'https' else 80)}"
