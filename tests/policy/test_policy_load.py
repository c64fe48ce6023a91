"""load_policy: every stage, each error at the line and column of the value at fault."""
import json
import os
import textwrap
from pathlib import Path

import jsonschema
import pytest
import yaml

from sidecar.policy.dump import policy_data
from sidecar.policy.errors import PolicyError, Problem
from sidecar.policy.load import SCHEMA_PATH, load_policy, validate_files
from sidecar.policy.conditions import CONDITION_NAMES, JsonCondition
from sidecar.policy.model import RetryPolicy

HERE = Path(__file__).parent
REPO = HERE.parents[1]
SPEC_EXAMPLE = HERE / "spec-example.yaml"
SPEC_ENV = {"BACKUP_LLM_KEY": "sk-backup-123", "AZ_EAST_KEY": "az-east-456", "AZ_WEST_KEY": "az-west-789"}


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def load(tmp_path: Path, text: str, env: dict | None = None):
    return load_policy(write(tmp_path, text), env=env or {})


def problems(tmp_path: Path, text: str, env: dict | None = None) -> list[tuple[int, int, str]]:
    with pytest.raises(PolicyError) as info:
        load(tmp_path, text, env)
    return [(p.line, p.col, p.message) for p in info.value.problems]


# --- the SPEC's example and the shipped policies ---------------------------------------------------

def test_spec_example_loads_every_key():
    policy = load_policy(str(SPEC_EXAMPLE), env=SPEC_ENV)
    chat = policy.routes[0]
    assert [l.name for l in policy.listeners] == ["egress", "llm"]
    assert policy.listeners[1].upstream == "openai"
    assert policy.telemetry.traces.endpoint == "http://jaeger:4317"
    assert chat.timeout == 30 and chat.per_try_timeout == 10
    assert chat.retry.backoff.base == 0.1 and chat.retry.max_body == 64 * 1024
    assert chat.retry.when.statuses == {429, 502, 503, 504} and chat.retry.methods == {"POST"}
    assert chat.breaker.slow_call.duration == 5 and chat.breaker.max_open_for == 300
    assert chat.cache.stale_if_error == 3600 and chat.cache.key == ("method", "url", "body")
    assert [t.label for t in chat.fallback.targets] == ["upstream:backup-llm", "cache:stale", "static"]
    rewrite = chat.fallback.targets[0].rewrite
    assert rewrite.json_map[0].mapping == (("gpt-4o", "backup-large"),)
    assert rewrite.json_map[0].default == "backup-small"
    static = chat.fallback.targets[2].static
    assert json.loads(static.body) == {"error": "degraded", "message": "Try again shortly"}
    assert static.content_type == "application/json"
    assert chat.queue.max_age == 86400 and chat.fault.abort.percent == 10
    assert chat.rate_limit.burst == 20 and chat.line == 43
    assert policy.upstreams["openai"].health_check.path == "/v1/models"
    orders = policy.upstreams["orders"]
    assert (orders.discovery, orders.refresh, orders.balance, orders.balanced) == ("dns", 5, "ewma", True)
    assert (orders.outlier.consecutive_failures, orders.outlier.eject_for, orders.outlier.max_eject_for,
            orders.outlier.max_ejected) == (5, 30, 300, 50)
    azure = policy.upstreams["azure-gpt4o"]
    assert [(e.host, e.weight, e.headers) for e in azure.endpoints] == [
        ("eastus.example.openai.azure.com", 2, (("api-key", "az-east-456"),)),
        ("westeu.example.openai.azure.com", 1, (("api-key", "az-west-789"),))]
    assert azure.url == "https://eastus.example.openai.azure.com" and azure.balanced


@pytest.mark.parametrize("path", sorted((REPO / "policies").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_policies_are_valid_without_any_environment(path):
    load_policy(str(path), env={})


def test_schema_is_draft_2020_12_closed_everywhere_and_linked_from_schemas():
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    link = REPO / "schemas" / "policy.schema.json"
    assert link.is_symlink() and os.readlink(link) == "../sidecar/policy/policy.schema.json"

    def walk(node, where):
        if isinstance(node, dict):
            if "properties" in node:
                assert node.get("additionalProperties") is False, where
            for k, v in node.items():
                walk(v, f"{where}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}/{i}")
    walk(schema, "#")
    assert set(schema["$defs"]["outcome"]["enum"]) == CONDITION_NAMES


# --- errors with positions -----------------------------------------------------------------------

def test_misspelt_key_points_at_the_key_and_suggests(tmp_path):
    text = """\
        version: 1
        routes:
          - name: chat
            retyr: {max_retries: 2}
        """
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as info:
        load_policy(path, env={})
    [problem] = info.value.problems
    assert problem == Problem(path, 4, 5, "routes[0]: unknown key 'retyr' (did you mean 'retry'?)")
    assert str(problem) == f"{path}:4:5: routes[0]: unknown key 'retyr' (did you mean 'retry'?)"


def test_nested_misspelling_and_every_problem_reported_in_order(tmp_path):
    found = problems(tmp_path, """\
        version: 1
        unmatched: passtrough
        routes:
          - name: chat
            retry: {backof: {base: 1s}, max_retries: many}
            mode: shadow
        """)
    assert found == [
        (2, 12, "unmatched: expected one of passthrough, deny, got 'passtrough' (did you mean 'passthrough'?)"),
        (5, 13, "routes[0].retry: unknown key 'backof' (did you mean 'backoff'?)"),
        (5, 46, "routes[0].retry.max_retries: expected an integer, got 'many'"),
    ]


def test_bad_duration_and_size_messages(tmp_path):
    found = problems(tmp_path, """\
        version: 1
        defaults: {timeout: 10 seconds, retry: {max_body: 1 TB}}
        """)
    assert found == [
        (2, 21, "defaults.timeout: expected a duration such as 250ms, 10s, 5m or 1h, got '10 seconds'"),
        (2, 51, "defaults.retry.max_body: expected a size such as 512, 64KiB, 1MiB or 10MB, got '1 TB'"),
    ]


def test_yaml11_words_do_not_become_booleans(tmp_path):
    # `allow_internal: yes` would silently be true under YAML 1.1; here it is an error.
    assert problems(tmp_path, "version: 1\ndefaults: {allow_internal: yes}\n") == [
        (2, 28, "defaults.allow_internal: expected true or false, got 'yes'")]


def test_duplicate_key_is_an_error_with_its_line(tmp_path):
    assert problems(tmp_path, "version: 1\nunmatched: deny\nunmatched: passthrough\n") == [
        (3, 1, "duplicate key 'unmatched' (first at line 2)")]


def test_yaml_syntax_error_has_its_mark(tmp_path):
    [(line, _, message)] = problems(tmp_path, "version: 1\nroutes: [\n  {name: a\n")
    assert line >= 3 and message.startswith("invalid YAML:")


def test_version_must_be_1_and_present(tmp_path):
    assert problems(tmp_path, "version: 2\n") == [(1, 10, "version: must be 1, got 2")]
    assert problems(tmp_path, "unmatched: deny\n") == [(1, 1, "missing required key 'version'")]


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n", "42\n"])
def test_a_policy_must_be_a_mapping(tmp_path, text):
    [(line, col, message)] = problems(tmp_path, text)
    assert (line, col) == (1, 1) and "must be a mapping" in message


def test_unreadable_and_non_utf8_files(tmp_path):
    for path in (tmp_path / "missing.yaml", tmp_path, "nul\0byte.yaml"):
        with pytest.raises(PolicyError) as info:
            load_policy(str(path))
        assert info.value.problems[0].line == 1 and "cannot read" in info.value.problems[0].message
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"version: 1\nstate_dir: /caf\xe9\n")
    with pytest.raises(PolicyError, match="not UTF-8") as info:
        load_policy(str(bad))
    assert info.value.problems[0].line == 2


def test_unknown_upstreams_are_reported_where_named(tmp_path):
    found = problems(tmp_path, """\
        version: 1
        listeners:
          - {name: llm, mode: reverse, port: 15002, upstream: opanai}
        upstreams:
          openai: {url: "https://api.openai.com"}
        routes:
          - name: chat
            upstream: openia
            fallback:
              targets: [{upstream: backup}]
        """)
    assert found == [
        (3, 55, "unknown upstream 'opanai' (did you mean 'openai'?) (defined: openai)"),
        (8, 15, "unknown upstream 'openia' (did you mean 'openai'?) (defined: openai)"),
        (10, 28, "unknown upstream 'backup' (defined: openai)"),
    ]


def test_error_in_a_merged_default_points_into_defaults(tmp_path):
    found = problems(tmp_path, """\
        version: 1
        defaults:
          fallback:
            targets: [{upstream: nowhere}]
        routes:
          - name: a
          - name: b
        """)
    assert found == [(4, 26, "unknown upstream 'nowhere' (defined: none)")]


def test_listener_port_clashes(tmp_path):
    found = problems(tmp_path, """\
        version: 1
        listeners:
          - {name: one, port: 15001}
          - {name: two, port: 15001}
          - {name: three, mode: transparent, port: 15000}
          - {name: four, mode: transparent, port: 15021, bind: 10.0.0.1}
        """)
    assert found == [
        (4, 23, "listener 'two': port 15001 is already used by listener 'one'"),
        (5, 44, "listener 'three': port 15000 is already used by the admin endpoint"),
        (6, 43, "listener 'four': port 15021 is already used by the health endpoint"),   # health binds 0.0.0.0
    ]


def test_distinct_addresses_and_port_zero_do_not_clash(tmp_path):
    policy = load(tmp_path, """\
        version: 1
        listeners:
          - {name: a, port: 15001, bind: 127.0.0.1}
          - {name: b, port: 15001, bind: 127.0.0.2}
          - {name: c, port: 0}
          - {name: d, port: 0}
        admin: {port: 0}
        health: {port: 0}
        """)
    assert [l.port for l in policy.listeners] == [15001, 15001, 0, 0]


def test_reverse_listener_needs_port_and_upstream(tmp_path):
    found = problems(tmp_path, """\
        version: 1
        listeners:
          - {name: rev, mode: reverse}
          - {name: prox, mode: proxy, upstream: x}
        upstreams: {x: {url: "http://x"}}
        """)
    assert found == [(3, 5, "listener 'rev': a reverse listener needs a port"),
                     (3, 5, "listener 'rev': a reverse listener needs an upstream"),
                     (4, 41, "listener 'prox': only a reverse listener has an upstream")]


def test_invalid_regexes_and_duplicate_route_names(tmp_path):
    found = problems(tmp_path, """\
        version: 1
        routes:
          - name: a
            match: {path_regex: "/v1/(", headers: [{name: x-t, regex: "[z-a]"}]}
          - name: a
        """)
    assert found == [
        (4, 25, "invalid regex '/v1/(': missing ), unterminated subpattern at position 4"),
        (4, 63, "invalid regex '[z-a]': bad character range z-a at position 1"),
        (5, 11, "duplicate route name 'a' (first at line 3)"),
    ]


def test_fallback_target_shapes(tmp_path):
    found = problems(tmp_path, """\
        version: 1
        upstreams: {b: {url: "http://b"}}
        routes:
          - name: a
            fallback:
              targets:
                - {upstream: b, cache: stale}
                - cache: stale
                - static: {body: x, json: {}}
                - static: {body_file: missing.json}
        """)
    assert found == [
        (7, 11, "routes[0].fallback.targets[0]: a fallback target is exactly one of {upstream: NAME}, "
                "{cache: stale} or {static: {...}}"),
        (9, 19, "routes[0].fallback.targets[2].static: a static response takes at most one of body, json or body_file"),
    ]
    found = problems(tmp_path, """\
        version: 1
        routes:
          - name: a
            fallback:
              targets:
                - cache: stale
                - static: {body_file: missing.json}
        """)
    assert found == [(6, 11, "a {cache: stale} target needs a cache on the route"),
                     (7, 31, "cannot read body_file 'missing.json': No such file or directory")]


def test_json_conditions_report_their_own_keys(tmp_path):
    found = problems(tmp_path, """\
        version: 1
        routes:
          - name: a
            fallback: {when: [{json: a}, {jsn: b, equals: 1}], targets: [{static: {}}]}
        """)
    assert found == [(4, 23, "routes[0].fallback.when[0]: missing required key 'equals'"),
                     (4, 34, "routes[0].fallback.when[1]: missing required key 'json'"),
                     (4, 35, "routes[0].fallback.when[1]: unknown key 'jsn' (did you mean 'json'?)")]


def test_upstream_url_checks(tmp_path):
    found = problems(tmp_path, """\
        version: 1
        upstreams:
          a: {url: "ftp://a"}
        """)
    assert found == [(3, 12, "upstreams.a.url: expected an http:// or https:// URL, got 'ftp://a'")]
    found = problems(tmp_path, """\
        version: 1
        upstreams:
          a: {url: "http://a:70000"}
          b: {url: "http://user:pw@b/?q=1"}
        """)
    assert [m for _, _, m in found] == ["invalid url 'http://a:70000': Port out of range 0-65535",
                                        "an upstream url has no query or fragment",
                                        "credentials go in the upstream's headers, not its url"]


def test_validate_files_lines(tmp_path):
    good = write(tmp_path, "version: 1\n", "good.yaml")
    bad = write(tmp_path, "version: 1\nroutes: [{name: a, tiemout: 1s}]\n", "bad.yaml")
    assert validate_files([good]) == []
    assert validate_files([good, bad]) == [f"{bad}:2:20: routes[0]: unknown key 'tiemout' (did you mean 'timeout'?)"]


# --- environment ---------------------------------------------------------------------------------

def test_env_expansion_defaults_and_literal_dollar(tmp_path):
    policy = load(tmp_path, """\
        version: 1
        upstreams:
          a:
            url: "https://${HOST}"
            headers: {authorization: "Bearer ${KEY}", x-opt: "${OPT:-none}", x-lit: "$${NOT_A_VAR}"}
        state_dir: ${STATE:-/tmp/state}
        """, env={"HOST": "api.example.com", "KEY": "s3cret-value"})
    up = policy.upstreams["a"]
    assert up.host == "api.example.com" and up.port == 443
    assert dict(up.headers) == {"authorization": "Bearer s3cret-value", "x-opt": "none", "x-lit": "${NOT_A_VAR}"}
    assert policy.state_dir == "/tmp/state"
    assert policy.secrets == ("api.example.com", "s3cret-value")     # from the environment, longest first


def test_undefined_variable_is_an_error_at_its_value(tmp_path):
    assert problems(tmp_path, """\
        version: 1
        upstreams:
          a: {url: "http://a", headers: {authorization: "Bearer ${API_KEY}"}}
        """) == [(3, 49, "environment variable API_KEY is not set (write ${API_KEY:-} for an optional value)")]
    assert problems(tmp_path, "version: 1\nstate_dir: ${oops\n") == [
        (2, 12, "invalid reference '${': expected ${NAME} or ${NAME:-default}")]


def test_a_whole_unquoted_reference_takes_its_values_type(tmp_path):
    policy = load(tmp_path, """\
        version: 1
        listeners:
          - name: e
            port: ${PORT:-15009}
        upstreams: {a: {url: "http://a", headers: {x-n: "${N}"}}}
        defaults:
          allow_internal: ${INTERNAL}
        """, env={"N": "42", "INTERNAL": "true"})
    assert policy.listeners[0].port == 15009
    assert policy.upstreams["a"].headers == (("x-n", "42"),)       # quoted: stays a string
    assert policy.defaults.allow_internal is True


def test_redaction_of_headers_and_secrets(tmp_path):
    policy = load(tmp_path, """\
        version: 1
        upstreams:
          llm: {url: "https://llm.example.com/${TENANT}", headers: {authorization: "Bearer ${KEY}"}}
        routes:
          - name: a
            upstream: llm
            fallback:
              targets: [{static: {body: "key is ${KEY}"}}]
        """, env={"KEY": "sk-abcdef", "TENANT": "acme-co"})
    text = json.dumps(policy.redacted)
    assert "sk-abcdef" not in text and "acme-co" not in text
    assert policy.redacted["upstreams"]["llm"]["headers"] == {"authorization": "<redacted>"}
    assert policy.redacted["upstreams"]["llm"]["url"] == "https://llm.example.com/<redacted>"
    assert policy.redacted["routes"][0]["fallback"]["targets"][0]["static"]["body"] == "key is <redacted>"
    assert policy.upstreams["llm"].headers == (("authorization", "Bearer sk-abcdef"),)   # the real value is kept


def test_secrets_do_not_leak_into_error_messages(tmp_path):
    [(_, _, message)] = problems(tmp_path, "version: 1\nupstreams: {a: {url: '${URL}'}}\n", env={"URL": "ftp://tok-42"})
    assert "tok-42" not in message and "<redacted>" in message


def test_non_finite_and_huge_numbers_are_rejected(tmp_path):
    assert problems(tmp_path, "version: 1\ndefaults: {timeout: .inf}\n") == [
        (2, 21, "inf is not allowed here: numbers must be finite")]
    [(line, col, message)] = problems(tmp_path, "version: 1\ndefaults: {concurrency: {max: 1" + "0" * 30 + "}}\n")
    assert (line, col) == (2, 31) and "too large" in message


# --- defaults, records and their defaults ---------------------------------------------------------

def test_defaults_merge_under_every_route_key_by_key(tmp_path):
    policy = load(tmp_path, """\
        version: 1
        defaults:
          timeout: 15s
          retry: {max_retries: 2, when: [reset, 503], backoff: {base: 50ms, max: 1s}}
          breaker: {consecutive_failures: 3}
        routes:
          - name: a
            retry: {max_retries: 5, when: [timeout], backoff: {max: 4s}}
          - name: b
            breaker: null
            timeout: 2s
        """)
    a, b = policy.routes
    assert a.timeout == 15 and a.retry.max_retries == 5
    assert a.retry.when.names == {"timeout"} and not a.retry.when.statuses       # lists are replaced
    assert (a.retry.backoff.base, a.retry.backoff.max) == (0.05, 4.0)             # mappings merge
    assert a.breaker.consecutive_failures == 3
    assert b.timeout == 2 and b.breaker is None and b.retry.max_retries == 2      # null switches off
    assert policy.defaults.name == "default" and policy.defaults.retry.max_retries == 2
    assert policy.defaults.line == 2 and (a.line, b.line) == (7, 9)


def test_unspecified_sub_keys_take_the_model_defaults(tmp_path):
    policy = load(tmp_path, """\
        version: 1
        routes:
          - name: a
            retry: {max_retries: 4}
            breaker: {}
            cache: {ttl: 10s, warm: [{path: /x}]}
            fallback: {targets: [{cache: stale}]}
            queue: {}
            rate_limit: {per_second: 2.5}
            fault: {header: {name: X-Fault}}
        """)
    r = policy.routes[0]
    assert r.retry == RetryPolicy(max_retries=4)
    assert r.breaker.consecutive_failures == 5 and r.breaker.half_open_requests == 1
    assert r.cache.warm[0].every == 10                      # a warm path defaults to the cache's ttl
    assert r.fallback.when.has("breaker-open") and r.fallback.when.matches_status(500)
    assert r.queue.when.names == {"breaker-open", "retries-exhausted"}
    assert r.rate_limit.burst == 2 and r.fault.header == ("x-fault", None)
    assert r.timeout == 15 and r.mode == "enforce" and r.upstream is None


def test_listener_and_endpoint_defaults(tmp_path):
    policy = load(tmp_path, "version: 1\n")
    assert [(l.name, l.mode, l.bind, l.port) for l in policy.listeners] == [("egress", "proxy", "127.0.0.1", 15001)]
    assert (policy.admin.bind, policy.admin.port) == ("127.0.0.1", 15000)
    assert (policy.health.bind, policy.health.port) == ("0.0.0.0", 15021)
    assert policy.state_dir == "/var/lib/sidecar" and policy.unmatched == "passthrough"
    assert policy.routes == () and policy.telemetry.service_name == "sidecar"
    policy = load(tmp_path, "version: 1\nlisteners: [{mode: transparent}, {mode: proxy}, {mode: proxy, port: 1}]\n")
    assert [(l.name, l.port) for l in policy.listeners] == [("transparent", 15006), ("proxy-15001", 15001),
                                                            ("proxy-1", 1)]


def test_upstream_fields_from_the_url(tmp_path):
    policy = load(tmp_path, """\
        version: 1
        upstreams:
          a: {url: "https://API.example.com/base/", tls: {ca_file: ca.pem, verify: false}}
          b: {url: "http://[::1]:8080", connect_timeout: 500ms, max_connections: 7}
        """)
    a, b = policy.upstreams["a"], policy.upstreams["b"]
    assert (a.scheme, a.host, a.port, a.base_path) == ("https", "api.example.com", 443, "/base")
    assert a.tls.ca_file == str(tmp_path / "ca.pem") and a.tls.verify is False
    assert (b.origin, b.connect_timeout, b.max_connections) == ("http://[::1]:8080", 0.5, 7)


def test_static_bodies(tmp_path):
    (tmp_path / "sorry.html").write_text("<p>sorry</p>")
    policy = load(tmp_path, """\
        version: 1
        routes:
          - name: a
            fallback:
              when: [503, {json: error.type, equals: overloaded}]
              targets:
                - static: {status: 503, json: {error: down, n: [1, 2]}}
                - static: {body_file: sorry.html, headers: {x-a: b}}
                - static: {body: hi, headers: {Content-Type: text/plain}}
        """)
    fb = policy.routes[0].fallback
    assert fb.when.statuses == {503} and fb.when.json == (JsonCondition(("error", "type"), "overloaded"),)
    one, two, three = (t.static for t in fb.targets)
    assert (one.status, one.body, one.content_type) == (503, b'{"error":"down","n":[1,2]}', "application/json")
    assert (two.body, two.content_type, two.headers) == (b"<p>sorry</p>", "text/html", (("x-a", "b"),))
    assert (three.body, three.content_type, three.headers) == (b"hi", "text/plain", ())


def test_digest_follows_the_bytes(tmp_path):
    one = load(tmp_path, "version: 1\n")
    two = load(tmp_path, "version: 1   # a comment changes the version\n")
    assert len(one.digest) == 12 and int(one.digest, 16) >= 0 and one.digest != two.digest


def test_relative_state_dir_is_beside_the_policy(tmp_path):
    assert load(tmp_path, "version: 1\nstate_dir: state\n").state_dir == str(tmp_path / "state")


@pytest.mark.parametrize("path", [SPEC_EXAMPLE, *sorted((REPO / "policies").glob("*.yaml"))], ids=lambda p: p.name)
def test_dumped_policy_loads_back_equal(tmp_path, path):
    policy = load_policy(str(path), env=SPEC_ENV)
    again = load(tmp_path, yaml.safe_dump(policy_data(policy, redact=False), sort_keys=False), env=SPEC_ENV)
    strip = lambda routes: [r.__class__(**{**{f: getattr(r, f) for f in r.__slots__}, "line": 0}) for r in routes]
    assert strip(again.routes) == strip(policy.routes)
    assert again.upstreams == policy.upstreams and again.listeners == policy.listeners
    assert strip([again.defaults]) == strip([policy.defaults])
    assert (again.telemetry, again.admin, again.health) == (policy.telemetry, policy.admin, policy.health)
