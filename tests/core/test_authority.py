"""core/authority.py: `host:port` with an IPv6 literal in brackets, everything else as it was."""
import pytest

from sidecar.core.authority import authority, bracketed


@pytest.mark.parametrize("host, port, expected", [
    ("::1", 8080, "[::1]:8080"),
    ("2001:db8::7", 443, "[2001:db8::7]:443"),
    ("[::1]", 8080, "[::1]:8080"),                  # already bracketed (a Host header's): not twice
    ("127.0.0.1", 80, "127.0.0.1:80"),
    ("api.example", 443, "api.example:443"),
])
def test_authority(host, port, expected):
    assert authority(host, port) == expected


def test_bracketed_leaves_names_and_ipv4_alone():
    assert [bracketed(h) for h in ("fe80::1", "[fe80::1]", "10.0.0.1", "svc")] == \
        ["[fe80::1]", "[fe80::1]", "10.0.0.1", "svc"]
