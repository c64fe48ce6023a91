"""Policy file -> frozen `Policy`, or a `PolicyError` listing every problem with its FILE:LINE:COL.

The pipeline, each stage stopping the load if it found problems:
  1. read the bytes (the digest is taken from them)
  2. parse as YAML 1.2 with positions (`yaml12`)
  3. expand `${VAR}` / `${VAR:-default}` in string values; reject non-finite and absurd numbers
  4. validate against `policy.schema.json`, each error mapped to the line:col of its key or value
  5. cross-reference, merge `defaults` under each route and build the records (`build`)

`load_policy` raises PolicyError for every kind of bad input and nothing else (a property test feeds it
random documents to hold it to that).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from functools import cache
from pathlib import Path

import jsonschema

from sidecar.policy import yaml12
from sidecar.policy.build import build_policy
from sidecar.policy.dump import scrub
from sidecar.policy.errors import PolicyError, Problem, suggest
from sidecar.policy.model import Policy

__all__ = ["PolicyError", "Problem", "load_policy", "validate_files"]

SCHEMA_PATH = Path(__file__).with_name("policy.schema.json")
MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_INT = 2**63               # beyond any port, count or size; keeps float() conversions from overflowing

# `$${` is a literal `${`; `${NAME}` / `${NAME:-default}`; a lone `${` is an error.
_REF = re.compile(r"\$\$\{|\$\{(?P<body>[^{}]*)\}|\$\{")
_REF_BODY = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>.*))?", re.S)
_WHOLE_REF = re.compile(r"\$\{[^{}]*\}")


def load_policy(path: str, env: Mapping[str, str] | None = None) -> Policy:
    raw = _read(path)
    doc = _parse(path, raw)
    expander = _Expander(os.environ if env is None else env)
    doc.data = expander.expand(doc.data, ())
    try:
        _validate(doc, path, expander.problems)
        return build_policy(doc, path, digest=hashlib.sha256(raw).hexdigest()[:12], secrets=expander.secrets)
    except PolicyError as exc:
        if not expander.secrets:
            raise
        # Messages quote values ("got 'ftp://...'"), and a value may hold a secret: /status shows them.
        raise PolicyError([replace(p, message=scrub(p.message, expander.secrets))
                           for p in exc.problems]) from None


def validate_files(paths: Iterable[str]) -> list[str]:
    """`FILE:LINE:COL: message` for every problem in every file; empty when all are valid."""
    lines: list[str] = []
    for path in paths:
        try:
            load_policy(path)
        except PolicyError as exc:
            lines += [str(p) for p in exc.problems]
    return lines


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except (OSError, ValueError) as exc:           # ValueError: a NUL in the path
        reason = getattr(exc, "strerror", None) or exc
        raise PolicyError([Problem(path, 1, 1, f"cannot read the policy file: {reason}")]) from exc
    if len(raw) > MAX_FILE_BYTES:
        raise PolicyError([Problem(path, 1, 1, f"the policy file is larger than {MAX_FILE_BYTES} bytes")])
    return raw


def _parse(path: str, raw: bytes) -> yaml12.Document:
    try:
        doc = yaml12.parse(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise PolicyError([Problem(path, line, 1, "the file is not UTF-8 text")]) from exc
    except yaml12.YamlError as exc:
        raise PolicyError([Problem(path, line, col, msg) for msg, line, col in exc.problems]) from exc
    if not isinstance(doc.data, dict):
        raise PolicyError([Problem(path, *doc.value_pos(()),
                                   "the policy must be a mapping (version, listeners, upstreams, routes, ...)")])
    return doc


def _validate(doc: yaml12.Document, path: str, expansion: list[tuple[yaml12.Path, str]]) -> None:
    """Expansion and schema problems together; a value whose expansion failed gets no schema error too."""
    problems = [Problem(path, *doc.value_pos(p), msg) for p, msg in expansion]
    failed = [p for p, _ in expansion]
    problems += [pr for p, pr in _schema_problems(doc, path) if not any(p[:len(f)] == f for f in failed)]
    if problems:
        raise PolicyError(problems)


class _Expander:
    """`${VAR}` expansion over string values (never keys), remembering what came from the environment."""

    def __init__(self, env: Mapping[str, str]):
        self.env = env
        self.problems: list[tuple[yaml12.Path, str]] = []
        self.found: set[str] = set()

    @property
    def secrets(self) -> tuple[str, ...]:
        # Longest first, so redacting "abc123" happens before its substring "abc".
        return tuple(sorted(self.found, key=lambda s: (-len(s), s)))

    def expand(self, value: object, path: yaml12.Path) -> object:
        if isinstance(value, dict):
            return {k: self.expand(v, path + (k,)) for k, v in value.items()}
        if isinstance(value, list):
            return [self.expand(v, path + (i,)) for i, v in enumerate(value)]
        if isinstance(value, str):
            value = self.string(value, path)
        if isinstance(value, float) and not math.isfinite(value):
            self.problems.append((path, f"{value} is not allowed here: numbers must be finite"))
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) >= MAX_INT:
            self.problems.append((path, f"{value} is too large"))
        return value

    def string(self, text: str, path: yaml12.Path) -> object:
        if "${" not in text:
            return str(text)
        try:
            out = _REF.sub(self._replace, text)
        except ValueError as exc:
            self.problems.append((path, str(exc)))
            return text
        # An unquoted value that is exactly one reference takes its value's type: `port: ${PORT:-8080}`.
        if isinstance(text, yaml12.PlainRef) and _WHOLE_REF.fullmatch(text):
            return yaml12.scalar_from_text(out)
        return out

    def _replace(self, m: re.Match[str]) -> str:
        if m.group(0) == "$${":
            return "${"
        body = m.group("body")
        ref = _REF_BODY.fullmatch(body) if body is not None else None
        if ref is None:
            shown = m.group(0) if body is not None else "${"
            raise ValueError(f"invalid reference {shown!r}: expected ${{NAME}} or ${{NAME:-default}}")
        name, default = ref.group("name"), ref.group("default")
        value = self.env.get(name)
        if value:
            self.found.add(value)
            return value
        if default is not None:
            return default
        if value is not None:
            return value                      # set but empty, and no default: empty is what was asked for
        raise ValueError(f"environment variable {name} is not set (write ${{{name}:-}} for an optional value)")


# --- schema errors -> problems ---------------------------------------------------------------------

_JSON_TYPES = {"object": "a mapping", "array": "a list", "string": "a string", "integer": "an integer",
               "number": "a number", "boolean": "true or false", "null": "null"}


@cache
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))


def _schema_problems(doc: yaml12.Document, file: str) -> Iterator[tuple[yaml12.Path, Problem]]:
    for error in _validator().iter_errors(doc.data):
        for path, key, message in _explain(error):
            pos = doc.key_pos(path) if key else doc.value_pos(path)
            yield path, Problem(file, *pos, message)


def _explain(err: jsonschema.ValidationError) -> Iterator[tuple[yaml12.Path, bool, str]]:
    """(path, points at the key?, message) for one schema error."""
    path = tuple(err.absolute_path)
    where = _dotted(path)
    prefix = f"{where}: " if where else ""
    kind, schema = err.validator, err.schema if isinstance(err.schema, dict) else {}
    if "propertyNames" in err.relative_schema_path:
        yield path + (err.instance,), True, f"{prefix}invalid name {err.instance!r}: {_message(err, schema)}"
    elif kind == "additionalProperties" and err.validator_value is False:
        known = schema.get("properties", {})
        for key in err.instance:
            if key not in known:
                yield path + (key,), True, f"{prefix}unknown key '{key}'{suggest(key, known)}"
    elif kind == "required":
        for key in err.validator_value:
            if key not in err.instance:
                yield path, False, f"{prefix}missing required key '{key}'"
    elif kind == "anyOf" and isinstance(err.instance, dict):
        # A mapping where a scalar or a mapping was allowed: the mapping branch's errors say more.
        deeper = [e for e in err.context if e.validator not in ("type", "enum", "const", "pattern")]
        if "errorMessage" in schema and all(list(alt) == ["required"] for alt in schema.get("anyOf", [None])):
            yield path, False, f"{prefix}{schema['errorMessage']}"   # one of several keys is missing
        elif deeper:
            for e in deeper:
                yield from _explain(e)
        else:
            yield path, False, prefix + _message(err, schema)
    else:
        yield path, False, prefix + _message(err, schema)


def _message(err: jsonschema.ValidationError, schema: Mapping[str, object]) -> str:
    kind, value = err.validator, err.instance
    if "errorMessage" in schema and kind in ("anyOf", "oneOf", "not", "pattern", "const", "minProperties"):
        got = "" if isinstance(value, (dict, list)) else f", got {_describe(value)}"
        # A misspelt name among alternatives (`when: [grpc:unavailble]`): the alternatives' enums.
        names = [str(c) for e in err.context if e.validator == "enum" for c in e.validator_value]
        hint = suggest(value, names) if isinstance(value, str) and names else ""
        return f"{schema['errorMessage']}{got}{hint}"
    if kind == "type":
        types = err.validator_value if isinstance(err.validator_value, list) else [err.validator_value]
        return f"expected {' or '.join(_JSON_TYPES.get(t, str(t)) for t in types)}, got {_describe(value)}"
    if kind == "enum":
        choices = [str(c) for c in err.validator_value]
        hint = suggest(value, choices) if isinstance(value, str) else ""
        return f"expected one of {', '.join(choices)}, got {_describe(value)}{hint}"
    if kind == "const":
        return f"expected {err.validator_value!r}, got {_describe(value)}"
    return str(err.message)


def _describe(value: object) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _dotted(path: yaml12.Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
