"""The shared durable queue (`queue: {store: redis://...}`): writes kept in Redis, delivered by any replica.

    accept ──Lua: XLEN < max_items ? XADD──> Stream `sidecar-q:<route>` ──> 202   (Redis down: no 202)
    every replica, per route:  lease `sidecar-q:<route>:lease` (SET NX PX visibility_timeout, renewed)
        the holder only:  oldest pending entry (XPENDING) ─mine─> XCLAIM (attempt n+1)
                                                           └theirs, idle > visibility─> XAUTOCLAIM
                          none pending ──> XREADGROUP > COUNT 1 (the next in acceptance order)
                          send ──done──> XACK + XDEL, queue_delivered      failed ──> backoff, again

Why a Stream and a consumer group: Redis gives every entry an id that only grows (acceptance order
across the whole fleet), and the group's pending list records which replica holds which entry and for
how long, so an entry held by a replica that died is found and reclaimed (XAUTOCLAIM) once it has been
idle for `visibility_timeout`. Why a lease on top: the group alone would hand entry n+1 to replica C
while replica B is still sending entry n, and "acceptance order per route" forbids that; the lease makes
one replica at a time the route's deliverer, and it reads one entry at a time. A lease holder that dies
stops renewing; after `visibility_timeout` another replica takes the lease and reclaims the entry.

Like the SQLite store, an entry leaves the stream only after its upstream answered, so a replica killed
at any point loses nothing acknowledged: the worst case is a write sent twice (sent, not yet acked),
which the `Idempotency-Key` stored with it lets the upstream detect. Durable "on disk" means what
Redis's persistence says: see the README (appendonly + appendfsync always, WAIT for replicas).
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass

from sidecar.core.breaker import transition_decision
from sidecar.core.decisions import Decision, DecisionRecord
from sidecar.core.retry import Backoff
from sidecar.fleet.link import Links, RedisLink, RedisUnavailable
from sidecar.policy.model import BackoffPolicy, Policy
from sidecar.queue import deliver
from sidecar.queue.store import Item, NewItem

log = logging.getLogger("sidecar.queue")

NAMESPACE = "sidecar-q"
GROUP = "sidecar"
POLL = 0.1                  # seconds between looks while this replica delivers (empty stream, backoff)
STANDBY_POLL = 0.5          # seconds between tries at the lease while another replica holds it
BACKOFF_BASE = 0.1
BACKOFF_CAP = 30.0
MAX_RETRY_AFTER = 300.0
CONSUMER_CLEANUP_EVERY = 300.0          # seconds between sweeps of departed replicas' consumer names
CONSUMER_IDLE_MS = 3_600_000

# Atomic max_items: the length check and the append in one step, whatever the number of replicas.
ADD = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
return redis.call('XADD', KEYS[1], '*', 'v', ARGV[2], 'b', ARGV[3])
"""
# The lease is renewed (or released) only by its holder.
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# Create the consumer group (and the stream) unless it exists; "exists" is not an error here.
GROUP_CREATE = """
local r = redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
if type(r) == 'table' and r.err then return 0 end
return 1
"""
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def stream_key(route: str) -> str:
    return f"{NAMESPACE}:{route}"


def encode(item: NewItem) -> tuple[str, bytes]:
    meta = {"route": item.route, "target": item.target, "upstream": item.upstream, "method": item.method,
            "url": item.url, "path": item.path, "headers": [list(h) for h in item.headers],
            "idempotency_key": item.idempotency_key, "trace_id": item.trace_id, "span_id": item.span_id,
            "accepted_at": item.accepted_at, "max_age": item.max_age}
    return json.dumps(meta, separators=(",", ":")), item.body


def decode(fields: dict) -> Item:
    meta = json.loads(fields[b"v"])
    return Item(route=meta["route"], target=meta["target"], upstream=meta["upstream"], method=meta["method"],
                url=meta["url"], path=meta["path"], headers=tuple((str(k), str(v)) for k, v in meta["headers"]),
                body=bytes(fields.get(b"b", b"")), idempotency_key=meta["idempotency_key"],
                trace_id=meta["trace_id"], span_id=meta["span_id"], accepted_at=float(meta["accepted_at"]),
                max_age=float(meta["max_age"]), id=0)


@dataclass(frozen=True, slots=True)
class Stored:
    """An accepted write: its stream id is the name the app sees (`x-sidecar-queued`)."""
    name: str


class Full(Exception):
    """The route's stream holds max_items writes already."""


def shared_routes(policy: Policy) -> dict[str, str]:
    """route name -> the Redis URL its writes are delivered from (`store`, or the `handoff` target)."""
    out = {}
    for route in (*policy.routes, policy.defaults):
        q = route.queue
        if q is None:
            continue
        if q.store != "state_dir":
            out[route.name] = q.store
        elif q.handoff is not None:
            out[route.name] = q.handoff
    return out


class _Head:
    """The entry this replica is delivering for a route, and its retry state (memory only)."""
    __slots__ = ("id", "item", "attempts", "next_at", "backoff")

    def __init__(self, entry_id: bytes, item: Item, attempts: int) -> None:
        self.id = entry_id
        self.item = item
        self.attempts = attempts
        self.next_at = 0.0
        self.backoff: Backoff | None = None


class SharedQueue:
    def __init__(self) -> None:
        self.links = Links()                 # replaced by the runtime's own at start
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._runtime = None
        self._workers: dict[str, asyncio.Task] = {}
        self._routes: dict[str, str] = {}                  # route -> url, from the current policy
        self._depth: dict[str, int] = {}
        self._oldest: dict[str, float] = {}                # route -> accepted_at (ms of the head's id)
        self._waiting: dict[str, str] = {}
        self._holding: set[str] = set()
        self._delivered: collections.Counter[str] = collections.Counter()
        self._expired: collections.Counter[str] = collections.Counter()
        self._heads: dict[str, _Head] = {}
        self._next_cleanup: dict[str, float] = {}
        self._supervisor: asyncio.Task | None = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, runtime) -> None:
        self._runtime = runtime
        self.links = runtime.links           # one connection pool per URL for the whole runtime
        self._sync()
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise(), name="queue:shared")

    async def _supervise(self) -> None:
        """Follows reloads: a route that gains or loses a Redis queue gains or loses its worker."""
        while True:
            await asyncio.sleep(1.0)
            self._sync()

    def _sync(self) -> None:
        wanted = shared_routes(self._runtime.gen.policy)
        for route in [r for r in self._workers if wanted.get(r) != self._routes.get(r)]:
            self._workers.pop(route).cancel()
        self._routes = wanted
        for route, url in wanted.items():
            if route not in self._workers and not self._closed:
                self._workers[route] = asyncio.get_running_loop().create_task(
                    self._work(route, self.links.get(url)), name=f"queue:{route}")

    # -- accepting ---------------------------------------------------------------------------------
    async def add(self, url: str, item: NewItem, max_items: int, timeout: float) -> Stored:
        """Append `item` to its route's stream; raises Full or RedisUnavailable (nothing was promised)."""
        link = self.links.get(url)
        meta, body = encode(item)
        script = link.client.register_script(ADD)
        # Tried even while the link backs off from an earlier failure: a write is worth one more try
        # (a refused connection fails at once; a silent Redis costs `timeout`, within the route's).
        entry_id = await link.call("queue add", lambda: script(keys=[stream_key(item.route)],
                                                               args=[max_items, meta, body]), timeout,
                                   despite_backoff=True)
        if entry_id is None:
            raise Full(item.route)
        return Stored(entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id))

    async def hand_off(self, url: str, items: list[Item]) -> int:
        """Move undelivered local writes to the shared stream (SIGTERM with `handoff:`); returns how many
        made it. No max_items here: these writes were promised already."""
        link = self.links.get(url)
        moved = 0
        for item in items:
            meta, body = encode(item)
            await link.call("queue handoff", lambda: link.client.xadd(stream_key(item.route),
                                                                      {"v": meta, "b": body}),
                            despite_backoff=True)
            moved += 1
        return moved

    # -- delivering --------------------------------------------------------------------------------
    async def _work(self, route: str, link: RedisLink) -> None:
        key = stream_key(route)
        lease = f"{key}:lease"
        holding = False
        group_ready = False
        while True:
            try:
                visibility = self._visibility(route)
                if not group_ready:
                    await self._ensure_group(link, key)
                    group_ready = True
                await self._observe(route, link, key)
                vis_ms = str(max(int(visibility * 1000), 100))
                if holding:
                    holding = bool(await link.call("queue lease", lambda: link.client.eval(
                        RENEW, 1, lease, self.consumer, vis_ms)))
                else:
                    holding = bool(await link.call("queue lease", lambda: link.client.set(
                        lease, self.consumer, nx=True, px=int(vis_ms))))
                if holding:
                    self._holding.add(route)
                else:
                    self._holding.discard(route)
                    self._heads.pop(route, None)
                    self._waiting[route] = "another replica delivers this route"
                    await asyncio.sleep(STANDBY_POLL)
                    continue
                await self._step(route, link, key, visibility, lease)
            except asyncio.CancelledError:
                if holding:
                    await self._release(link, lease)
                self._holding.discard(route)
                raise
            except RedisUnavailable as exc:
                holding = False
                group_ready = False
                self._holding.discard(route)
                self._waiting[route] = f"store unavailable: {exc}"
                await asyncio.sleep(POLL * 5)
            except Exception:  # noqa: BLE001 - a bug here must not stop delivery for good
                log.exception("queue: shared delivery worker for route %s failed; going on", route)
                await asyncio.sleep(1.0)

    async def _keep_lease(self, link: RedisLink, lease: str, visibility: float) -> None:
        vis_ms = str(max(int(visibility * 1000), 100))
        while True:
            await asyncio.sleep(max(visibility / 3, 0.05))
            try:
                await link.call("queue lease", lambda: link.client.eval(RENEW, 1, lease, self.consumer, vis_ms))
            except RedisUnavailable:
                pass                         # the ack will fail too; the entry stays pending

    async def _forget_dead_consumers(self, link: RedisLink, key: str) -> None:
        """Every sidecar process joins the group under a new name; names that hold nothing and were idle
        for an hour are dropped now and then, so pod churn does not grow the group for ever."""
        now = self._runtime.clock.monotonic()
        if now < self._next_cleanup.get(key, 0.0):
            return
        self._next_cleanup[key] = now + CONSUMER_CLEANUP_EVERY
        try:
            consumers = await link.call("queue consumers", lambda: link.client.xinfo_consumers(key, GROUP))
            for c in consumers:
                name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
                if c["pending"] == 0 and c["idle"] > CONSUMER_IDLE_MS and name != self.consumer:
                    await link.call("queue consumers", lambda: link.client.xgroup_delconsumer(key, GROUP, name))
        except RedisUnavailable:
            pass

    async def _release(self, link: RedisLink, lease: str) -> None:
        """A clean stop (SIGTERM): give the lease back and say this consumer is gone, so the next
        deliverer takes over its claimed entry at once instead of after visibility_timeout."""
        try:
            await link.call("queue lease", lambda: link.client.set(
                f"{lease}:gone:{self.consumer}", b"1", ex=3600), despite_backoff=True)
            await link.call("queue lease", lambda: link.client.eval(RELEASE, 1, lease, self.consumer),
                            despite_backoff=True)
        except RedisUnavailable:
            pass

    def _visibility(self, route: str) -> float:
        current = self._route(route)
        q = current.queue if current is not None else None
        return q.visibility_timeout if q is not None else 30.0

    def _route(self, name: str):
        from sidecar.queue.queue import find_route
        return find_route(self._runtime.gen.policy, name)

    async def _ensure_group(self, link: RedisLink, key: str) -> None:
        await link.call("queue group", lambda: link.client.eval(GROUP_CREATE, 1, key, GROUP))

    async def _observe(self, route: str, link: RedisLink, key: str) -> None:
        async def both():
            pipe = link.client.pipeline(transaction=False)
            pipe.xlen(key)
            pipe.xrange(key, count=1)
            return await pipe.execute()
        depth, head = await link.call("queue depth", both)
        self._depth[route] = depth
        if head:
            self._oldest[route] = int(head[0][0].split(b"-")[0]) / 1000
        else:
            self._oldest.pop(route, None)

    async def _step(self, route: str, link: RedisLink, key: str, visibility: float, lease: str) -> None:
        head = self._heads.get(route)
        if head is None:
            head = await self._next(route, link, key, visibility)
            if head is None:
                await asyncio.sleep(POLL)
                return
            self._heads[route] = head
        if await self._expire(route, link, key, head):
            return
        why = deliver.blocked(self._runtime.current(), route, head.item.target, head.next_at)
        if why is not None:
            self._waiting[route] = why
            await asyncio.sleep(POLL)
            return
        self._waiting.pop(route, None)
        # An attempt may outlast the visibility timeout (a slow upstream under a long route timeout):
        # the lease is renewed meanwhile, so no other replica takes the route over from a live one.
        renewer = asyncio.get_running_loop().create_task(self._keep_lease(link, lease, visibility))
        try:
            await self._deliver(route, link, key, head)
        finally:
            renewer.cancel()
        await self._forget_dead_consumers(link, key)

    async def _next(self, route: str, link: RedisLink, key: str, visibility: float) -> _Head | None:
        """The oldest entry not yet delivered, claimed by this replica; None when there is none (or the
        oldest is held by a replica not yet silent for `visibility_timeout`)."""
        pending = await link.call("queue pending", lambda: link.client.xpending_range(
            key, GROUP, min="-", max="+", count=1))
        if pending:
            p = pending[0]
            owner = p["consumer"].decode() if isinstance(p["consumer"], bytes) else p["consumer"]
            idle_ms = p["time_since_delivered"]
            if owner != self.consumer and idle_ms < visibility * 1000 and await link.call(
                    "queue pending", lambda: link.client.exists(f"{key}:lease:gone:{owner}")):
                idle_ms = visibility * 1000           # its owner stopped cleanly: no need to wait
            if owner != self.consumer and idle_ms < visibility * 1000:
                self._waiting[route] = (f"{p['message_id'].decode()} is held by {owner}; reclaimed once it "
                                        f"has been silent for {visibility:g}s")
                return None
            if owner == self.consumer:
                claimed = await link.call("queue claim", lambda: link.client.xclaim(
                    key, GROUP, self.consumer, 0, [p["message_id"]]))
            else:
                min_idle = min(int(visibility * 1000), int(p["time_since_delivered"]))
                _, claimed, *_ = await link.call("queue claim", lambda: link.client.xautoclaim(
                    key, GROUP, self.consumer, min_idle, start_id=p["message_id"], count=1))
                if claimed:
                    log.warning("queue: route %s: reclaimed %s from %s, silent for %.1fs", route,
                                claimed[0][0].decode(), owner, p["time_since_delivered"] / 1000)
            return await self._take(link, key, claimed, int(p["times_delivered"]))
        fresh = await link.call("queue read", lambda: link.client.xreadgroup(
            GROUP, self.consumer, {key: ">"}, count=1))
        entries = fresh[0][1] if fresh else []
        return await self._take(link, key, entries, 0)

    async def _take(self, link: RedisLink, key: str, entries, attempts: int) -> _Head | None:
        for entry_id, fields in entries:
            if not fields:                   # in the pending list, gone from the stream: forget it
                await link.call("queue ack", lambda: link.client.xack(key, GROUP, entry_id))
                continue
            return _Head(entry_id, decode(fields), attempts)
        return None

    async def _done(self, link: RedisLink, key: str, entry_id: bytes) -> None:
        async def both():
            pipe = link.client.pipeline(transaction=True)
            pipe.xack(key, GROUP, entry_id)
            pipe.xdel(key, entry_id)
            return await pipe.execute()
        await link.call("queue ack", both)

    async def _expire(self, route: str, link: RedisLink, key: str, head: _Head) -> bool:
        current = self._route(route)
        max_age = current.queue.max_age if current is not None and current.queue is not None else head.item.max_age
        age = self._runtime.clock.time() - head.item.accepted_at
        if age <= max_age:
            return False
        await self._done(link, key, head.id)
        self._heads.pop(route, None)
        self._expired[route] += 1
        reason = (f"{head.id.decode()} dropped undelivered after {age:.0f}s (max_age {max_age:g}s, "
                  f"{head.attempts} attempt(s))")
        log.warning("queue: route %s: %s", route, reason)
        self._emit(Decision.QUEUE_EXPIRED, route, head.item.target, reason, head.item)
        return True

    async def _deliver(self, route: str, link: RedisLink, key: str, head: _Head) -> None:
        runtime = self._runtime
        item = head.item
        breaker = deliver.route_breaker(runtime.current(), route, item.target)
        request = deliver.build_request(runtime.gen.policy, item)
        if request is None:
            if breaker is not None:
                breaker.release()
            self._waiting[route] = f"upstream {item.upstream} is not in the policy"
            await asyncio.sleep(POLL * 10)
            return
        try:
            outcome, record = await deliver.attempt(runtime.current(), item, request, self._route(route), head.attempts)
        except BaseException:
            if breaker is not None:
                breaker.release()
            raise
        if breaker is not None:
            transition = deliver.judge(breaker, outcome)
            if transition is not None:
                self._emit(transition_decision(transition), route, item.target,
                           f"{transition.reason} (queue delivery)", None, breaker_state=transition.new.value)
        if outcome.delivered:
            self._heads.pop(route, None)
            await self._done(link, key, head.id)
            self._delivered[route] += 1
            what = "delivered" if outcome.status < 400 else "refused for good by the upstream"
            self._emit(Decision.QUEUE_DELIVERED, route, item.target,
                       f"{head.id.decode()} {what} ({outcome.status}) after {head.attempts + 1} attempt(s), "
                       f"{runtime.clock.time() - item.accepted_at:.1f}s queued", item)
        else:
            if head.backoff is None:
                current = self._route(route)
                base = current.retry.backoff.base if current is not None and current.retry else BACKOFF_BASE
                head.backoff = Backoff(BackoffPolicy(base=base or BACKOFF_BASE, max=BACKOFF_CAP), runtime.current().rng)
            delay = head.backoff.next_delay()
            if outcome.retry_after is not None:
                delay = max(delay, min(outcome.retry_after, MAX_RETRY_AFTER))
            head.attempts += 1
            head.next_at = runtime.clock.monotonic() + delay
        runtime.sink.request_finished(record)

    def _emit(self, decision: Decision, route: str, upstream: str | None, reason: str, item: Item | None,
              *, breaker_state: str | None = None) -> None:
        runtime = self._runtime
        runtime.sink.decision(DecisionRecord(
            decision=decision, route=route, upstream=upstream, reason=reason, at=time.time(),
            breaker_state=breaker_state, policy_version=runtime.gen.policy.digest,
            trace_id=item.trace_id if item else None, span_id=item.span_id if item else None))

    # -- observing ---------------------------------------------------------------------------------
    def stats(self) -> dict:
        now = time.time()
        out = {}
        for route in sorted(set(self._routes) | set(self._delivered) | set(self._expired)):
            oldest = self._oldest.get(route)
            out[route] = {"depth": self._depth.get(route, 0),
                          "oldest_age": round(max(now - oldest, 0.0), 3) if oldest else 0.0,
                          "delivered": self._delivered[route], "expired": self._expired[route],
                          "waiting": self._waiting.get(route), "store": self.links.get(self._routes[route]).where
                          if route in self._routes else None, "delivering_here": route in self._holding}
        return out

    async def listing(self, limit: int) -> list[dict]:
        items = []
        for route, url in sorted(self._routes.items()):
            link = self.links.get(url)
            try:
                entries = await link.call("queue list", lambda: link.client.xrange(stream_key(route), count=limit))
            except RedisUnavailable:
                continue
            for entry_id, fields in entries:
                item = decode(fields)
                items.append({"id": entry_id.decode(), "route": route, "upstream": item.target,
                              "method": item.method, "path": item.path, "accepted_at": item.accepted_at,
                              "idempotency_key": item.idempotency_key, "trace_id": item.trace_id,
                              "body_bytes": len(item.body), "store": link.where})
        return items

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._workers.values()) + ([self._supervisor] if self._supervisor else [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
