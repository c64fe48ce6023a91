"""The translators, by example: requests, answers, errors and streams in both directions (pure code:
dicts and bytes in, dicts and bytes out)."""
import json

import pytest

from llm_streams import anthropic_sse, fold_anthropic, fold_openai, openai_sse
from provider_shapes import Rejected, check_anthropic, check_openai
from sidecar.llm.translate import TRANSLATIONS, Refused
from sidecar.llm.translate.sse import SSEParser

O2A = TRANSLATIONS["openai-chat/anthropic-messages"]
A2O = TRANSLATIONS["anthropic-messages/openai-chat"]

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}


def test_openai_request_becomes_a_messages_request_the_strict_parser_accepts():
    doc = {"model": "gpt-4o", "temperature": 1.5, "top_p": 0.9, "stop": "END", "user": "u-1",
           "stream": True, "stream_options": {"include_usage": True}, "parallel_tool_calls": False,
           "tools": [WEATHER], "tool_choice": "required",
           "messages": [
               {"role": "system", "content": "Be brief."},
               {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
               {"role": "user", "content": "Weather in Paris?"},
               {"role": "user", "content": [{"type": "text", "text": "And a picture:"},
                                            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
                                            {"type": "image_url", "image_url": {"url": "https://x.test/a.jpg"}}]},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
               {"role": "user", "content": "Thanks"}]}
    with pytest.raises(Rejected):
        check_anthropic(doc)                 # the OpenAI shape itself is refused by the strict parser
    plan = O2A.request(doc, max_tokens=1024)
    body = plan.body
    check_anthropic(body)
    assert body["system"] == "Be brief.\n\nUse tools."
    assert body["max_tokens"] == 1024        # the policy default: the app sent none
    assert body["temperature"] == 1.0        # OpenAI's 0..2 clamped to Anthropic's 0..1
    assert body["top_p"] == 0.9 and body["stop_sequences"] == ["END"]
    assert body["metadata"] == {"user_id": "u-1"} and body["stream"] is True
    assert body["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert body["tools"] == [{"name": "get_weather", "description": "Weather in a city",
                              "input_schema": WEATHER["function"]["parameters"]}]
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]   # merged
    first = body["messages"][0]["content"]
    assert first[0] == {"type": "text", "text": "Weather in Paris?"}
    assert first[2] == {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}}
    assert first[3] == {"type": "image", "source": {"type": "url", "url": "https://x.test/a.jpg"}}
    assert body["messages"][1]["content"] == [{"type": "tool_use", "id": "call_1", "name": "get_weather",
                                               "input": {"city": "Paris"}}]
    assert body["messages"][2]["content"] == [{"type": "tool_result", "tool_use_id": "call_1", "content": "18C"},
                                              {"type": "text", "text": "Thanks"}]
    assert plan.stream and plan.include_usage


def test_max_completion_tokens_wins_over_the_default():
    plan = O2A.request({"model": "m", "max_completion_tokens": 77, "messages": [{"role": "user", "content": "x"}]},
                       max_tokens=1024)
    assert plan.body["max_tokens"] == 77


@pytest.mark.parametrize("field,value,words", [
    ("n", 2, "n > 1"), ("logprobs", True, "logprobs"), ("top_logprobs", 3, "top_logprobs"),
    ("logit_bias", {"1": 2}, "logit_bias"), ("presence_penalty", 0.5, "presence_penalty"),
    ("response_format", {"type": "json_object"}, "response_format"), ("audio", {"voice": "x"}, "audio"),
])
def test_features_anthropic_lacks_are_refused_with_the_reason(field, value, words):
    with pytest.raises(Refused, match=words):
        O2A.request({"model": "m", "messages": [{"role": "user", "content": "x"}], field: value}, max_tokens=10)


def test_harmless_values_of_those_fields_pass():
    plan = O2A.request({"model": "m", "n": 1, "logprobs": False, "presence_penalty": 0,
                        "response_format": {"type": "text"}, "seed": 3, "some_future_field": {"x": 1},
                        "messages": [{"role": "user", "content": "x"}]}, max_tokens=10)
    check_anthropic(plan.body)


def test_anthropic_answer_becomes_a_chat_completion():
    answer = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
              "content": [{"type": "text", "text": "Checking."},
                          {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}],
              "stop_reason": "tool_use", "stop_sequence": None,
              "usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 2}}
    plan = O2A.request({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}, max_tokens=10)
    out = O2A.answer(answer, plan, now=1700000000)
    assert out["object"] == "chat.completion" and out["created"] == 1700000000
    assert out["model"] == "claude-sonnet-4-5"          # what the provider says it served
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Checking."
    call = choice["message"]["tool_calls"][0]
    assert call["id"] == "toolu_1" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert out["usage"] == {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17,
                            "prompt_tokens_details": {"cached_tokens": 2}}


@pytest.mark.parametrize("stop,finish", [("end_turn", "stop"), ("stop_sequence", "stop"),
                                         ("max_tokens", "length"), ("tool_use", "tool_calls"),
                                         ("something_new", "stop")])
def test_finish_reasons(stop, finish):
    plan = O2A.request({"model": "m", "messages": [{"role": "user", "content": "x"}]}, max_tokens=10)
    out = O2A.answer({"content": [], "stop_reason": stop, "usage": {}}, plan, now=0)
    assert out["choices"][0]["finish_reason"] == finish


def test_overloaded_529_becomes_an_openai_503_keeping_the_error_type():
    status, body = O2A.error(529, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    assert status == 503
    assert body == {"error": {"message": "Overloaded", "type": "overloaded_error", "param": None,
                              "code": "overloaded_error"}}
    status, body = O2A.error(429, "not json")
    assert status == 429 and body["error"]["type"] == "rate_limit_error"


def test_legacy_functions_round_trip_as_function_call():
    doc = {"model": "m", "functions": [WEATHER["function"]], "function_call": {"name": "get_weather"},
           "messages": [{"role": "user", "content": "x"},
                        {"role": "assistant", "content": None,
                         "function_call": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}},
                        {"role": "function", "name": "get_weather", "content": "-3C"}]}
    plan = O2A.request(doc, max_tokens=10)
    check_anthropic(plan.body)
    assert plan.body["tool_choice"] == {"type": "tool", "name": "get_weather"}
    answer = {"content": [{"type": "tool_use", "id": "t", "name": "get_weather", "input": {}}],
              "stop_reason": "tool_use", "usage": {}}
    message = O2A.answer(answer, plan, now=0)["choices"][0]
    assert message["finish_reason"] == "function_call"
    assert message["message"]["function_call"] == {"name": "get_weather", "arguments": "{}"}


def test_anthropic_stream_becomes_openai_chunks_with_usage_and_done():
    message = {"id": "msg_9", "type": "message", "role": "assistant", "model": "claude-x",
               "content": [{"type": "text", "text": "Hello there"},
                           {"type": "tool_use", "id": "toolu_2", "name": "lookup", "input": {"q": "a b", "n": 2}}],
               "stop_reason": "tool_use", "usage": {"input_tokens": 7, "output_tokens": 9}}
    plan = O2A.request({"model": "gpt", "stream": True, "stream_options": {"include_usage": True},
                        "messages": [{"role": "user", "content": "x"}]}, max_tokens=10)
    tr = O2A.stream(plan, now=5)
    raw = anthropic_sse(message)
    out = b"".join(tr.feed(raw[i:i + 7]) for i in range(0, len(raw), 7)) + tr.end()
    folded = fold_openai(out)
    assert folded["done"] and folded["error"] is None and not tr.failed
    assert folded["role"] == "assistant" and folded["text"] == "Hello there"
    assert folded["calls"] == {0: {"id": "toolu_2", "name": "lookup", "arguments": json.dumps({"q": "a b", "n": 2})}}
    assert folded["finish"] == "tool_calls" and folded["model"] == "claude-x"
    assert folded["usage"]["prompt_tokens"] == 7 and folded["usage"]["completion_tokens"] == 9
    assert out.endswith(b"data: [DONE]\n\n")


def test_anthropic_error_event_ends_the_openai_stream_with_an_error():
    tr = O2A.stream(O2A.request({"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]},
                                max_tokens=5), now=0)
    out = tr.feed(b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"busy"}}\n\n')
    assert fold_openai(out)["error"] == {"message": "busy", "type": "overloaded_error", "param": None,
                                         "code": "overloaded_error"}
    assert tr.done and tr.failed and tr.feed(b"data: more\n\n") == b""


def test_truncated_and_malformed_streams_end_with_an_error_event():
    plan = O2A.request({"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}, max_tokens=5)
    message = {"id": "m", "model": "c", "content": [{"type": "text", "text": "abc"}], "stop_reason": "end_turn",
               "usage": {"input_tokens": 1, "output_tokens": 1}}
    raw = anthropic_sse(message)
    tr = O2A.stream(plan, now=0)
    out = tr.feed(raw[: len(raw) // 2]) + tr.end()
    assert fold_openai(out)["error"]["type"] == "stream_error" and tr.failed
    tr = O2A.stream(plan, now=0)
    out = tr.feed(b"event: message_start\ndata: {not json\n\n")
    assert "malformed" in fold_openai(out)["error"]["message"]


def test_anthropic_request_becomes_an_openai_request():
    doc = {"model": "claude-x", "max_tokens": 300, "system": [{"type": "text", "text": "Be terse."}],
           "stop_sequences": ["###"], "temperature": 0.3, "metadata": {"user_id": "u"}, "stream": True,
           "tools": [{"name": "lookup", "description": "d", "input_schema": {"type": "object"}}],
           "tool_choice": {"type": "tool", "name": "lookup", "disable_parallel_tool_use": True},
           "messages": [{"role": "user", "content": "Find x"},
                        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "s"},
                                                          {"type": "text", "text": "Looking."},
                                                          {"type": "tool_use", "id": "t1", "name": "lookup",
                                                           "input": {"q": "x"}}]},
                        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "42"},
                                                     {"type": "text", "text": "and?"},
                                                     {"type": "image", "source": {"type": "base64",
                                                                                  "media_type": "image/png",
                                                                                  "data": "AA"}}]}]}
    with pytest.raises(Rejected):
        check_openai(doc)
    plan = A2O.request(doc, max_tokens=1024)
    body = plan.body
    check_openai(body)
    assert body["max_completion_tokens"] == 300 and body["stop"] == ["###"] and body["user"] == "u"
    assert body["stream_options"] == {"include_usage": True}
    assert body["tool_choice"] == {"type": "function", "function": {"name": "lookup"}}
    assert body["parallel_tool_calls"] is False
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "user"]
    assert body["messages"][2]["tool_calls"][0]["function"] == {"name": "lookup", "arguments": '{"q": "x"}'}
    assert body["messages"][3] == {"role": "tool", "tool_call_id": "t1", "content": "42"}
    assert body["messages"][4]["content"][1] == {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}


@pytest.mark.parametrize("field,value", [("top_k", 5), ("thinking", {"type": "enabled", "budget_tokens": 100})])
def test_features_openai_lacks_are_refused(field, value):
    with pytest.raises(Refused, match=field):
        A2O.request({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], field: value},
                    max_tokens=5)


def test_openai_answer_error_and_stream_become_anthropic():
    completion = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-2024",
                  "choices": [{"index": 0, "finish_reason": "length",
                               "message": {"role": "assistant", "content": "partial",
                                           "tool_calls": [{"id": "c1", "type": "function",
                                                           "function": {"name": "f", "arguments": '{"a": [1]}'}}]}}],
                  "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13,
                            "prompt_tokens_details": {"cached_tokens": 4}}}
    plan = A2O.request({"model": "claude", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
                       max_tokens=5)
    out = A2O.answer(completion, plan, now=0)
    assert out["type"] == "message" and out["model"] == "gpt-4o-2024" and out["stop_reason"] == "max_tokens"
    assert out["content"] == [{"type": "text", "text": "partial"},
                              {"type": "tool_use", "id": "c1", "name": "f", "input": {"a": [1]}}]
    assert out["usage"]["input_tokens"] == 6 and out["usage"]["cache_read_input_tokens"] == 4
    status, body = A2O.error(503, {"error": {"message": "down", "type": "server_error"}})
    assert status == 529 and body == {"type": "error", "error": {"type": "overloaded_error", "message": "down"}}
    tr = A2O.stream(plan, now=0)
    raw = openai_sse(completion)
    events = b"".join(tr.feed(raw[i:i + 5]) for i in range(0, len(raw), 5)) + tr.end()
    folded = fold_anthropic(events)
    assert folded["stopped"] and folded["error"] is None and not folded["open"]
    assert folded["content"] == out["content"] and folded["stop_reason"] == "max_tokens"
    assert folded["usage"]["output_tokens"] == 3


def test_sse_parser_handles_any_line_ending_and_split_points():
    raw = b"event: a\r\ndata: 1\r\n\r\n: comment\ndata: 2\ndata: 3\n\nevent: b\rdata: 4\r\r"
    for cut in range(len(raw)):
        p = SSEParser()
        got = p.feed(raw[:cut]) + p.feed(raw[cut:])
        assert [(e.event, e.data) for e in got] == [("a", "1"), (None, "2\n3"), ("b", "4")], cut
