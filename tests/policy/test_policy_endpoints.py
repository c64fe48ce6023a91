"""The upstream keys of an endpoint set and the route's `split`: loaded, checked, shown, redacted."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sidecar.policy.errors import PolicyError
from sidecar.explain import explain
from sidecar.policy.load import load_policy
from sidecar.policy.model import SplitTarget


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def problems(tmp_path: Path, text: str, env=None) -> list[tuple[int, int, str]]:
    with pytest.raises(PolicyError) as info:
        load_policy(write(tmp_path, text), env=env or {})
    return [(p.line, p.col, p.message) for p in info.value.problems]


BASE = """\
version: 1
upstreams:
  a: {url: http://a.internal}
  b: {url: http://b.internal}
"""


def test_endpoints_weights_headers_and_defaults(tmp_path):
    policy = load_policy(write(tmp_path, """\
        version: 1
        upstreams:
          llm:
            headers: {x-team: shop, api-key: shared}
            endpoints:
              - {url: "https://east.example:8443/v1", weight: 3, headers: {api-key: "${EAST}"}}
              - {url: http://10.0.0.2}
        """), env={"EAST": "k-east"})
    up = policy.upstreams["llm"]
    assert up.balanced and up.balance == "ewma" and up.discovery == "none"
    east, west = up.endpoints
    assert (east.scheme, east.host, east.port, east.base_path, east.weight) == ("https", "east.example", 8443, "/v1", 3)
    assert east.headers == (("api-key", "k-east"),) and west.weight == 1 and west.port == 80
    assert (up.outlier.consecutive_failures, up.outlier.max_ejected) == (5, 50)
    shown = policy.redacted["upstreams"]["llm"]
    assert shown["endpoints"][0]["headers"] == {"api-key": "<redacted>"}
    assert "k-east" not in repr(policy.redacted)


def test_dns_discovery_resolver_balance_and_outlier(tmp_path):
    policy = load_policy(write(tmp_path, """\
        version: 1
        upstreams:
          orders:
            url: http://orders.svc:8080
            discovery: dns
            refresh: 2s
            resolver: {servers: ["127.0.0.1:5353", "10.96.0.10"]}
            balance: round-robin
            outlier: {consecutive_failures: 2, eject_for: 1s, max_eject_for: 10s, max_ejected: 34%}
        """))
    up = policy.upstreams["orders"]
    assert (up.discovery, up.refresh, up.resolver, up.balance) == ("dns", 2, ("127.0.0.1:5353", "10.96.0.10"),
                                                                   "round-robin")
    assert (up.outlier.eject_for, up.outlier.max_eject_for, up.outlier.max_ejected) == (1, 10, 34)


def test_split_loads_and_explains(tmp_path):
    policy = load_policy(write(tmp_path, BASE + """\
        routes:
          - name: canary
            split: [{upstream: a, weight: 90}, {upstream: b, weight: 10}]
        """.replace("        ", "")))
    route = policy.routes[0]
    assert route.split == (SplitTarget("a", 90), SplitTarget("b", 10)) and route.upstream is None
    out = explain(policy, route, "http", "x")
    assert [s["upstream"] for s in out["split"]] == ["a", "b"]


@pytest.mark.parametrize("snippet,where,message", [
    ("  c: {url: http://c, endpoints: [{url: http://d}]}\n", (5, 33), "give either url or endpoints"),
    ("  c: {endpoints: [{url: http://d}], discovery: dns}\n", (5, 48), "list endpoints or discover them"),
    ("  c: {url: http://c, resolver: {servers: [1.1.1.1]}}\n", (5, 32), "resolver is used by discovery: dns"),
    ("  c: {url: http://c, balance: least-requests}\n", (5, 31), "did you mean 'least-request'"),
    ("  c: {url: http://c, outlier: {consecutive_failure: 3}}\n", (5, 32),
     "unknown key 'consecutive_failure' (did you mean 'consecutive_failures'?)"),
    ("  c: {url: http://c, outlier: {max_ejected: 150%}}\n", (5, 45), "expected a percentage"),
    ("  c: {endpoints: [{url: ftp://d}]}\n", (5, 25), "expected an http:// or https:// URL"),
    ("  c: {endpoints: [{url: http://d, wieght: 2}]}\n", (5, 35), "did you mean 'weight'"),
    ("  c: {connect_timeout: 1s}\n", (5, 6), "upstreams.c: an upstream needs a url or a list of endpoints"),
    ("  c: {url: http://c, discovery: dns, refresh: 0s}\n", (5, 47), "refresh must be longer than 0s"),
])
def test_upstream_problems_point_at_the_key(tmp_path, snippet, where, message):
    found = problems(tmp_path, BASE + snippet)
    assert any((line, col) == where and message in text for line, col, text in found), found


def test_split_problems(tmp_path):
    found = problems(tmp_path, BASE + """\
routes:
  - name: both
    upstream: a
    split: [{upstream: a, weight: 1}]
  - name: unknown
    split: [{upstream: aa, weight: 1}, {upstream: b, weight: 1}]
  - name: zero
    split: [{upstream: a, weight: 0}, {upstream: b, weight: 0}]
  - name: twice
    split: [{upstream: a, weight: 1}, {upstream: a, weight: 2}]
""")
    messages = [(line, text) for line, _, text in found]
    assert (8, "route 'both': give either upstream or split, not both") in messages
    assert any(line == 10 and "unknown upstream 'aa'" in text and "did you mean 'a'" in text for line, text in messages)
    assert (12, "a split needs at least one weight above 0") in messages
    assert any(line == 14 and "listed twice" in text for line, text in messages)


def test_shipped_examples_validate_with_the_cli():
    repo = Path(__file__).parents[2]
    files = [str(repo / "policies" / n) for n in ("headless-dns.yaml", "llm-keys.yaml", "canary.yaml")]
    run = subprocess.run([sys.executable, "-m", "sidecar", "validate", *files], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
