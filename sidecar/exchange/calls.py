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

# A streamed answer may pause this long between chunks before the try counts as cut (at least the
# route's timeout).
MIN_READ_IDLE = 30.0


def redact_url(url: URL) -> str:
    """The URL for traces: without credentials."""
    if url.user or url.password:
        url = url.with_user(None)
    return str(url)


def upstream_url(up: Upstream, path_qs: str) -> URL:
    return URL(f"{up.origin}{up.base_path}{path_qs}", encoded=True)


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
        url = URL(f"{ex.url.scheme}://{dest}{path_qs}", encoded=True)
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
                body=body or ex.body, server_hostname=hostname, fallback_target=fallback_target)
