"""Store-and-forward for writes: accept now with `202`, deliver later, in order, exactly as sent.

    fallback layer ──accept(ex, reason)──> SQLite (fsync) ──> 202 + x-sidecar-queued
    one worker per route:  head item only ──breaker admits?──> send ──2xx/4xx──> delete, queue_delivered
                                                                    └─5xx/failure──> backoff, try again
                           expired (max_age) ──> delete, queue_expired  (never silently)

Why one worker per route, head item only: "delivered in acceptance order per route" means item n+1 must
not overtake item n, so a route's writes go one at a time; routes do not wait on each other. A write
is deleted only after its upstream answered, so `kill -9` at any point loses nothing acknowledged: the
worst case is one write delivered twice (answered, not yet deleted), which the `Idempotency-Key` we add
to every stored write lets the upstream detect.

The event loop never touches the disk: every SQLite call runs on one dedicated thread. What the loop
needs synchronously (depth, ages, order) is a small in-memory index loaded from the file at start.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from multidict import CIMultiDict

from sidecar.core.authority import authority
from sidecar.core.breaker import Transition, transition_decision
from sidecar.core.clock import SYSTEM_CLOCK
from sidecar.core.decisions import Decision, DecisionRecord
from sidecar.core.retry import Backoff
from sidecar.exchange.calls import upstream_url
from sidecar.exchange.context import Context
from sidecar.exchange.types import Exchange, Reply
from sidecar.policy.model import BackoffPolicy, Policy, Route
from sidecar.queue import deliver
from sidecar.queue.store import IndexRow, NewItem, Store

log = logging.getLogger("sidecar.queue")

POLL = 0.1                  # seconds between looks at a head that is waiting (breaker, backoff)
BACKOFF_BASE = 0.1          # when the route has no retry policy to take a base from
BACKOFF_CAP = 30.0
MAX_RETRY_AFTER = 300.0     # an upstream's Retry-After is honoured up to this
LISTING_LIMIT = 1000

# Never stored: recomputed per delivery (length, trace context) or meaningless later (expect).
_NOT_STORED = frozenset({"content-length", "traceparent", "tracestate", "expect"})


class Entry:
    """One waiting write in the in-memory index (its body stays on disk)."""
    __slots__ = ("id", "target", "accepted_at", "max_age", "attempts", "next_at", "backoff")

    def __init__(self, row: IndexRow) -> None:
        self.id = row.id
        self.target = row.target
        self.accepted_at = row.accepted_at
        self.max_age = row.max_age
        self.attempts = row.attempts
        self.next_at = 0.0                   # monotonic; 0: due now (also right after a restart)
        self.backoff: Backoff | None = None


def find_route(policy: Policy, name: str) -> Route | None:
    if policy.defaults.name == name:
        return policy.defaults
    return next((r for r in policy.routes if r.name == name), None)


def new_item(ex: Exchange, now: float, max_age: float) -> NewItem:
    """What a store keeps of a write: the app's request as sent (minus what is recomputed per delivery),
    where it was going, and an Idempotency-Key (the app's, or a new UUID added to its headers)."""
    gen = ex.ctx
    path = ex.url.raw_path_qs or "/"
    name = ex.route.upstream
    if name is None:                     # a reverse listener's upstream, as the listener chose it
        listener = next((lst for lst in gen.policy.listeners if lst.name == ex.record.listener), None)
        if listener is not None and listener.mode == "reverse":
            name = listener.upstream
    up = gen.policy.upstreams.get(name) if name else None
    if up is not None:
        target, upstream, url = up.name, up.name, str(upstream_url(up, path))
    else:
        target, upstream = authority(ex.url.host or "", ex.url.port), None   # make_call's name
        url = f"{ex.url.scheme}://{ex.url.raw_authority}{path}"
    headers = [(k, v) for k, v in ex.headers.items() if k.lower() not in _NOT_STORED]
    key = ex.headers.get("idempotency-key")
    if not key:
        key = str(uuid.uuid4())
        headers.append(("Idempotency-Key", key))
    return NewItem(route=ex.route.name, target=target, upstream=upstream, method=ex.method, url=url,
                   path=path, headers=tuple(headers), body=ex.body.data, idempotency_key=key,
                   trace_id=ex.record.trace_id, span_id=ex.record.span_id, accepted_at=now, max_age=max_age)


def queued_reply(route: str, name: str, idempotency_key: str) -> Reply:
    """The app's 202 for a stored write (both stores)."""
    body = {"queued": name, "route": route, "idempotency_key": idempotency_key}
    headers = CIMultiDict({"content-type": "application/json", "x-sidecar-queued": name})
    return Reply(status=202, headers=headers, upstream="queue", body=json.dumps(body).encode())


class DurableQueue:
    def __init__(self, store: Store, executor: ThreadPoolExecutor, rows: list[IndexRow]) -> None:
        self._store = store
        self._executor = executor
        self._routes: dict[str, collections.deque[Entry]] = collections.defaultdict(collections.deque)
        for row in rows:
            self._routes[row.route].append(Entry(row))
        self._reserved: collections.Counter[str] = collections.Counter()   # accepts writing right now
        self._delivered: collections.Counter[str] = collections.Counter()
        self._expired: collections.Counter[str] = collections.Counter()
        self._waiting: dict[str, str] = {}   # route -> why its head is not being sent
        self._full: set[str] = set()         # routes at max_items, logged once until they drain
        self._workers: dict[str, asyncio.Task] = {}
        self._current: Callable[[], Context] | None = None   # the running generation
        self._clock = SYSTEM_CLOCK
        self._closed = False

    @classmethod
    async def open(cls, state_dir: str) -> "DurableQueue":
        """Open (or create) the queue under `state_dir`; raises `QueueError` with a clear message."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sidecar-queue")
        loop = asyncio.get_running_loop()
        try:
            store = await loop.run_in_executor(executor, Store, state_dir)
            rows = await loop.run_in_executor(executor, store.index)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        if rows:
            log.info("queue: %d write(s) waiting in %s from before the restart", len(rows), store.path)
        return cls(store, executor, rows)

    def start(self, current: Callable[[], Context]) -> None:
        """Begin delivering; `current()` is the running generation: policy, transport, breakers, clock,
        sinks (read on each use, so a reload applies to writes already waiting)."""
        self._current = current
        self._clock = current().clock
        for route, entries in self._routes.items():
            if entries:
                self._ensure_worker(route)

    def _ctx(self) -> Context:
        assert self._current is not None, "start() first"
        return self._current()

    async def _db(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- accepting ---------------------------------------------------------------------------------
    async def accept(self, ex: Exchange, reason: str) -> Reply | None:
        """Store the write and answer 202, or None (the chain goes on) when it cannot be queued."""
        route = ex.route
        policy = route.queue
        if policy is None or self._closed or self._current is None:
            return None
        if not ex.body.replayable:
            log.debug("queue: %s %s on route %s not queued: its body is larger than the route's replay "
                      "limit", ex.method, ex.url.path, route.name)
            return None
        if not ex.enforce:
            ex.decide(Decision.QUEUED, f"would queue: {reason}")
            return None
        entries = self._routes[route.name]
        if len(entries) + self._reserved[route.name] >= policy.max_items:
            if route.name not in self._full:
                self._full.add(route.name)
                log.warning("queue: route %s is full (max_items %d): writes are not queued until it "
                            "drains", route.name, policy.max_items)
            return None
        self._full.discard(route.name)
        item = self._new_item(ex, policy.max_age)
        self._reserved[route.name] += 1
        try:
            item_id = await self._db(self._store.add, item)
        except (sqlite3.Error, OSError) as exc:
            # Disk full or gone: telling the app 202 would be a lie, so the chain answers instead.
            log.error("queue: could not store a write for route %s: %s", route.name, exc)
            return None
        finally:
            self._reserved[route.name] -= 1
        entry = Entry(IndexRow(item_id, route.name, item.target, item.accepted_at, item.max_age, 0))
        entries.append(entry)
        if len(entries) > 1 and entries[-2].id > item_id:   # concurrent accepts finished out of order
            ordered = sorted(entries, key=lambda e: e.id)     # in place: the worker holds this deque
            entries.clear()
            entries.extend(ordered)
        name = self._store.item_name(item_id)
        ex.decide(Decision.QUEUED, f"{reason}; stored as {name}, delivered when {item.target} recovers",
                  upstream=item.target)
        self._ensure_worker(route.name)
        return queued_reply(route.name, name, item.idempotency_key)

    def _new_item(self, ex: Exchange, max_age: float) -> NewItem:
        return new_item(ex, self._clock.time(), max_age)

    # -- delivering --------------------------------------------------------------------------------
    def _ensure_worker(self, route: str) -> None:
        if route not in self._workers and not self._closed and self._current is not None:
            self._workers[route] = asyncio.get_running_loop().create_task(self._work(route),
                                                                          name=f"queue:{route}")

    async def _work(self, route: str) -> None:
        """Deliver `route`'s writes one at a time, oldest first, until none is left."""
        try:
            while self._routes[route]:
                await self._expire(route)
                entries = self._routes[route]
                if not entries:
                    break
                head = entries[0]
                why = self._blocked(route, head)
                if why is not None:
                    self._waiting[route] = why
                    await self._ctx().sleep(POLL)
                    continue
                self._waiting.pop(route, None)
                await self._deliver(route, head)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a bug here must not silently stop delivery for good
            log.exception("queue: delivery worker for route %s failed; restarting it", route)
            self._workers.pop(route, None)
            await asyncio.sleep(1.0)
            self._ensure_worker(route)
            return
        finally:
            if self._workers.get(route) is asyncio.current_task():
                self._workers.pop(route, None)
            self._waiting.pop(route, None)

    def _max_age(self, route: str, entry: Entry) -> float:
        current = find_route(self._ctx().policy, route)
        return current.queue.max_age if current is not None and current.queue is not None else entry.max_age

    async def _expire(self, route: str) -> None:
        entries = self._routes[route]
        now = self._clock.time()
        while entries and now - entries[0].accepted_at > self._max_age(route, entries[0]):
            entry = entries[0]
            item = await self._db(self._store.get, entry.id)
            await self._db(self._store.delete, entry.id)
            if entries and entries[0] is entry:
                entries.popleft()
            self._expired[route] += 1
            age = now - entry.accepted_at
            reason = (f"{self._store.item_name(entry.id)} dropped undelivered after {age:.0f}s "
                      f"(max_age {self._max_age(route, entry):g}s, {entry.attempts} attempt(s))")
            log.warning("queue: route %s: %s", route, reason)
            self._emit(Decision.QUEUE_EXPIRED, route, entry.target, reason,
                       trace_id=item.trace_id if item else None, span_id=item.span_id if item else None)

    def _blocked(self, route: str, head: Entry) -> str | None:
        """Why the head may not be sent right now, or None. Admitting through the breaker goes last:
        it takes a half-open probe slot, which `_deliver` then always gives back."""
        ctx = self._ctx()
        if self._clock.monotonic() < head.next_at:
            return f"backoff after {head.attempts} attempt(s)"
        health = ctx.health.get(head.target)
        if health is not None and not health.healthy:
            return f"upstream {head.target} failing its health check"
        breaker = self._breaker(route, head.target)
        if breaker is not None:
            admitted, transition = breaker.admit()
            self._transition(route, head.target, transition)
            if not admitted:
                return f"circuit breaker for {head.target} is {breaker.state.value}"
        return None

    def _breaker(self, route: str, target: str):
        state = self._ctx().states.get(route)
        return state.breaker(target) if state is not None else None

    async def _deliver(self, route: str, head: Entry) -> None:
        ctx = self._ctx()
        breaker = self._breaker(route, head.target)
        try:
            item = await self._db(self._store.get, head.id)
            request = deliver.build_request(ctx.policy, item) if item is not None else None
            if request is None:
                if breaker is not None:
                    breaker.release()
                if item is None:             # gone from the file (deleted by hand): forget it
                    self._routes[route].popleft()
                else:
                    self._waiting[route] = f"upstream {item.upstream} is not in the policy"
                    await ctx.sleep(POLL * 10)
                return
            current = find_route(ctx.policy, route)
            outcome, record = await deliver.attempt(ctx, item, request, current, head.attempts)
        except BaseException:
            if breaker is not None:
                breaker.release()            # cancelled (shutdown): no verdict on the upstream
            raise
        if breaker is not None:
            self._transition(route, head.target, deliver.judge(breaker, outcome))
        if outcome.delivered:
            await self._db(self._store.delete, head.id)
            entries = self._routes[route]
            if entries and entries[0] is head:
                entries.popleft()
            self._delivered[route] += 1
            what = "delivered" if outcome.status < 400 else "refused for good by the upstream"
            self._emit(Decision.QUEUE_DELIVERED, route, head.target,
                       f"{self._store.item_name(head.id)} {what} ({outcome.status}) after "
                       f"{head.attempts + 1} attempt(s), {self._clock.time() - head.accepted_at:.1f}s queued",
                       trace_id=item.trace_id, span_id=item.span_id)
        else:
            await self._retry_later(route, head, outcome)
        ctx.sink.request_finished(record)

    async def _retry_later(self, route: str, head: Entry, outcome: deliver.Outcome) -> None:
        if head.backoff is None:
            current = find_route(self._ctx().policy, route)
            base = current.retry.backoff.base if current is not None and current.retry else BACKOFF_BASE
            head.backoff = Backoff(BackoffPolicy(base=base or BACKOFF_BASE, max=BACKOFF_CAP), self._ctx().rng)
        delay = head.backoff.next_delay()
        if outcome.retry_after is not None:
            delay = max(delay, min(outcome.retry_after, MAX_RETRY_AFTER))
        head.attempts += 1
        head.next_at = self._clock.monotonic() + delay
        await self._db(self._store.note_failure, head.id, head.attempts, self._clock.time() + delay,
                       outcome.error or "failed")

    def _transition(self, route: str, target: str, transition: Transition | None) -> None:
        if transition is not None:
            self._emit(transition_decision(transition), route, target, f"{transition.reason} (queue delivery)",
                       breaker_state=transition.new.value)

    def _emit(self, decision: Decision, route: str, upstream: str | None, reason: str, *,
              trace_id: str | None = None, span_id: str | None = None, breaker_state: str | None = None) -> None:
        ctx = self._ctx()
        ctx.sink.decision(DecisionRecord(
            decision=decision, route=route, upstream=upstream, reason=reason, at=time.time(),
            breaker_state=breaker_state, policy_version=ctx.policy.digest,
            trace_id=trace_id, span_id=span_id))

    async def _hand_off(self, targets: dict[str, str], move) -> None:
        """SIGTERM with `handoff:`: each such route's undelivered writes go to its shared stream, oldest
        first, and leave the local file once Redis took them (a failure keeps the rest here)."""
        for route, url in sorted(targets.items()):
            entries = self._routes.get(route)
            if not entries:
                continue
            count = len(entries)
            moved = 0
            try:
                while entries:
                    entry = entries[0]
                    item = await self._db(self._store.get, entry.id)
                    if item is not None:
                        await move(url, [item])
                    await self._db(self._store.delete, entry.id)
                    entries.popleft()
                    moved += 1
            except Exception as exc:  # noqa: BLE001 - whatever failed, what is left stays on disk
                log.error("queue: route %s: handoff to %s stopped after %d of %d write(s): %s", route,
                          url, moved, count, exc)
            else:
                log.info("queue: route %s: %d undelivered write(s) handed off to the shared queue", route, moved)

    # -- observing ---------------------------------------------------------------------------------
    def stats(self) -> dict:
        """For /status and /metrics: depth and age of the oldest write, overall and per route."""
        now = self._clock.time()
        by_route = {}
        for route in sorted(set(self._routes) | set(self._delivered) | set(self._expired)):
            entries = self._routes.get(route) or ()
            by_route[route] = {
                "depth": len(entries),
                "oldest_age": round(now - entries[0].accepted_at, 3) if entries else 0.0,
                "delivered": self._delivered[route],
                "expired": self._expired[route],
                "waiting": self._waiting.get(route),
            }
        depth = sum(r["depth"] for r in by_route.values())
        oldest = max((r["oldest_age"] for r in by_route.values()), default=0.0)
        return {"depth": depth, "oldest_age": oldest, "by_route": by_route, "file": self._store.path}

    async def listing(self, limit: int = LISTING_LIMIT) -> dict:
        """GET /queue: the waiting writes in acceptance order, without bodies or header values."""
        items = await self._db(self._store.listing, limit)
        depth = sum(len(e) for e in self._routes.values())
        return {"items": items, "depth": depth, "truncated": depth > len(items)}

    async def close(self, handoff=None) -> None:
        """Stop delivering; every write not yet delivered stays on disk for the next start, except on
        routes in `handoff` ((route -> redis url, async move(url, items) -> count)): moved there."""
        if self._closed:
            return
        self._closed = True
        workers = list(self._workers.values())
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        if handoff is not None:
            await self._hand_off(*handoff)
        left = {route: len(entries) for route, entries in self._routes.items() if entries}
        if left:
            log.warning("queue: %d write(s) undelivered at shutdown, kept in %s (%s): they survive a "
                        "restart on this state_dir, not the pod's deletion", sum(left.values()),
                        self._store.path, ", ".join(f"{r}: {n}" for r, n in sorted(left.items())))
        try:
            await self._db(self._store.close)
        finally:
            self._executor.shutdown(wait=True)


async def open_queue(policy: Policy) -> DurableQueue | None:
    """The queue when some route has `queue:`, else None (no file is created)."""
    if not policy.queues_writes:
        return None
    return await DurableQueue.open(policy.state_dir)


