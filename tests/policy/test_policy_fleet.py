"""`rate_limit.key/store/max_keys` and `queue.store/visibility_timeout/handoff`: loaded, checked, dumped."""
import subprocess
import sys
import textwrap

import pytest

from sidecar.policy.dump import route_data
from sidecar.policy.errors import PolicyError
from sidecar.policy.load import load_policy


def load(tmp_path, text):
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent(text))
    return load_policy(str(path), env={})


def test_fleet_keys_load_and_dump_as_written(tmp_path):
    policy = load(tmp_path, """\
        version: 1
        routes:
          - name: chat
            rate_limit: {per_second: 20, burst: 40, key: "header:X-Tenant", store: "redis://r:6379/1", max_keys: 500}
            queue: {store: "redis://r:6379/2", visibility_timeout: 45s}
          - name: local
            rate_limit: {per_second: 5, key: "header:x-api-key"}
            queue: {handoff: "redis://r:6379/2"}
        """)
    chat, local = policy.routes
    assert (chat.rate_limit.key, chat.rate_limit.store, chat.rate_limit.max_keys) == ("x-tenant", "redis://r:6379/1", 500)
    assert (chat.queue.store, chat.queue.visibility_timeout, chat.queue.handoff) == ("redis://r:6379/2", 45, None)
    assert (local.rate_limit.store, local.rate_limit.max_keys) == ("local", 10_000)
    assert (local.queue.store, local.queue.handoff) == ("state_dir", "redis://r:6379/2")
    assert route_data(chat)["rate_limit"] == {"per_second": 20, "burst": 40, "key": "header:x-tenant",
                                              "max_keys": 500, "store": "redis://r:6379/1"}
    assert route_data(chat)["queue"]["visibility_timeout"] == "45s"


@pytest.mark.parametrize("bad, message", [
    ("rate_limit: {per_second: 1, key: x-tenant}", "rate_limit.key: expected header:NAME"),
    ("rate_limit: {per_second: 1, store: memcached://m}", "rate_limit.store: expected local or a redis://"),
    ("rate_limit: {per_second: 1, max_keys: 0}", "rate_limit.max_keys"),
    ("queue: {store: /var/lib/q}", "queue.store: expected state_dir or a redis://"),
    ("queue: {handoff: state_dir}", "queue.handoff: expected a redis://"),
])
def test_bad_fleet_keys_name_the_key(tmp_path, bad, message):
    with pytest.raises(PolicyError) as info:
        load(tmp_path, f"version: 1\nroutes:\n  - name: r\n    {bad}\n")
    assert any(message in str(p) and p.line == 4 for p in info.value.problems), info.value.problems


def test_explain_shows_the_shared_stores(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("version: 1\nroutes:\n  - name: r\n    match: {path_prefix: /}\n"
                    "    rate_limit: {per_second: 1, key: 'header:x-tenant', store: 'redis://r:6379/0'}\n")
    out = subprocess.run([sys.executable, "-m", "sidecar", "explain", "-c", str(path), "GET", "http://a/x"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "key: header:x-tenant" in out.stdout and "store: redis://r:6379/0" in out.stdout
