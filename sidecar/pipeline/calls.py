"""Building what each target is sent: the primary's request, and a fallback upstream's rewrite of it.

A named upstream gets its own origin (scheme, host, port, base path), its own `Host`, and its configured
headers (API keys); a request with no upstream goes to its original destination unchanged.
"""
from __future__ import annotations

import json

from multidict import CIMultiDict
from yarl import URL

from sidecar.pipeline.body import RequestBody
from sidecar.pipeline.exchange import Call, Exchange
from sidecar.policy.model import Rewrite, Upstream


def upstream_url(up: Upstream, path_qs: str) -> URL:
    return URL(f"{up.origin}{up.base_path}{path_qs}", encoded=True)


def host_header(up: Upstream) -> str:
    default = 443 if up.scheme == "https" else 80
    return up.host if up.port == default else f"{up.host}:{up.port}"


def _path_qs(url: URL) -> str:
    return url.raw_path_qs or "/"


def make_call(ex: Exchange, upstream: Upstream | None, *, headers: CIMultiDict | None = None,
              path_qs: str | None = None, body: RequestBody | None = None,
              fallback_target: str | None = None) -> Call:
    headers = CIMultiDict(ex.headers) if headers is None else headers
    path_qs = _path_qs(ex.url) if path_qs is None else path_qs
    if upstream is None:
        authority = ex.url.raw_authority
        if ex.connect_to is not None:        # the Host header (kept in `headers`) is not re-resolved
            ip, port = ex.connect_to
            authority = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        url = URL(f"{ex.url.scheme}://{authority}{path_qs}", encoded=True)
        name = f"{ex.url.host}:{ex.url.port}"
        hostname = None
    else:
        url = upstream_url(upstream, path_qs)
        headers["Host"] = host_header(upstream)
        for key, value in upstream.headers:
            headers[key] = value
        name = upstream.name
        hostname = upstream.tls.server_name
    return Call(upstream=upstream, name=name, method=ex.method, url=url, headers=headers,
                body=body or ex.body, server_hostname=hostname, fallback_target=fallback_target)


def rewritten_call(ex: Exchange, upstream: Upstream, rewrite: Rewrite | None, label: str) -> Call:
    """The request for a fallback upstream, with `rewrite` applied (path, headers, JSON body fields)."""
    headers = CIMultiDict(ex.headers)
    path_qs = _path_qs(ex.url)
    body = ex.body
    if rewrite is not None:
        if rewrite.path is not None:
            query = ex.url.raw_query_string
            path_qs = rewrite.path + (f"?{query}" if query else "")
        for name in rewrite.remove_headers:
            headers.popall(name, None)
        if rewrite.touches_body and body.replayable:
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


def apply_json_rewrite(doc: dict, rewrite: Rewrite) -> None:
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


def _walk(doc: dict, path: tuple[str, ...], *, create: bool):
    node = doc
    for part in path[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            if not create:
                return None, path[-1]
            nxt = node[part] = {}
        node = nxt
    return node, path[-1]
