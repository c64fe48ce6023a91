"""YAML 1.2 core-schema loading that remembers where every key and value was written.

PyYAML resolves plain scalars by YAML 1.1 rules, where `on`, `no` and `y` are booleans, `1:20` is the
integer 80 and `2024-01-01` a date: values that change type behind the operator's back. `Loader12` keeps
PyYAML's (pure Python) scanner and composer, which carry marks, and swaps the resolvers for the YAML 1.2
core schema (https://yaml.org/spec/1.2.2/#1032-tag-resolution). The node tree is then walked here rather
than by PyYAML's constructor so that duplicate keys are errors and every path gets its line:col.

    doc = parse(text)
    doc.data                        # plain dicts, lists, str, int, float, bool, None
    doc.value_pos(("routes", 0))    # (line, col), 1-based, of that value
    doc.key_pos(("routes", 0, "retyr"))

Mapping keys are always strings: the scalar's source text (`1: x` has key "1"), since a policy is
JSON-shaped. Merge keys (`<<`) are a YAML 1.1 feature and stay ordinary keys.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

Path = tuple[str | int, ...]  # mapping keys and list indices, from the document's root
Pos = tuple[int, int]

MAX_DEPTH = 64            # far deeper than any policy; bounds recursion in every later pass
MAX_NODES = 200_000       # bounds alias expansion ("billion laughs")

_T = "tag:yaml.org,2002:"
_NULL = re.compile(r"~|null|Null|NULL|")
_BOOL = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}
_INT = re.compile(r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+")
_FLOAT = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)")


class YamlError(Exception):
    """One or more problems, each `(message, line, col)` with 1-based positions."""

    def __init__(self, problems: list[tuple[str, int, int]]):
        super().__init__("; ".join(f"{line}:{col}: {msg}" for msg, line, col in problems))
        self.problems = problems


class PlainRef(str):
    """A plain (unquoted) scalar holding `${`: after expansion it may take the type of its value."""
    __slots__ = ()


class Loader12(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML ships no type hints: SafeLoader is Any
    """SafeLoader with the YAML 1.2 core schema's implicit resolvers and nothing else."""
    yaml_implicit_resolvers: dict[str | None, list[tuple[str, re.Pattern[str]]]] = {}




def _whole(pattern: re.Pattern[str]) -> re.Pattern[str]:
    # PyYAML's resolver calls .match(), which anchors only at the start.
    return re.compile(f"(?:{pattern.pattern})\\Z")


Loader12.add_implicit_resolver(_T + "null", _whole(_NULL), ["~", "n", "N", ""])
Loader12.add_implicit_resolver(_T + "bool", re.compile("(?:" + "|".join(_BOOL) + ")\\Z"), list("tTfF"))
Loader12.add_implicit_resolver(_T + "int", _whole(_INT), list("-+0123456789"))
Loader12.add_implicit_resolver(_T + "float", _whole(_FLOAT), list("-+.0123456789"))


def _pos(node: Node) -> Pos:
    return node.start_mark.line + 1, node.start_mark.column + 1


def scalar_from_text(text: str) -> object:
    """How YAML 1.2 core reads `text` as a plain scalar (used to type a whole-value `${VAR}`)."""
    if _NULL.fullmatch(text):
        return None
    if text in _BOOL:
        return _BOOL[text]
    if _INT.fullmatch(text):
        return _to_int(text)
    if _FLOAT.fullmatch(text):
        return _to_float(text)
    return text


def _to_int(text: str) -> int:
    if text.startswith("0o"):
        return int(text[2:], 8)
    if text.startswith("0x"):
        return int(text[2:], 16)
    return int(text, 10)


def _to_float(text: str) -> float:
    low = text.lower()
    if low.endswith(".inf"):
        return -math.inf if low.startswith("-") else math.inf
    if low == ".nan":
        return math.nan
    return float(text)


@dataclass
class Document:
    data: object
    values: dict[Path, Pos] = field(default_factory=dict)
    keys: dict[Path, Pos] = field(default_factory=dict)

    def value_pos(self, path: Path) -> Pos:
        """Where the value at `path` starts; the nearest enclosing value's position if unknown."""
        path = tuple(path)
        while path not in self.values and path:
            path = path[:-1]
        return self.values.get(path, (1, 1))

    def key_pos(self, path: Path) -> Pos:
        path = tuple(path)
        return self.keys.get(path) or self.value_pos(path)


class _Walker:
    """Node tree -> plain data, recording positions and collecting duplicate-key problems."""

    def __init__(self) -> None:
        self.doc = Document(None)
        self.problems: list[tuple[str, int, int]] = []
        self.count = 0

    def fail(self, node: Node, message: str) -> YamlError:
        return YamlError([(message, *_pos(node))])

    def walk(self, node: Node, path: Path) -> object:
        self.count += 1
        if self.count > MAX_NODES:
            raise self.fail(node, f"document too large (over {MAX_NODES} nodes once aliases expand)")
        if len(path) > MAX_DEPTH:
            raise self.fail(node, f"nested more than {MAX_DEPTH} levels deep")
        self.doc.values[path] = _pos(node)
        if isinstance(node, MappingNode):
            return self.mapping(node, path)
        if isinstance(node, SequenceNode):
            if node.tag != _T + "seq":
                raise self.fail(node, f"unsupported tag {node.tag!r}")
            return [self.walk(item, path + (i,)) for i, item in enumerate(node.value)]
        return self.scalar(node)

    def mapping(self, node: MappingNode, path: Path) -> dict[str, object]:
        if node.tag != _T + "map":
            raise self.fail(node, f"unsupported tag {node.tag!r}")
        result: dict[str, object] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                raise self.fail(key_node, "a mapping key must be a plain string, not a list or mapping")
            key = key_node.value
            if key in result:
                line, _ = self.doc.keys[path + (key,)]
                self.problems.append((f"duplicate key '{key}' (first at line {line})", *_pos(key_node)))
                continue
            self.doc.keys[path + (key,)] = _pos(key_node)
            result[key] = self.walk(value_node, path + (key,))
        return result

    def scalar(self, node: ScalarNode) -> object:
        tag, text = node.tag, node.value
        try:
            if tag == _T + "str":
                return PlainRef(text) if node.style is None and "${" in text else text
            if tag == _T + "null" and _NULL.fullmatch(text):
                return None
            if tag == _T + "bool" and text in _BOOL:
                return _BOOL[text]
            if tag == _T + "int":
                return _to_int(text)
            if tag == _T + "float":
                return _to_float(text)
        except ValueError:
            pass
        if tag in (_T + "null", _T + "bool", _T + "int", _T + "float"):
            raise self.fail(node, f"{text!r} is not a valid {tag[len(_T):]}")
        raise self.fail(node, f"unsupported tag {tag!r}")


def _syntax_problem(exc: yaml.YAMLError, text: str) -> tuple[str, int, int]:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        message = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem:
            message = f"{exc.problem} ({exc.context})"
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        return f"invalid YAML: {message}", line, col
    position = getattr(exc, "position", 0) or 0         # ReaderError: a character YAML forbids
    line = text.count("\n", 0, position) + 1
    col = position - (text.rfind("\n", 0, position) + 1) + 1
    return f"invalid YAML: {getattr(exc, 'reason', None) or exc}", line, col


def parse(text: str) -> Document:
    """One YAML document -> Document. Raises YamlError (with positions) for anything else."""
    try:
        loader = Loader12(text)           # the reader checks every character up front
        try:
            node = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise YamlError([_syntax_problem(exc, text)]) from exc
    except RecursionError as exc:
        raise YamlError([("invalid YAML: nested too deeply", 1, 1)]) from exc
    if node is None:
        return Document(None, {(): (1, 1)})
    walker = _Walker()
    walker.doc.data = walker.walk(node, ())
    if walker.problems:
        raise YamlError(walker.problems)
    return walker.doc
