"""The policy's LLM keys: `llm.prices` and `rate_limit.tokens_per_minute`, loaded, dumped, and refused
with FILE:LINE:COL when wrong."""
import textwrap

import pytest

from sidecar.policy.errors import PolicyError
from sidecar.policy.load import load_policy

BASE = """
version: 1
llm: {prices: {gpt-4o: {input_per_million: 2.5, output_per_million: 10}, "*": {input_per_million: 1, output_per_million: 2}}}
upstreams: {a: {url: "http://127.0.0.1:1"}}
routes:
  - {name: tokens-only, upstream: a, rate_limit: {tokens_per_minute: 1000}}
  - {name: both, upstream: a, rate_limit: {per_second: 5, tokens_per_minute: 2000}}
"""


def load(tmp_path, text):
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(text))
    return load_policy(str(path), env={})


def test_loads_and_dumps(tmp_path):
    policy = load(tmp_path, BASE)
    assert policy.llm.price("gpt-4o") == (2.5, 10.0) and policy.llm.price("*") == (1.0, 2.0)
    assert policy.llm.price("other") is None
    only, both = policy.routes
    assert (only.rate_limit.per_second, only.rate_limit.tokens_per_minute) == (None, 1000)
    assert (both.rate_limit.per_second, both.rate_limit.burst, both.rate_limit.tokens_per_minute) == (5.0, 5, 2000)
    assert policy.redacted["routes"][0]["rate_limit"] == {"tokens_per_minute": 1000}
    assert policy.redacted["llm"]["prices"]["gpt-4o"] == {"input_per_million": 2.5, "output_per_million": 10}


@pytest.mark.parametrize("limit, message", [
    ("{}", "routes[0].rate_limit: a rate limit needs per_second, tokens_per_minute or both"),
    ("{tokens_per_minut: 5}", "routes[0].rate_limit: unknown key 'tokens_per_minut' (did you mean 'tokens_per_minute'?)"),
    ("{tokens_per_minute: 0}", "routes[0].rate_limit.tokens_per_minute: 0 is less than the minimum of 1"),
])
def test_bad_limits_name_the_line(tmp_path, limit, message):
    text = f"""
    version: 1
    upstreams: {{a: {{url: "http://127.0.0.1:1"}}}}
    routes:
      - {{name: r, upstream: a, rate_limit: {limit}}}
    """
    with pytest.raises(PolicyError) as info:
        load(tmp_path, text)
    assert [(p.line, p.message) for p in info.value.problems] == [(5, message)]


def test_a_price_needs_both_figures(tmp_path):
    with pytest.raises(PolicyError) as info:
        load(tmp_path, """
        version: 1
        llm: {prices: {gpt-4o: {input_per_million: 2.5}}}
        """)
    assert [(p.line, p.message) for p in info.value.problems] == [
        (3, "llm.prices.gpt-4o: missing required key 'output_per_million'")]
