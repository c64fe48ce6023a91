"""YAML 1.2 scalars and positions: the traps YAML 1.1 sets for operators."""
import math

import pytest

from sidecar.policy.yaml12 import MAX_DEPTH, PlainRef, YamlError, parse, scalar_from_text


@pytest.mark.parametrize("text", ["on", "off", "yes", "no", "y", "n", "Yes", "NO", "On"])
def test_yaml11_booleans_stay_strings(text):
    assert parse(f"a: {text}\n").data == {"a": text}


@pytest.mark.parametrize("text, value", [("true", True), ("True", True), ("TRUE", True),
                                         ("false", False), ("False", False), ("FALSE", False)])
def test_only_true_and_false_are_booleans(text, value):
    assert parse(f"a: {text}\n").data["a"] is value


@pytest.mark.parametrize("text", ["1:20", "190:20:30", "2024-01-01", "2001-12-14t21:59:43.10-05:00",
                                  "1_000", "0b101", "+.5e", "1.2.3", "0x", "<<"])
def test_no_sexagesimal_timestamps_or_yaml11_numbers(text):
    assert parse(f"a: {text}\n").data == {"a": text}


@pytest.mark.parametrize("text, value", [("10", 10), ("-3", -3), ("+7", 7), ("010", 10), ("0x1F", 31),
                                         ("0o17", 15), ("1.5", 1.5), ("1e3", 1000.0), (".5", 0.5)])
def test_core_schema_numbers(text, value):
    parsed = parse(f"a: {text}\n").data["a"]
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize("text", ["~", "null", "Null", "NULL", ""])
def test_nulls(text):
    assert parse(f"a: {text}\n").data == {"a": None}


def test_special_floats():
    data = parse("a: .inf\nb: -.Inf\nc: .nan\n").data
    assert data["a"] == math.inf and data["b"] == -math.inf and math.isnan(data["c"])


def test_quoted_values_are_strings():
    assert parse("a: '10'\nb: \"true\"\nc: !!str 5\n").data == {"a": "10", "b": "true", "c": "5"}


def test_keys_are_source_text():
    assert parse("1: a\ntrue: b\non: c\n").data == {"1": "a", "true": "b", "on": "c"}


def test_duplicate_keys_are_errors_with_line_and_col():
    with pytest.raises(YamlError) as info:
        parse("routes:\n  - name: a\n    retry: {}\n    retry: {}\n")
    assert info.value.problems == [("duplicate key 'retry' (first at line 3)", 4, 5)]


def test_every_duplicate_is_reported():
    with pytest.raises(YamlError) as info:
        parse("a: 1\na: 2\nb: {c: 1, c: 2}\n")
    assert [(line, col) for _, line, col in info.value.problems] == [(2, 1), (3, 11)]


def test_positions_of_keys_and_values():
    doc = parse("version: 1\nroutes:\n  - name: chat\n    match: {path: /v1}\n")
    assert doc.key_pos(("routes", 0, "match")) == (4, 5)
    assert doc.value_pos(("routes", 0, "match", "path")) == (4, 19)
    assert doc.value_pos(("routes", 0)) == (3, 5)
    assert doc.value_pos(("routes", 0, "nope", "deeper")) == (3, 5)   # nearest known ancestor


def test_syntax_error_carries_the_mark():
    with pytest.raises(YamlError) as info:
        parse("a: 1\nb: [1, 2\nc: 3\n")
    message, line, col = info.value.problems[0]
    assert message.startswith("invalid YAML:") and line == 3


def test_forbidden_character_has_a_position():
    with pytest.raises(YamlError) as info:
        parse("a: 1\nb: \x07\n")
    assert info.value.problems[0][1:] == (2, 4)


def test_several_documents_are_an_error():
    with pytest.raises(YamlError):
        parse("a: 1\n---\nb: 2\n")


def test_unsupported_tags_are_errors():
    with pytest.raises(YamlError, match="unsupported tag"):
        parse("a: !!python/name:os.system x\n")
    with pytest.raises(YamlError, match="not a valid int"):
        parse("a: !!int ten\n")


def test_empty_document_is_none():
    assert parse("").data is None
    assert parse("# only a comment\n").data is None


def test_complex_keys_are_errors():
    with pytest.raises(YamlError, match="mapping key"):
        parse("? [a, b]\n: c\n")


def test_alias_bomb_is_bounded():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}]"
              for i in range(1, 9)]
    with pytest.raises(YamlError, match="too large"):
        parse("\n".join(lines) + "\n")


def test_deep_nesting_is_an_error_not_a_crash():
    with pytest.raises(YamlError):
        parse("[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5))
    with pytest.raises(YamlError):
        parse("[" * 5000 + "]" * 5000)


def test_recursive_alias_is_an_error():
    with pytest.raises(YamlError):
        parse("a: &x [*x]\n")


def test_plain_references_are_marked_for_typing():
    data = parse("a: ${PORT}\nb: '${PORT}'\n").data
    assert isinstance(data["a"], PlainRef) and not isinstance(data["b"], PlainRef)


def test_scalar_from_text_uses_core_rules():
    assert [scalar_from_text(t) for t in ("8080", "true", "on", "", "1.5", "0x10")] == \
        [8080, True, "on", None, 1.5, 16]
