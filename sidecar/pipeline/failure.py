"""What went wrong with a route's primary, as the `when:` lists of `fallback` and `queue` see it.

A `Failure` is an outcome a layer or the transport raised, or an answer whose status, gRPC status or
JSON body matched a condition. The fallback layer (pipeline/fallback.py) and the store-and-forward
layer (pipeline/storeforward.py) both judge the primary's result with it, so a condition means the
same thing in either list.
"""
from __future__ import annotations

import json
from typing import NoReturn

from sidecar.exchange.types import Degraded, Exchange, Reply
from sidecar.grpc_rules import GrpcCode
from sidecar.pipeline.grpc import reply_code
from sidecar.pipeline.retry import retries_exhausted
from sidecar.policy.conditions import TRANSPORT_FAILURES, Conditions, Outcome
from sidecar.transport.errors import UpstreamFailure


class Failure:
    """What went wrong with the primary, as `when:` conditions see it: an `outcome` (a layer refused,
    the transport failed), or an answer (`reply`) whose status, gRPC status or JSON body matched a
    condition."""
    __slots__ = ("outcome", "status", "reason", "retry_after", "reply", "json", "grpc")

    def __init__(self, outcome: Outcome | None, status: int, reason: str, retry_after: float | None = None,
                 reply: Reply | None = None, json: bool = False, grpc: GrpcCode | None = None) -> None:
        self.outcome = outcome
        self.status = status
        self.reason = reason
        self.retry_after = retry_after
        self.reply = reply
        self.json = json                     # a body condition of `fallback.when` matched
        self.grpc = grpc                     # the answer's gRPC status, when a condition lists gRPC ones

    @classmethod
    def of(cls, exc: BaseException) -> "Failure":
        if isinstance(exc, Degraded):
            return cls(exc.outcome, exc.status, exc.reason, exc.retry_after)
        assert isinstance(exc, UpstreamFailure)
        return cls(exc.kind, TRANSPORT_FAILURES.get(exc.kind, 502), f"{exc.kind}: {exc.detail}")

    @property
    def label(self) -> str:
        """The failure's name for `x-sidecar-upstream` and the trace's error type."""
        return self.outcome.value if self.outcome is not None else str(self.status)

    def matches(self, when: Conditions, ex: Exchange) -> bool:
        if self.json:                        # a body condition of `when` already matched
            return bool(when.json)
        if self.outcome is not None and when.has(self.outcome):
            return True
        if when.has(Outcome.RETRIES_EXHAUSTED):
            if self.reply is not None and retries_exhausted(ex, self.reply):
                return True                  # a failed answer that no retry followed
            if ex.retries_exhausted or self.outcome in TRANSPORT_FAILURES:
                return True                  # a failed try that no retry followed
        return when.matches_answer(self.status, self.grpc) and self.outcome is not Outcome.RATE_LIMITED

    def replaced_by(self, answer: Reply) -> Reply:
        """Another answer (a fallback's, the queue's 202) takes the failed one's place: release it."""
        if self.reply is not None:
            self.reply.release()
        return answer

    def raise_(self) -> NoReturn:
        assert self.outcome is not None, "an answer is returned, not raised"
        raise Degraded(self.outcome, self.reason, status=self.status, retry_after=self.retry_after)


def _json_condition(when: Conditions, reply: Reply) -> bool:
    """`{json: "error.type", equals: ...}` on a buffered JSON body (APIs that answer errors with 200)."""
    if not when.json or reply.body is None:
        return False
    try:
        doc = json.loads(reply.body)
    except (ValueError, UnicodeDecodeError):
        return False
    for cond in when.json:
        node = doc
        for part in cond.path:
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None and node == cond.equals:
            return True
    return False


async def reply_failure(ex: Exchange, reply: Reply, when: Conditions) -> Failure | None:
    """The answer as a failure when it meets a condition of `when` (status, gRPC status, retries
    exhausted, or a JSON body condition on a small 2xx answer); None when it is an answer to pass on."""
    code = reply_code(reply) if when.grpc else None
    if when.matches_grpc(code):
        assert code is not None
        return Failure(None, reply.status, f"{code.condition} from {reply.upstream}", reply=reply, grpc=code)
    if reply.status >= 400 and when.matches_status(reply.status) \
            or (when.has(Outcome.RETRIES_EXHAUSTED) and retries_exhausted(ex, reply)):
        return Failure(None, reply.status, f"{reply.status} from {reply.upstream}", reply=reply, grpc=code)
    if when.json and reply.status < 300:
        await _buffer_small(ex, reply)
        if _json_condition(when, reply):
            return Failure(None, reply.status, f"error in the {reply.upstream} response body", reply=reply,
                           json=True)
    return None


async def _buffer_small(ex: Exchange, reply: Reply) -> None:
    """Read a body up to `retry.max_body` so a JSON condition can look at it (larger ones stream on)."""
    if reply.stream is None:
        return
    limit = ex.route.retry.max_body if ex.route.retry else 64 * 1024
    length = reply.headers.get("content-length")
    if length is None or not length.isdigit() or int(length) > limit:
        return
    parts = [chunk async for chunk in reply.stream]
    reply.body = b"".join(parts)
    reply.stream = None
