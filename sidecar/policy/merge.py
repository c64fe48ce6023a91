"""Plain-data helpers for the loader: the key-by-key merge of `defaults` under a route."""
from __future__ import annotations


def deep_merge(base: object, over: object) -> object:
    """`over` wins; mappings present on both sides merge recursively; lists and scalars are replaced.

    A `null` in `over` wins too, which is how a route switches off a feature its defaults turn on
    (`retry: null`), as in Helm's value merging.
    """
    if not (isinstance(base, dict) and isinstance(over, dict)):
        return over
    merged = dict(base)
    for key, value in over.items():
        merged[key] = deep_merge(base[key], value) if key in base else value
    return merged


def has_path(data: object, path: tuple[str | int, ...]) -> bool:
    """Whether `path` (mapping keys and list indices) leads to a value in `data`."""
    for part in path:
        if isinstance(data, dict) and isinstance(part, str) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        else:
            return False
    return True
