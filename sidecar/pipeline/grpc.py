"""gRPC answers and outcomes, in the pipeline's terms (Reply). The pure rules are in grpc_rules.py.

A gRPC call's outcome is its `grpc-status`: in the response head when the answer is trailers-only (an
error with no messages), else in the trailers. Until the trailers arrive, a call whose head said
200 has no verdict yet; layers that judge a reply before its body (retry, fallback) see the status
only when it came with the head or the whole answer came at once (a small unary answer).
"""
from __future__ import annotations

import json
from collections.abc import Mapping

from multidict import CIMultiDict

from sidecar.grpc_rules import GrpcCode, answer_status, encode_message, for_outcome, is_grpc
from sidecar.exchange.types import Reply


def is_grpc_request(headers: Mapping[str, str]) -> bool:
    return is_grpc(headers.get("content-type"))


def error_reply(code: GrpcCode | int, message: str, upstream: str = "sidecar") -> Reply:
    """A trailers-only gRPC answer: HTTP 200, the status in the head, no body (PROTOCOL-HTTP2.md)."""
    headers = CIMultiDict({"content-type": "application/grpc", "grpc-status": str(int(code))})
    if message:
        headers["grpc-message"] = encode_message(message)
    return Reply(status=200, headers=headers, upstream=upstream, body=b"")


def as_grpc(reply: Reply, outcome: str | None, message: str | None = None) -> Reply:
    """The sidecar's own error answer (a JSON error page for HTTP) for a gRPC caller; the message is
    the JSON error's `error` unless given."""
    if message is None:
        try:
            message = str(json.loads(reply.body or b"{}").get("error", ""))
        except (ValueError, AttributeError):
            message = ""
    grpc = error_reply(for_outcome(outcome, reply.status), message, reply.upstream)
    for name in ("retry-after",):
        if name in reply.headers:
            grpc.headers[name] = reply.headers[name]
    return grpc


# One gRPC message of length 0 (uncompressed): the default value of any response message type.
EMPTY_MESSAGE = b"\x00\x00\x00\x00\x00"


def accepted(reply: Reply) -> Reply:
    """The store-and-forward answer (HTTP 202) for a gRPC caller. gRPC has no "accepted": a 202 would
    reach the client as UNKNOWN and invite a second send of a call already stored. It gets OK with one
    empty message (the default response) and the queue's headers (`x-sidecar-queued`) as metadata, so
    it can tell a stored call from a served one."""
    headers = CIMultiDict(reply.headers)
    headers["content-type"] = "application/grpc"
    headers.popall("content-length", None)
    return Reply(status=200, headers=headers, upstream=reply.upstream, body=EMPTY_MESSAGE,
                 trailers=CIMultiDict({"grpc-status": "0"}))


def reply_code(reply: Reply) -> GrpcCode | None:
    """The gRPC status of an answer, if known yet: from a trailers-only head, or from trailers."""
    return answer_status(reply.headers, reply.trailers)
