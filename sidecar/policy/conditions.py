"""The `when:` language of `retry`, `fallback` and `queue`: one vocabulary for the schema, the matchers
and the layers.

    Outcome      what went wrong with a try or a layer: a transport failure, or a layer that refused
    StatusClass  a range of answer statuses: 5xx, 4xx, gateway-error (502, 503, 504)
    int          one exact status (100-599)
    JsonCondition  a field of a JSON answer body (`{json: error.type, equals: overloaded_error}`)
    GrpcCode     a gRPC status of the answer (`grpc:unavailable`), from its head or trailers

A `when:` list is parsed once (`parse_when`) into `Conditions`, a frozen record of typed values; the
layers raise `Outcome` members and ask `Conditions` whether they match. The JSON schema's `outcome`
enum is the union of `Outcome` and `StatusClass` values (tests/policy checks they agree), so a name
that no layer raises cannot pass validation.

Adding a kind of condition (as gRPC statuses were): give it a small typed value here, a branch in
`parse_when`, a field in `Conditions` with its matcher, and a pattern in the schema's `whenItem`.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Iterable

from sidecar.grpc_rules import CONDITION_NAMES as GRPC_CONDITION_NAMES
from sidecar.grpc_rules import GrpcCode


class Outcome(StrEnum):
    """Why no good answer came. A `str` enum: its value is the `when:` name and the trace's error type."""
    CONNECT_FAILURE = "connect-failure"        # refused, unreachable, DNS, TLS handshake, connect timeout
    RESET = "reset"                            # the peer closed or reset before or while answering
    TIMEOUT = "timeout"                        # no answer within the try's (or the route's) time
    PROTOCOL_ERROR = "protocol-error"          # the peer answered something that is not HTTP
    BREAKER_OPEN = "breaker-open"              # the (route, upstream) breaker rejected the call
    UPSTREAM_UNHEALTHY = "upstream-unhealthy"  # the upstream fails its active health checks
    RETRIES_EXHAUSTED = "retries-exhausted"    # the last try failed and no retry followed it
    CONCURRENCY_FULL = "concurrency-full"      # the route's concurrency limit is reached
    RATE_LIMITED = "rate-limited"              # the route's token bucket is empty


# What the transport raises (`UpstreamFailure.kind`), and the status the app gets for it when nothing
# else answers.
TRANSPORT_FAILURES: dict[Outcome, int] = {
    Outcome.CONNECT_FAILURE: 503, Outcome.RESET: 503, Outcome.TIMEOUT: 504, Outcome.PROTOCOL_ERROR: 502,
}


class StatusClass(StrEnum):
    SERVER_ERROR = "5xx"
    CLIENT_ERROR = "4xx"
    GATEWAY_ERROR = "gateway-error"            # 502, 503, 504 (Envoy's `gateway-error`)

    def covers(self, status: int) -> bool:
        if self is StatusClass.SERVER_ERROR:
            return status >= 500
        if self is StatusClass.CLIENT_ERROR:
            return 400 <= status < 500
        return status in (502, 503, 504)


# Every name a `when:` list may hold (the schema's `outcome` enum).
CONDITION_NAMES = frozenset({*Outcome, *StatusClass})


@dataclass(frozen=True, slots=True)
class JsonCondition:
    """`{json: "error.type", equals: "overloaded_error"}`: a dotted path into a JSON response body."""
    path: tuple[str, ...]
    equals: object


@dataclass(frozen=True, slots=True)
class Conditions:
    """A parsed `when:` list."""
    outcomes: frozenset[Outcome] = frozenset()
    statuses: frozenset[int] = frozenset()
    classes: frozenset[StatusClass] = frozenset()
    json: tuple[JsonCondition, ...] = ()
    grpc: frozenset[GrpcCode] = frozenset()

    def has(self, outcome: Outcome) -> bool:
        """Is `outcome` listed? `breaker-open` also covers an unhealthy upstream: either way the upstream
        is out of rotation and rejected without a call (`upstream-unhealthy` names that case alone)."""
        if outcome in self.outcomes:
            return True
        return outcome is Outcome.UPSTREAM_UNHEALTHY and Outcome.BREAKER_OPEN in self.outcomes

    def matches_status(self, status: int) -> bool:
        if status in self.statuses:
            return True
        return any(cls.covers(status) for cls in self.classes)

    def matches_grpc(self, code: GrpcCode | None) -> bool:
        """Is this gRPC status (None: not a gRPC answer, or its status not known yet) listed?"""
        return code is not None and code in self.grpc

    def matches_answer(self, status: int, code: GrpcCode | None) -> bool:
        """An answer's HTTP status or, for a gRPC answer, its `grpc-status`."""
        return self.matches_status(status) or self.matches_grpc(code)

    @property
    def names(self) -> frozenset[str]:
        """The named conditions, as the policy file spells them."""
        return frozenset({*(c.value for c in (*self.outcomes, *self.classes)), *(c.condition for c in self.grpc)})


def parse_when(items: Iterable[object]) -> Conditions:
    """A `when:` list the schema accepted -> `Conditions`. Raises ValueError on an unknown name."""
    outcomes: set[Outcome] = set()
    classes: set[StatusClass] = set()
    statuses: set[int] = set()
    json: list[JsonCondition] = []
    grpc: set[GrpcCode] = set()
    for item in items:
        if isinstance(item, bool):
            raise ValueError(f"not a condition: {item!r}")
        if isinstance(item, (int, float)):
            statuses.add(int(item))
        elif isinstance(item, str):
            if item in GRPC_CONDITION_NAMES:
                grpc.add(GrpcCode.from_condition(item))
            elif item in StatusClass._value2member_map_:
                classes.add(StatusClass(item))
            else:
                outcomes.add(Outcome(item))
        elif isinstance(item, dict):
            json.append(JsonCondition(tuple(str(item["json"]).split(".")), item["equals"]))
        else:
            raise ValueError(f"not a condition: {item!r}")
    return Conditions(outcomes=frozenset(outcomes), statuses=frozenset(statuses),
                      classes=frozenset(classes), json=tuple(json), grpc=frozenset(grpc))
