"""Entries as bytes: framed for a shared store (`encode`), compact for this process (`pack`).

Shared store (Redis), no pickle, since a shared Redis is not a trusted source:

    b"SCE1" | meta length (4 bytes, big-endian) | meta (JSON, UTF-8) | body (raw bytes)

The body stays raw, so a 1 MiB answer is not inflated by base64; the meta is small JSON, checked field
by field on the way back, and anything malformed is a `ValueError` (the caller treats it as a miss).

Memory store: the entry's fields as one `marshal`led tuple, the body inside up to INLINE_BODY; beyond
it `(meta, body)`, so a hit never copies a large body. An answer with five headers and an 86-byte body
takes ~560 bytes as objects (the record, a tuple per header pair, the body's object) and 320 packed.
`marshal` only ever reads what `pack` wrote in this same process.
"""
from __future__ import annotations

import json
import marshal
import struct

from sidecar.core.cache import CacheEntry

MAGIC = b"SCE1"
_LEN = struct.Struct(">I")
MAX_META = 1 << 20
INLINE_BODY = 4096                         # bytes: a larger body is kept as its own object, never copied


def encode(entry: CacheEntry) -> bytes:
    meta = {"s": entry.status, "h": [list(h) for h in entry.headers], "t": entry.stored_at, "ttl": entry.ttl,
            "sie": entry.stale_if_error, "swr": entry.stale_while_revalidate,
            "v": [list(v) for v in entry.vary]}
    if entry.trailers:
        meta["tr"] = [list(t) for t in entry.trailers]
    raw = json.dumps(meta, separators=(",", ":"), ensure_ascii=False).encode()
    return b"".join((MAGIC, _LEN.pack(len(raw)), raw, entry.body))


def decode(data: bytes) -> CacheEntry:
    if not isinstance(data, (bytes, bytearray, memoryview)) or bytes(data[:4]) != MAGIC or len(data) < 8:
        raise ValueError("not a cache entry")
    (size,) = _LEN.unpack_from(data, 4)
    if size > MAX_META or 8 + size > len(data):
        raise ValueError("cache entry meta out of bounds")
    meta = json.loads(bytes(data[8:8 + size]))
    if not isinstance(meta, dict):
        raise ValueError("cache entry meta is not an object")
    status = meta.get("s")
    if not isinstance(status, int) or not 100 <= status <= 999:
        raise ValueError("bad status")
    headers = tuple(_pair(h, str) for h in _list(meta.get("h")))
    vary = tuple(_pair(v, (str, type(None))) for v in _list(meta.get("v", [])))
    trailers = tuple(_pair(t, str) for t in _list(meta.get("tr", [])))
    return CacheEntry(status=status, headers=headers, body=bytes(data[8 + size:]),
                      stored_at=_number(meta.get("t")), ttl=_number(meta.get("ttl")),
                      stale_if_error=_number(meta.get("sie", 0)),
                      stale_while_revalidate=_number(meta.get("swr", 0)), vary=vary, trailers=trailers)


def _list(value) -> list:
    if not isinstance(value, list):
        raise ValueError("expected a list")
    return value


def _pair(value, second) -> tuple:
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], second)):
        raise ValueError("bad header pair")
    return value[0], value[1]


def _number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("expected a number")
    return float(value)


# -- the memory store's form -------------------------------------------------------------------------

def pack(entry: CacheEntry) -> bytes | tuple[bytes, bytes] | CacheEntry:
    """One compact value for the memory store: `unpack(pack(entry)) == entry`."""
    fields = (entry.status, entry.headers, entry.stored_at, entry.ttl, entry.stale_if_error,
              entry.stale_while_revalidate, entry.vary, entry.trailers)
    try:
        if len(entry.body) <= INLINE_BODY:
            return marshal.dumps((*fields, entry.body))
        return marshal.dumps(fields), entry.body
    except ValueError:                     # a field marshal cannot write (a str or int subclass): as is
        return entry


def unpack(value: bytes | tuple[bytes, bytes] | CacheEntry) -> CacheEntry:
    if isinstance(value, CacheEntry):
        return value
    if isinstance(value, tuple):
        meta, body = value
        status, headers, stored_at, ttl, sie, swr, vary, trailers = marshal.loads(meta)
    else:
        status, headers, stored_at, ttl, sie, swr, vary, trailers, body = marshal.loads(value)
    return CacheEntry(status=status, headers=headers, body=body, stored_at=stored_at, ttl=ttl,
                      stale_if_error=sie, stale_while_revalidate=swr, vary=vary, trailers=trailers)
