"""`host:port` as the product prints it: an IPv6 literal in brackets (RFC 3986 §3.2.2 IP-literal).

yarl's `URL.host`, a socket's original destination and a CONNECT target with its brackets stripped all
give `::1`; joined with a port that reads `::1:8080`, which is ambiguous and unlike `[::1]:8080` shown
everywhere else (endpoint keys, Host headers). Names and IPv4 addresses come out exactly as before, so
labels, breaker keys and cache keys built from them do not change.
"""
from __future__ import annotations


def bracketed(host: str) -> str:
    """`host` as it is written in an authority: an IPv6 literal (it has a ':') in brackets; a host
    already in brackets, a name or an IPv4 address as it is."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def authority(host: str, port: int | None) -> str:
    """`host:port` with an IPv6 literal bracketed: `[::1]:8080`, `10.0.0.1:80`, `api.example:443`."""
    return f"{bracketed(host)}:{port}"
