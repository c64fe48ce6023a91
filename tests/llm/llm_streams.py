"""Test helpers: provider answers rendered as the event streams each API sends, and app-side streams
folded back into one answer, so stream translation can be compared with whole-answer translation."""
from __future__ import annotations

import json

from sidecar.llm.translate.sse import SSEParser, encode


def anthropic_sse(message: dict, pieces: int = 3) -> bytes:
    """An Anthropic Message as the Messages API streams it (tool input as partial_json pieces)."""
    start = {**message, "content": [], "stop_reason": None,
             "usage": {"input_tokens": message["usage"]["input_tokens"], "output_tokens": 1}}
    out = [encode({"type": "message_start", "message": start}, "message_start"),
           encode({"type": "ping"}, "ping")]
    for i, block in enumerate(message["content"]):
        if block["type"] == "text":
            out.append(encode({"type": "content_block_start", "index": i,
                               "content_block": {"type": "text", "text": ""}}, "content_block_start"))
            text = block["text"]
            step = max(1, len(text) // pieces)
            for k in range(0, len(text), step):
                out.append(encode({"type": "content_block_delta", "index": i,
                                   "delta": {"type": "text_delta", "text": text[k:k + step]}}, "content_block_delta"))
        else:
            out.append(encode({"type": "content_block_start", "index": i,
                               "content_block": {"type": "tool_use", "id": block["id"], "name": block["name"],
                                                 "input": {}}}, "content_block_start"))
            args = json.dumps(block["input"])
            step = max(1, len(args) // pieces)
            for k in range(0, len(args), step):
                out.append(encode({"type": "content_block_delta", "index": i,
                                   "delta": {"type": "input_json_delta", "partial_json": args[k:k + step]}},
                                  "content_block_delta"))
        out.append(encode({"type": "content_block_stop", "index": i}, "content_block_stop"))
    out.append(encode({"type": "message_delta", "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                       "usage": {"output_tokens": message["usage"]["output_tokens"]}}, "message_delta"))
    out.append(encode({"type": "message_stop"}, "message_stop"))
    return b"".join(out)


def openai_sse(completion: dict, include_usage: bool = True, pieces: int = 3) -> bytes:
    """An OpenAI chat.completion as chat.completions streams it."""
    base = {"id": completion["id"], "object": "chat.completion.chunk", "created": completion["created"],
            "model": completion["model"]}
    choice = completion["choices"][0]
    msg = choice["message"]

    def chunk(delta: dict, finish=None) -> bytes:
        return encode({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    out = [chunk({"role": "assistant", "content": ""})]
    text = msg.get("content") or ""
    step = max(1, len(text) // pieces)
    for k in range(0, len(text), step):
        out.append(chunk({"content": text[k:k + step]}))
    for n, call in enumerate(msg.get("tool_calls") or []):
        out.append(chunk({"tool_calls": [{"index": n, "id": call["id"], "type": "function",
                                          "function": {"name": call["function"]["name"], "arguments": ""}}]}))
        args = call["function"]["arguments"]
        step = max(1, len(args) // pieces)
        for k in range(0, len(args), step):
            out.append(chunk({"tool_calls": [{"index": n, "function": {"arguments": args[k:k + step]}}]}))
    out.append(chunk({}, choice["finish_reason"]))
    if include_usage:
        out.append(encode({**base, "choices": [], "usage": completion["usage"]}))
    out.append(encode("[DONE]"))
    return b"".join(out)


def events(data: bytes) -> list:
    return SSEParser().feed(data)


def fold_openai(data: bytes) -> dict:
    """OpenAI chunk events folded into {text, calls, finish, usage, done, error}."""
    out: dict = {"text": "", "calls": {}, "finish": None, "usage": None, "done": False, "error": None,
                 "role": None, "id": None, "model": None}
    for ev in events(data):
        if ev.data == "[DONE]":
            out["done"] = True
            continue
        doc = json.loads(ev.data)
        if "error" in doc:
            out["error"] = doc["error"]
            continue
        out["id"], out["model"] = doc["id"], doc["model"]
        if doc.get("usage"):
            out["usage"] = doc["usage"]
        for choice in doc["choices"]:
            delta = choice["delta"]
            out["role"] = delta.get("role", out["role"])
            out["text"] += delta.get("content") or ""
            for call in delta.get("tool_calls") or []:
                slot = out["calls"].setdefault(call["index"], {"id": None, "name": "", "arguments": ""})
                if call.get("id"):
                    slot["id"] = call["id"]
                fn = call.get("function") or {}
                slot["name"] += fn.get("name") or ""
                slot["arguments"] += fn.get("arguments") or ""
            if choice.get("finish_reason"):
                out["finish"] = choice["finish_reason"]
    return out


def fold_anthropic(data: bytes) -> dict:
    """Anthropic Messages events folded into a Message (plus `error`, `stopped`)."""
    msg: dict = {"content": [], "error": None, "stopped": False, "open": set()}
    partial: dict[int, str] = {}
    for ev in events(data):
        doc = json.loads(ev.data)
        assert ev.event == doc["type"], (ev.event, doc)
        kind = doc["type"]
        if kind == "message_start":
            msg.update({k: v for k, v in doc["message"].items() if k != "content"})
        elif kind == "content_block_start":
            assert doc["index"] == len(msg["content"])
            msg["content"].append(dict(doc["content_block"]))
            msg["open"].add(doc["index"])
        elif kind == "content_block_delta":
            assert doc["index"] in msg["open"]
            block = msg["content"][doc["index"]]
            if doc["delta"]["type"] == "text_delta":
                block["text"] += doc["delta"]["text"]
            else:
                partial[doc["index"]] = partial.get(doc["index"], "") + doc["delta"]["partial_json"]
        elif kind == "content_block_stop":
            msg["open"].discard(doc["index"])
            if doc["index"] in partial:
                msg["content"][doc["index"]]["input"] = json.loads(partial.pop(doc["index"]))
        elif kind == "message_delta":
            msg["stop_reason"] = doc["delta"]["stop_reason"]
            msg["usage"] = {**msg.get("usage", {}), **doc["usage"]}
        elif kind == "message_stop":
            msg["stopped"] = True
        elif kind == "error":
            msg["error"] = doc["error"]
    return msg
