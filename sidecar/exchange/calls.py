"""Building what each target is sent: the request for an upstream, or for the original destination.

A named upstream gets its own origin (scheme, host, port, base path), its own `Host`, and its configured
headers (API keys); a request with no upstream goes to its original destination unchanged.
"""
from __future__ import annotations

from multidict import CIMultiDict
from yarl import URL

from sidecar.core.authority import authority
from sidecar.exchange.body import RequestBody
from sidecar.exchange.types import Call, Exchange
from sidecar.policy.model import Upstream
from sidecar.telemetry.records import url_text

# A streamed answer may pause this long between chunks before the try counts as cut (at least the
# route's timeout).
MIN_READ_IDLE = 30.0


# Parsed URLs by their text: an app calls the same few paths over and over, and parsing one costs more
# than the rest of building its request. URLs are immutable, so one object serves every request.
URL_CACHE_SIZE = 1024
URL_CACHE_TEXT = 2048                   # longer texts are parsed each time
_urls: dict[str, URL] = {}


def url_of(text: str) -> URL:
    """`URL(text, encoded=True)`, parsed once per distinct text while the cache holds it (it is emptied
    when full: unique query strings cost a parse each, as without it, and never grow memory)."""
    url = _urls.get(text)
    if url is None:
        url = URL(text, encoded=True)
        if len(text) > URL_CACHE_TEXT:        # a huge one-off (a long query string): not kept
            return url
        if len(_urls) >= URL_CACHE_SIZE:
            _urls.clear()
        _urls[text] = url
    return url


def record_url(url: URL) -> str | URL:
    """What a request's or a try's record keeps of its URL: the URL itself when it carries no
    credentials (its text is made only for a span that is exported), else its text without them."""
    if url.raw_user is None and url.raw_password is None:
        return url
    return url_text(url)


def upstream_url(up: Upstream, path_qs: str) -> URL:
    return url_of(f"{up.origin}{up.base_path}{path_qs}")


def host_header(up: Upstream) -> str:
    default = 443 if up.scheme == "https" else 80
    return up.host if up.port == default else f"{up.host}:{up.port}"


def path_qs_of(url: URL) -> str:
    return url.raw_path_qs or "/"


def make_call(ex: Exchange, upstream: Upstream | None, *, headers: CIMultiDict[str] | None = None,
              path_qs: str | None = None, body: RequestBody | None = None,
              fallback_target: str | None = None) -> Call:
    headers = CIMultiDict(ex.headers) if headers is None else headers
    path_qs = path_qs_of(ex.url) if path_qs is None else path_qs
    if upstream is None:
        dest = ex.url.raw_authority
        if ex.connect_to is not None:        # the Host header (kept in `headers`) is not re-resolved
            dest = authority(*ex.connect_to)
        url = url_of(f"{ex.url.scheme}://{dest}{path_qs}")
        name = authority(ex.url.host or "", ex.url.port)
        hostname = None
    else:
        url = upstream_url(upstream, path_qs)
        headers["Host"] = host_header(upstream)
        for key, value in upstream.headers:
            headers[key] = value
        name = upstream.name
        hostname = upstream.tls.server_name
    return Call(upstream=upstream, name=name, method=ex.method, url=url, headers=headers,
                body=body or ex.body, server_hostname=hostname, fallback_target=fallback_target,
                path_qs=path_qs)
