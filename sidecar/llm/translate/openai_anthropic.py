"""openai-chat/anthropic-messages: an app written against OpenAI chat completions, served by Anthropic.

    request   chat.completions body  -> Messages body         (Refused: a 400 naming what cannot be sent)
    answer    Message                -> chat.completion
    error     Anthropic error        -> OpenAI error body     (529 overloaded_error -> 503)
    stream    Messages SSE events    -> chat.completion.chunk events and `data: [DONE]`

Error bodies keep the provider's `error.type` (e.g. `overloaded_error`), so a `{json: error.type}`
condition reads the same before and after translation.
"""
from __future__ import annotations

import json

from sidecar.llm.translate.base import Plan, Refused, as_dict, as_list, number, text_of
from sidecar.llm.translate.sse import Event, SSEParser, StreamError, encode

FINISH = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "max_tokens": "length",
          "model_context_window_exceeded": "length", "tool_use": "tool_calls", "refusal": "content_filter"}
IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
               500: "api_error", 529: "overloaded_error"}

# Fields whose meaning Anthropic cannot honour: refused with the reason, never silently dropped.
REFUSED = (
    ("n", lambda v: v not in (None, 1), "n > 1: Anthropic returns one answer per request"),
    ("logprobs", bool, "logprobs: Anthropic does not return token log probabilities"),
    ("top_logprobs", lambda v: v not in (None, 0), "top_logprobs: Anthropic does not return log probabilities"),
    ("logit_bias", bool, "logit_bias: Anthropic has no token bias"),
    ("presence_penalty", lambda v: v not in (None, 0), "presence_penalty: Anthropic has no penalties"),
    ("frequency_penalty", lambda v: v not in (None, 0), "frequency_penalty: Anthropic has no penalties"),
    ("response_format", lambda v: not (isinstance(v, dict) and v.get("type") == "text") and v is not None,
     "response_format (JSON mode / json_schema): not translated to Anthropic"),
    ("audio", lambda v: v is not None, "audio output: Anthropic has none"),
    ("modalities", lambda v: v not in (None, ["text"]), "modalities other than text: Anthropic has none"),
    ("prediction", lambda v: v is not None, "prediction (predicted outputs): Anthropic has none"),
    ("web_search_options", lambda v: v is not None, "web_search_options: not translated to Anthropic"),
    ("reasoning_effort", lambda v: v is not None, "reasoning_effort: not translated to Anthropic"),
)
# Sent by the app for OpenAI's own bookkeeping; they do not change the answer. `user` becomes
# Anthropic's metadata.user_id; the rest are dropped.
IGNORED = ("seed", "store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier", "verbosity")


class OpenAIToAnthropic:
    name: str = "openai-chat/anthropic-messages"
    path: str = "/v1/messages"
    app_headers: tuple[str, ...] = ("authorization", "openai-organization", "openai-project", "openai-beta",
                                    "x-api-key", "api-key")
    provider_headers: tuple[tuple[str, str], ...] = (("anthropic-version", "2023-06-01"),)

    def request(self, doc: object, *, max_tokens: int) -> Plan:
        doc = as_dict(doc, "the request body")
        for key, refused, reason in REFUSED:
            if key in doc and refused(doc[key]):
                raise Refused(reason)
        model = doc.get("model")
        if not isinstance(model, str):
            raise Refused("model is missing")
        system, messages, functions = _messages(as_list(doc.get("messages"), "messages"))
        out: dict = {"model": model, "messages": messages}
        limit = doc.get("max_completion_tokens", doc.get("max_tokens"))
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise Refused("max_completion_tokens is not a positive integer")
        out["max_tokens"] = max_tokens if limit is None else limit
        if system:
            out["system"] = "\n\n".join(system)
        if doc.get("temperature") is not None:     # OpenAI's range is 0..2, Anthropic's 0..1
            out["temperature"] = min(float(number(doc["temperature"], "temperature")), 1.0)
        if doc.get("top_p") is not None:
            out["top_p"] = number(doc["top_p"], "top_p")
        stop = doc.get("stop")
        if stop is not None:
            stops = [stop] if isinstance(stop, str) else as_list(stop, "stop")
            if not all(isinstance(s, str) for s in stops):
                raise Refused("stop is not a string or a list of strings")
            if stops:
                out["stop_sequences"] = stops
        legacy = "functions" in doc and "tools" not in doc
        tools = doc.get("tools") if not legacy else [{"type": "function", "function": f}
                                                     for f in as_list(doc["functions"], "functions")]
        if tools:
            out["tools"] = [_tool(t, i) for i, t in enumerate(as_list(tools, "tools"))]
        choice = _tool_choice(doc.get("function_call") if legacy else doc.get("tool_choice"), legacy)
        if doc.get("parallel_tool_calls") is False and out.get("tools"):
            choice = choice or {"type": "auto"}
            if choice["type"] != "none":
                choice["disable_parallel_tool_use"] = True
        if choice is not None:
            out["tool_choice"] = choice
        if isinstance(doc.get("user"), str):
            out["metadata"] = {"user_id": doc["user"]}
        stream = doc.get("stream") is True
        if stream:
            out["stream"] = True
        options = doc.get("stream_options")
        include_usage = stream and isinstance(options, dict) and options.get("include_usage") is True
        if functions and not legacy:
            raise Refused("function-role messages need `functions`, not `tools`")
        return Plan(body=out, stream=stream, include_usage=include_usage, legacy_functions=legacy, model=model)

    def answer(self, doc: object, plan: Plan, *, now: int) -> dict:
        doc = as_dict(doc, "the provider's answer")
        text, calls = [], []
        for block in _items(doc.get("content")):
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text":
                text.append(str(block.get("text", "")))
            elif block.get("type") == "tool_use":
                calls.append({"id": str(block.get("id", "")), "type": "function",
                              "function": {"name": str(block.get("name", "")),
                                           "arguments": json.dumps(block.get("input", {}), ensure_ascii=False)}})
        message: dict = {"role": "assistant", "content": "".join(text) if text or not calls else None,
                         "refusal": None}
        finish = FINISH.get(str(doc.get("stop_reason")), "stop")
        if calls and plan.legacy_functions:
            message["function_call"] = calls[0]["function"]
            finish = "function_call" if finish == "tool_calls" else finish
        elif calls:
            message["tool_calls"] = calls
        return {"id": str(doc.get("id", "chatcmpl-sidecar")), "object": "chat.completion", "created": now,
                "model": str(doc.get("model", plan.model or "")),
                "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
                "usage": _usage(doc.get("usage"))}

    def error(self, status: int, doc: object) -> tuple[int, dict]:
        err = doc.get("error") if isinstance(doc, dict) else None
        err = err if isinstance(err, dict) else {}
        etype = str(err.get("type") or ERROR_TYPES.get(status, "api_error"))
        message = str(err.get("message") or f"the fallback provider answered {status}")
        return (503 if status == 529 else status), _openai_error(message, etype)

    def refusal(self, reason: str) -> dict:
        return _openai_error(f"the sidecar cannot send this request to the fallback provider: {reason}",
                             "invalid_request_error", code="unsupported_by_fallback")

    def stream(self, plan: Plan, *, now: int) -> "MessagesToChunks":
        return MessagesToChunks(plan, now)


def _openai_error(message: str, etype: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": etype, "param": None, "code": code or etype}}


def _usage(usage: object) -> dict:
    u = usage if isinstance(usage, dict) else {}
    cached = _int(u.get("cache_read_input_tokens"))
    prompt = _int(u.get("input_tokens")) + _int(u.get("cache_creation_input_tokens")) + cached
    completion = _int(u.get("output_tokens"))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _items(v: object) -> list:
    return v if isinstance(v, list) else []


def _obj(v: object) -> dict:
    return v if isinstance(v, dict) else {}


def _int(v: object) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def _messages(raw: list) -> tuple[list[str], list[dict], bool]:
    """System text, and the turns with consecutive same-role turns merged (Anthropic alternates)."""
    system: list[str] = []
    turns: list[dict] = []
    pending_fn: dict[str, str] = {}          # legacy function name -> the tool_use id made up for it
    saw_function_role = False

    def add(role: str, blocks: list[dict]) -> None:
        if not blocks:
            return
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})

    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        m = as_dict(m, where)
        role = m.get("role")
        if role in ("system", "developer"):
            system.append(text_of(m.get("content"), f"{where}.content"))
        elif role == "user":
            add("user", _user_blocks(m.get("content"), where))
        elif role == "assistant":
            blocks: list[dict] = []
            text = _assistant_text(m.get("content"), where)
            if text:
                blocks.append({"type": "text", "text": text})
            for j, call in enumerate(as_list(m.get("tool_calls") or [], f"{where}.tool_calls")):
                call = as_dict(call, f"{where}.tool_calls[{j}]")
                fn = as_dict(call.get("function"), f"{where}.tool_calls[{j}].function")
                blocks.append({"type": "tool_use", "id": str(call.get("id", f"call_{i}_{j}")),
                               "name": _name(fn.get("name"), where), "input": _arguments(fn.get("arguments"), where)})
            if m.get("function_call") is not None:
                fn = as_dict(m["function_call"], f"{where}.function_call")
                name = _name(fn.get("name"), where)
                pending_fn[name] = f"call_fn_{i}"
                blocks.append({"type": "tool_use", "id": pending_fn[name], "name": name,
                               "input": _arguments(fn.get("arguments"), where)})
            add("assistant", blocks)
        elif role == "tool":
            add("user", [{"type": "tool_result", "tool_use_id": str(m.get("tool_call_id", "")),
                          "content": text_of(m.get("content"), f"{where}.content")}])
        elif role == "function":
            saw_function_role = True
            result_of = m.get("name")
            if not isinstance(result_of, str) or result_of not in pending_fn:
                raise Refused(f"{where}: a function result with no function_call before it")
            add("user", [{"type": "tool_result", "tool_use_id": pending_fn.pop(result_of),
                          "content": text_of(m.get("content"), f"{where}.content")}])
        else:
            raise Refused(f"{where}: role {role!r} is not translated")
    return system, turns, saw_function_role


def _name(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise Refused(f"{where}: a tool call without a function name")
    return value


def _arguments(raw: object, where: str) -> object:
    if raw is None or raw == "":
        return {}
    try:
        value = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise Refused(f"{where}: tool call arguments are not a JSON object")
    return value


def _assistant_text(content: object, where: str) -> str:
    if isinstance(content, list):            # text and refusal parts
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "refusal":
                parts.append(str(part.get("refusal", "")))
            else:
                parts.append(text_of([part], f"{where}.content"))
        return "\n".join(p for p in parts if p)
    return text_of(content, f"{where}.content")


def _user_blocks(content: object, where: str) -> list[dict]:
    if isinstance(content, str) or content is None:
        return [{"type": "text", "text": content}] if content else []
    blocks = []
    for j, part in enumerate(as_list(content, f"{where}.content")):
        part = as_dict(part, f"{where}.content[{j}]")
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise Refused(f"{where}.content[{j}]: text is not a string")
            if part["text"]:
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            blocks.append(_image(url, f"{where}.content[{j}]"))
        else:
            raise Refused(f"{where}.content[{j}]: {kind!r} parts are not translated to Anthropic")
    return blocks


def _image(url: object, where: str) -> dict:
    if not isinstance(url, str):
        raise Refused(f"{where}: image_url has no url")
    if url.startswith("data:"):
        head, sep, data = url[5:].partition(",")
        media, _, encoding = head.partition(";")
        if not sep or encoding != "base64" or media not in IMAGE_TYPES:
            raise Refused(f"{where}: a data URL image must be base64 {', '.join(IMAGE_TYPES)}")
        return {"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise Refused(f"{where}: image url is neither https:// nor a data URL")


def _tool(t: object, i: int) -> dict:
    t = as_dict(t, f"tools[{i}]")
    if t.get("type", "function") != "function":
        raise Refused(f"tools[{i}]: {t.get('type')!r} tools are not translated to Anthropic")
    fn = as_dict(t.get("function"), f"tools[{i}].function")
    out = {"name": _name(fn.get("name"), f"tools[{i}]"),
           "input_schema": fn.get("parameters") or {"type": "object", "properties": {}}}
    if isinstance(fn.get("description"), str):
        out["description"] = fn["description"]
    return out


def _tool_choice(choice: object, legacy: bool) -> dict | None:
    if choice is None:
        return None
    if choice in ("auto", "none"):
        return {"type": choice}
    if choice == "required":
        return {"type": "any"}
    if isinstance(choice, dict):
        fn = choice if legacy else choice.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            return {"type": "tool", "name": fn["name"]}
    raise Refused(f"tool_choice {choice!r} is not translated")


class MessagesToChunks:
    """Anthropic's Messages stream -> OpenAI chat.completion.chunk events, event by event.

    Holds the message id, model, usage counters and the block-index -> tool-index map: constant memory
    whatever the length of the stream (argument deltas are passed on, never accumulated).
    """

    def __init__(self, plan: Plan, now: int) -> None:
        self._parser = SSEParser()
        self._plan = plan
        self._id = "chatcmpl-sidecar"
        self._model = plan.model or ""
        self._created = now
        self._tools: dict[int, int] = {}
        self._usage: dict = {}
        self.done = False
        self.failed = False
        self.began = False
        self.error_body: dict | None = None

    def feed(self, chunk: bytes) -> bytes:
        if self.done:
            return b""
        try:
            events = self._parser.feed(chunk)
            out = []
            for ev in events:
                out.append(self._event(ev))
                if self.done:
                    break
            return b"".join(out)
        # An event of a shape nobody expected ends the app's stream with an error, never a crash.
        except (StreamError, TypeError, ValueError, AttributeError) as exc:
            return self.fail(f"the provider's stream is malformed: {exc}")

    def end(self) -> bytes:
        return b"" if self.done else self.fail("the provider's stream ended before message_stop")

    def fail(self, reason: str, etype: str = "stream_error") -> bytes:
        if self.done:
            return b""
        self.done = self.failed = True
        self.error_body = _openai_error(reason, etype)
        return encode(self.error_body)

    def _chunk(self, delta: dict, finish: str | None = None) -> bytes:
        doc = {"id": self._id, "object": "chat.completion.chunk", "created": self._created, "model": self._model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        if self._plan.include_usage:
            doc["usage"] = None
        return encode(doc)

    def _event(self, ev: Event) -> bytes:
        data = ev.json()
        if not isinstance(data, dict):
            raise StreamError("event data is not an object")
        kind = data.get("type", ev.event)
        if kind in ("content_block_start", "content_block_delta", "message_delta"):
            self.began = True
        if kind == "message_start":
            msg = _obj(data.get("message"))
            self._id = str(msg.get("id", self._id))
            self._model = str(msg.get("model", self._model))
            self._usage.update(_obj(msg.get("usage")))
            return self._chunk({"role": "assistant", "content": ""})
        if kind == "content_block_start":
            block = _obj(data.get("content_block"))
            if block.get("type") == "tool_use":
                k = self._tools[_index(data)] = len(self._tools)
                return self._call_delta(k, {"name": str(block.get("name", "")), "arguments": ""},
                                        str(block.get("id", "")))
            if block.get("type") == "text" and block.get("text"):
                return self._chunk({"content": block["text"]})
            return b""
        if kind == "content_block_delta":
            delta = _obj(data.get("delta"))
            if delta.get("type") == "text_delta":
                return self._chunk({"content": str(delta.get("text", ""))})
            if delta.get("type") == "input_json_delta" and _index(data) in self._tools:
                return self._call_delta(self._tools[_index(data)], {"arguments": str(delta.get("partial_json", ""))})
            return b""                       # thinking, signatures, citations: OpenAI chat has no place
        if kind == "message_delta":
            self._usage.update(_obj(data.get("usage")))
            delta = _obj(data.get("delta"))
            finish = FINISH.get(str(delta.get("stop_reason")), "stop")
            if self._plan.legacy_functions and finish == "tool_calls":
                finish = "function_call"
            return self._chunk({}, finish)
        if kind == "message_stop":
            self.done = True
            out = b""
            if self._plan.include_usage:
                out = encode({"id": self._id, "object": "chat.completion.chunk", "created": self._created,
                              "model": self._model, "choices": [], "usage": _usage(self._usage)})
            return out + encode("[DONE]")
        if kind == "error":
            err = _obj(data.get("error"))
            return self.fail(str(err.get("message", "the provider's stream failed")),
                             str(err.get("type", "api_error")))
        if kind == "ping":
            return b": ping\n\n"             # keeps idle timers on the app's side fed, as upstream meant
        return b""                           # an event type added later: nothing the app can use

    def _call_delta(self, k: int, fn: dict, call_id: str | None = None) -> bytes:
        if self._plan.legacy_functions:
            return self._chunk({"function_call": fn}) if k == 0 else b""
        call: dict = {"index": k}
        if call_id is not None:
            call.update(id=call_id, type="function")
        call["function"] = fn
        return self._chunk({"tool_calls": [call]})


def _index(data: dict) -> int:
    index = data.get("index")
    return index if isinstance(index, int) else -1


OPENAI_TO_ANTHROPIC = OpenAIToAnthropic()
