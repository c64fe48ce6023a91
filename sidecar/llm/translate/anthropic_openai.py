"""anthropic-messages/openai-chat: an app written against Anthropic's Messages API, served by OpenAI chat
completions (or any server that speaks them).

    request   Messages body              -> chat.completions body   (Refused: a 400 naming what cannot be sent)
    answer    chat.completion            -> Message
    error     OpenAI error               -> Anthropic error body    (503 -> 529 overloaded_error)
    stream    chat.completion.chunk SSE  -> Messages events (message_start ... message_stop)
"""
from __future__ import annotations

import json

from sidecar.llm.translate.base import Plan, Refused, as_dict, as_list, number, text_of
from sidecar.llm.translate.sse import Event, SSEParser, StreamError, encode

STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
        "content_filter": "refusal"}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
               503: "overloaded_error", 529: "overloaded_error"}

REFUSED = (
    ("top_k", lambda v: v is not None, "top_k: OpenAI chat completions have no top_k"),
    ("thinking", lambda v: isinstance(v, dict) and v.get("type") not in (None, "disabled"),
     "thinking (extended thinking): not translated to OpenAI chat completions"),
    ("container", lambda v: v is not None, "container: OpenAI chat completions have none"),
    ("mcp_servers", bool, "mcp_servers: OpenAI chat completions have none"),
)
IGNORED = ("service_tier", "inference_geo")


class AnthropicToOpenAI:
    name: str = "anthropic-messages/openai-chat"
    path: str = "/v1/chat/completions"
    app_headers: tuple[str, ...] = ("authorization", "x-api-key", "anthropic-version", "anthropic-beta")
    provider_headers: tuple[tuple[str, str], ...] = ()

    def request(self, doc: object, *, max_tokens: int) -> Plan:
        doc = as_dict(doc, "the request body")
        for key, refused, reason in REFUSED:
            if key in doc and refused(doc[key]):
                raise Refused(reason)
        model = doc.get("model")
        if not isinstance(model, str):
            raise Refused("model is missing")
        messages = []
        if doc.get("system") is not None:
            messages.append({"role": "system", "content": _system(doc["system"])})
        for i, m in enumerate(as_list(doc.get("messages"), "messages")):
            messages.extend(_message(as_dict(m, f"messages[{i}]"), f"messages[{i}]"))
        out: dict = {"model": model, "messages": messages}
        limit = doc.get("max_tokens", max_tokens)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise Refused("max_tokens is not a positive integer")
        out["max_completion_tokens"] = limit
        for key in ("temperature", "top_p"):
            if doc.get(key) is not None:
                out[key] = number(doc[key], key)
        stops = doc.get("stop_sequences")
        if stops:
            stops = as_list(stops, "stop_sequences")
            if len(stops) > 4 or not all(isinstance(s, str) for s in stops):
                raise Refused("stop_sequences: OpenAI takes at most 4 strings")
            out["stop"] = stops
        tools = [_tool(t, i) for i, t in enumerate(as_list(doc.get("tools") or [], "tools"))]
        if tools:
            out["tools"] = tools
        choice = doc.get("tool_choice")
        if choice is not None:
            choice = as_dict(choice, "tool_choice")
            kind = choice.get("type")
            if kind in ("auto", "none"):
                out["tool_choice"] = kind
            elif kind == "any":
                out["tool_choice"] = "required"
            elif kind == "tool" and isinstance(choice.get("name"), str):
                out["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
            else:
                raise Refused(f"tool_choice {choice!r} is not translated")
            if choice.get("disable_parallel_tool_use") is True and tools:
                out["parallel_tool_calls"] = False
        metadata = doc.get("metadata")
        if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
            out["user"] = metadata["user_id"]
        stream = doc.get("stream") is True
        if stream:                           # Anthropic streams always end with usage: ask for it
            out["stream"] = True
            out["stream_options"] = {"include_usage": True}
        return Plan(body=out, stream=stream, model=model)

    def answer(self, doc: object, plan: Plan, *, now: int) -> dict:
        doc = as_dict(doc, "the provider's answer")
        choices = _items(doc.get("choices"))
        choice = _obj(choices[0]) if choices else {}
        message = _obj(choice.get("message"))
        content: list[dict] = []
        text = message.get("content")
        if isinstance(text, str) and text:
            content.append({"type": "text", "text": text})
        if isinstance(message.get("refusal"), str) and message["refusal"]:
            content.append({"type": "text", "text": message["refusal"]})
        calls = _items(message.get("tool_calls"))
        if isinstance(message.get("function_call"), dict):
            calls = calls + [{"id": "call_function", "function": message["function_call"]}]
        for call in calls:
            fn = _obj(_obj(call).get("function"))
            content.append({"type": "tool_use", "id": str(_obj(call).get("id", "")),
                            "name": str(fn.get("name", "")), "input": _input(fn.get("arguments"))})
        return {"id": str(doc.get("id", "msg_sidecar")), "type": "message", "role": "assistant",
                "model": str(doc.get("model", plan.model or "")), "content": content,
                "stop_reason": STOP.get(str(choice.get("finish_reason")), "end_turn"), "stop_sequence": None,
                "usage": _usage(doc.get("usage"))}

    def error(self, status: int, doc: object) -> tuple[int, dict]:
        err = _obj(doc.get("error")) if isinstance(doc, dict) else {}
        etype = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        message = str(err.get("message") or f"the fallback provider answered {status}")
        return (529 if etype == "overloaded_error" else status), _anthropic_error(message, etype)

    def refusal(self, reason: str) -> dict:
        return _anthropic_error(f"the sidecar cannot send this request to the fallback provider: {reason}",
                                "invalid_request_error")

    def stream(self, plan: Plan, *, now: int) -> "ChunksToMessages":
        return ChunksToMessages(plan)


def _anthropic_error(message: str, etype: str) -> dict:
    return {"type": "error", "error": {"type": etype, "message": message}}


def _items(v: object) -> list:
    return v if isinstance(v, list) else []


def _obj(v: object) -> dict:
    return v if isinstance(v, dict) else {}


def _int(v: object) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def _usage(usage: object) -> dict:
    u = _obj(usage)
    cached = _int(_obj(u.get("prompt_tokens_details")).get("cached_tokens"))
    return {"input_tokens": max(_int(u.get("prompt_tokens")) - cached, 0),
            "output_tokens": _int(u.get("completion_tokens")), "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": 0}


def _input(raw: object) -> object:
    """Arguments as a JSON object; a model's malformed JSON is handed over as the raw string."""
    if not isinstance(raw, str) or not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _system(system: object) -> str:
    return text_of(system, "system")


def _message(m: dict, where: str) -> list[dict]:
    role = m.get("role")
    content = m.get("content")
    blocks = [{"type": "text", "text": content}] if isinstance(content, str) else as_list(content, f"{where}.content")
    if role == "assistant":
        text, calls = [], []
        for j, b in enumerate(blocks):
            b = as_dict(b, f"{where}.content[{j}]")
            kind = b.get("type")
            if kind == "text":
                text.append(str(b.get("text", "")))
            elif kind == "tool_use":
                if not isinstance(b.get("name"), str):
                    raise Refused(f"{where}.content[{j}]: tool_use without a name")
                calls.append({"id": str(b.get("id", "")), "type": "function",
                              "function": {"name": b["name"],
                                           "arguments": json.dumps(b.get("input", {}), ensure_ascii=False)}})
            elif kind in ("thinking", "redacted_thinking"):
                continue                     # the earlier model's reasoning: OpenAI chat cannot take it back
            else:
                raise Refused(f"{where}.content[{j}]: {kind!r} blocks are not translated to OpenAI")
        out: dict = {"role": "assistant", "content": "".join(text) if text else None}
        if calls:
            out["tool_calls"] = calls
        return [out]
    if role != "user":
        raise Refused(f"{where}: role {role!r} is not translated")
    results: list[dict] = []
    parts: list[dict] = []
    for j, b in enumerate(blocks):
        b = as_dict(b, f"{where}.content[{j}]")
        kind = b.get("type")
        if kind == "tool_result":            # OpenAI wants each result as its own `tool` message, first
            results.append({"role": "tool", "tool_call_id": str(b.get("tool_use_id", "")),
                            "content": text_of(b.get("content"), f"{where}.content[{j}].content")})
        elif kind == "text":
            parts.append({"type": "text", "text": str(b.get("text", ""))})
        elif kind == "image":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(_obj(b.get("source")), where)}})
        else:
            raise Refused(f"{where}.content[{j}]: {kind!r} blocks are not translated to OpenAI")
    out_msgs = results
    if parts:
        simple = all(p["type"] == "text" for p in parts)
        out_msgs = results + [{"role": "user",
                               "content": "\n".join(p["text"] for p in parts) if simple else parts}]
    return out_msgs


def _image_url(source: dict, where: str) -> str:
    if source.get("type") == "base64":
        return f"data:{source.get('media_type', 'image/png')};base64,{source.get('data', '')}"
    if source.get("type") == "url" and isinstance(source.get("url"), str):
        return source["url"]
    raise Refused(f"{where}: image source {source.get('type')!r} is not translated")


def _tool(t: object, i: int) -> dict:
    t = as_dict(t, f"tools[{i}]")
    if t.get("type") not in (None, "custom") or not isinstance(t.get("name"), str):
        raise Refused(f"tools[{i}]: Anthropic server tools ({t.get('type')!r}) are not translated")
    fn: dict = {"name": t["name"], "parameters": t.get("input_schema") or {"type": "object", "properties": {}}}
    if isinstance(t.get("description"), str):
        fn["description"] = t["description"]
    return {"type": "function", "function": fn}


class ChunksToMessages:
    """OpenAI chunk events -> Anthropic's Messages events, as they arrive.

    A content block is open at a time (text, or one tool call); it is closed when the next one starts.
    `message_delta` (stop reason, usage) goes out at `[DONE]`, after the usage chunk OpenAI sends last.
    """

    def __init__(self, plan: Plan) -> None:
        self._parser = SSEParser()
        self._plan = plan
        self._started = False
        self._block = -1                     # index of the open Anthropic block, -1: none
        self._open: tuple[str, int] | None = None   # ("text", 0) or ("tool", openai tool index)
        self._stop = "end_turn"
        self._usage: dict = {}
        self.done = False
        self.failed = False
        self.began = False
        self.error_body: dict | None = None

    def feed(self, chunk: bytes) -> bytes:
        if self.done:
            return b""
        try:
            out = []
            for ev in self._parser.feed(chunk):
                out.append(self._event(ev))
                if self.done:
                    break
            return b"".join(out)
        # An event of a shape nobody expected ends the app's stream with an error, never a crash.
        except (StreamError, TypeError, ValueError, AttributeError) as exc:
            return self.fail(f"the provider's stream is malformed: {exc}")

    def end(self) -> bytes:
        return b"" if self.done else self.fail("the provider's stream ended before [DONE]")

    def fail(self, reason: str, etype: str = "api_error") -> bytes:
        if self.done:
            return b""
        self.done = self.failed = True
        self.error_body = _anthropic_error(reason, etype)
        return encode(self.error_body, "error")

    def _event(self, ev: Event) -> bytes:
        if ev.data.strip() == "[DONE]":
            self.done = True
            return (self._start({}) + self._close()
                    + encode({"type": "message_delta", "delta": {"stop_reason": self._stop, "stop_sequence": None},
                              "usage": {"output_tokens": _usage(self._usage)["output_tokens"]}}, "message_delta")
                    + encode({"type": "message_stop"}, "message_stop"))
        data = ev.json()
        if not isinstance(data, dict):
            raise StreamError("event data is not an object")
        if data.get("error") is not None:
            err = _obj(data.get("error"))
            etype = "overloaded_error" if err.get("code") == "overloaded" else str(err.get("type") or "api_error")
            return self.fail(str(err.get("message", "the provider's stream failed")), etype)
        out = self._start(data)
        if isinstance(data.get("usage"), dict):
            self._usage = data["usage"]
        for choice in _items(data.get("choices"))[:1]:
            choice = _obj(choice)
            delta = _obj(choice.get("delta"))
            text = delta.get("content") or delta.get("refusal")
            if isinstance(text, str) and text:
                out += self._open_block(("text", 0), {"type": "text", "text": ""})
                out += self._delta({"type": "text_delta", "text": text})
            for call in _items(delta.get("tool_calls")):
                call = _obj(call)
                fn = _obj(call.get("function"))
                k = call.get("index", 0)
                if self._open != ("tool", k):
                    out += self._open_block(("tool", k), {"type": "tool_use", "id": str(call.get("id", "")),
                                                          "name": str(fn.get("name", "")), "input": {}})
                if isinstance(fn.get("arguments"), str) and fn["arguments"]:
                    out += self._delta({"type": "input_json_delta", "partial_json": fn["arguments"]})
            if choice.get("finish_reason"):
                self.began = True
                self._stop = STOP.get(str(choice["finish_reason"]), "end_turn")
                out += self._close()
        return out

    def _start(self, data: dict) -> bytes:
        if self._started:
            return b""
        self._started = True
        message: dict = {"id": str(data.get("id", "msg_sidecar")), "type": "message", "role": "assistant",
                   "model": str(data.get("model", self._plan.model or "")), "content": [],
                   "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": 0, "output_tokens": 0}}
        return encode({"type": "message_start", "message": message}, "message_start")

    def _open_block(self, key: tuple[str, int], block: dict) -> bytes:
        if self._open == key:
            return b""
        self.began = True
        out = self._close()
        self._block += 1
        self._open = key
        return out + encode({"type": "content_block_start", "index": self._block, "content_block": block},
                            "content_block_start")

    def _delta(self, delta: dict) -> bytes:
        return encode({"type": "content_block_delta", "index": self._block, "delta": delta}, "content_block_delta")

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        self._open = None
        return encode({"type": "content_block_stop", "index": self._block}, "content_block_stop")


ANTHROPIC_TO_OPENAI = AnthropicToOpenAI()
