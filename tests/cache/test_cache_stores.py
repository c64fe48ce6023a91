"""The stores: a bounded LRU in memory, and a real Redis (down included), plus the entry framing."""
import logging
import socket

import pytest
import redis.asyncio as aioredis

from sidecar.cache import codec
from sidecar.cache.stores import MemoryStore, RedisStore
from sidecar.core.cache import CacheEntry
from sidecar.core.clock import FakeClock


def entry(body: bytes = b"x", ttl: float = 60, sie: float = 0, swr: float = 0, clock=None) -> CacheEntry:
    return CacheEntry(status=200, headers=(("content-type", "text/plain"), ("x-a", "1")), body=body,
                      stored_at=(clock or FakeClock()).time(), ttl=ttl, stale_if_error=sie,
                      stale_while_revalidate=swr, vary=(("accept", None), ("accept-encoding", "gzip")),
                      trailers=(("grpc-status", "0"), ("grpc-message", "")))   # a gRPC answer's, kept


# -- codec ------------------------------------------------------------------------------------------

def test_codec_round_trip_keeps_every_field_and_raw_body():
    original = entry(body=bytes(range(256)) * 10, sie=3600, swr=30)
    data = codec.encode(original)
    assert data.startswith(b"SCE1") and data.endswith(original.body)
    assert codec.decode(data) == original


@pytest.mark.parametrize("data", [
    b"", b"SCE1", b"XXXX\x00\x00\x00\x02{}", b"SCE1\x00\x00\xff\xff{}", b"SCE1\x00\x00\x00\x02[]",
    b"SCE1\x00\x00\x00\x0b{\"s\": true}",
    b"\x80\x04\x95pickle",
])
def test_codec_rejects_anything_else(data):
    with pytest.raises(ValueError):
        codec.decode(data)


@pytest.mark.parametrize("body", [b"", b"x" * 100, bytes(range(256)) * 100])
def test_memory_form_round_trips_every_field(body):
    original = entry(body=body, sie=3600, swr=30)
    packed = codec.pack(original)
    assert codec.unpack(packed) == original
    if len(body) > codec.INLINE_BODY:
        assert codec.unpack(packed).body is original.body    # a large body is never copied on a hit


def test_memory_form_keeps_what_marshal_cannot_write_as_it_is():
    class Name(str):
        pass
    odd = CacheEntry(status=200, headers=((Name("x-a"), "1"),), body=b"x", stored_at=0.0, ttl=60.0)
    assert codec.unpack(codec.pack(odd)) is odd


# -- memory -----------------------------------------------------------------------------------------

async def test_memory_lru_bounded_by_entries():
    store = MemoryStore(max_entries=3, max_bytes=10**9, clock=FakeClock())
    for key in "abc":
        await store.set(key, entry())
    assert await store.get("a") is not None        # a is now the youngest
    await store.set("d", entry())
    assert await store.get("b") is None            # b was the least recently used
    assert all([await store.get(k) for k in "acd"])
    assert store.entries() == 3 and store.evictions == 1


async def test_memory_lru_bounded_by_bytes():
    size = entry(body=b"x" * 1000).size
    store = MemoryStore(max_entries=100, max_bytes=size * 2 + 10, clock=FakeClock())
    for key in "abc":
        await store.set(key, entry(body=b"x" * 1000))
    assert await store.get("a") is None
    assert store.stats()["bytes"] == size * 2
    await store.set("huge", entry(body=b"x" * size * 3))   # larger than the whole store: not kept
    assert await store.get("huge") is None and store.entries() == 2


async def test_memory_replacing_an_entry_does_not_leak_bytes():
    store = MemoryStore(max_entries=10, max_bytes=10**6, clock=FakeClock())
    for _ in range(5):
        await store.set("a", entry(body=b"x" * 100))
    assert store.stats()["bytes"] == entry(body=b"x" * 100).size


async def test_memory_keeps_stale_copies_for_the_stale_windows_then_drops_them():
    clock = FakeClock()
    store = MemoryStore(max_entries=10, max_bytes=10**6, clock=clock)
    await store.set("k", entry(ttl=10, sie=100, swr=20, clock=clock))
    clock.advance(109)
    assert await store.get("k") is not None
    clock.advance(1)
    assert store.entries() == 0
    assert await store.get("k") is None and store.stats()["bytes"] == 0


async def test_memory_limits_follow_a_reload():
    store = MemoryStore(max_entries=10, max_bytes=10**6, clock=FakeClock())
    for key in "abcd":
        await store.set(key, entry())
    store.configure(max_entries=2, max_bytes=10**6)
    await store.set("e", entry())
    assert store.entries() == 2


# -- redis ------------------------------------------------------------------------------------------

async def test_redis_round_trip_with_the_stores_own_ttl(redis_url):
    clock = FakeClock()
    store = RedisStore(redis_url, namespace="sidecar:r", clock=clock)
    original = entry(ttl=60, sie=3600, swr=30, clock=clock)
    await store.set("sidecar:r:k1", original)
    assert await store.get("sidecar:r:k1") == original
    assert await store.get("sidecar:r:missing") is None
    client = aioredis.from_url(redis_url)
    try:
        pttl = await client.pttl("sidecar:r:k1")
        assert 3_600_000 < pttl <= 3_660_000          # ttl + max(stale_if_error, stale_while_revalidate)
        raw = await client.get("sidecar:r:k1")
        assert raw.startswith(b"SCE1")
        await client.set("sidecar:r:junk", b"\x80\x04not ours")
        assert await store.get("sidecar:r:junk") is None   # unreadable: a miss, not an error
    finally:
        await client.aclose()
    store.entries()                                   # starts a count in the background
    await store._count_task
    assert store.entries() == 2
    await store.close()


async def test_redis_down_is_a_miss_logged_once_then_recovers(redis_server, caplog):
    with socket.socket() as s:                        # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    clock = FakeClock()
    store = RedisStore(f"redis://127.0.0.1:{dead}/0", namespace="sidecar:r", clock=clock)
    caplog.set_level(logging.WARNING, logger="sidecar.cache")
    assert await store.get("k") is None
    await store.set("k", entry(clock=clock))
    assert await store.get("k") is None
    clock.advance(5)
    assert await store.get("k") is None
    warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 1 and f"127.0.0.1:{dead}" in warnings[0].getMessage()
    assert store.stats()["available"] is False and store.errors == 2   # skipped while backing off
    await store.close()


async def test_redis_store_skips_a_failing_server_for_a_while(redis_url):
    clock = FakeClock()
    store = RedisStore(redis_url, namespace="sidecar:r", clock=clock)
    await store.set("k", entry(clock=clock))
    store._failed(ConnectionError("boom"), "get")
    assert await store.get("k") is None                # backing off: not even asked
    clock.advance(1)
    assert await store.get("k") is not None            # back
    assert store.stats()["available"] is True
    await store.close()
