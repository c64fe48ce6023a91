"""The router: every match kind, first match wins, wildcard hosts."""
import re
import time

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.policy.load import load_policy
from sidecar.policy.match import Router, normalize_host, strip_query
from sidecar.policy.model import HeaderMatch, Match, Route

POLICY = """\
version: 1
routes:
  - name: exact-path
    match: {host: api.example.com, path: /v1/health}
  - name: chat
    match: {host: api.example.com, path_prefix: /v1/chat/, methods: [POST]}
  - name: gold
    match: {path_prefix: /v1/reports, headers: [{name: X-Tenant, exact: gold}]}
  - name: beta
    match: {path_prefix: /v1/reports, headers: [{name: x-beta, present: true}, {name: x-tenant, regex: "t-[0-9]+"}]}
  - name: no-debug
    match: {path_prefix: /v1/reports, headers: [{name: x-debug, present: false}]}
  - name: items
    match: {path_regex: "/v1/items/[0-9]+", methods: [get, HEAD]}
  - name: wildcard
    match: {host: "*.example.com"}
  - name: catch-all
    match: {path_prefix: /}
"""


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    path = tmp_path_factory.mktemp("match") / "policy.yaml"
    path.write_text(POLICY)
    return Router(load_policy(str(path), env={}))


def name(router, method, host, path, headers=None):
    route = router.match(method, host, path, CIMultiDictProxy(CIMultiDict(headers or {})))
    return route.name if route else None


@pytest.mark.parametrize("method, host, path, headers, expected", [
    ("GET", "api.example.com", "/v1/health", {}, "exact-path"),
    ("GET", "API.Example.COM:443", "/v1/health?verbose=1", {}, "exact-path"),   # case, port and query ignored
    ("GET", "api.example.com.", "/v1/health", {}, "exact-path"),               # trailing dot
    ("GET", "api.example.com", "/v1/health/more", {}, "wildcard"),              # exact is exact
    ("POST", "api.example.com", "/v1/chat/completions", {}, "chat"),
    ("post", "api.example.com", "/v1/chat/completions", {}, "chat"),
    ("GET", "api.example.com", "/v1/chat/completions", {}, "wildcard"),         # method filters
    ("GET", "other.org", "/v1/reports/9", {"x-tenant": "gold"}, "gold"),        # header names any case
    ("GET", "other.org", "/v1/reports/9", {"x-tenant": "GOLD", "x-debug": "1"}, "catch-all"),
    ("GET", "other.org", "/v1/reports/9", {"x-beta": "", "x-tenant": "t-42"}, "beta"),
    ("GET", "other.org", "/v1/reports/9", {"x-beta": "1", "x-tenant": "t-42x"}, "no-debug"),   # regex is full
    ("GET", "other.org", "/v1/reports/9", {"x-debug": "1"}, "catch-all"),
    ("GET", "other.org", "/v1/items/12", {}, "items"),
    ("HEAD", "other.org", "/v1/items/12?x=1", {}, "items"),
    ("GET", "other.org", "/v1/items/12/parts", {}, "catch-all"),                # regex must match it all
    ("DELETE", "other.org", "/v1/items/12", {}, "catch-all"),
    ("GET", "a.b.example.com", "/x", {}, "wildcard"),
    ("GET", "example.com", "/x", {}, "catch-all"),                              # not the apex
    ("GET", "badexample.com", "/x", {}, "catch-all"),
    ("GET", "", "/v1/health", {}, "catch-all"),
])
def test_match_kinds(router, method, host, path, headers, expected):
    assert name(router, method, host, path, headers) == expected


def test_first_match_wins_and_no_match_is_none(tmp_path):
    routes = [Route("a", Match(path_prefix="/a")), Route("b", Match(path_prefix="/")), Route("c", Match())]
    router = Router(routes)
    assert router.match("GET", "h", "/a/1", None).name == "a"
    assert router.match("GET", "h", "/z", None).name == "b"
    assert Router(routes[:1]).match("GET", "h", "/z", None) is None
    assert Router([]).match("GET", "h", "/", None) is None


def test_repeated_headers_match_on_any_value():
    route = Route("t", Match(headers=(HeaderMatch("x-tenant", exact="gold"),)))
    headers = CIMultiDict([("X-Tenant", "free"), ("x-tenant", "gold")])
    assert Router([route]).match("GET", "h", "/", headers) is route
    regex = Route("r", Match(headers=(HeaderMatch("x-tenant", regex=re.compile("g.*")),)))
    assert Router([regex]).match("GET", "h", "/", headers) is regex
    assert Router([regex]).match("GET", "h", "/", {"x-tenant": "gold"}) is regex    # a plain mapping


def test_plain_mapping_and_no_headers():
    route = Route("p", Match(headers=(HeaderMatch("x-a", present=False),)))
    assert Router([route]).match("GET", "h", "/", None) is route
    assert Router([route]).match("GET", "h", "/", {"x-a": "1"}) is None


@pytest.mark.parametrize("raw, host", [("Example.COM:8080", "example.com"), ("[::1]:8080", "[::1]"),
                                       ("[::1]", "[::1]"), (None, ""), ("h.", "h"), ("h", "h")])
def test_normalize_host(raw, host):
    assert normalize_host(raw) == host


def test_strip_query():
    assert strip_query("/a?b#c") == "/a" and strip_query("/a#c?d") == "/a" and strip_query("/a") == "/a"


def test_matching_is_fast(router):
    headers = CIMultiDictProxy(CIMultiDict({"x-debug": "1"}))
    start = time.perf_counter()
    for _ in range(20_000):
        router.match("GET", "other.org:80", "/v1/reports/9?q=1", headers)   # falls through 7 routes
    per_call = (time.perf_counter() - start) / 20_000
    assert per_call < 50e-6, f"{per_call * 1e6:.1f}us per match"
