"""A fallback upstream's request: the primary's (exchange/calls.py) with the target's rewrite applied."""
from __future__ import annotations

import json

from multidict import CIMultiDict

from sidecar.exchange.body import RequestBody
from sidecar.exchange.calls import make_call, path_qs_of
from sidecar.exchange.types import Call, Exchange
from sidecar.policy.model import Rewrite, Upstream


def rewritten_call(ex: Exchange, upstream: Upstream, rewrite: Rewrite | None, label: str) -> Call:
    """The request for a fallback upstream, with `rewrite` applied (path, headers, JSON body fields)."""
    headers = CIMultiDict(ex.headers)
    path_qs = path_qs_of(ex.url)
    body = ex.body
    if rewrite is not None:
        if rewrite.path is not None:
            query = ex.url.raw_query_string
            path_qs = rewrite.path + (f"?{query}" if query else "")
        for name in rewrite.remove_headers:
            headers.popall(name, None)
        if rewrite.touches_body and body.data is not None:     # replayable: the whole body is here
            new = rewrite_json(body.data, rewrite)
            if new is not None:
                body = RequestBody(new)
                headers.popall("content-length", None)
    call = make_call(ex, upstream, headers=headers, path_qs=path_qs, body=body, fallback_target=label)
    if rewrite is not None:
        for name, value in rewrite.set_headers:
            call.headers[name] = value
    return call


def rewrite_json(data: bytes, rewrite: Rewrite) -> bytes | None:
    """Apply `json_map` and `json_set` to a JSON object body; None when the body is not one."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict):
        return None
    apply_json_rewrite(doc, rewrite)
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def apply_json_rewrite(doc: dict[str, object], rewrite: Rewrite) -> None:
    """`json_map` then `json_set`, in place."""
    for jm in rewrite.json_map:
        parent, leaf = _walk(doc, jm.path, create=False)
        if parent is None or leaf not in parent:
            continue
        current = parent[leaf]
        for source, target in jm.mapping:
            if current == source:
                parent[leaf] = target
                break
        else:
            if jm.has_default:
                parent[leaf] = jm.default
    for path, value in rewrite.json_set:
        parent, leaf = _walk(doc, path, create=True)
        if parent is not None:
            parent[leaf] = value


def _walk(doc: dict[str, object], path: tuple[str, ...], *,
          create: bool) -> tuple[dict[str, object] | None, str]:
    node = doc
    for part in path[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            if not create:
                return None, path[-1]
            nxt = node[part] = {}
        node = nxt
    return node, path[-1]
