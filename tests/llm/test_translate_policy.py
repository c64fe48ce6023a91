"""`rewrite: {translate: ..., max_tokens: N}` in the policy: loaded, validated with line:col, dumped."""
import json

import pytest

from sidecar.llm.translate import TRANSLATIONS
from sidecar.policy.dump import policy_data
from sidecar.policy.errors import PolicyError
from sidecar.policy.load import SCHEMA_PATH, load_policy
from sidecar.policy.model import DEFAULT_MAX_TOKENS

POLICY = """\
version: 1
upstreams:
  openai: {url: "https://api.openai.com"}
  anthropic: {url: "https://api.anthropic.com", headers: {x-api-key: "${ANTHROPIC_API_KEY:-}"}}
routes:
  - name: chat
    match: {path: /v1/chat/completions}
    upstream: openai
    fallback:
      targets:
        - upstream: anthropic
          rewrite: REWRITE
"""


def load(tmp_path, rewrite: str):
    path = tmp_path / "p.yaml"
    path.write_text(POLICY.replace("REWRITE", rewrite))
    return load_policy(str(path), env={})


def problems(tmp_path, rewrite: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load(tmp_path, rewrite)
    return [f"{p.line}:{p.col}: {p.message}" for p in info.value.problems]


def test_translate_with_json_map_headers_and_max_tokens(tmp_path):
    policy = load(tmp_path, '{translate: openai-chat/anthropic-messages, max_tokens: 900, '
                            'json_map: {model: {"*": claude-sonnet-4-5}}, headers: {anthropic-beta: x}}')
    rewrite = policy.routes[0].fallback.targets[0].rewrite
    assert rewrite.translate == "openai-chat/anthropic-messages" and rewrite.max_tokens == 900
    assert rewrite.json_map[0].default == "claude-sonnet-4-5" and rewrite.set_headers == (("anthropic-beta", "x"),)
    dumped = policy_data(policy)["routes"][0]["fallback"]["targets"][0]["rewrite"]
    assert dumped["translate"] == "openai-chat/anthropic-messages" and dumped["max_tokens"] == 900


def test_max_tokens_defaults(tmp_path):
    rewrite = load(tmp_path, "{translate: anthropic-messages/openai-chat}").routes[0].fallback.targets[0].rewrite
    assert rewrite.max_tokens == DEFAULT_MAX_TOKENS == 4096


def test_a_misspelt_translation_gets_a_did_you_mean_at_its_line(tmp_path):
    assert problems(tmp_path, "{translate: openai-chat/anthropic}") == [
        "12:32: routes[0].fallback.targets[0].rewrite.translate: expected one of openai-chat/anthropic-messages, "
        "anthropic-messages/openai-chat, got 'openai-chat/anthropic' (did you mean 'openai-chat/anthropic-messages'?)"]
    assert problems(tmp_path, "{translte: openai-chat/anthropic-messages}")[0].endswith(
        "unknown key 'translte' (did you mean 'translate'?)")


def test_max_tokens_needs_a_translation_and_a_positive_integer(tmp_path):
    assert "'translate' is a dependency of 'max_tokens'" in problems(tmp_path, "{max_tokens: 10}")[0]
    assert "less than the minimum of 1" in problems(tmp_path, "{translate: anthropic-messages/openai-chat, "
                                                              "max_tokens: 0}")[0]


def test_the_schema_names_exactly_the_translations_there_are():
    schema = json.loads(SCHEMA_PATH.read_text())
    assert schema["$defs"]["rewrite"]["properties"]["translate"]["enum"] == list(TRANSLATIONS)


def test_the_shipped_llm_policy_falls_back_from_openai_to_anthropic():
    from pathlib import Path
    policy = load_policy(str(Path(__file__).parents[2] / "policies" / "llm-backup.yaml"), env={})
    chat = next(r for r in policy.routes if r.name == "chat")
    translated = [t for t in chat.fallback.targets if t.rewrite is not None and t.rewrite.translate]
    assert translated and translated[0].rewrite.translate == "openai-chat/anthropic-messages"
    assert dict(policy.upstreams[translated[0].upstream].headers).keys() >= {"x-api-key", "anthropic-version"}
