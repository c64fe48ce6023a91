"""sidecar/grpc_rules.py: gRPC status names, grpc-timeout both ways, the sidecar's own refusals as statuses."""
import pytest

from sidecar.grpc_rules import (CONDITION_NAMES, GrpcCode, encode_message, for_outcome, format_timeout, is_grpc,
                               parse_status, parse_timeout)


def test_condition_names_round_trip():
    assert GrpcCode.RESOURCE_EXHAUSTED.condition == "grpc:resource-exhausted"
    assert len(CONDITION_NAMES) == 16 and "grpc:ok" not in CONDITION_NAMES   # a success is no condition
    for code in GrpcCode:
        assert GrpcCode.from_condition(code.condition) is code
    with pytest.raises(KeyError):
        GrpcCode.from_condition("grpc:unavailabel")


@pytest.mark.parametrize("value,seconds", [("100m", 0.1), ("1S", 1.0), ("2M", 120.0), ("1H", 3600.0),
                                           ("250u", 250e-6), ("99999999n", 0.099999999)])
def test_parse_timeout(value, seconds):
    assert parse_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [None, "", "100", "123456789m", "1.5S", "-1S", "10s", "10 m"])
def test_parse_timeout_refuses_what_is_not_the_syntax(value):
    assert parse_timeout(value) is None


def test_format_timeout_never_promises_more_than_is_left():
    for seconds in (0.0000004, 0.0999, 1.2345, 99.9999999, 150.0, 86_400.0 * 2, 1e9):
        text = format_timeout(seconds)
        assert parse_timeout(text) is not None and len(text) <= 9
        assert parse_timeout(text) <= max(seconds, 1e-6)
    assert format_timeout(0.1) == "100000u"


def test_status_and_content_type():
    assert parse_status("14") is GrpcCode.UNAVAILABLE
    assert parse_status("99") is GrpcCode.UNKNOWN          # statuscodes.md: unknown numbers are UNKNOWN
    assert parse_status("x") is None and parse_status(None) is None
    assert is_grpc("application/grpc") and is_grpc("application/grpc+proto")
    assert not is_grpc("application/grpc-web") and not is_grpc("application/json") and not is_grpc(None)


def test_refusals_map_to_grpc_codes():
    assert for_outcome("rate-limited", 429) is GrpcCode.RESOURCE_EXHAUSTED
    assert for_outcome("concurrency-full", 503) is GrpcCode.RESOURCE_EXHAUSTED
    assert for_outcome("breaker-open", 503) is GrpcCode.UNAVAILABLE
    assert for_outcome("timeout", 504) is GrpcCode.DEADLINE_EXCEEDED
    assert for_outcome(None, 403) is GrpcCode.PERMISSION_DENIED
    assert for_outcome(None, 418) is GrpcCode.UNKNOWN
    assert encode_message("50% done\n") == "50%25 done%0A"
