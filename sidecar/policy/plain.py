"""The policy document's plain data, narrowed to the types the schema admitted where the builder reads it.

`yaml12` gives dicts (string keys), lists and scalars; `load` validates them against
`policy.schema.json` before `build` reads a single value, so a value's shape at a given key is known.
These helpers say which shape, so the builder is type-checked without trusting `Any`. A value of
another type means the schema and the builder disagree (a bug, not a bad policy): TypeError.
"""
from __future__ import annotations

Doc = dict[str, object]   # one mapping of the policy document


def mapping(value: object) -> Doc:
    if not isinstance(value, dict):
        raise TypeError(f"expected a mapping, got {value!r}")
    return value


def items(value: object) -> list[object]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {value!r}")
    return value


def text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def optional_text(value: object) -> str | None:
    return None if value is None else text(value)


def number(value: object) -> int | float:
    """An `integer` or `number` of the schema (which admits 3.0 as an integer)."""
    if not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {value!r}")
    return value


def optional_flag(value: object) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {value!r}")
    return value
