"""`grpc:<code-name>` conditions in `retry.when`, `fallback.when` and `queue.when`: parsed, dumped back,
and a misspelt or unknown one refused at its line with a did-you-mean."""
import json
import subprocess
import sys
import textwrap

import pytest
import yaml

from sidecar.grpc_rules import CONDITION_NAMES, GrpcCode
from sidecar.policy.conditions import parse_when
from sidecar.policy.dump import conditions_data, policy_data
from sidecar.policy.errors import PolicyError
from sidecar.policy.load import SCHEMA_PATH, load_policy

POLICY = """\
version: 1
upstreams:
  svc: {url: "http://127.0.0.1:9", protocol: h2c}
routes:
  - name: rpc
    upstream: svc
    match: {path_prefix: /test.Echo/}
    retry: {when: [connect-failure, grpc:unavailable, 503]}
    fallback:
      when: [breaker-open, grpc:resource-exhausted, {json: error.type, equals: busy}]
      targets: [{static: {grpc_status: 14, message: busy}}]
    queue: {when: [grpc:deadline-exceeded]}
"""


def write(tmp_path, text):
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_the_schema_lists_every_grpc_condition_but_ok():
    schema = json.loads(SCHEMA_PATH.read_text())
    assert set(schema["$defs"]["grpcCondition"]["enum"]) == CONDITION_NAMES
    assert "grpc:ok" not in CONDITION_NAMES and len(CONDITION_NAMES) == len(GrpcCode) - 1


def test_grpc_conditions_are_typed_and_matched_apart_from_http_statuses():
    when = parse_when(["grpc:unavailable", "grpc:resource-exhausted", 503, "timeout"])
    assert when.grpc == {GrpcCode.UNAVAILABLE, GrpcCode.RESOURCE_EXHAUSTED}
    assert when.matches_grpc(GrpcCode.UNAVAILABLE) and not when.matches_grpc(GrpcCode.INVALID_ARGUMENT)
    assert not when.matches_grpc(None)                   # not a gRPC answer, or no status yet
    assert when.matches_answer(200, GrpcCode.RESOURCE_EXHAUSTED) and when.matches_answer(503, None)
    assert not when.matches_answer(200, GrpcCode.OK) and not when.matches_status(14)
    assert conditions_data(when) == ["grpc:resource-exhausted", "grpc:unavailable", "timeout", 503]
    with pytest.raises(ValueError):
        parse_when(["grpc:ok"])


def test_grpc_conditions_load_and_dump_back_equal(tmp_path):
    policy = load_policy(write(tmp_path, POLICY), env={})
    [route] = policy.routes
    assert route.retry.when.grpc == {GrpcCode.UNAVAILABLE}
    assert route.fallback.when.grpc == {GrpcCode.RESOURCE_EXHAUSTED} and route.fallback.when.json
    assert route.queue.when.grpc == {GrpcCode.DEADLINE_EXCEEDED}
    data = policy_data(policy, redact=False)
    again = load_policy(write(tmp_path, yaml.safe_dump(data, sort_keys=False)), env={})
    assert (again.routes[0].retry, again.routes[0].fallback, again.routes[0].queue) == \
        (route.retry, route.fallback, route.queue)


def test_unknown_grpc_names_are_refused_where_written_with_a_did_you_mean(tmp_path):
    path = write(tmp_path, """\
        version: 1
        routes:
          - name: rpc
            retry: {when: [grpc:unavailble, grpc:ok]}
            fallback: {when: [grpc:resource_exhausted], targets: [{static: {grpc_status: 14}}]}
            queue: {when: [grpcunavailable]}
        """)
    with pytest.raises(PolicyError) as info:
        load_policy(path, env={})
    found = [(p.line, p.col, p.message.split(": ")[0], p.message.rsplit(", got ", 1)[1])
             for p in info.value.problems]
    assert found == [
        (4, 20, "routes[0].retry.when[0]", "'grpc:unavailble' (did you mean 'grpc:unavailable'?)"),
        (4, 37, "routes[0].retry.when[1]", "'grpc:ok' (did you mean 'grpc:unknown'?)"),   # OK is no failure
        (5, 23, "routes[0].fallback.when[0]", "'grpc:resource_exhausted' (did you mean 'grpc:resource-exhausted'?)"),
        (6, 20, "routes[0].queue.when[0]", "'grpcunavailable' (did you mean 'grpc:unavailable'?)"),
    ]
    assert "a gRPC status (grpc:unavailable" in info.value.problems[0].message


def test_validate_and_explain_accept_them(tmp_path):
    path = write(tmp_path, POLICY)
    run = lambda *args: subprocess.run([sys.executable, "-m", "sidecar", *args], capture_output=True, text=True,
                                       timeout=60)
    assert run("validate", path).returncode == 0
    shown = run("explain", "-c", path, "POST", "http://x/test.Echo/Unary")
    assert shown.returncode == 0, shown.stderr
    route = yaml.safe_load(shown.stdout)["policy"]
    assert route["retry"]["when"] == ["connect-failure", "grpc:unavailable", 503]
    assert route["fallback"]["when"][:2] == ["breaker-open", "grpc:resource-exhausted"]
    assert route["queue"]["when"] == ["grpc:deadline-exceeded"]
