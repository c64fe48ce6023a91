"""`sidecar validate` and `sidecar explain`, run as the operator runs them."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).parents[2]
SIDECAR = Path(sys.executable).parent / "sidecar"
POLICIES = sorted((REPO / "policies").glob("*.yaml"))


def run(*args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [str(SIDECAR)] if SIDECAR.exists() else [sys.executable, "-m", "sidecar"]
    environ = {k: v for k, v in os.environ.items() if k != "BACKUP_LLM_KEY"} | (env or {})
    return subprocess.run([*command, *args], cwd=cwd, env=environ, capture_output=True, text=True, timeout=60)


def test_validate_prints_file_line_col_and_exits_1(tmp_path):
    (tmp_path / "bad.yaml").write_text("version: 1\nroutes:\n  - name: chat\n    retyr: {max_retries: 2}\n")
    result = run("validate", "bad.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == "bad.yaml:4:5: routes[0]: unknown key 'retyr' (did you mean 'retry'?)\n"


def test_validate_reports_every_file(tmp_path):
    (tmp_path / "a.yaml").write_text("version: 1\nunmatched: nope\n")
    (tmp_path / "b.yaml").write_text("version: 1\nversion: 1\n")
    (tmp_path / "ok.yaml").write_text("version: 1\n")
    result = run("validate", "a.yaml", "ok.yaml", "b.yaml", "missing.yaml", cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert [l.split(":")[0:3] for l in lines] == [["a.yaml", "2", "12"], ["b.yaml", "2", "1"],
                                                  ["missing.yaml", "1", "1"]]


@pytest.mark.parametrize("path", POLICIES, ids=lambda p: p.name)
def test_every_shipped_policy_validates(path):
    result = run("validate", str(path.relative_to(REPO)))
    assert (result.returncode, result.stdout) == (0, "")


def test_explain_a_matched_route():
    result = run("explain", "-c", "policies/tenants.yaml", "GET", "http://reports.internal:8080/v1/reports/7",
                 "-H", "X-Tenant: gold")
    assert result.returncode == 0, result.stderr
    out = yaml.safe_load(result.stdout)
    assert out["route"] == "reports-gold" and out["upstream"] == "reports"
    assert out["destination"] == "http://reports.internal:8080"
    policy = out["policy"]
    assert policy["timeout"] == "20s"                                  # the route's own
    assert policy["retry"]["max_retries"] == 3
    assert policy["retry"]["when"] == ["connect-failure", "reset", 503]  # merged from defaults
    assert policy["breaker"]["open_for"] == "20s"                       # from defaults
    assert policy["fallback"]["hedge"] == "2s"
    assert [list(t) for t in policy["fallback"]["targets"]] == [["upstream", "rewrite"], ["cache"], ["static"]]
    assert "when: [connect-failure, reset, 503]" in result.stdout       # written as an operator writes it


def test_explain_unmatched_passthrough_and_deny():
    result = run("explain", "-c", "policies/default.yaml", "GET", "https://example.org/anything?q=1")
    out = yaml.safe_load(result.stdout)
    assert (out["route"], out["unmatched"], out["upstream"]) == (None, "passthrough", None)
    assert out["destination"] == "https://example.org:443"
    assert out["policy"]["timeout"] == "15s" and out["policy"]["retry"]["max_body"] == "64KiB"
    result = run("explain", "-c", "policies/tenants.yaml", "GET", "http://elsewhere/")
    out = yaml.safe_load(result.stdout)
    assert {k: v for k, v in out.items() if k != "listeners"} == {"route": None, "unmatched": "deny"}


def test_explain_says_how_each_listener_carries_the_url(tmp_path):
    (tmp_path / "p.yaml").write_text(
        "version: 1\n"
        "listeners:\n"
        "  - {name: egress, mode: proxy, port: 15001, intercept: {hosts: [api.openai.com]}}\n"
        "  - {name: mesh, mode: transparent, port: 15006}\n"
        "  - {name: llm, mode: reverse, port: 15002, upstream: openai}\n"
        "upstreams: {openai: {url: 'https://api.openai.com'}}\n"
        "routes:\n"
        "  - {name: chat, match: {host: api.openai.com}, upstream: openai}\n"
        "  - {name: db, match: {host: 10.0.0.5}}\n")

    def listeners(url):
        result = run("explain", "-c", "p.yaml", "GET", url, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        return yaml.safe_load(result.stdout)["listeners"]
    https = listeners("https://api.openai.com/v1/chat/completions")
    assert https["egress"].startswith("governed (HTTPS intercepted")
    assert https["mesh"] == "relayed with connect-level policy (TLS routed on SNI, route chat)"
    assert https["llm"].startswith("not carried")
    other = listeners("https://example.org/")
    assert other["egress"] == "relayed with connect-level policy (CONNECT tunnel, route default)"
    plain = listeners("http://example.org/")
    assert all(v.startswith("governed") for v in plain.values()), plain
    tcp = listeners("redis://10.0.0.5:6379")
    assert tcp["mesh"].startswith("relayed with connect-level policy (TCP") and "route db" in tcp["mesh"]
    assert tcp["llm"].startswith("not carried")


def test_explain_redacts_secrets(tmp_path):
    (tmp_path / "p.yaml").write_text(
        "version: 1\n"
        "upstreams: {a: {url: 'https://a.example.com/${TOKEN}', headers: {authorization: 'Bearer ${TOKEN}'}}}\n"
        "routes:\n"
        "  - {name: r, upstream: a, fallback: {targets: [{static: {body: 'token ${TOKEN}'}}]}}\n")
    result = run("explain", "-c", "p.yaml", "GET", "https://a.example.com/x", cwd=tmp_path, env={"TOKEN": "tok-998877"})
    assert result.returncode == 0, result.stderr
    out = yaml.safe_load(result.stdout)
    assert "tok-998877" not in result.stdout
    assert out["destination"] == "https://a.example.com/<redacted>"
    assert out["policy"]["fallback"]["targets"][0]["static"]["body"] == "token <redacted>"


def test_explain_on_a_bad_policy_prints_problems_and_exits_1(tmp_path):
    (tmp_path / "bad.yaml").write_text("version: 3\n")
    result = run("explain", "-c", "bad.yaml", "GET", "http://x/", cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == "bad.yaml:1:10: version: must be 1, got 3\n"


def test_explain_rejects_a_malformed_header():
    result = run("explain", "-c", "policies/default.yaml", "GET", "http://x/", "-H", "no colon")
    assert result.returncode == 1 and "Name: value" in result.stderr
