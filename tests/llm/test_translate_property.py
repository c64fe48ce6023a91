"""Round-trip properties over generated conversations (hypothesis).

- OpenAI request -> Anthropic -> OpenAI keeps roles, text, tool names, arguments and results, and the
  Anthropic body passes the strict parser derived from the anthropic package's request types.
- The answer built from it survives Anthropic -> OpenAI -> Anthropic, whole or streamed in arbitrary
  pieces, and the streamed translation equals the whole-answer one.
- A truncated stream ends with one error event; arbitrary JSON or bytes never raise anything but
  `Refused` (a 400 for the app).
"""
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_streams import anthropic_sse, fold_anthropic, fold_openai, openai_sse
from provider_shapes import check_anthropic, check_openai
from sidecar.llm.translate import TRANSLATIONS, Refused

O2A = TRANSLATIONS["openai-chat/anthropic-messages"]
A2O = TRANSLATIONS["anthropic-messages/openai-chat"]
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30)
names = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,15}", fullmatch=True)
scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | text
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(text, inner, max_size=3), max_leaves=8)
arguments = st.dictionaries(names, json_values, max_size=4)


@st.composite
def conversations(draw):
    """OpenAI messages: an optional system prompt, then user / assistant (text, tool calls) / tool turns."""
    msgs = []
    if draw(st.booleans()):
        msgs.append({"role": draw(st.sampled_from(["system", "developer"])), "content": draw(text)})
    n = 0
    for _ in range(draw(st.integers(1, 4))):
        msgs.append({"role": "user", "content": draw(text)})
        calls = [{"id": f"call_{(n := n + 1)}", "type": "function",
                  "function": {"name": draw(names), "arguments": json.dumps(draw(arguments))}}
                 for _ in range(draw(st.integers(0, 2)))]
        reply = {"role": "assistant", "content": draw(st.none() | text) if calls else draw(text)}
        if calls:
            reply["tool_calls"] = calls
        msgs.append(reply)
        msgs.extend({"role": "tool", "tool_call_id": c["id"], "content": draw(text)} for c in calls)
    msgs.append({"role": "user", "content": draw(text)})
    return msgs


def flatten(msgs: list) -> list:
    """A conversation as (kind, ...) items; consecutive user texts joined as a translation joins them."""
    items: list = []
    for m in msgs:
        role = m["role"]
        if role in ("system", "developer"):
            items.append(("system", m["content"]))
        elif role == "tool":
            items.append(("result", m["tool_call_id"], m["content"]))
        elif role == "user":
            if items and items[-1][0] == "user":
                items[-1] = ("user", items[-1][1] + "\n" + m["content"])
            else:
                items.append(("user", m["content"]))
        else:
            if m.get("content"):
                items.append(("assistant", m["content"]))
            for c in m.get("tool_calls") or []:
                items.append(("call", c["id"], c["function"]["name"], json.loads(c["function"]["arguments"])))
    return items


@SETTINGS
@given(conversations(), st.integers(1, 4096))
def test_openai_request_round_trips_through_anthropic(msgs, default):
    plan = O2A.request({"model": "gpt-4o", "messages": msgs}, max_tokens=default)
    check_anthropic(plan.body)
    back = A2O.request(plan.body, max_tokens=default).body
    check_openai(back)
    assert flatten(back["messages"]) == flatten(msgs)
    assert back["max_completion_tokens"] == default


@st.composite
def anthropic_answers(draw):
    content = []
    if draw(st.booleans()):
        content.append({"type": "text", "text": draw(text)})
    content += [{"type": "tool_use", "id": f"toolu_{i}", "name": draw(names), "input": draw(arguments)}
                for i in range(draw(st.integers(0, 3)))]
    stop = "tool_use" if len(content) > 1 or (content and content[0]["type"] == "tool_use") \
        else draw(st.sampled_from(["end_turn", "max_tokens"]))
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": draw(names), "content": content,
            "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": draw(st.integers(0, 10**6)), "output_tokens": draw(st.integers(0, 10**6))}}


PLAN = O2A.request({"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": "x"}]}, max_tokens=10)
BACK = A2O.request({"model": "claude", "max_tokens": 10, "stream": True,
                    "messages": [{"role": "user", "content": "x"}]}, max_tokens=10)


def pieces(raw: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(raw) + 1) for c in cuts} | {0, len(raw)})
    return [raw[a:b] for a, b in zip(points, points[1:], strict=False)]


@SETTINGS
@given(anthropic_answers(), st.lists(st.integers(0, 10**6), max_size=12))
def test_answers_round_trip_whole_and_streamed(answer, cuts):
    completion = O2A.answer(answer, PLAN, now=1)
    message = completion["choices"][0]["message"]
    assert message["content"] == "".join(b["text"] for b in answer["content"] if b["type"] == "text") or (
        message["content"] is None and message.get("tool_calls"))
    again = A2O.answer(completion, BACK, now=1)
    assert again["content"] == answer["content"]
    assert again["stop_reason"] == answer["stop_reason"]
    assert again["usage"]["input_tokens"] == answer["usage"]["input_tokens"]
    assert again["usage"]["output_tokens"] == answer["usage"]["output_tokens"]

    tr = O2A.stream(PLAN, now=1)
    chunks = b"".join(tr.feed(p) for p in pieces(anthropic_sse(answer), cuts)) + tr.end()
    folded = fold_openai(chunks)
    assert folded["done"] and folded["error"] is None
    assert folded["text"] == (message["content"] or "")
    streamed = [folded["calls"][k] for k in sorted(folded["calls"])]
    whole = message.get("tool_calls") or []
    assert [(c["id"], c["name"], json.loads(c["arguments"])) for c in streamed] \
        == [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole]
    assert folded["finish"] == completion["choices"][0]["finish_reason"]
    assert folded["usage"] == completion["usage"]

    back = A2O.stream(BACK, now=1)
    events = b"".join(back.feed(p) for p in pieces(chunks, cuts)) + back.end()
    msg = fold_anthropic(events)
    assert msg["stopped"] and msg["error"] is None and not msg["open"]
    assert msg["content"] == answer["content"] and msg["stop_reason"] == answer["stop_reason"]


@SETTINGS
@given(anthropic_answers(), st.data())
def test_a_truncated_stream_ends_with_one_error_event(answer, data):
    for raw, tr, fold in ((anthropic_sse(answer), O2A.stream(PLAN, now=1), fold_openai),
                          (openai_sse(O2A.answer(answer, PLAN, now=1)), A2O.stream(BACK, now=1), fold_anthropic)):
        cut = data.draw(st.integers(0, len(raw) - len(b"data: [DONE]\n\n") - 1))
        out = tr.feed(raw[:cut]) + tr.end()
        assert tr.done and tr.failed
        assert fold(out)["error"] is not None
        assert out.count(b"error") >= 1 and tr.end() == b"" and tr.feed(raw[cut:]) == b""


@SETTINGS
@given(st.dictionaries(st.sampled_from(["model", "messages", "tools", "tool_choice", "stop", "max_tokens",
                                        "system", "stream", "stream_options", "functions", "n", "temperature",
                                        "max_completion_tokens", "user", "metadata", "stop_sequences"]) | text,
                       json_values, max_size=8)
       | json_values, st.integers(1, 100))
def test_arbitrary_json_is_translated_or_refused_never_a_crash(doc, default):
    for tr in (O2A, A2O):
        try:
            tr.request(doc, max_tokens=default)
        except Refused:
            pass
        try:
            assert isinstance(tr.answer(doc, PLAN, now=0), dict)
        except Refused:
            pass
        status, body = tr.error(500, doc)
        assert status >= 500 and isinstance(body, dict)


@SETTINGS
@given(st.lists(st.binary(max_size=64) | st.sampled_from([
    b"event: message_start\n", b"data: {\"type\": \"message_start\", \"message\": 3}\n\n",
    b"data: {\"type\": \"content_block_delta\", \"index\": [1]}\n\n", b"data: [DONE]\n\n",
    b"data: {\"choices\": [{\"delta\": {\"tool_calls\": [7]}}]}\n\n", b"\r\n", b"data: \xff\n\n"]), max_size=12))
def test_arbitrary_bytes_in_a_stream_never_raise(chunks):
    for tr in (O2A.stream(PLAN, now=0), A2O.stream(BACK, now=0)):
        out = b"".join(tr.feed(c) for c in chunks) + tr.end()
        assert tr.done
        assert isinstance(out, bytes)
