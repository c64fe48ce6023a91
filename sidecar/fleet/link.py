"""One Redis connection pool per URL, with the cache store's manners (sidecar/cache/stores.py):

    every call under a timeout ──ok──> result
                               └─error or timeout──> RedisUnavailable; the link "backs off": for
                                 0.25 s, doubling up to 5 s, calls fail at once without touching Redis
    first failure: one warning; while failing: nothing more; first success after: one "is back" line

The backoff cap is short (5 s, the cache's is 30 s) because what depends on this link degrades while
it is down (a queue that refuses writes, a limit enforced per pod), so recovery should be noticed soon.

A runtime holds one link per URL (`Links`), shared by every route naming it: a reload keeps them (no
reconnect), the runtime's close closes them. redis-py is imported only when a policy names Redis
(it costs ~7 MiB resident; see stores._simple_memory_cache).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

from yarl import URL

from sidecar.core.authority import authority
from sidecar.core.clock import SYSTEM_CLOCK, Clock

log = logging.getLogger("sidecar.fleet")

OP_TIMEOUT = 0.5                           # seconds: any one call, connecting included (the default)
CONNECT_TIMEOUT = 1.0                      # also bounded by the call's own timeout
BACKOFF_FIRST = 0.25
BACKOFF_MAX = 5.0
MAX_CONNECTIONS = 64                       # per URL; past it a call fails (and degrades) at once


class RedisUnavailable(Exception):
    """Redis could not be used for this call (down, slow, backing off, or an error reply)."""


def where(url: str) -> str:
    """The URL as logs may show it: no password."""
    parsed = URL(url)
    db = (parsed.path or "/").strip("/") or "0"
    return f"{parsed.scheme}://{authority(parsed.host or '', parsed.port or 6379)}/{db}"


class RedisLink:
    def __init__(self, url: str, clock: Clock = SYSTEM_CLOCK) -> None:
        import redis.asyncio as aioredis     # only when a policy names a Redis store
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError
        self.url = url
        self.where = where(url)
        self.clock = clock
        # No socket timeout of redis-py's own: every call runs under `call`'s timeout, which a caller
        # may lengthen (a write waiting to be stored) or shorten.
        self.client = aioredis.Redis.from_url(
            url, socket_timeout=None, socket_connect_timeout=CONNECT_TIMEOUT,
            max_connections=MAX_CONNECTIONS, decode_responses=False, retry_on_timeout=False,
            # A pooled connection that Redis closed (a restart) fails its next command once: one
            # immediate retry on a fresh connection, so a restart costs no failed call and no backoff.
            retry=Retry(NoBackoff(), 1), retry_on_error=[RedisConnectionError],
            health_check_interval=0)
        self._down_until = 0.0
        self._backoff = BACKOFF_FIRST
        self.failing = False
        self.errors = 0
        self.last_error: str | None = None

    def available(self) -> bool:
        return self.clock.monotonic() >= self._down_until

    async def call(self, op: str, fn: Callable[[], Awaitable[Any]], timeout: float = OP_TIMEOUT, *,
                   despite_backoff: bool = False) -> Any:
        """Run `fn()` (one or a few Redis commands) under `timeout`; RedisUnavailable on any failure.
        `despite_backoff`: try even while backing off (a last word at shutdown, worth one timeout)."""
        if not despite_backoff and not self.available():
            raise RedisUnavailable(f"{self.where} unavailable ({self.last_error}); not retried until "
                                   f"the backoff ends")
        try:
            async with asyncio.timeout(max(timeout, 0.001)):
                result = await fn()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - connection, timeout, protocol or error replies alike
            self.failed(exc, op)
            raise RedisUnavailable(f"{self.where}: {self.last_error}") from exc
        self.ok()
        return result

    def failed(self, exc: BaseException, op: str) -> None:
        self.errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        self._down_until = self.clock.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)
        if not self.failing:
            self.failing = True
            log.warning("redis %s unavailable on %s (%s): shared queue and global limits degrade "
                        "until it is back", self.where, op, self.last_error)

    def ok(self) -> None:
        if self.failing:
            self.failing = False
            log.info("redis %s is back", self.where)
        self._backoff = BACKOFF_FIRST

    def stats(self) -> dict:
        return {"store": self.where, "available": not self.failing, "errors": self.errors}

    async def close(self) -> None:
        try:
            await self.client.aclose()
        except Exception:  # noqa: BLE001 - closing a dead connection is not worth an error
            pass


class Links:
    """The links of one runtime, one per URL: created on first use (connecting on their first call),
    kept across reloads, closed with the runtime."""

    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        self.clock = clock
        self._links: dict[str, RedisLink] = {}

    def get(self, url: str) -> RedisLink:
        found = self._links.get(url)
        if found is None:
            found = self._links[url] = RedisLink(url, self.clock)
        return found

    def stats(self) -> list[dict]:
        return [each.stats() for each in self._links.values()]

    async def close(self) -> None:
        links = list(self._links.values())
        self._links.clear()
        for each in links:
            await each.close()
