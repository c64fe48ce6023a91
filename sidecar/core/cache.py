"""Response caching as pure logic: what is stored, how fresh it is, what key it has, what the app is told.

No I/O and no clock reads: `now` (wall seconds, `Clock.time()`) is passed in. Wall time rather than
monotonic because entries are shared by every replica through Redis, and only wall clocks compare across
processes.

    CacheEntry          one stored response (frozen), with the windows it was stored under
    freshness()         fresh | stale_while_revalidate | stale_if_error | expired   (RFC 9111 §4.2, RFC 5861)
    RequestDirectives   the app's no-store, no-cache, max-age, only-if-cached          (RFC 9111 §5.2.1)
    not_storable()      why an upstream answer may not be stored, or None                (RFC 9111 §3)
    build_key()         method, url (sorted query), sha256 of the body, header:NAME values
    cache_status()      the `Cache-Status` member of this cache                          (RFC 9211)

The policy's `ttl` is the operator's word: an upstream's `max-age` / `s-maxage` neither lengthens nor
shortens it. The upstream can only veto storing (`no-store`, `private`, `no-cache`, a zero max-age, an
`Expires` in the past, `Vary: *`, `Set-Cookie`) and forbid serving stale (`must-revalidate`).
"""
from __future__ import annotations

import enum
import hashlib
import math
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from sys import intern as _intern
from typing import Iterable, Mapping

from yarl import URL

from sidecar.core.authority import authority
from sidecar.grpc_rules import GrpcCode, answer_status, is_grpc
from sidecar.policy.model import CachePolicy

CACHE_NAME = "sidecar"                     # our member name in Cache-Status (RFC 9211 §2)

REVALIDATE_GRACE = 60.0                    # seconds an expired copy with a validator is kept to revalidate
# The headers RFC 9110 §15.4.5 asks a 304 to repeat from the 200 it stands for.
NOT_MODIFIED_HEADERS = ("cache-control", "content-location", "date", "etag", "expires", "vary")


@dataclass(frozen=True, slots=True)
class CacheEntry:
    status: int
    headers: tuple[tuple[str, str], ...]   # end-to-end response headers, as the upstream sent them
    body: bytes
    stored_at: float                       # wall seconds
    ttl: float
    stale_if_error: float = 0.0
    stale_while_revalidate: float = 0.0
    # The request headers a `Vary` response depends on, as they were when it was stored (RFC 9111 §4.1).
    vary: tuple[tuple[str, str | None], ...] = ()
    # HTTP/2 trailers that ended the answer: a gRPC answer's status is there, so a served copy is a
    # complete gRPC answer.
    trailers: tuple[tuple[str, str], ...] = ()

    def age(self, now: float) -> float:
        return max(0.0, now - self.stored_at)

    def remaining(self, now: float) -> float:
        """Freshness left; negative once stale (the `ttl` parameter of RFC 9211 §2.5)."""
        return self.ttl - self.age(now)

    @property
    def keep_for(self) -> float:
        """How long a store keeps it: stale copies must outlive freshness to serve during outages, and
        one with a validator (ETag, Last-Modified) outlives it by at least REVALIDATE_GRACE (or its
        ttl, if longer) so that a request after expiry can revalidate it instead of fetching it whole."""
        extra = max(self.stale_if_error, self.stale_while_revalidate)
        if validators(self):
            extra = max(extra, self.ttl, REVALIDATE_GRACE)
        return self.ttl + extra

    @property
    def size(self) -> int:
        return len(self.body) + sum(len(k) + len(v) + 4 for k, v in self.headers) + 128

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


class Freshness(str, enum.Enum):
    FRESH = "fresh"
    STALE_WHILE_REVALIDATE = "stale_while_revalidate"   # serve now, refresh in the background
    STALE_IF_ERROR = "stale_if_error"                   # forward; serve only if the upstream fails
    EXPIRED = "expired"


def freshness(entry: CacheEntry, now: float) -> Freshness:
    """RFC 9111 §4.2 with the policy's ttl as freshness lifetime, then the RFC 5861 windows past it."""
    age = entry.age(now)
    if age < entry.ttl:
        return Freshness.FRESH
    if age < entry.ttl + entry.stale_while_revalidate:
        return Freshness.STALE_WHILE_REVALIDATE
    if age < entry.ttl + entry.stale_if_error:
        return Freshness.STALE_IF_ERROR
    return Freshness.EXPIRED


def usable_on_error(entry: CacheEntry, now: float) -> bool:
    """RFC 5861 §4: a stale copy may stand in for an error answer for `stale_if_error` past freshness."""
    return entry.age(now) < entry.ttl + entry.stale_if_error


# -- Cache-Control -------------------------------------------------------------------------------------

def parse_cache_control(values: Iterable[str]) -> dict[str, str | None]:
    """Directives of every Cache-Control field line, names lower-cased (RFC 9111 §5.2)."""
    out: dict[str, str | None] = {}
    for value in values:
        for part in _split_commas(value):
            name, sep, arg = part.partition("=")
            name = name.strip().lower()
            if name and name not in out:       # RFC 9111 §4.2.1: the first of duplicates wins
                out[name] = arg.strip().strip('"') if sep else None
    return out


def _split_commas(value: str) -> list[str]:
    """Split on commas outside quoted strings (`no-cache="a, b"` is one directive)."""
    parts: list[str] = []
    buf: list[str] = []
    quoted = False
    for ch in value:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    parts.append("".join(buf))
    return [p for p in (p.strip() for p in parts) if p]


def _seconds(value: str | None) -> int | None:
    if value is None or not value.isdigit():
        return None                             # RFC 9111 §1.2.2: delta-seconds are digits only
    return int(value)


@dataclass(frozen=True, slots=True)
class RequestDirectives:
    no_store: bool = False                  # neither read nor write: the app's full opt-out
    no_cache: bool = False                  # do not answer from a stored copy; forward and store
    max_age: int | None = None              # the app accepts nothing older than this
    only_if_cached: bool = False            # answer from the cache or 504, never forward (§5.2.1.7)

    @classmethod
    def parse(cls, cache_control: Iterable[str], pragma: Iterable[str] = ()) -> "RequestDirectives":
        cc = parse_cache_control(cache_control)
        # RFC 9111 §5.4: `Pragma: no-cache` counts only when the request has no Cache-Control.
        pragma_no_cache = not cc and any("no-cache" in p.lower() for p in pragma)
        max_age = _seconds(cc.get("max-age")) if "max-age" in cc else None
        return cls(no_store="no-store" in cc, no_cache="no-cache" in cc or pragma_no_cache or max_age == 0,
                   max_age=max_age, only_if_cached="only-if-cached" in cc)

    def accepts_fresh(self, entry: CacheEntry, now: float) -> bool:
        """May a fresh stored copy answer without forwarding? (§5.2.1.1 max-age, §5.2.1.4 no-cache)"""
        if self.no_cache:
            return False
        return self.max_age is None or entry.age(now) <= self.max_age


class NotStored(str, enum.Enum):
    """Why an upstream answer was not stored (RFC 9211 `detail`, /status counters)."""
    STATUS = "status"
    NO_STORE = "no-store"
    PRIVATE = "private"
    NO_CACHE = "no-cache"
    MAX_AGE_ZERO = "max-age=0"
    EXPIRES = "expires"
    VARY_ALL = "vary=*"
    SET_COOKIE = "set-cookie"
    TOO_LARGE = "too-large"
    NO_TTL = "no-ttl"
    GRPC_STATUS = "grpc-status"            # a gRPC answer that is not OK, or whose status never came


def not_storable(status: int, headers: Mapping[str, str] | Iterable[tuple[str, str]],
                 policy: CachePolicy) -> NotStored | None:
    """None when the answer may be stored; else the reason (RFC 9111 §3, §5.2.2)."""
    pairs = list(headers.items()) if hasattr(headers, "items") else list(headers)

    def get_all(name: str) -> list[str]:
        return [v for k, v in pairs if k.lower() == name]
    if status not in policy.statuses:
        return NotStored.STATUS
    if policy.ttl + max(policy.stale_if_error, policy.stale_while_revalidate) <= 0:
        return NotStored.NO_TTL
    cc = parse_cache_control(get_all("cache-control"))
    if "no-store" in cc:
        return NotStored.NO_STORE
    if "private" in cc:                     # Redis shares entries between replicas: a shared cache
        return NotStored.PRIVATE
    if "no-cache" in cc:                    # even the field-qualified form: we do not revalidate
        return NotStored.NO_CACHE
    # §5.2.2.10: s-maxage overrides max-age in a shared cache; either at 0 says "never fresh".
    limit = cc.get("s-maxage") if "s-maxage" in cc else cc.get("max-age")
    if limit is not None and _seconds(limit) == 0:
        return NotStored.MAX_AGE_ZERO
    if "s-maxage" not in cc and "max-age" not in cc and _expired_on_arrival(get_all("expires"),
                                                                           get_all("date")):
        return NotStored.EXPIRES
    if any("*" in v for v in get_all("vary")):
        return NotStored.VARY_ALL           # §4.1: `Vary: *` never matches a later request
    if get_all("set-cookie"):
        return NotStored.SET_COOKIE         # nginx's default: one caller's cookie is not everyone's
    content_length = next(iter(get_all("content-length")), None)
    if content_length is not None and content_length.strip().isdigit() \
            and int(content_length) > policy.max_body:
        return NotStored.TOO_LARGE
    return None


def _expired_on_arrival(expires: list[str], date: list[str]) -> bool:
    """§5.3: an invalid `Expires` (notably "0") means the past; one at or before `Date` is stale."""
    if not expires:
        return False
    when = _http_date(expires[0])
    if when is None:
        return True
    sent = _http_date(date[0]) if date else None
    return sent is not None and when <= sent


def _http_date(value: str) -> float | None:
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def grpc_complete(headers: Iterable[tuple[str, str]], trailers: Mapping[str, str] | None) -> bool:
    """May a whole answer be stored, as far as gRPC goes? Any non-gRPC answer may; a gRPC one only when
    its trailers say OK (a gRPC answer whose trailers never came was cut or failed)."""
    head = {k.lower(): v for k, v in headers}
    return not is_grpc(head.get("content-type")) or answer_status(head, trailers) is GrpcCode.OK


def make_entry(status: int, headers: Iterable[tuple[str, str]], body: bytes, *, now: float,
               policy: CachePolicy, request_headers: Mapping[str, str],
               trailers: Iterable[tuple[str, str]] = ()) -> CacheEntry:
    """The entry for a storable answer, with the policy's windows at the time it was stored."""
    # Interned: every entry repeats the same names and mostly the same short values, ~30 % of an
    # entry's memory with small bodies (10,000 entries: 3.5 MiB less).
    pairs = tuple((_intern(str(k)), _intern(str(v)) if len(v) <= 64 else str(v)) for k, v in headers)
    cc = parse_cache_control(v for k, v in pairs if k.lower() == "cache-control")
    sie, swr = policy.stale_if_error, policy.stale_while_revalidate
    if "must-revalidate" in cc or "proxy-revalidate" in cc:
        sie = swr = 0.0                     # RFC 9111 §4.2.4: the origin forbids serving it stale
    return CacheEntry(status=status, headers=pairs, body=body, stored_at=now, ttl=policy.ttl,
                      stale_if_error=sie, stale_while_revalidate=swr,
                      vary=vary_values(pairs, request_headers), trailers=tuple(trailers))


def validators(entry: CacheEntry) -> tuple[tuple[str, str], ...]:
    """RFC 9111 §4.3.1: the conditional header fields asking the origin whether a stored 200 is still
    current (`If-None-Match` from its ETag, `If-Modified-Since` from its Last-Modified); () for none."""
    if entry.status != 200:
        return ()
    found = []
    etag = entry.header("etag")
    if etag:
        found.append(("If-None-Match", etag))
    modified = entry.header("last-modified")
    if modified:
        found.append(("If-Modified-Since", modified))
    return tuple(found)


def freshened(entry: CacheEntry, not_modified: Iterable[tuple[str, str]], *, now: float, policy: CachePolicy,
              request_headers: Mapping[str, str]) -> CacheEntry:
    """RFC 9111 §4.3.4: the stored answer after a 304, its header fields replaced by the 304's (but for
    Content-Length, §3.2), fresh again from `now`; the stored body is kept."""
    fresh = [(k, v) for k, v in not_modified if k.lower() != "content-length"]
    replaced = {k.lower() for k, _ in fresh}
    headers = [(k, v) for k, v in entry.headers if k.lower() not in replaced] + fresh
    return make_entry(entry.status, headers, entry.body, now=now, policy=policy, request_headers=request_headers,
                      trailers=entry.trailers)


def vary_values(headers: Iterable[tuple[str, str]], request_headers: Mapping[str, str]) \
        -> tuple[tuple[str, str | None], ...]:
    names: list[str] = []
    for key, value in headers:
        if key.lower() == "vary":
            names.extend(n.strip().lower() for n in value.split(",") if n.strip())
    return tuple((n, _normalise(request_headers.get(n))) for n in sorted(set(names)))


def vary_matches(entry: CacheEntry, request_headers: Mapping[str, str]) -> bool:
    """RFC 9111 §4.1: a stored answer with `Vary` serves only requests with the same header values."""
    return all(_normalise(request_headers.get(name)) == value for name, value in entry.vary)


def _normalise(value: str | None) -> str | None:
    return None if value is None else ",".join(p.strip() for p in value.split(","))


def etag_matches(entry: CacheEntry, if_none_match: str) -> bool:
    """If-None-Match against the stored ETag, weak comparison (RFC 9110 §13.1.2)."""
    etag = entry.header("etag")
    if etag is None:
        return False
    if if_none_match.strip() == "*":
        return True

    def strip(tag: str) -> str:
        return tag.strip().removeprefix("W/")
    return strip(etag) in {strip(t) for t in if_none_match.split(",")}


# -- keys ----------------------------------------------------------------------------------------------

def build_key(parts: Iterable[str], method: str, url: URL, headers: Mapping[str, str], body: bytes | None,
              upstream: str | None = None) -> str:
    """The canonical key text for `cache.key` (`method`, `url`, `body`, `header:NAME`).

    The query is sorted, so `?b=2&a=1` and `?a=1&b=2` share an entry; the body is a sha256, so a key
    stays small. One line per part: URLs and header values cannot hold a newline, so keys never clash.
    `url` is the upstream's view (`canonical_url`): `upstream` names the upstream the request goes to.
    """
    lines = []
    for part in parts:
        if part == "method":
            lines.append("method=" + method.upper())
        elif part == "url":
            lines.append("url=" + canonical_url(url, upstream))
        elif part == "body":
            lines.append("body=sha256:" + hashlib.sha256(body or b"").hexdigest())
        elif part.startswith("header:"):
            name = part[7:].lower()
            values = headers.getall(name, []) if hasattr(headers, "getall") else \
                [v for v in [headers.get(name)] if v is not None]
            lines.append(f"header:{name}=" + ("\x00" if not values else ", ".join(values)))
    return "\n".join(lines)


def canonical_url(url: URL, upstream: str | None = None) -> str:
    """The URL a cache key holds: the upstream's view of the request, as nginx keys on
    `$proxy_host$request_uri`. To a named upstream: `upstream://NAME/path?sorted-query`, whatever host
    or listener the app addressed (a warmed entry is found by the requests it is meant for); to the
    original destination: `scheme://host:port/path?sorted-query`, an IPv6 host in brackets (names and
    IPv4 keys as they always were). The fragment never reaches a server."""
    query = "&".join(sorted(p for p in url.raw_query_string.split("&") if p))
    if upstream is not None:
        base = f"upstream://{upstream}{url.raw_path or '/'}"
    else:
        base = f"{url.scheme}://{authority(url.raw_host or '', url.port)}{url.raw_path or '/'}"
    return f"{base}?{query}" if query else base


def key_digest(namespace: str, key: str) -> str:
    """What the store sees: a hash, so header values in a key (say `authorization`) never reach Redis."""
    return f"{namespace}:{hashlib.sha256(key.encode()).hexdigest()[:40]}"


# -- Cache-Status (RFC 9211) ---------------------------------------------------------------------------

def cache_status(*, hit: bool = False, fwd: str | None = None, fwd_status: int | None = None,
                 ttl: float | None = None, stored: bool = False, collapsed: bool = False,
                 detail: str | None = None, upstream_value: str | None = None) -> str:
    """Our member of `Cache-Status`, appended after any the upstream sent (§2: origin-side first).

    `hit` means answered without going forward (§2.1), which includes a stale copy served while it is
    refreshed in the background; `fwd` says why the request went forward (miss, stale, request, method,
    bypass, vary-miss), and a stale copy served after a failed forward is `fwd=stale` with `fwd-status`.
    """
    params = [CACHE_NAME]
    if hit:
        params.append("hit")
    if fwd is not None:
        params.append(f"fwd={fwd}")
    if fwd_status is not None:
        params.append(f"fwd-status={fwd_status}")
    if ttl is not None:
        params.append(f"ttl={math.floor(ttl)}")
    if stored:
        params.append("stored")
    if collapsed:
        params.append("collapsed")
    if detail:
        params.append(f"detail={detail}" if _is_token(detail) else f'detail="{detail}"')
    ours = "; ".join(params)
    return f"{upstream_value}, {ours}" if upstream_value else ours


def _is_token(text: str) -> bool:
    # sf-token (RFC 8941 §3.3.4): starts with a letter or "*", then tchar, ":" or "/".
    return bool(text) and (text[0].isalpha() or text[0] == "*") and all(
        ch.isalnum() or ch in "!#$%&'*+-.^_`|~:/" for ch in text)
