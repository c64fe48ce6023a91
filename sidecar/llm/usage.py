"""Recognising LLM calls by their shape, and reading their token usage from the answer as it passes.

    request_shape(path, body)   the API an upstream call speaks, from its path and JSON body; None when
                                it is not an LLM call (the one check a non-LLM try pays: str.endswith)
    LlmCall                     what one try to an LLM API asked for and what its answer said
    AnswerScanner               fed the answer's bytes as they are relayed; never raises, never holds
                                more than one bounded SSE line or a bounded JSON body

Shapes read (the answers of OpenAI-compatible and Anthropic APIs, JSON or SSE):

    OpenAI   /chat/completions  {"object": "chat.completion[.chunk]", "model", "choices": [{"finish_reason"}],
             /completions        "usage": {"prompt_tokens", "completion_tokens"}}  -- streams carry usage in a
             /embeddings         last chunk when the request sets stream_options.include_usage
             /responses         {"object": "response", "model", "status", "usage": {"input_tokens", "output_tokens"}};
                                streams: events `response.created` ... `response.completed` {"response": {...}}
    Anthropic /messages         {"type": "message", "model", "stop_reason", "usage": {"input_tokens",
                                 "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"}};
                                streams: `message_start` {"message": {...}} then `message_delta`
                                {"delta": {"stop_reason"}, "usage": {"output_tokens"}} (cumulative)

An answer is counted only when it carries a usage object with integer counts: anything else (HTML, a
JSON error, a truncated stream, an upstream that merely uses those paths) leaves no figures behind.
"""
from __future__ import annotations

import json
import re
import time
from typing import TypeGuard

from sidecar.telemetry.genai import LlmCall

__all__ = ["AnswerScanner", "LlmCall", "request_shape", "scan_body", "absorb"]

# (path suffix, provider, operation name per the OpenTelemetry GenAI conventions, API)
_SHAPES: tuple[tuple[str, str, str, str], ...] = (
    ("/chat/completions", "openai", "chat", "chat.completions"),
    ("/completions", "openai", "text_completion", "completions"),
    ("/embeddings", "openai", "embeddings", "embeddings"),
    ("/responses", "openai", "chat", "responses"),
    ("/messages", "anthropic", "chat", "messages"),
)
_SUFFIXES = tuple(s[0] for s in _SHAPES)

MAX_SSE_LINE = 256 * 1024        # a longer SSE line is skipped (usage lines are a few hundred bytes)
MAX_JSON_BODY = 4 * 1024 * 1024  # a streamed (chunked) JSON answer is read up to this, then given up
MAX_MODEL_CHARS = 200            # a "model" longer than this is not a model name
_PROBE_EVENTS = 8                # data events parsed while the model is still unknown, then only likely ones


def request_shape(path: str, body: bytes | None) -> LlmCall | None:
    """The LLM API a call speaks, by its path and (when the body is at hand) its JSON; else None."""
    if not path.endswith(_SUFFIXES):
        path = path.rstrip("/")
        if not path.endswith(_SUFFIXES):
            return None
    for suffix, provider, operation, api in _SHAPES:
        if path.endswith(suffix):
            break
    call = LlmCall(provider=provider, operation=operation, api=api)
    if body:
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None                    # a body that is not JSON: not an LLM API call
        if not isinstance(doc, dict):
            return None
        model = doc.get("model")
        if isinstance(model, str) and len(model) <= MAX_MODEL_CHARS:
            call.request_model = model
        for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            value = doc.get(key)
            if _count(value):
                call.max_tokens = value
                break
        call.stream = doc.get("stream") is True
    return call


def _count(value) -> TypeGuard[int]:
    return type(value) is int and 0 <= value < 1 << 53


# A data line worth parsing once the model is known: one that may carry usage or a finish reason.
_LIKELY = re.compile(rb'"usage"\s*:\s*\{|"(?:finish|stop)_reason"\s*:\s*"|"type"\s*:\s*"(?:message_start|response\.)')


class AnswerScanner:
    """Reads an answer's figures into an `LlmCall` as its bytes pass. `feed` never raises and keeps at
    most one SSE line (`MAX_SSE_LINE`) or one JSON body (`MAX_JSON_BODY`): constant memory per stream."""

    __slots__ = ("call", "sse", "_buf", "_skipping", "_json", "_events", "_closed", "_at")

    def __init__(self, call: LlmCall, *, sse: bool) -> None:
        self.call = call
        self.sse = sse
        self._buf = bytearray()
        self._skipping = False             # inside an over-long SSE line: drop bytes up to its end
        self._json: bytearray | None = None if sse else bytearray()
        self._events = 0
        self._closed = False
        self._at = 0

    def feed(self, chunk: bytes, at_ns: int = 0) -> None:
        """`at_ns`: when the chunk arrived (wall clock), for the time to first chunk."""
        if self._closed or not chunk:
            return
        try:
            if self.sse:
                self._at = at_ns
                self._feed_sse(chunk)
            elif self._json is not None:
                if len(self._json) + len(chunk) > MAX_JSON_BODY:
                    self._json = None      # too big to be an answer worth reading: give up, pass it on
                else:
                    self._json += chunk
        except Exception:  # noqa: BLE001 - a scanner bug must never break the relay
            self._closed = True

    def close(self) -> None:
        """The answer ended (whole or cut): read what is left. A cut SSE line is not read."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._json:
                absorb(self.call, _loads(bytes(self._json)))
        except Exception:  # noqa: BLE001
            pass
        self._buf = bytearray()
        self._json = None

    def _feed_sse(self, chunk: bytes) -> None:
        buf = self._buf
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                break
            if self._skipping:
                self._skipping = False
            else:
                if buf:
                    buf += chunk[start:end]
                    line = bytes(buf)
                    buf.clear()
                else:
                    line = chunk[start:end]
                self._line(line)
            start = end + 1
        rest = len(chunk) - start
        if rest and not self._skipping:
            if len(buf) + rest > MAX_SSE_LINE:
                buf.clear()
                self._skipping = True
            else:
                buf += chunk[start:]

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return                         # event:, id:, comments, blank separators
        data = line[5:].strip()
        if not data or data == b"[DONE]":
            return
        call = self.call
        if not call.first_chunk_ns:
            call.first_chunk_ns = self._at or time.time_ns()
        self._events += 1
        if (call.response_model is None and self._events <= _PROBE_EVENTS) or _LIKELY.search(data):
            absorb(call, _loads(data))


def _loads(data: bytes):
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def scan_body(call: LlmCall, body: bytes) -> None:
    """A whole answer in hand (JSON, or a short SSE stream that came with the headers)."""
    if body[:1] in (b"{", b" ", b"\n", b"\r", b"\t"):
        absorb(call, _loads(body))
    else:
        scanner = AnswerScanner(call, sse=True)
        scanner.feed(body)
        scanner.feed(b"\n")                # a last line without its newline still counts
        scanner.close()


def absorb(call: LlmCall, doc) -> None:
    """Take what one JSON answer or SSE event says. Unknown shapes are ignored."""
    if not isinstance(doc, dict):
        return
    kind = doc.get("type")
    if kind == "message_start":
        _object(call, doc.get("message"))
    elif kind == "message_delta":
        delta = doc.get("delta")
        if isinstance(delta, dict):
            _finish(call, delta.get("stop_reason"))
        _usage(call, doc.get("usage"), cumulative=True)
    elif isinstance(kind, str) and kind.startswith("response."):
        _object(call, doc.get("response"))
    else:
        _object(call, doc)


def _object(call: LlmCall, obj) -> None:
    if not isinstance(obj, dict):
        return
    model = obj.get("model")
    if isinstance(model, str) and 0 < len(model) <= MAX_MODEL_CHARS:
        call.response_model = model
    rid = obj.get("id")
    if isinstance(rid, str) and len(rid) <= MAX_MODEL_CHARS and call.response_id is None:
        call.response_id = rid
    choices = obj.get("choices")
    if isinstance(choices, list):
        for choice in choices[:16]:
            if isinstance(choice, dict):
                _finish(call, choice.get("finish_reason"))
    _finish(call, obj.get("stop_reason"))
    if obj.get("object") == "response":
        status = obj.get("status")
        if status in ("completed", "incomplete", "failed"):
            _finish(call, status)
    _usage(call, obj.get("usage"), cumulative=False)


def _finish(call: LlmCall, reason) -> None:
    if isinstance(reason, str) and 0 < len(reason) <= 64 and reason not in call.finish_reasons \
            and len(call.finish_reasons) < 16:
        call.finish_reasons.append(reason)


def _usage(call: LlmCall, usage, *, cumulative: bool) -> None:
    """OpenAI: prompt_tokens / completion_tokens (embeddings: prompt_tokens only); Responses and
    Anthropic: input_tokens / output_tokens. Anthropic's input_tokens leave out cached input, which the
    GenAI conventions count in `gen_ai.usage.input_tokens`: added back here."""
    if not isinstance(usage, dict):
        return
    inp = usage.get("input_tokens", usage.get("prompt_tokens"))
    out = usage.get("output_tokens", usage.get("completion_tokens"))
    read = usage.get("cache_read_input_tokens")
    write = usage.get("cache_creation_input_tokens")
    if call.provider == "anthropic" and _count(inp):
        inp += (read if _count(read) else 0) + (write if _count(write) else 0)
    if not _count(read):
        details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
        read = details.get("cached_tokens") if isinstance(details, dict) else None
    if _count(inp) and (inp or not cumulative):
        call.input_tokens = inp
    if _count(out):
        call.output_tokens = out
    elif call.operation == "embeddings" and _count(inp) and call.output_tokens is None:
        call.output_tokens = 0
    if _count(read) and read:
        call.cache_read_tokens = read
    if _count(write) and write:
        call.cache_write_tokens = write
