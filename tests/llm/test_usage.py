"""The LLM answer scanner: shapes it reads, and (fuzzed) shapes it must leave alone without a sound."""
import json

from hypothesis import HealthCheck, given, settings, strategies as st

from sidecar.llm.usage import MAX_SSE_LINE, AnswerScanner, LlmCall, request_shape, scan_body


def chat() -> LlmCall:
    return request_shape("/v1/chat/completions", b'{"model": "gpt-4o", "max_tokens": 20, "stream": true}')


def sse(*docs, names=None) -> bytes:
    out = []
    for i, doc in enumerate(docs):
        head = f"event: {names[i]}\n" if names else ""
        out.append(f"{head}data: {json.dumps(doc)}\n\n")
    return "".join(out).encode()


OPENAI_STREAM = sse(
    {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o-2024", "usage": None,
     "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]},
    {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o-2024", "usage": None,
     "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]},
    {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o-2024", "choices": [],
     "usage": {"prompt_tokens": 12, "completion_tokens": 20, "total_tokens": 32,
               "prompt_tokens_details": {"cached_tokens": 4}}}) + b"data: [DONE]\n\n"

ANTHROPIC_STREAM = sse(
    {"type": "message_start", "message": {"id": "m1", "type": "message", "model": "claude-sonnet-4-5",
                                          "usage": {"input_tokens": 10, "cache_read_input_tokens": 5,
                                                    "output_tokens": 1}}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "usage"}},
    {"type": "message_delta", "delta": {"stop_reason": "max_tokens"}, "usage": {"output_tokens": 33}},
    {"type": "message_stop"},
    names=["message_start", "content_block_delta", "message_delta", "message_stop"])


def scan(call: LlmCall, data: bytes, pieces: list[int] | None = None, sse_mode: bool = True) -> LlmCall:
    s = AnswerScanner(call, sse=sse_mode)
    cuts = sorted(set(p % (len(data) + 1) for p in (pieces or [])))
    start = 0
    for cut in [*cuts, len(data)]:
        s.feed(data[start:cut])
        start = cut
    s.close()
    return call


def test_request_shapes():
    assert request_shape("/v1/models", b"") is None
    assert request_shape("/api/orders", b'{"model": "x"}') is None
    assert request_shape("/v1/chat/completions", b"<html>") is None
    c = request_shape("/openai/deployments/x/chat/completions", b'{"model": "m", "max_completion_tokens": 9}')
    assert (c.provider, c.operation, c.request_model, c.max_tokens) == ("openai", "chat", "m", 9)
    assert request_shape("/v1/messages", b'{"model": "claude"}').provider == "anthropic"
    assert request_shape("/v1/embeddings", None).operation == "embeddings"
    assert request_shape("/v1/completions/", b"{}").operation == "text_completion"


def test_openai_stream_in_any_pieces():
    for pieces in ([], [1], [7, 8, 9], list(range(0, len(OPENAI_STREAM), 3))):
        c = scan(chat(), OPENAI_STREAM, pieces)
        assert (c.response_model, c.input_tokens, c.output_tokens, c.cache_read_tokens) == ("gpt-4o-2024", 12, 20, 4)
        assert c.finish_reasons == ["length"] and c.first_chunk_ns > 0


def test_anthropic_stream_counts_cached_input_and_cumulative_output():
    c = scan(request_shape("/v1/messages", b'{"model": "claude", "stream": true}'), ANTHROPIC_STREAM, [50, 51])
    assert (c.response_model, c.input_tokens, c.output_tokens, c.cache_read_tokens) == ("claude-sonnet-4-5", 15, 33, 5)
    assert c.finish_reasons == ["max_tokens"]


def test_json_answers():
    c = chat()
    scan_body(c, json.dumps({"object": "chat.completion", "model": "g", "choices": [{"finish_reason": "stop"}],
                             "usage": {"prompt_tokens": 3, "completion_tokens": 4}}).encode())
    assert (c.input_tokens, c.output_tokens, c.finish_reasons) == (3, 4, ["stop"])
    e = request_shape("/v1/embeddings", b'{"model": "e"}')
    scan_body(e, b'{"object": "list", "data": [], "model": "e-3", "usage": {"prompt_tokens": 8, "total_tokens": 8}}')
    assert (e.input_tokens, e.output_tokens) == (8, 0)
    r = request_shape("/v1/responses", b'{"model": "o"}')
    scan_body(r, b'{"object": "response", "status": "completed", "model": "o-1", '
                 b'"usage": {"input_tokens": 6, "output_tokens": 2, "input_tokens_details": {"cached_tokens": 0}}}')
    assert (r.response_model, r.input_tokens, r.output_tokens, r.finish_reasons) == ("o-1", 6, 2, ["completed"])
    a = request_shape("/v1/messages", b"{}")
    scan(a, b'{"type": "message", "model": "c", "stop_reason": "end_turn", "usage": '
            b'{"input_tokens": 1, "output_tokens": 2}}', [5, 30], sse_mode=False)
    assert (a.input_tokens, a.output_tokens, a.finish_reasons) == (1, 2, ["end_turn"])


def test_responses_stream_completed_event():
    r = request_shape("/v1/responses", b'{"model": "o", "stream": true}')
    data = sse({"type": "response.created", "response": {"id": "r1", "object": "response", "model": "o-1",
                                                          "status": "in_progress", "usage": None}},
               {"type": "response.output_text.delta", "delta": "x"},
               {"type": "response.completed", "response": {"id": "r1", "object": "response", "model": "o-1",
                                                            "status": "completed",
                                                            "usage": {"input_tokens": 4, "output_tokens": 6}}})
    scan(r, data, [10])
    assert (r.response_model, r.input_tokens, r.output_tokens) == ("o-1", 4, 6)


def test_truncated_stream_counts_nothing():
    cut = OPENAI_STREAM.rindex(b"data: {")          # cut inside the usage chunk
    c = scan(chat(), OPENAI_STREAM[:cut + 40])
    assert not c.has_usage


def test_an_over_long_line_is_skipped_and_scanning_resumes():
    huge = b"data: " + b"x" * (MAX_SSE_LINE + 10) + b"\n\n"
    c = scan(chat(), huge + OPENAI_STREAM, [100, MAX_SSE_LINE, MAX_SSE_LINE + 30])
    assert (c.input_tokens, c.output_tokens) == (12, 20)


# -- fuzz: malformed, truncated or non-LLM answers leave no figures and raise nothing --------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["model", "id", "object", "type", "choices", "delta", "message", "response", "x",
                         "finish_reason", "stop_reason", "status"]), children, max_size=5),
    max_leaves=20)


def usage_free(value) -> bool:
    if isinstance(value, dict):
        return "usage" not in value and all(usage_free(v) for v in value.values())
    if isinstance(value, list):
        return all(usage_free(v) for v in value)
    return True


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=2000), pieces=st.lists(st.integers(min_value=0, max_value=2000), max_size=6),
       sse_mode=st.booleans())
def test_fuzz_random_bytes(data, pieces, sse_mode):
    c = scan(chat(), data, pieces, sse_mode=sse_mode)
    assert not c.has_usage


@settings(max_examples=150, deadline=None)
@given(docs=st.lists(json_values, max_size=5), pieces=st.lists(st.integers(min_value=0, max_value=5000), max_size=6))
def test_fuzz_llm_looking_json_without_usage(docs, pieces):
    data = b"".join(b"data: " + json.dumps(d).encode() + b"\n\n" for d in docs)
    c = scan(chat(), data, pieces)
    assert not c.has_usage
    for d in docs:
        one = chat()
        scan_body(one, json.dumps(d).encode())
        assert not one.has_usage


@settings(max_examples=200, deadline=None)
@given(cut=st.integers(min_value=0, max_value=len(OPENAI_STREAM) - 1),
       noise=st.binary(max_size=50), pieces=st.lists(st.integers(min_value=0, max_value=600), max_size=5))
def test_fuzz_truncated_or_corrupted_streams(cut, noise, pieces):
    """A stream cut before its usage line ends, with anything after the cut: never counts, never raises.
    (A cut after the usage line's newline counts the complete usage, which is right.)"""
    usage_line_end = OPENAI_STREAM.index(b"\n", OPENAI_STREAM.index(b'"usage": {"prompt'))
    data = OPENAI_STREAM[:cut] + noise
    c = scan(chat(), data, pieces)
    if cut <= usage_line_end:          # the usage line has not ended
        assert c.input_tokens is None or b'"usage": {' in noise   # noise alone cannot form a usage object
    else:
        assert (c.input_tokens, c.output_tokens) == (12, 20)


async def test_the_relay_wrapper_reads_the_last_chunk_when_the_consumer_stops_there():
    """A consumer that stops after the usage chunk (and never asks for the next) still gets it counted."""
    from sidecar.pipeline.send import _scanned

    async def upstream():
        for part in OPENAI_STREAM.split(b"\n\n")[:-2]:       # ... up to the usage event, no [DONE]
            yield part + b"\n\n"
    call = chat()
    relay = _scanned(upstream(), AnswerScanner(call, sse=True))
    async for chunk in relay:
        if b'"usage": {' in chunk:
            break                                          # stops at the yield of the last chunk
    await relay.aclose()
    assert (call.input_tokens, call.output_tokens) == (12, 20)
