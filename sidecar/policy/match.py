"""Request -> route: first match wins. Pure, and on the hot path, so each route's `match` is compiled
once into one closure that tests only the conditions the route has, cheapest first.

Semantics (Envoy's route match, where the SPEC is silent):
  - host: lower-cased, `:port` and a trailing dot dropped; `*.example.com` matches any subdomain, not
    the apex; no `host` (or `*`) matches any.
  - path, path_prefix, path_regex: on the path without query or fragment, undecoded; the regex must
    match the whole path (`fullmatch`, as Envoy's safe_regex).
  - methods: upper-cased.
  - headers: all must hold; `exact` / `regex` (full match) hold when any value of a repeated header
    does; `present: false` holds when the header is absent.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from sidecar.policy.model import HeaderMatch, Match, Policy, Route

Test = Callable[[str, str, str, object], bool]


def normalize_host(host: str | None) -> str:
    if not host:
        return ""
    host = host.lower()
    if host.startswith("["):                 # [::1]:8080
        end = host.find("]")
        return host[: end + 1] if end != -1 else host
    return host.partition(":")[0].rstrip(".")


def strip_query(path: str) -> str:
    for sep in ("?", "#"):
        if sep in path:
            path = path.partition(sep)[0]
    return path


class Router:
    __slots__ = ("_entries",)

    def __init__(self, policy: Policy | Iterable[Route]):
        routes = policy.routes if isinstance(policy, Policy) else tuple(policy)
        self._entries: tuple[tuple[Route, Test], ...] = tuple((r, compile_match(r.match)) for r in routes)

    def match(self, method: str, host: str | None, path: str, headers: Mapping[str, str] | None = None) -> Route | None:
        method, host, path = method.upper(), normalize_host(host), strip_query(path)
        for route, test in self._entries:
            if test(method, host, path, headers):
                return route
        return None


def compile_match(m: Match) -> Test:
    methods, exact_path, prefix, regex = m.methods, m.path, m.path_prefix, m.path_regex
    host_exact = host_suffix = None
    if m.host is not None and m.host.startswith("*."):
        host_suffix = m.host[1:]             # ".example.com": the apex itself does not end with it
    else:
        host_exact = m.host
    header_tests = tuple(_header_test(h) for h in m.headers)

    def test(method: str, host: str, path: str, headers: object) -> bool:
        if methods is not None and method not in methods:
            return False
        if host_exact is not None and host != host_exact:
            return False
        if host_suffix is not None and not host.endswith(host_suffix):
            return False
        if exact_path is not None and path != exact_path:
            return False
        if prefix is not None and not path.startswith(prefix):
            return False
        if regex is not None and regex.fullmatch(path) is None:
            return False
        for header_test in header_tests:
            if not header_test(headers):
                return False
        return True

    return test


def _values(headers: object, name: str) -> list[str]:
    if headers is None:
        return []
    getall = getattr(headers, "getall", None)
    if getall is not None:                   # multidict: every value of a repeated header
        return list(getall(name, []))
    value = headers.get(name)                # type: ignore[attr-defined]
    return [] if value is None else [value]


def _header_test(h: HeaderMatch) -> Callable[[object], bool]:
    name = h.name
    if h.exact is not None:
        exact = h.exact
        return lambda headers: exact in _values(headers, name)
    if h.regex is not None:
        regex = h.regex
        return lambda headers: any(regex.fullmatch(v) for v in _values(headers, name))
    want = bool(h.present)
    return lambda headers: bool(_values(headers, name)) is want
