"""Property: whatever the file holds, `load_policy` returns a Policy or raises PolicyError, nothing else.

Three sources of input: random YAML documents (nested mappings, lists and scalars drawn from the
policy's own vocabulary, so they get past the first checks), mutations of the SPEC's valid example (so
they reach the cross-reference checks and the record builders), and raw text.
"""
import json
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from sidecar.policy.dump import policy_data
from sidecar.policy.errors import PolicyError
from sidecar.policy.load import SCHEMA_PATH, load_policy
from sidecar.policy.match import Router
from sidecar.policy.model import Policy
from sidecar.policy.yaml12 import parse

HERE = Path(__file__).parent
BASE = parse((HERE / "spec-example.yaml").read_text()).data
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _schema_keys(node, out):
    if isinstance(node, dict):
        out.update(node.get("properties", {}))
        for value in node.values():
            _schema_keys(value, out)
    elif isinstance(node, list):
        for value in node:
            _schema_keys(value, out)
    return out


KEYS = sorted(_schema_keys(json.loads(SCHEMA_PATH.read_text()), set()) | {"*", "<<", "", "openai", "gpt-4o"})
WORDS = ["250ms", "10s", "5m", "1h", "1m30s", "0s", "10 s", "64KiB", "1MiB", "512", "1 TB", "openai", "backup-llm",
         "stale", "memory", "redis://r:6379/0", "proxy", "reverse", "transparent", "enforce", "shadow", "deny",
         "passthrough", "/v1/", "/", "(", "[z-a]", "*.example.com", "*", "${X}", "${X:-1}", "${UNSET}", "$${", "${",
         "POST", "get", "header:x-a", "5xx", "timeout", "connect-failure", "http://x", "https://y:0/base",
         "http://[::1", "http://u:p@h/?q", "body.json", "../../etc/passwd", "/dev/null", "on", "yes", "1:20",
         "grpc", "http/protobuf", "0.0.0.0", "a.b", ".", "9" * 400 + "h"]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.sampled_from(WORDS),
    st.sampled_from([0, 1, 2, -1, 100, 200, 429, 503, 599, 600, 15001, 65535, 65536, 0.5, 1.5, 1e308]))
VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), children, max_size=5),
    max_leaves=25)
ENVS = st.dictionaries(st.sampled_from(["X", "BACKUP_LLM_KEY", "UNSET"]),
                       st.sampled_from(["", "1", "on", "s3cr3t", "${X}"]))


def _check(text: str | bytes, env: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "policy.yaml"
        (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
        try:
            policy = load_policy(str(path), env=env)
        except PolicyError as exc:
            assert exc.problems
            for problem in exc.problems:
                assert problem.line >= 1 and problem.col >= 1 and problem.message
            return
    assert isinstance(policy, Policy)
    json.dumps(policy.redacted)                               # /config can always serve it
    yaml.safe_dump(policy_data(policy, redact=False))
    Router(policy).match("GET", "api.openai.com", "/v1/chat/completions", {"x-tenant": "a"})


def _paths(data, prefix=()):
    yield prefix
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _paths(value, prefix + (i,))


PATHS = list(_paths(BASE))[1:]


def _mutate(data, path, op, value, key):
    *parents, last = path
    node = data
    for part in parents:
        node = node[part]
    if op == "replace":
        node[last] = value
    elif op == "delete":
        del node[last]
    elif op == "add" and isinstance(node[last], dict):
        node[last][key] = value
    elif op == "add" and isinstance(node[last], list):
        node[last].append(value)
    elif op == "empty":
        node[last] = type(node[last])() if isinstance(node[last], (dict, list)) else None


MUTATIONS = st.lists(st.tuples(st.sampled_from(PATHS), st.sampled_from(["replace", "delete", "add", "empty"]),
                               VALUES, st.sampled_from(KEYS)), min_size=1, max_size=3)


@SETTINGS
@given(VALUES, ENVS)
def test_random_documents(document, env):
    _check(yaml.safe_dump(document), env)


@SETTINGS
@given(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=8), ENVS)
def test_random_top_level_mappings(document, env):
    _check(yaml.safe_dump({"version": 1, **document}), env)


@SETTINGS
@given(MUTATIONS, ENVS)
def test_mutations_of_a_valid_policy(mutations, env):
    data = json.loads(json.dumps(BASE))
    for path, op, value, key in mutations:
        try:
            _mutate(data, path, op, value, key)
        except (KeyError, IndexError, TypeError):
            pass                                              # an earlier mutation removed the path
    _check(yaml.safe_dump(data), env)


@SETTINGS
@given(st.text(max_size=200) | st.binary(max_size=200), ENVS)
def test_raw_text(text, env):
    _check(text, env)


@pytest.mark.parametrize("text", ["{", "a: b: c", "\t- x", "version: 1\nroutes: [{name: a, match: {path_regex: '(' }}]",
                                  "version: !!binary aGk=", "version: 1\n...\n---\n", "\ufeffversion: 1"])
def test_awkward_inputs(text):
    _check(text, {})
