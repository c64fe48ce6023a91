"""A fallback target that speaks another provider's API (`rewrite: {translate: APP/PROVIDER}`).

    app request --translate--> json_map / json_set --> provider path, provider headers --> target stack
    app answer  <--translate-- JSON answer, error body, or SSE stream (event by event, as it arrives)

The translators are pure (sidecar/llm/translate); this module only moves bytes and headers. The
target's breaker sits inside (it judges the provider's own answer: a 529 is a failure of that upstream);
the chain and the app see the translated answer (a 529 overloaded_error arrives as an OpenAI 503).
"""
from __future__ import annotations

import json
from typing import AsyncIterator, Awaitable, Callable

from multidict import CIMultiDict

from sidecar.llm.translate import TRANSLATIONS, Plan, Refused, StreamTranslator, Translation
from sidecar.exchange.body import RequestBody
from sidecar.exchange.calls import make_call
from sidecar.pipeline.calls import apply_json_rewrite
from sidecar.exchange.types import Call, Exchange, Reply
from sidecar.policy.model import Rewrite, Upstream
from sidecar.transport.errors import UpstreamFailure
from sidecar.policy.conditions import Outcome

# A whole (non-streamed) answer is read before it is translated; past this it is refused, not buffered.
MAX_ANSWER = 8 * 1024 * 1024


async def call_translated(ex: Exchange, upstream: Upstream, rewrite: Rewrite, label: str,
                          stack: Callable[[Exchange, Call], Awaitable[Reply]]) -> Reply:
    tr = TRANSLATIONS[rewrite.translate or ""]
    try:
        call, plan = translated_call(ex, upstream, rewrite, label, tr)
    except Refused as exc:
        return _json(400, tr.refusal(exc.reason), "sidecar")
    return await translated_reply(ex, await stack(ex, call), tr, plan)


def translated_call(ex: Exchange, upstream: Upstream, rewrite: Rewrite, label: str,
                    tr: Translation) -> tuple[Call, Plan]:
    """The provider's request. Raises `Refused` when the app's request cannot be said in its API."""
    try:
        doc = json.loads(ex.body.data or b"")
    except (ValueError, UnicodeDecodeError) as exc:
        raise Refused("the request body is not JSON") from exc
    plan = tr.request(doc, max_tokens=rewrite.max_tokens)
    body = plan.body
    apply_json_rewrite(body, rewrite)        # after translation: json_map speaks the provider's fields
    headers = CIMultiDict(ex.headers)
    for name in tr.app_headers + rewrite.remove_headers + ("content-length", "content-encoding", "accept"):
        headers.popall(name, None)           # the app's key for its own provider never leaves
    for name, value in tr.provider_headers:
        headers[name] = value                # defaults: the upstream's and the rewrite's headers win
    headers["content-type"] = "application/json"
    headers["accept"] = "text/event-stream" if plan.stream else "application/json"
    headers["accept-encoding"] = "identity"  # the answer is read and rewritten, so it must be plain
    query = ex.url.raw_query_string
    path = rewrite.path or tr.path
    data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    call = make_call(ex, upstream, headers=headers, path_qs=path + (f"?{query}" if query else ""),
                     body=RequestBody(data), fallback_target=label)
    for name, value in rewrite.set_headers:
        call.headers[name] = value
    return call, plan


async def translated_reply(ex: Exchange, reply: Reply, tr: Translation, plan: Plan) -> Reply:
    headers = reply.headers
    for name in ("content-length", "content-encoding", "etag", "last-modified"):
        headers.popall(name, None)
    streamed = "text/event-stream" in headers.get("content-type", "")
    if reply.status < 400 and streamed and reply.stream is not None:
        translator = tr.stream(plan, now=int(ex.ctx.clock.time()))
        try:
            head = await _head(reply.stream, translator)
        except UpstreamFailure:
            reply.finish(False)
            raise
        if translator.failed and not translator.began:
            await _close(reply.stream)
            reply.release_cb = None
            return _failed_before_answer(reply, translator)
        reply.stream = _relay(reply.stream, translator, head)
        return reply
    try:
        data = await _read(reply)
    except UpstreamFailure:
        reply.finish(False)
        raise
    try:
        doc = json.loads(data) if data else None
    except (ValueError, UnicodeDecodeError):
        doc = None
    if reply.status >= 400:
        status, out = tr.error(reply.status, doc)
    elif streamed:                           # a whole event stream in one read: translated the same way
        translator = tr.stream(plan, now=int(ex.ctx.clock.time()))
        reply.body = translator.feed(data) + translator.end()
        return _failed_before_answer(reply, translator) if translator.failed and not translator.began else reply
    else:
        try:
            status, out = reply.status, tr.answer(doc, plan, now=int(ex.ctx.clock.time()))
        except Refused as exc:
            reply.finish(False)
            return _json(502, tr.error(502, {"error": {"message": f"fallback answer unreadable: {exc.reason}"}})[1],
                         reply.upstream)
    reply.status = status
    reply.body = json.dumps(out, separators=(",", ":"), ensure_ascii=False).encode()
    headers["content-type"] = "application/json"
    return reply


def _failed_before_answer(reply: Reply, translator: StreamTranslator) -> Reply:
    """An error event before the answer began (Anthropic streams an overload this way, after a 200):
    nothing has reached the app, so it is a failed try that the chain moves on from."""
    reply.finish(False)
    status = 503 if "overloaded" in json.dumps(translator.error_body) else 502
    return _json(status, translator.error_body or {}, reply.upstream)


async def _read(reply: Reply) -> bytes:
    if reply.stream is None:
        return reply.body or b""
    parts, size = [], 0
    async for chunk in reply.stream:
        size += len(chunk)
        if size > MAX_ANSWER:
            raise UpstreamFailure(Outcome.PROTOCOL_ERROR, f"a fallback answer over {MAX_ANSWER} bytes to translate")
        parts.append(chunk)
    reply.stream = None
    reply.release_cb = None
    return b"".join(parts)


async def _head(source: AsyncIterator[bytes], tr: StreamTranslator) -> bytes:
    """Read until the answer begins (or the stream ends): what comes before is a few small events."""
    out = []
    async for chunk in source:
        out.append(tr.feed(chunk))
        if tr.began or tr.done:
            break
    else:
        out.append(tr.end())
    return b"".join(out)


async def _relay(source: AsyncIterator[bytes], tr: StreamTranslator, head: bytes) -> AsyncIterator[bytes]:
    """The provider's events, translated chunk by chunk. A stream that breaks, ends early or carries an
    error event ends the app's stream with an error event, then counts as cut (the breaker's verdict)."""
    try:
        if head:
            yield head
        # Read to the provider's end even after the translated stream is complete: the layers below
        # (the LLM usage scanner in send.py) see each chunk only once the next one is asked for.
        async for chunk in source:
            out = tr.feed(chunk)
            if out:
                yield out
            if tr.failed:
                break
        tail = tr.end()
        if tail:
            yield tail
    except UpstreamFailure as exc:
        yield tr.fail(f"the fallback provider's stream broke: {exc.kind}")
        raise
    finally:
        await _close(source)
    if tr.failed:
        raise UpstreamFailure(Outcome.PROTOCOL_ERROR, "the fallback provider's stream ended with an error")


async def _close(source: AsyncIterator[bytes]) -> None:
    aclose = getattr(source, "aclose", None)
    if aclose is not None:                   # the transport's relay releases its connection on close
        await aclose()


def _json(status: int, doc: dict[str, object], upstream: str) -> Reply:
    return Reply(status=status, headers=CIMultiDict({"content-type": "application/json"}), upstream=upstream,
                 body=json.dumps(doc, separators=(",", ":")).encode())
