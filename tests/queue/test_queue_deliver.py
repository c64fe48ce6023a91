"""Pure parts of a delivery: which answers end a write's journey, and the request rebuilt from policy."""
import textwrap

import pytest

from sidecar.policy.load import load_policy
from sidecar.queue.deliver import build_request, finished
from sidecar.queue.store import Item


@pytest.mark.parametrize("status,done", [(200, True), (201, True), (204, True), (400, True), (404, True),
                                         (409, True), (422, True), (408, False), (429, False),
                                         (500, False), (502, False), (503, False)])
def test_what_ends_a_writes_journey(status, done):
    assert finished(status) is done


def load(tmp_path, upstreams):
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent(f"""
        version: 1
        listeners:
          - {{name: egress, mode: proxy, port: 15999}}
        upstreams:
        {textwrap.indent(upstreams, "  ")}
        routes:
          - {{name: orders, match: {{path_prefix: /}}, queue: {{when: [retries-exhausted]}}}}
    """))
    return load_policy(str(path))


def item(**kw) -> Item:
    fields = dict(route="orders", target="svc", upstream="svc", method="POST", url="http://old:1/v1/orders?x=1",
                  path="/orders?x=1", headers=(("Host", "app-facing:15002"), ("x-app", "1"),
                                               ("Idempotency-Key", "k1")),
                  body=b"{}", idempotency_key="k1", trace_id="a" * 32, span_id="b" * 16, accepted_at=0.0,
                  max_age=60.0, id=7)
    fields.update(kw)
    return Item(**fields)


def test_named_upstream_from_the_current_policy_with_its_secrets(tmp_path):
    policy = load(tmp_path, 'svc: {url: "https://api.example.com:8443/v1", headers: {authorization: "Bearer s3"}}')
    req = build_request(policy, item())
    assert str(req.url) == "https://api.example.com:8443/v1/orders?x=1"
    assert req.headers["Host"] == "api.example.com:8443"
    assert req.headers["authorization"] == "Bearer s3"
    assert req.headers["x-app"] == "1" and req.headers.getall("Idempotency-Key") == ["k1"]


def test_an_upstream_gone_from_the_policy_makes_the_write_wait(tmp_path):
    policy = load(tmp_path, 'other: {url: "http://127.0.0.1:1"}')
    assert build_request(policy, item()) is None


def test_original_destination_is_used_as_stored(tmp_path):
    policy = load(tmp_path, 'other: {url: "http://127.0.0.1:1"}')
    req = build_request(policy, item(upstream=None, target="old:1", url="http://old:1/v1/orders?x=1",
                                     headers=(("Host", "old:1"),)))
    assert req.upstream is None and str(req.url) == "http://old:1/v1/orders?x=1"
    assert req.headers["Host"] == "old:1" and req.headers["Idempotency-Key"] == "k1"
