"""Hop-by-hop headers (RFC 9110 §7.6.1) are dropped in both directions, with every header the
`Connection` header names. `Proxy-Authorization` is for this proxy alone and never forwarded."""
from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

HOP_BY_HOP = frozenset({
    "connection", "proxy-connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade",
    "proxy-authorization", "proxy-authenticate",
})


def end_to_end(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    """A copy of `headers` without hop-by-hop ones."""
    named = headers.get("connection")
    drop = HOP_BY_HOP
    if named:
        drop = HOP_BY_HOP | {t.strip().lower() for t in named.split(",") if t.strip()}
    # One C-level copy, then delete the few present (about twice as fast as a filtered rebuild).
    out = CIMultiDict(headers)
    for name in drop:
        if name in out:
            del out[name]
    return out
