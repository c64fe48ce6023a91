"""Strict request checkers derived from the providers' own SDK request types.

Allowed keys, required keys and roles come from the TypedDicts the `anthropic` and `openai` packages
publish (`MessageCreateParams`, `UserMessageParam`, `TextBlockParam`, ..., `CompletionCreateParams`,
`ChatCompletion*MessageParam`), so a body the real API would reject for its shape -- an unknown key, a
missing required one, a role or block type it lacks -- is rejected here too. (pydantic cannot build a
validator from these TypedDicts: some fields are typed `IO[bytes]` or `Iterable`.)

One addition: the anthropic 2.x types no longer declare the sampling parameters (`temperature`,
`top_p`, `top_k`) that the Messages API has long taken; the checker accepts those three.
"""
from __future__ import annotations

import functools

import typing_extensions as te
from anthropic.types import (AssistantMessageParam, ImageBlockParam, TextBlockParam, ToolChoiceAnyParam,
                             ToolChoiceAutoParam, ToolChoiceNoneParam, ToolChoiceToolParam, ToolParam,
                             ToolResultBlockParam, ToolUseBlockParam, UserMessageParam)
from anthropic.types.message_create_params import MessageCreateParamsBase
from openai.types.chat import (ChatCompletionAssistantMessageParam, ChatCompletionContentPartImageParam,
                               ChatCompletionContentPartTextParam, ChatCompletionFunctionToolParam,
                               ChatCompletionMessageToolCallParam, ChatCompletionSystemMessageParam,
                               ChatCompletionToolMessageParam, ChatCompletionUserMessageParam)
from openai.types.chat.completion_create_params import CompletionCreateParamsBase

SAMPLING = frozenset({"temperature", "top_p", "top_k"})


class Rejected(Exception):
    pass


@functools.cache
def _keys(td) -> tuple[frozenset, frozenset]:
    hints = te.get_type_hints(td, include_extras=True)
    return frozenset(hints), frozenset(k for k, v in hints.items() if te.get_origin(v) is te.Required)


def _check(doc: object, td, where: str, also: frozenset = frozenset()) -> dict:
    if not isinstance(doc, dict):
        raise Rejected(f"{where}: not an object")
    allowed, required = _keys(td)
    extra = set(doc) - allowed - also
    if extra:
        raise Rejected(f"{where}: unknown keys {sorted(extra)}")
    missing = required - set(doc)
    if missing:
        raise Rejected(f"{where}: missing {sorted(missing)}")
    return doc


ANTHROPIC_ROLES = {"user": UserMessageParam, "assistant": AssistantMessageParam}
ANTHROPIC_BLOCKS = {"text": TextBlockParam, "image": ImageBlockParam, "tool_use": ToolUseBlockParam,
                    "tool_result": ToolResultBlockParam}
ANTHROPIC_CHOICES = {"auto": ToolChoiceAutoParam, "any": ToolChoiceAnyParam, "tool": ToolChoiceToolParam,
                     "none": ToolChoiceNoneParam}


def check_anthropic(doc: object) -> None:
    _check(doc, MessageCreateParamsBase, "body", SAMPLING | {"stream"})
    if not isinstance(doc["max_tokens"], int) or not isinstance(doc["model"], str):
        raise Rejected("max_tokens/model types")
    for i, m in enumerate(doc["messages"]):
        td = ANTHROPIC_ROLES.get(m.get("role") if isinstance(m, dict) else None)
        if td is None:
            raise Rejected(f"messages[{i}]: role {m.get('role') if isinstance(m, dict) else m!r}")
        _check(m, td, f"messages[{i}]")
        if i and doc["messages"][i - 1]["role"] == m["role"]:
            raise Rejected(f"messages[{i}]: two {m['role']} turns in a row")
        content = m["content"]
        if isinstance(content, str):
            continue
        if not isinstance(content, list) or not content:
            raise Rejected(f"messages[{i}].content: empty or not a list")
        for j, block in enumerate(content):
            btd = ANTHROPIC_BLOCKS.get(block.get("type") if isinstance(block, dict) else None)
            if btd is None:
                raise Rejected(f"messages[{i}].content[{j}]: block {block!r}")
            _check(block, btd, f"messages[{i}].content[{j}]")
            if block["type"] == "text" and not block["text"]:
                raise Rejected(f"messages[{i}].content[{j}]: empty text block")
            if block["type"] == "tool_use" and not isinstance(block["input"], dict):
                raise Rejected(f"messages[{i}].content[{j}]: tool input is not an object")
    for i, tool in enumerate(doc.get("tools", [])):
        _check(tool, ToolParam, f"tools[{i}]")
    if "tool_choice" in doc:
        ctd = ANTHROPIC_CHOICES.get(doc["tool_choice"].get("type"))
        if ctd is None:
            raise Rejected("tool_choice type")
        _check(doc["tool_choice"], ctd, "tool_choice")
    if not isinstance(doc.get("system", ""), (str, list)):
        raise Rejected("system")


OPENAI_ROLES = {"system": ChatCompletionSystemMessageParam, "user": ChatCompletionUserMessageParam,
                "assistant": ChatCompletionAssistantMessageParam, "tool": ChatCompletionToolMessageParam}
OPENAI_PARTS = {"text": ChatCompletionContentPartTextParam, "image_url": ChatCompletionContentPartImageParam}


def check_openai(doc: object) -> None:
    _check(doc, CompletionCreateParamsBase, "body", frozenset({"stream"}))
    for i, m in enumerate(doc["messages"]):
        td = OPENAI_ROLES.get(m.get("role") if isinstance(m, dict) else None)
        if td is None:
            raise Rejected(f"messages[{i}]: role {m!r}")
        _check(m, td, f"messages[{i}]")
        if isinstance(m.get("content"), list):
            for j, part in enumerate(m["content"]):
                ptd = OPENAI_PARTS.get(part.get("type") if isinstance(part, dict) else None)
                if ptd is None:
                    raise Rejected(f"messages[{i}].content[{j}]: part {part!r}")
                _check(part, ptd, f"messages[{i}].content[{j}]")
        for j, call in enumerate(m.get("tool_calls") or []):
            _check(call, ChatCompletionMessageToolCallParam, f"messages[{i}].tool_calls[{j}]")
    for i, tool in enumerate(doc.get("tools", [])):
        _check(tool, ChatCompletionFunctionToolParam, f"tools[{i}]")
