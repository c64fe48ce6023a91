"""One cached route (`RouteCache`): lookups, collapsed misses, background refreshes, stale answers, counters.

What it does for a request is told in sidecar.pipeline.cache, the layer that hands requests to it.
It lives on the route's state (sidecar.exchange.state.RouteState.cache), so a reload that keeps the
store and key keeps its entries.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from multidict import CIMultiDict

from sidecar.cache.stores import Store, open_store
from sidecar.cache.tee import Capture, tee
from sidecar.core.cache import (
    NOT_MODIFIED_HEADERS, CacheEntry, Freshness, NotStored, RequestDirectives, build_key, cache_status,
    etag_matches, freshened, freshness, grpc_complete, key_digest, make_entry, not_storable, usable_on_error,
    validators, vary_matches,
)
from sidecar.core.clock import Clock
from sidecar.core.decisions import Decision
from sidecar.exchange.calls import make_call
from sidecar.exchange.context import Context
from sidecar.exchange.records import follow_up_record
from sidecar.exchange.replies import json_error
from sidecar.exchange.types import Call, Degraded, Exchange, Reply
from sidecar.grpc_rules import SERVER_FAULTS, answer_status
from sidecar.policy.model import CachePolicy
from sidecar.transport.errors import UpstreamFailure

log = logging.getLogger("sidecar.cache")

# Answers made by the sidecar itself: never stored, and (RFC 9211 §2) given no Cache-Status member.
LOCAL_ANSWERS = frozenset({"static", "cache", "fault", "queue", "sidecar"})
# A background refresh wants the whole answer, not a 304 to the app's own validators.
CONDITIONALS = ("if-none-match", "if-modified-since", "if-match", "if-unmodified-since", "if-range")
CLOSE_WAIT = 1.0                           # seconds pending writes may take at shutdown
# What a collapsed miss learns when the forward it waited on failed: try the stale copy, not the upstream.
FAILED = object()


def cacheable_method(method: str, policy: CachePolicy) -> bool:
    return method in ("GET", "HEAD") or (method == "POST" and "body" in policy.key)


class RouteCache:
    """One cached route: its store, in-flight misses, background refreshes and counters."""

    def __init__(self, route: str, policy: CachePolicy, clock: Clock) -> None:
        self.route = route
        self.policy = policy
        self.clock = clock
        self.namespace = f"sidecar:{route}"
        self.store: Store = open_store(policy.store, namespace=self.namespace, max_entries=policy.max_entries,
                                       max_bytes=policy.max_bytes, clock=clock)
        self._inflight: dict[str, asyncio.Future] = {}      # key -> the leader's entry (or None)
        self._refreshing: dict[str, asyncio.Task] = {}      # key -> its one background refresh
        self._writes: dict[str, CacheEntry] = {}            # stored but perhaps not yet in the store
        self._tasks: set[asyncio.Task] = set()
        self._warm_task: asyncio.Task | None = None          # not in _tasks: it never ends by itself
        self.counts = dict.fromkeys(("hits", "stale", "revalidations", "revalidate_failed", "misses",
                                     "stored", "not_stored", "collapsed", "bypass", "not_modified"), 0)

    # -- lifecycle ---------------------------------------------------------------------------------
    def update(self, policy: CachePolicy) -> None:
        self.policy = policy
        self.store.configure(policy.max_entries, policy.max_bytes)

    @property
    def warming(self) -> bool:
        return self._warm_task is not None and not self._warm_task.done()

    def start_warming(self, current: Callable[[], Context]) -> None:
        """(Re)start fetching `cache.warm` paths: all of them now, then each on its schedule."""
        from sidecar.cache.warm import warm_loop
        if self._warm_task is not None:
            self._warm_task.cancel()
            self._warm_task = None
        if not self.policy.warm:
            return
        try:
            self._warm_task = asyncio.get_running_loop().create_task(warm_loop(current, self.route, self))
        except RuntimeError:                 # no running loop: a runtime built outside one
            pass

    def retire(self) -> None:
        """Replaced by a reload that changed the store or key: close the old store in the background."""
        self._spawn(self.close())

    async def close(self) -> None:
        """Shutdown: refreshes are dropped, writes get a moment to land, then the store is closed."""
        for task in [*self._refreshing.values(), *([self._warm_task] if self._warm_task else [])]:
            task.cancel()
        pending = [t for t in self._tasks if t is not asyncio.current_task()]
        if pending:
            await asyncio.wait(pending, timeout=CLOSE_WAIT)
        await self.store.close()

    async def drain(self) -> None:
        """Wait for pending writes and background refreshes (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _spawn(self, coro) -> asyncio.Task | None:
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:
            coro.close()
            return None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- admin -------------------------------------------------------------------------------------
    def entries(self) -> int:
        return self.store.entries()

    def stats(self) -> dict:
        return {**self.store.stats(), **self.counts, "in_flight_misses": len(self._inflight),
                "refreshing": len(self._refreshing), "ttl": self.policy.ttl,
                "stale_if_error": self.policy.stale_if_error,
                "stale_while_revalidate": self.policy.stale_while_revalidate}

    # -- store access ------------------------------------------------------------------------------
    async def lookup(self, key: str) -> CacheEntry | None:
        pending = self._writes.get(key)
        return pending if pending is not None else await self.store.get(key)

    def save(self, key: str, entry: CacheEntry) -> None:
        self.counts["stored"] += 1
        self._writes[key] = entry            # visible to this process at once, before the write lands
        self._spawn(self._write(key, entry))

    async def _write(self, key: str, entry: CacheEntry) -> None:
        try:
            await self.store.set(key, entry)
        finally:
            if self._writes.get(key) is entry:
                del self._writes[key]

    # -- the layer ---------------------------------------------------------------------------------
    async def handle(self, ex: Exchange, call: Call, next) -> Reply:
        policy = ex.route.cache or self.policy   # the policy the request started under
        if not cacheable_method(ex.method, policy):
            self.counts["bypass"] += 1
            return self._mark(ex, await next(ex, call), "method")
        directives = RequestDirectives.parse(ex.headers.getall("cache-control", []),
                                             ex.headers.getall("pragma", []))
        if directives.no_store:
            self.counts["bypass"] += 1
            return self._mark(ex, await next(ex, call), "request", detail="no-store")
        if "body" in policy.key and not ex.body.replayable:
            self.counts["bypass"] += 1       # too large to hash: streamed through, never cached
            return self._mark(ex, await next(ex, call), "bypass", detail="body-too-large")
        key_method = "GET" if ex.method == "HEAD" else ex.method
        key = key_digest(self.namespace, build_key(policy.key, key_method, ex.url, ex.headers, ex.body.data,
                                                   call.upstream.name if call.upstream is not None else None))
        ex.cache_key = key
        if not ex.enforce:
            return await self._shadow(ex, call, next, key)
        now = self.clock.time()
        entry = await self.lookup(key)
        fwd = "miss"
        stale: CacheEntry | None = None      # an expired copy the origin may confirm with a 304
        if entry is not None and not vary_matches(entry, ex.headers):
            entry, fwd = None, "vary-miss"
        if entry is not None:
            state = freshness(entry, now)
            if state in (Freshness.FRESH, Freshness.STALE_WHILE_REVALIDATE) \
                    and not directives.accepts_fresh(entry, now):
                fwd = "request"
            elif state is Freshness.FRESH:
                return self._hit(ex, entry, now)
            elif state is Freshness.STALE_WHILE_REVALIDATE:
                return self._serve_and_refresh(ex, call, next, key, entry, now)
            else:
                fwd = "stale"
                if not any(name in ex.headers for name in CONDITIONALS):   # the app's own validators win
                    stale = entry
        if directives.only_if_cached:
            reply = json_error(504, "not cached (only-if-cached)", ex.route.name, upstream="cache")
            reply.cache_status = cache_status(detail="only-if-cached")
            return reply
        self.counts["misses"] += 1
        if ex.method == "HEAD":
            return await self._forward(ex, call, next, key, fwd, None)
        leader = self._inflight.get(key)
        if leader is not None:
            shared = await self._wait(leader, ex)
            if shared is FAILED:
                stale = await self._stale_on_error(ex, key, fwd, "the forward it joined failed", None)
                if stale is not None:
                    return stale
            elif shared is not None and vary_matches(shared, ex.headers):
                return self._collapsed(ex, shared)
            return await self._forward(ex, call, next, key, fwd, None)   # not stored: on our own
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        return await self._forward(ex, call, next, key, fwd, fut, stale)

    async def _forward(self, ex: Exchange, call: Call, next, key: str, fwd: str,
                       fut: asyncio.Future | None, stale: CacheEntry | None = None) -> Reply:
        conditional = validators(stale) if stale is not None else ()
        for name, value in conditional:      # RFC 9111 §4.3.1: ask whether the stored copy still holds
            call.headers[name] = value
        handed_over = False
        try:
            try:
                reply = await next(ex, call)
            except (Degraded, UpstreamFailure) as exc:
                self._settle(key, fut, FAILED)
                stale = await self._stale_on_error(ex, key, fwd, str(exc), None)
                if stale is not None:
                    return stale
                raise
            if reply.upstream == "cache":    # the fallback chain's `cache: stale` target answered
                self._settle(key, fut, FAILED)
                return reply
            if conditional and reply.status == 304 and reply.upstream not in LOCAL_ANSWERS:
                handed_over = True
                return self._not_modified(ex, key, stale, reply, fut)
            code = answer_status(reply.headers, reply.trailers)   # a gRPC server fault is an error too
            if (reply.status >= 500 or code in SERVER_FAULTS) and reply.upstream not in ("static", "queue"):
                self._settle(key, fut, FAILED)
                what = code.condition if code in SERVER_FAULTS and code is not None else reply.status
                stale = await self._stale_on_error(ex, key, fwd, f"{what} from {reply.upstream}", reply.status)
                if stale is not None:
                    reply.release()
                    return stale
            handed_over = self._store_reply(ex, key, reply, fwd, fut)
            return reply
        finally:
            if not handed_over:
                self._settle(key, fut, None)

    def _store_reply(self, ex: Exchange, key: str, reply: Reply, fwd: str,
                     fut: asyncio.Future | None) -> bool:
        """Set Cache-Status, and arrange for the answer to be stored. True when `fut` is settled later."""
        if reply.upstream in LOCAL_ANSWERS:
            return False
        upstream_value = reply.headers.get("cache-status")
        policy = ex.route.cache or self.policy
        reason = not_storable(reply.status, reply.headers, policy) if ex.method != "HEAD" else None
        if ex.method == "HEAD" or reason is not None \
                or (reply.body is not None and len(reply.body) > policy.max_body):
            if reason is not None:
                self.counts["not_stored"] += 1
            detail = reason.value if reason is not None and reason.value != "status" else None
            reply.cache_status = cache_status(fwd=fwd, fwd_status=reply.status, detail=detail,
                                              upstream_value=upstream_value)
            return False
        received = self.clock.time()         # RFC 9111 §4.2.3: age counts from when the answer arrived
        headers = tuple(reply.headers.items())
        request_headers = ex.headers

        def store(body: bytes) -> CacheEntry:
            entry = make_entry(reply.status, headers, body, now=received, policy=policy,
                               request_headers=request_headers, trailers=_trailers(reply))
            self.save(key, entry)
            return entry

        if reply.body is not None:
            if not grpc_complete(headers, reply.trailers):
                self.counts["not_stored"] += 1
                reply.cache_status = cache_status(fwd=fwd, fwd_status=reply.status,
                                                  detail=NotStored.GRPC_STATUS.value, upstream_value=upstream_value)
                return False
            self._settle(key, fut, store(reply.body))
            reply.cache_status = cache_status(fwd=fwd, fwd_status=reply.status, stored=True,
                                              upstream_value=upstream_value)
            return True
        capture = Capture(policy.max_body)
        reply.stream = tee(reply.stream, capture)

        def done(ok: bool | None) -> None:
            whole = ok is True and capture.complete and not capture.overflow \
                and grpc_complete(headers, reply.trailers)
            if not whole:
                self.counts["not_stored"] += 1
            self._settle(key, fut, store(b"".join(capture.parts)) if whole else None)
        reply.on_done.append(done)
        known_length = reply.headers.get("content-length", "").isdigit()
        if not known_length:
            # A stream of unknown length (chunked, SSE) may run for minutes: collapsed requests do not
            # wait for it, they go upstream on their own now. It is still stored if it ends within max_body.
            self._settle(key, fut, None)
        # `stored` only when it is certain at header time: a known length within max_body.
        reply.cache_status = cache_status(fwd=fwd, fwd_status=reply.status, stored=known_length,
                                          upstream_value=upstream_value)
        return True

    def _not_modified(self, ex: Exchange, key: str, stale: CacheEntry, reply: Reply,
                      fut: asyncio.Future | None) -> Reply:
        """RFC 9111 §4.3.3: the origin confirmed the stored copy. Freshen it, store it, serve it whole."""
        entry = self._freshen(ex, key, stale, reply)
        self._settle(key, fut, entry)
        now = self.clock.time()
        ex.decide(Decision.CACHE_REVALIDATE, f"{reply.upstream} confirmed the stored copy (304)",
                  upstream="cache")
        return self._reply(ex, entry, now, cache_status(fwd="stale", fwd_status=304, stored=True,
                                                        ttl=entry.remaining(now),
                                                        upstream_value=reply.headers.get("cache-status")))

    def _freshen(self, ex: Exchange, key: str, stale: CacheEntry, reply: Reply) -> CacheEntry:
        """A 304 to our validators: the stored copy with the 304's header fields, fresh from now, stored."""
        reply.finish(True)                   # a good answer: the breaker counts it
        entry = freshened(stale, tuple(reply.headers.items()), now=self.clock.time(),
                          policy=ex.route.cache or self.policy, request_headers=ex.headers)
        self.save(key, entry)
        self.counts["not_modified"] += 1
        return entry

    def _settle(self, key: str, fut: asyncio.Future | None, entry: CacheEntry | None) -> None:
        if fut is None:
            return
        if self._inflight.get(key) is fut:
            del self._inflight[key]
        if not fut.done():
            fut.set_result(entry)

    async def _wait(self, fut: asyncio.Future, ex: Exchange) -> CacheEntry | object | None:
        self.counts["collapsed"] += 1
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout=max(ex.remaining(), 0.0))
        except TimeoutError:
            return None

    # -- answers from the cache --------------------------------------------------------------------
    def _reply(self, ex: Exchange, entry: CacheEntry, now: float, status_value: str) -> Reply:
        status, body = entry.status, entry.body
        inm = ex.headers.get("if-none-match")
        if inm is not None and entry.status == 200 and etag_matches(entry, inm):
            status, body = 304, b""          # RFC 9111 §4.3.2: the app's own validator matches
            headers = CIMultiDict((k, v) for k, v in entry.headers if k.lower() in NOT_MODIFIED_HEADERS)
        else:
            headers = CIMultiDict(entry.headers)
        upstream_age = headers.popall("age", ["0"])[0]
        age = entry.age(now) + (int(upstream_age) if upstream_age.isdigit() else 0)
        headers["age"] = str(int(age))       # RFC 9111 §5.1
        return Reply(status=status, headers=headers, upstream="cache", body=body, cache_status=status_value,
                     trailers=CIMultiDict(entry.trailers) if entry.trailers else None)

    def _hit(self, ex: Exchange, entry: CacheEntry, now: float) -> Reply:
        self.counts["hits"] += 1
        ex.decide(Decision.CACHE_HIT, f"fresh copy, {entry.age(now):.0f}s old", upstream="cache")
        return self._reply(ex, entry, now, cache_status(hit=True, ttl=entry.remaining(now),
                                                        upstream_value=entry.header("cache-status")))

    def _collapsed(self, ex: Exchange, entry: CacheEntry) -> Reply:
        now = self.clock.time()
        ex.decide(Decision.CACHE_HIT, "collapsed into a concurrent miss for the same key", upstream="cache")
        return self._reply(ex, entry, now, cache_status(fwd="miss", collapsed=True, ttl=entry.remaining(now),
                                                        upstream_value=entry.header("cache-status")))

    def _serve_and_refresh(self, ex: Exchange, call: Call, next, key: str, entry: CacheEntry,
                           now: float) -> Reply:
        """RFC 5861 §3: serve the stale copy now; one refresh per key runs in the background."""
        stale_for = -entry.remaining(now)
        self.counts["hits"] += 1             # answered without going forward: a hit (RFC 9211 §2.1)
        ex.decide(Decision.CACHE_REVALIDATE,
                  f"copy {stale_for:.0f}s past its ttl, served while it is refreshed", upstream="cache")
        if key not in self._refreshing:
            self.counts["revalidations"] += 1
            task = self._spawn(self._refresh(ex, call, next, key, entry))
            if task is not None:
                self._refreshing[key] = task
                task.add_done_callback(lambda t, key=key: self._refreshing.pop(key, None)
                                       if self._refreshing.get(key) is t else None)
        # RFC 9211 §2.1: a stale answer given without going forward (background revalidation) is a hit.
        return self._reply(ex, entry, now, cache_status(hit=True, ttl=entry.remaining(now),
                                                        detail="stale-while-revalidate",
                                                        upstream_value=entry.header("cache-status")))

    async def _stale_on_error(self, ex: Exchange, key: str, fwd: str, reason: str,
                              fwd_status: int | None) -> Reply | None:
        now = self.clock.time()
        entry = await self.lookup(key)       # the newest copy: another request may have stored one
        if entry is None or not vary_matches(entry, ex.headers) or not usable_on_error(entry, now):
            return None
        self.counts["stale"] += 1
        ex.decide(Decision.CACHE_STALE,
                  f"{reason}; serving a copy {entry.age(now):.0f}s old (stale-if-error)", upstream="cache")
        return self._reply(ex, entry, now, cache_status(fwd=fwd, fwd_status=fwd_status,
                                                        ttl=entry.remaining(now), detail="stale-if-error",
                                                        upstream_value=entry.header("cache-status")))

    async def stale_reply(self, ex: Exchange) -> Reply | None:
        """For the fallback target `cache: stale`: the newest copy for the key, up to stale_if_error old."""
        key = ex.cache_key
        if key is None:
            return None
        now = self.clock.time()
        entry = await self.lookup(key)
        if entry is None or not vary_matches(entry, ex.headers) or not usable_on_error(entry, now):
            return None
        self.counts["stale"] += 1
        return self._reply(ex, entry, now, cache_status(fwd="stale", fwd_status=ex.primary_status,
                                                        ttl=entry.remaining(now), detail="fallback",
                                                        upstream_value=entry.header("cache-status")))

    def _mark(self, ex: Exchange, reply: Reply, fwd: str, detail: str | None = None) -> Reply:
        if reply.upstream not in LOCAL_ANSWERS and ex.enforce:
            reply.cache_status = cache_status(fwd=fwd, fwd_status=reply.status, detail=detail,
                                              upstream_value=reply.headers.get("cache-status"))
        return reply

    # -- background refresh and shadow mode --------------------------------------------------------
    async def _refresh(self, ex: Exchange, call: Call, next, key: str, stale: CacheEntry) -> None:
        """Fetch the answer again on an exchange of its own: nothing here can touch the app's response.
        Conditional on the stored copy's validators: a 304 freshens it without sending the body again."""
        bg = _background_exchange(ex)
        bg_call = make_call(bg, call.upstream)
        for name in CONDITIONALS:
            bg_call.headers.popall(name, None)
        conditional = validators(stale)
        for name, value in conditional:
            bg_call.headers[name] = value
        try:
            async with asyncio.timeout(bg.route.timeout + 1.0):
                reply = await next(bg, bg_call)
                if not await self._absorb(bg, key, reply, stale if conditional else None):
                    self.counts["revalidate_failed"] += 1
        except (Degraded, UpstreamFailure, TimeoutError, OSError) as exc:
            self.counts["revalidate_failed"] += 1
            log.debug("background refresh on route %s failed: %s", self.route, exc)
        except Exception:  # noqa: BLE001 - a background task has nobody else to tell
            self.counts["revalidate_failed"] += 1
            log.exception("background refresh on route %s failed", self.route)

    async def _absorb(self, bg: Exchange, key: str, reply: Reply, stale: CacheEntry | None = None) -> bool:
        """Read a refreshed answer whole (up to max_body) and store it; False when it was not stored.
        `stale` is the copy whose validators the refresh carried: a 304 freshens it."""
        if stale is not None and reply.status == 304 and reply.upstream not in LOCAL_ANSWERS:
            self._freshen(bg, key, stale, reply)
            return True
        policy = bg.route.cache or self.policy
        if reply.upstream in LOCAL_ANSWERS or not_storable(reply.status, reply.headers, policy) is not None:
            reply.release()
            return False
        body = reply.body
        if body is None:
            parts, size = [], 0
            try:
                async for chunk in reply.stream:
                    size += len(chunk)
                    if size > policy.max_body:
                        await _close(reply.stream)
                        reply.release()
                        return False
                    parts.append(chunk)
            except UpstreamFailure:
                reply.finish(False)          # cut mid-body: the breaker counts it
                raise
            body = b"".join(parts)
        reply.finish(True)
        if len(body) > policy.max_body or not grpc_complete(reply.headers.items(), reply.trailers):
            return False
        self.save(key, make_entry(reply.status, tuple(reply.headers.items()), body, now=self.clock.time(),
                                  policy=policy, request_headers=bg.headers, trailers=_trailers(reply)))
        return True

    async def _shadow(self, ex: Exchange, call: Call, next, key: str) -> Reply:
        """Shadow mode: say what the cache would have done, forward anyway, keep the cache warm."""
        now = self.clock.time()
        entry = await self.lookup(key)
        if entry is not None and vary_matches(entry, ex.headers):
            state = freshness(entry, now)
            if state is Freshness.FRESH:
                ex.decide(Decision.CACHE_HIT, "would answer from a fresh copy", upstream="cache")
            elif state is Freshness.STALE_WHILE_REVALIDATE:
                ex.decide(Decision.CACHE_REVALIDATE, "would serve a stale copy and refresh it",
                          upstream="cache")
        reply = await next(ex, call)
        if ex.method != "HEAD" and reply.status < 500:
            self._store_reply(ex, key, reply, "miss", None)
        reply.cache_status = None            # shadow: the app sees no policy
        return reply


def _background_exchange(ex: Exchange) -> Exchange:
    """A detached copy of the request, in the same trace as the one that triggered it."""
    method = "GET" if ex.method == "HEAD" else ex.method
    record = follow_up_record(ex.record, listener="cache-revalidate", method=method)
    bg = Exchange(route=ex.route, state=ex.state, ctx=ex.ctx, method=method, url=ex.url,
                  headers=CIMultiDict(ex.headers), body=ex.body,
                  deadline=ex.ctx.clock.monotonic() + ex.route.timeout, record=record,
                  egress_guard=ex.egress_guard)
    bg.cache_key = ex.cache_key
    bg.connect_to = ex.connect_to
    return bg


def _trailers(reply: Reply) -> tuple[tuple[str, str], ...]:
    return tuple(reply.trailers.items()) if reply.trailers else ()


async def _close(stream) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()
