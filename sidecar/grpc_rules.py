"""gRPC over HTTP/2, the parts policy needs (pure: no I/O). grpc/grpc `doc/PROTOCOL-HTTP2.md` and
`doc/statuscodes.md` are the sources.

    GrpcCode        the 17 status codes; `condition` is the `when:` name (`grpc:unavailable`)
    parse_timeout   `grpc-timeout` (1-8 digits and a unit) -> seconds
    format_timeout  seconds -> `grpc-timeout`, the remaining deadline sent upstream
    for_outcome     the status a gRPC client gets when the sidecar itself refuses or gives up
"""
from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from enum import IntEnum


class GrpcCode(IntEnum):
    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16

    @property
    def condition(self) -> str:
        """`grpc:resource-exhausted`: the code's name as a `when:` condition."""
        return "grpc:" + self.name.lower().replace("_", "-")

    @classmethod
    def from_condition(cls, name: str) -> "GrpcCode":
        if not name.startswith("grpc:"):
            raise ValueError(f"not a gRPC condition: {name!r}")
        return cls[name[5:].upper().replace("-", "_")]


# Every gRPC `when:` name. OK is none: a success is never a failure to retry or fall back on.
CONDITION_NAMES = frozenset(code.condition for code in GrpcCode if code is not GrpcCode.OK)

# Codes that say the server (not the request) failed: the breaker counts them as failures, as it counts
# a 5xx. The others (INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED...) are the caller's, like a 4xx.
SERVER_FAULTS = frozenset({GrpcCode.UNKNOWN, GrpcCode.DEADLINE_EXCEEDED, GrpcCode.INTERNAL,
                           GrpcCode.UNAVAILABLE, GrpcCode.DATA_LOSS})


def is_grpc(content_type: str | None) -> bool:
    return content_type is not None and (content_type == "application/grpc"
                                         or content_type.startswith(("application/grpc+", "application/grpc;")))


def parse_status(value: str | None) -> GrpcCode | None:
    """A `grpc-status` value; an unknown number is UNKNOWN (statuscodes.md), garbage is None."""
    if value is None or not value.strip().isdigit():
        return None
    try:
        return GrpcCode(int(value))
    except ValueError:
        return GrpcCode.UNKNOWN


def answer_status(headers: Mapping[str, str], trailers: Mapping[str, str] | None) -> GrpcCode | None:
    """The gRPC status of an answer (`headers`, `trailers`: mappings; trailers None until the body
    ended), if known yet: from a trailers-only head, or from the trailers. None for a non-gRPC answer."""
    if not is_grpc(headers.get("content-type")):
        return None
    code = parse_status(headers.get("grpc-status"))
    if code is None and trailers is not None:
        code = parse_status(trailers.get("grpc-status"))
    return code


_TIMEOUT = re.compile(r"([0-9]{1,8})([HMSmun])")
_UNIT = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def parse_timeout(value: str | None) -> float | None:
    """`grpc-timeout: 100m` -> 0.1 (seconds); None when absent or not the protocol's syntax."""
    if value is None:
        return None
    match = _TIMEOUT.fullmatch(value.strip())
    if match is None:
        return None
    return int(match.group(1)) * _UNIT[match.group(2)]


def format_timeout(seconds: float) -> str:
    """The finest unit that fits 8 digits, rounded down (never promise the upstream more time than is
    left), at least 1 µs."""
    for unit, scale in (("u", 1e6), ("m", 1e3), ("S", 1.0), ("M", 1 / 60), ("H", 1 / 3600)):
        amount = int(seconds * scale)
        if amount < 100_000_000:
            return f"{max(amount, 1)}{unit}"
    return "99999999H"


def encode_message(message: str) -> str:
    """`grpc-message` is percent-encoded UTF-8 (PROTOCOL-HTTP2.md: Status-Message)."""
    return urllib.parse.quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")


# The status a gRPC client gets when the sidecar answers itself, by `when:` outcome name; else by
# the HTTP status it would have sent, as grpc's doc/http-grpc-status-mapping.md maps it.
_BY_OUTCOME = {
    "rate-limited": GrpcCode.RESOURCE_EXHAUSTED, "concurrency-full": GrpcCode.RESOURCE_EXHAUSTED,
    "breaker-open": GrpcCode.UNAVAILABLE, "upstream-unhealthy": GrpcCode.UNAVAILABLE,
    "connect-failure": GrpcCode.UNAVAILABLE, "reset": GrpcCode.UNAVAILABLE,
    "timeout": GrpcCode.DEADLINE_EXCEEDED, "protocol-error": GrpcCode.INTERNAL,
}
_BY_STATUS = {400: GrpcCode.INTERNAL, 401: GrpcCode.UNAUTHENTICATED, 403: GrpcCode.PERMISSION_DENIED,
              404: GrpcCode.UNIMPLEMENTED, 429: GrpcCode.UNAVAILABLE, 502: GrpcCode.UNAVAILABLE,
              503: GrpcCode.UNAVAILABLE, 504: GrpcCode.UNAVAILABLE}


def for_outcome(outcome: str | None, http_status: int) -> GrpcCode:
    if http_status == 504:
        return GrpcCode.DEADLINE_EXCEEDED        # the route's (or the client's grpc-timeout) time ran out
    if outcome is not None and str(outcome) in _BY_OUTCOME:
        return _BY_OUTCOME[str(outcome)]
    return _BY_STATUS.get(http_status, GrpcCode.UNKNOWN)
