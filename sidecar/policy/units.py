"""Durations and sizes: parsed once when the policy loads, formatted back for `explain` and `/config`.

A duration is `250ms`, `10s`, `5m`, `1h`, `1d`, a sum of those (`1m30s`), or a plain number of seconds.
A size is a number of bytes, optionally with a unit: `KB`/`MB`/`GB` (powers of 1000) or
`KiB`/`MiB`/`GiB` (powers of 1024). The JSON schema admits the same spellings (kept in step by a test).
"""
from __future__ import annotations

import math
import re

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_DURATION = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?(?:ms|s|m|h|d))+|[0-9]+(?:\.[0-9]+)?")

_SIZE_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3,
               "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?) ?(B|KB|MB|GB|KiB|MiB|GiB)?")


def parse_duration(value: object) -> float:
    """Seconds, as a float. Raises ValueError for anything that is not a finite, non-negative duration."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, float):
        seconds = value
    elif isinstance(value, int):
        seconds = float(value) if abs(value) < 2**63 else math.inf
    elif isinstance(value, str) and _DURATION.fullmatch(value):
        if value[-1].isdigit():
            seconds = float(value)
        else:
            seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(value))
    else:
        raise ValueError(f"not a duration: {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"not a duration: {value!r}")
    return seconds


def parse_size(value: object) -> int:
    """Bytes, as an int (fractions round to the nearest byte). Raises ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        size = int(value)
    elif isinstance(value, str) and (m := _SIZE.fullmatch(value)):
        scaled = float(m.group(1)) * _SIZE_UNITS[m.group(2) or ""]
        if not math.isfinite(scaled):                  # 400 digits overflow a float
            raise ValueError(f"not a size: {value!r}")
        size = round(scaled)
    else:
        raise ValueError(f"not a size: {value!r}")
    if size < 0:
        raise ValueError(f"not a size: {value!r}")
    return size


def format_duration(seconds: float) -> str:
    """The shortest exact spelling in one unit: 30s, 250ms, 5m, 1h (never `d`: `24h` reads better)."""
    ms = round(float(seconds) * 1000, 6)
    if not ms.is_integer():
        return f"{ms:g}ms"
    ms = int(ms)
    if ms == 0:
        return "0s"
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def format_size(size: int) -> str | int:
    """`64KiB`, `1MiB`, `10MB`; a size that fits no unit stays a plain number of bytes."""
    if size == 0:
        return 0
    for unit in ("GiB", "MiB", "KiB", "GB", "MB", "KB"):
        if size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return size
