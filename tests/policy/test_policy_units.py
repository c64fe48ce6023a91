"""Durations and sizes: parsing, formatting back, and agreement with the schema's patterns."""
import json
import re
from pathlib import Path

import pytest
from hypothesis import assume, given, strategies as st

from sidecar.policy.units import format_duration, format_size, parse_duration, parse_size

SCHEMA = json.loads((Path(__file__).parents[2] / "schemas" / "policy.schema.json").read_text())
DURATION_RE = re.compile(SCHEMA["$defs"]["duration"]["anyOf"][1]["pattern"])
SIZE_RE = re.compile(SCHEMA["$defs"]["size"]["anyOf"][1]["pattern"])


@pytest.mark.parametrize("text, seconds", [("250ms", 0.25), ("10s", 10), ("5m", 300), ("1h", 3600),
                                           ("1d", 86400), ("1m30s", 90), ("1.5s", 1.5), ("0s", 0),
                                           (3, 3.0), (0.5, 0.5), ("12", 12.0)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["10 s", "-1s", "1x", "", "s", True, None, -1, float("inf"), float("nan"),
                                 "9" * 400 + "h", 10**400])
def test_bad_durations(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize("text, size", [("64KiB", 65536), ("1MiB", 1 << 20), ("2GiB", 2 << 30),
                                        ("10KB", 10_000), ("1MB", 10**6), ("1GB", 10**9), ("512", 512),
                                        (512, 512), ("512B", 512), ("1.5KiB", 1536), ("64 KiB", 65536)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["64kib", "1TB", "-1", "x", True, -5, 1.5, "9" * 400 + "GiB"])
def test_bad_sizes(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


@pytest.mark.parametrize("seconds, text", [(30, "30s"), (0.25, "250ms"), (300, "5m"), (3600, "1h"),
                                           (86400, "24h"), (90, "90s"), (1.5, "1500ms"), (0, "0s"),
                                           (0.0005, "0.5ms")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize("size, text", [(65536, "64KiB"), (1 << 20, "1MiB"), (10_000, "10KB"),
                                        (512, 512), (0, 0), (3 << 30, "3GiB")])
def test_format_size(size, text):
    assert format_size(size) == text


@given(st.integers(min_value=0, max_value=10**9))
def test_durations_round_trip_through_their_format(ms):
    text = format_duration(ms / 1000)
    assert DURATION_RE.fullmatch(text)
    assert parse_duration(text) == pytest.approx(ms / 1000)


@given(st.integers(min_value=0, max_value=2**40))
def test_sizes_round_trip_through_their_format(size):
    text = format_size(size)
    assert isinstance(text, int) or SIZE_RE.fullmatch(text)
    assert parse_size(text) == size


@given(st.from_regex(DURATION_RE, fullmatch=True))
def test_whatever_the_schema_admits_as_a_duration_parses(text):
    assume(len(text) < 300)                   # longer numbers overflow a float: a load error, tested above
    assert parse_duration(text) >= 0


@given(st.from_regex(SIZE_RE, fullmatch=True))
def test_whatever_the_schema_admits_as_a_size_parses(text):
    assume(len(text) < 300)
    assert parse_size(text) >= 0
