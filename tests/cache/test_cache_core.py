"""core/cache.py: freshness windows, what may be stored, keys and Cache-Status, with a fake clock."""
import pytest
from multidict import CIMultiDict
from yarl import URL

from sidecar.core.cache import (
    REVALIDATE_GRACE, CacheEntry, Freshness, NotStored, RequestDirectives, build_key, cache_status, canonical_url,
    etag_matches, freshened, freshness, grpc_complete, key_digest, make_entry, not_storable, parse_cache_control,
    usable_on_error, validators, vary_matches,
)
from sidecar.core.clock import FakeClock
from sidecar.policy.model import CachePolicy

POLICY = CachePolicy(ttl=60, stale_if_error=3600, stale_while_revalidate=30, max_body=1024)


def entry_at(clock: FakeClock, policy: CachePolicy = POLICY, headers=(), request_headers=None) -> CacheEntry:
    return make_entry(200, headers, b"body", now=clock.time(), policy=policy,
                      request_headers=CIMultiDict(request_headers or {}))


def test_freshness_windows_follow_ttl_then_rfc5861():
    clock = FakeClock()
    entry = entry_at(clock)
    seen = []
    for step in (0, 59.9, 0.1, 29.9, 0.1, 3569.9, 0.1):
        clock.advance(step)
        seen.append(freshness(entry, clock.time()))
    assert seen == [Freshness.FRESH, Freshness.FRESH, Freshness.STALE_WHILE_REVALIDATE,
                    Freshness.STALE_WHILE_REVALIDATE, Freshness.STALE_IF_ERROR, Freshness.STALE_IF_ERROR,
                    Freshness.EXPIRED]


def test_stale_if_error_reaches_from_the_end_of_ttl():
    clock = FakeClock()
    entry = entry_at(clock, CachePolicy(ttl=10, stale_if_error=5))
    clock.advance(14.9)
    assert usable_on_error(entry, clock.time())
    clock.advance(0.1)
    assert not usable_on_error(entry, clock.time())
    assert entry.keep_for == 15


def test_remaining_is_negative_once_stale():
    clock = FakeClock()
    entry = entry_at(clock)
    clock.advance(75)
    assert entry.remaining(clock.time()) == -15


def test_must_revalidate_forbids_serving_stale():
    clock = FakeClock()
    entry = entry_at(clock, headers=[("Cache-Control", "max-age=600, must-revalidate")])
    assert (entry.stale_if_error, entry.stale_while_revalidate) == (0, 0)
    clock.advance(61)
    assert freshness(entry, clock.time()) is Freshness.EXPIRED


@pytest.mark.parametrize("headers, reason", [
    ({}, None),
    ({"Cache-Control": "public, max-age=5"}, None),          # the policy's ttl wins; 5s is no veto
    ({"Cache-Control": "no-store"}, NotStored.NO_STORE),
    ({"Cache-Control": "private, max-age=60"}, NotStored.PRIVATE),
    ({"Cache-Control": 'no-cache="set-cookie"'}, NotStored.NO_CACHE),
    ({"Cache-Control": "max-age=0"}, NotStored.MAX_AGE_ZERO),
    ({"Cache-Control": "max-age=0, s-maxage=30"}, None),     # s-maxage speaks for shared caches
    ({"Cache-Control": "s-maxage=0, max-age=30"}, NotStored.MAX_AGE_ZERO),
    ({"Expires": "0"}, NotStored.EXPIRES),
    ({"Expires": "Thu, 01 Jan 2015 00:00:00 GMT", "Date": "Thu, 01 Jan 2015 00:00:00 GMT"},
     NotStored.EXPIRES),
    ({"Expires": "Thu, 01 Jan 2015 00:00:00 GMT", "Cache-Control": "max-age=60"}, None),
    ({"Vary": "*"}, NotStored.VARY_ALL),
    ({"Set-Cookie": "sid=1"}, NotStored.SET_COOKIE),
    ({"Content-Length": "1025"}, NotStored.TOO_LARGE),
    ({"Content-Length": "1024"}, None),
])
def test_what_the_upstream_can_veto(headers, reason):
    assert not_storable(200, CIMultiDict(headers), POLICY) is reason


def test_only_configured_statuses_are_stored():
    assert not_storable(404, {}, POLICY) is NotStored.STATUS
    assert not_storable(404, {}, CachePolicy(statuses=frozenset({200, 404}))) is None
    assert not_storable(200, {}, CachePolicy(ttl=0)) is NotStored.NO_TTL
    assert not_storable(200, {}, CachePolicy(ttl=0, stale_if_error=60)) is None


def test_cache_control_parsing():
    cc = parse_cache_control(['max-age=10, no-cache="a, b"', "MAX-AGE=20, Private"])
    assert cc == {"max-age": "10", "no-cache": "a, b", "private": None}


@pytest.mark.parametrize("cc, pragma, expected", [
    ([], [], RequestDirectives()),
    (["no-store"], [], RequestDirectives(no_store=True)),
    (["no-cache"], [], RequestDirectives(no_cache=True)),
    (["max-age=0"], [], RequestDirectives(no_cache=True, max_age=0)),
    ([], ["no-cache"], RequestDirectives(no_cache=True)),
    (["max-age=5"], ["no-cache"], RequestDirectives(max_age=5)),   # Pragma only without Cache-Control
    (["only-if-cached"], [], RequestDirectives(only_if_cached=True)),
])
def test_request_directives(cc, pragma, expected):
    assert RequestDirectives.parse(cc, pragma) == expected


def test_request_max_age_limits_what_counts_as_fresh():
    clock = FakeClock()
    entry = entry_at(clock)
    clock.advance(20)
    assert RequestDirectives.parse(["max-age=30"]).accepts_fresh(entry, clock.time())
    assert not RequestDirectives.parse(["max-age=10"]).accepts_fresh(entry, clock.time())
    assert not RequestDirectives.parse(["no-cache"]).accepts_fresh(entry, clock.time())


def test_keys_sort_the_query_and_hash_the_body():
    headers = CIMultiDict({"X-Tenant": "a"})
    one = build_key(("method", "url"), "get", URL("http://Api.Example:80/v1/x?b=2&a=1#frag"), headers, None)
    two = build_key(("method", "url"), "GET", URL("http://api.example/v1/x?a=1&b=2"), headers, None)
    assert one == two == "method=GET\nurl=http://api.example:80/v1/x?a=1&b=2"
    body_a = build_key(("method", "url", "body"), "POST", URL("http://h/x"), headers, b'{"q": 1}')
    body_b = build_key(("method", "url", "body"), "POST", URL("http://h/x"), headers, b'{"q": 2}')
    assert body_a != body_b and "body=sha256:" in body_a
    assert build_key(("url",), "GET", URL("http://h/x"), headers, None) == \
        build_key(("url",), "HEAD", URL("http://h/x"), headers, None)


def test_header_parts_of_a_key():
    url = URL("http://h/x")
    a = build_key(("url", "header:x-tenant"), "GET", url, CIMultiDict({"X-Tenant": "a"}), None)
    b = build_key(("url", "header:x-tenant"), "GET", url, CIMultiDict({"X-Tenant": "b"}), None)
    empty = build_key(("url", "header:x-tenant"), "GET", url, CIMultiDict({"X-Tenant": ""}), None)
    absent = build_key(("url", "header:x-tenant"), "GET", url, CIMultiDict(), None)
    assert len({a, b, empty, absent}) == 4
    assert a.endswith("header:x-tenant=a")


def test_key_digest_keeps_header_values_out_of_the_store():
    key = build_key(("url", "header:authorization"), "GET", URL("http://h/x"),
                    CIMultiDict({"Authorization": "Bearer secret"}), None)
    digest = key_digest("sidecar:route", key)
    assert digest.startswith("sidecar:route:") and "secret" not in digest


def test_canonical_url_keeps_encoding_and_default_ports():
    assert canonical_url(URL("https://h/a%2Fb?x=%20")) == "https://h:443/a%2Fb?x=%20"
    assert canonical_url(URL("http://h:8080")) == "http://h:8080/"


def test_an_ipv6_destination_is_keyed_bracketed_and_other_keys_are_unchanged():
    assert canonical_url(URL("http://[::1]:8080/a")) == "http://[::1]:8080/a"        # was http://::1:8080/a
    # entries stored before IPv6 hosts were bracketed are still found: same key text, same digest
    v4 = build_key(("method", "url"), "GET", URL("http://10.0.0.1:8080/a?b=2&a=1"), {}, None)
    name = build_key(("method", "url"), "GET", URL("http://Api.Example/v1/x"), {}, None)
    assert v4 == "method=GET\nurl=http://10.0.0.1:8080/a?a=1&b=2"
    assert key_digest("ns", v4) == "ns:5969f7e221ae12ba502c72853c2f2f80c321da3a"
    assert key_digest("ns", name) == "ns:14e9ff631737853b8864982a23beb4929d238673"


def test_vary_matches_on_the_request_headers_stored_with_the_answer():
    clock = FakeClock()
    entry = entry_at(clock, headers=[("Vary", "Accept-Encoding, Accept")],
                     request_headers={"Accept-Encoding": "gzip,  br"})
    assert entry.vary == (("accept", None), ("accept-encoding", "gzip,br"))
    assert vary_matches(entry, CIMultiDict({"accept-encoding": "gzip, br"}))
    assert not vary_matches(entry, CIMultiDict({"accept-encoding": "identity"}))
    assert not vary_matches(entry, CIMultiDict({"accept-encoding": "gzip,br", "accept": "text/html"}))


def test_etag_weak_comparison():
    entry = entry_at(FakeClock(), headers=[("ETag", 'W/"v1"')])
    assert etag_matches(entry, '"v0", "v1"')
    assert etag_matches(entry, "*")
    assert not etag_matches(entry, '"v2"')


@pytest.mark.parametrize("kwargs, expected", [
    (dict(hit=True, ttl=41.7), "sidecar; hit; ttl=41"),
    (dict(fwd="miss", fwd_status=200, stored=True), "sidecar; fwd=miss; fwd-status=200; stored"),
    (dict(hit=True, ttl=-0.5, detail="stale-while-revalidate"),
     "sidecar; hit; ttl=-1; detail=stale-while-revalidate"),
    (dict(fwd="stale", fwd_status=503, ttl=-120, detail="stale-if-error"),
     "sidecar; fwd=stale; fwd-status=503; ttl=-120; detail=stale-if-error"),
    (dict(fwd="miss", collapsed=True), "sidecar; fwd=miss; collapsed"),
    (dict(fwd="miss", fwd_status=200, detail="max-age=0"),
     'sidecar; fwd=miss; fwd-status=200; detail="max-age=0"'),
    (dict(hit=True, upstream_value="CDN; fwd=miss"), "CDN; fwd=miss, sidecar; hit"),
])
def test_cache_status_values(kwargs, expected):
    assert cache_status(**kwargs) == expected


def test_validators_come_from_etag_and_last_modified_of_a_200():
    clock = FakeClock()
    both = entry_at(clock, headers=(("ETag", '"a"'), ("Last-Modified", "Wed, 25 Nov 2026 10:00:00 GMT")))
    assert validators(both) == (("If-None-Match", '"a"'), ("If-Modified-Since", "Wed, 25 Nov 2026 10:00:00 GMT"))
    assert validators(entry_at(clock)) == ()
    not_ok = make_entry(404, (("ETag", '"a"'),), b"", now=0, policy=POLICY, request_headers=CIMultiDict())
    assert validators(not_ok) == ()


def test_an_entry_with_a_validator_is_kept_past_its_stale_windows_to_be_revalidated():
    clock = FakeClock()
    short = CachePolicy(ttl=10)
    assert entry_at(clock, short).keep_for == 10
    assert entry_at(clock, short, headers=(("ETag", '"a"'),)).keep_for == 10 + REVALIDATE_GRACE
    assert entry_at(clock, CachePolicy(ttl=600), headers=(("ETag", '"a"'),)).keep_for == 1200
    assert entry_at(clock, headers=(("ETag", '"a"'),)).keep_for == 60 + 3600     # stale_if_error is longer


def test_a_304_freshens_the_entry_and_replaces_its_header_fields_but_content_length():
    clock = FakeClock()
    old = entry_at(clock, headers=(("ETag", '"a"'), ("Content-Length", "4"), ("X-Gen", "1"), ("X-Kept", "k")))
    clock.advance(100)
    new = freshened(old, (("ETag", '"a"'), ("X-Gen", "2"), ("Content-Length", "0")), now=clock.time(),
                    policy=POLICY, request_headers=CIMultiDict())
    assert new.body == b"body" and new.stored_at == clock.time() and freshness(new, clock.time()) is Freshness.FRESH
    assert new.header("x-gen") == "2" and new.header("x-kept") == "k" and new.header("content-length") == "4"


def test_a_grpc_answer_is_complete_only_with_ok_in_its_trailers():
    grpc_head = (("content-type", "application/grpc"),)
    assert grpc_complete(grpc_head, {"grpc-status": "0"})
    assert not grpc_complete(grpc_head, {"grpc-status": "14"})
    assert not grpc_complete(grpc_head, None)                          # cut: the trailers never came
    assert grpc_complete((*grpc_head, ("grpc-status", "0")), None)      # trailers-only OK: an empty stream
    assert not grpc_complete((*grpc_head, ("grpc-status", "5")), None)
    assert grpc_complete((("content-type", "application/json"),), None)  # not gRPC: HTTP rules alone
