"""The two stores behind a route's cache, both on aiocache, both answering misses rather than errors.

    MemoryStore   aiocache's SimpleMemoryCache holds the entries, each packed into one compact value
                  (codec.pack); an OrderedDict beside it keeps LRU order and expiry, bounded by
                  `max_entries` AND `max_bytes` (oldest go first)
    RedisStore    aiocache's RedisCache on `redis://host:port/db` (or `rediss://`), shared by every
                  replica; entries framed by codec.py (no pickle); Redis evicts by its own maxmemory policy

An entry is kept for ttl + max(stale_if_error, stale_while_revalidate), so stale copies exist during an
outage. A store that fails (Redis down, slow, or answering garbage) turns into misses: the request goes
upstream as if the cache were empty. The first failure is logged, then nothing until it recovers.
"""
from __future__ import annotations

import asyncio
import importlib
import logging
import sys
from collections import OrderedDict
from typing import Protocol

from yarl import URL

from sidecar.cache import codec
from sidecar.core.authority import authority
from sidecar.core.cache import CacheEntry
from sidecar.core.clock import Clock

log = logging.getLogger("sidecar.cache")


def _simple_memory_cache() -> type:
    """aiocache's SimpleMemoryCache, without the redis client.

    aiocache (0.12) imports the whole redis client in its package `__init__` whenever redis is
    installed: ~7 MiB resident (redis-py brings OpenTelemetry's metrics SDK along) in every sidecar,
    though only a `redis://` store needs it. Hidden for that one import; RedisStore imports
    aiocache.backends.redis, and redis with it, when a policy asks for one."""
    hide = "aiocache" not in sys.modules and "redis" not in sys.modules
    if hide:
        sys.modules["redis"] = None          # `import redis` raises ImportError: aiocache skips RedisCache
    try:
        return importlib.import_module("aiocache").SimpleMemoryCache
    finally:
        if hide:
            del sys.modules["redis"]


SimpleMemoryCache = _simple_memory_cache()

PURGE_EVERY = 256                          # sets between sweeps of expired memory entries
REDIS_OP_TIMEOUT = 0.5                     # a cache lookup slower than this is worth less than a miss
REDIS_CONNECT_TIMEOUT = 0.5
REDIS_RETRY_AFTER = 1.0                    # after a failure, skip Redis this long (doubling, capped)
REDIS_RETRY_MAX = 30.0
REDIS_COUNT_EVERY = 10.0                   # seconds between key counts for `sidecar_cache_entries`


class Store(Protocol):
    kind: str

    async def get(self, key: str) -> CacheEntry | None: ...

    async def set(self, key: str, entry: CacheEntry) -> None: ...

    async def delete(self, key: str) -> None: ...

    def entries(self) -> int: ...

    def stats(self) -> dict: ...

    def configure(self, max_entries: int, max_bytes: int) -> None: ...

    async def close(self) -> None: ...


def open_store(url: str, *, namespace: str, max_entries: int, max_bytes: int, clock: Clock) -> Store:
    if url == "memory":
        return MemoryStore(max_entries=max_entries, max_bytes=max_bytes, clock=clock)
    return RedisStore(url, namespace=namespace, clock=clock)


class MemoryStore:
    kind = "memory"

    def __init__(self, *, max_entries: int, max_bytes: int, clock: Clock) -> None:
        # No aiocache timeout: every operation is a dict access, and wait_for would cost a task each.
        self._cache = SimpleMemoryCache(timeout=None)
        # key -> expires_at (monotonic): one float per entry; an entry's size is read back from its value.
        self._index: OrderedDict[str, float] = OrderedDict()
        self._bytes = 0
        self._sets = 0
        self.evictions = 0
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.clock = clock

    def configure(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes

    async def get(self, key: str) -> CacheEntry | None:
        expires = self._index.get(key)
        if expires is None:
            return None
        if self.clock.monotonic() >= expires:
            await self.delete(key)
            return None
        self._index.move_to_end(key)         # LRU: a read makes it young again
        value = await self._cache.get(key)
        return None if value is None else codec.unpack(value)

    async def set(self, key: str, entry: CacheEntry) -> None:
        size, keep = entry.size, entry.keep_for
        if keep <= 0 or size > self.max_bytes:
            return
        value = codec.pack(entry)
        await self.delete(key)               # a replaced entry gives its bytes back first
        self._index[key] = self.clock.monotonic() + keep
        self._bytes += size
        await self._cache.set(key, value)
        await self._evict()
        self._sets += 1
        if self._sets % PURGE_EVERY == 0:
            await self._purge()

    async def delete(self, key: str) -> None:
        if self._index.pop(key, None) is not None:
            await self._drop(key)

    async def _drop(self, key: str) -> None:
        """Remove the value of a key already out of the index, and count its bytes out."""
        value = await self._cache.get(key)
        if value is not None:
            self._bytes -= codec.unpack(value).size
            await self._cache.delete(key)

    async def _evict(self) -> None:
        while self._index and (len(self._index) > self.max_entries or self._bytes > self.max_bytes):
            key, _ = self._index.popitem(last=False)
            self.evictions += 1
            await self._drop(key)

    async def _purge(self) -> None:
        now = self.clock.monotonic()
        for key in [k for k, expires in self._index.items() if now >= expires]:
            await self.delete(key)

    def entries(self) -> int:
        now = self.clock.monotonic()
        return sum(1 for expires in self._index.values() if now < expires)

    def stats(self) -> dict:
        return {"store": "memory", "entries": self.entries(), "bytes": self._bytes,
                "max_entries": self.max_entries, "max_bytes": self.max_bytes, "evictions": self.evictions}

    async def close(self) -> None:
        self._index.clear()
        self._bytes = 0
        await self._cache.clear()


class RedisStore:
    kind = "redis"

    def __init__(self, url: str, *, namespace: str, clock: Clock) -> None:
        parsed = URL(url)
        db = (parsed.path or "/").strip("/").split("/")[0]
        self.url = url
        self.where = f"{parsed.scheme}://{authority(parsed.host or '', parsed.port or 6379)}/{db or 0}"   # no password
        self.namespace = namespace
        self.clock = clock
        # Values are our own framed bytes: no serializer, no decoding (encoding=None).
        # Only a Redis-backed route imports the redis client (see _simple_memory_cache).
        from aiocache.backends.redis import RedisCache
        from aiocache.serializers import NullSerializer
        self._cache = RedisCache(
            serializer=NullSerializer(encoding=None), endpoint=parsed.host or "127.0.0.1",
            port=parsed.port or 6379, db=int(db) if db.isdigit() else 0, password=parsed.password,
            ssl=parsed.scheme == "rediss", timeout=REDIS_OP_TIMEOUT,
            create_connection_timeout=REDIS_CONNECT_TIMEOUT)
        self._down_until = 0.0
        self._backoff = REDIS_RETRY_AFTER
        self._failing = False
        self.errors = 0
        self._count = 0
        self._counted_at: float | None = None
        self._count_task: asyncio.Task | None = None

    def configure(self, max_entries: int, max_bytes: int) -> None:
        """Redis bounds itself (`maxmemory` with an LRU policy); the policy's limits are for memory."""

    def _available(self) -> bool:
        return self.clock.monotonic() >= self._down_until

    def _failed(self, exc: BaseException, op: str) -> None:
        self.errors += 1
        self._down_until = self.clock.monotonic() + self._backoff
        if not self._failing:
            self._failing = True
            log.warning("cache store %s unavailable on %s (%s: %s): answering misses until it is back",
                        self.where, op, type(exc).__name__, exc)
        self._backoff = min(self._backoff * 2, REDIS_RETRY_MAX)

    def _ok(self) -> None:
        if self._failing:
            self._failing = False
            log.info("cache store %s is back", self.where)
        self._backoff = REDIS_RETRY_AFTER

    async def get(self, key: str) -> CacheEntry | None:
        if not self._available():
            return None
        try:
            data = await self._cache.get(key)
        except Exception as exc:  # noqa: BLE001 - any store failure is a miss, never a failed request
            self._failed(exc, "get")
            return None
        self._ok()
        if data is None:
            return None
        try:
            return codec.decode(data)
        except ValueError as exc:
            log.debug("cache entry %s in %s unreadable (%s): a miss", key, self.where, exc)
            return None

    async def set(self, key: str, entry: CacheEntry) -> None:
        keep = entry.keep_for
        if keep <= 0 or not self._available():
            return
        try:
            # A float ttl makes aiocache use PSETEX: Redis expires it, every replica sees the same copy.
            await self._cache.set(key, codec.encode(entry), ttl=max(float(keep), 0.001))
        except Exception as exc:  # noqa: BLE001
            self._failed(exc, "set")
            return
        self._ok()

    async def delete(self, key: str) -> None:
        if not self._available():
            return
        try:
            await self._cache.delete(key)
        except Exception as exc:  # noqa: BLE001
            self._failed(exc, "delete")

    def entries(self) -> int:
        """The last count of this route's keys; a metrics scrape starts a new count now and then."""
        now = self.clock.monotonic()
        stale = self._counted_at is None or now - self._counted_at >= REDIS_COUNT_EVERY
        if stale and self._available() and (self._count_task is None or self._count_task.done()):
            try:
                self._count_task = asyncio.get_running_loop().create_task(self._recount(now))
            except RuntimeError:             # no running loop (a synchronous caller)
                pass
        return self._count

    async def _recount(self, now: float) -> None:
        self._counted_at = now
        try:
            async with asyncio.timeout(REDIS_OP_TIMEOUT * 4):
                count = 0
                async for _ in self._cache.client.scan_iter(match=f"{self.namespace}:*", count=1000):
                    count += 1
        except Exception as exc:  # noqa: BLE001
            self._failed(exc, "count")
            return
        self._count = count

    def stats(self) -> dict:
        return {"store": self.where, "entries": self._count, "errors": self.errors,
                "available": not self._failing}

    async def close(self) -> None:
        if self._count_task is not None:
            self._count_task.cancel()
        try:
            await self._cache.client.aclose()
        except Exception:  # noqa: BLE001 - closing a dead connection is not worth an error
            pass
