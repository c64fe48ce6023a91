"""The queue a route's writes go to: `store: state_dir` (SQLite, this pod: queue.py) or
`store: redis://...` (a Stream every replica delivers from: queue/shared.py), behind one face for the
fallback layer, /status, /metrics and /queue.

At SIGTERM the local store keeps what it could not deliver (and says how many), or, for routes with
`handoff: redis://...`, moves those writes to the route's shared stream before the process exits.
"""
from __future__ import annotations

import logging


from sidecar.core.decisions import Decision
from sidecar.fleet.link import RedisUnavailable
from sidecar.queue.shared import Full, SharedQueue, shared_routes
from sidecar.exchange.types import Exchange, Reply
from sidecar.policy.model import Policy
from sidecar.queue.queue import LISTING_LIMIT, DurableQueue, new_item, queued_reply

log = logging.getLogger("sidecar.queue")

# How long a write may wait for Redis to store it (within the route's timeout): longer than other Redis
# calls, since the alternative is refusing a write the app will have to handle itself.
ADD_TIMEOUT = 2.0


def uses_state_dir(policy: Policy) -> bool:
    return any(r.queue is not None and r.queue.store == "state_dir" for r in (*policy.routes, policy.defaults))


class Queues:
    def __init__(self, local: DurableQueue | None, shared: bool) -> None:
        self.local = local
        self.shared = SharedQueue() if shared else None
        self._runtime = None
        self._full: set[str] = set()

    def start(self, runtime) -> None:
        self._runtime = runtime
        if self.local is not None:
            self.local.start(runtime.current)
        if self.shared is not None:
            self.shared.start(runtime)

    async def accept(self, ex: Exchange, reason: str) -> Reply | None:
        policy = ex.route.queue
        if policy is None or self._runtime is None:
            return None
        if policy.store == "state_dir":
            return await self.local.accept(ex, reason) if self.local is not None else None
        return await self._accept_shared(ex, reason)

    async def _accept_shared(self, ex: Exchange, reason: str) -> Reply | None:
        route, policy = ex.route, ex.route.queue
        if self.shared is None or not ex.body.replayable:
            return None
        if not ex.enforce:
            ex.decide(Decision.QUEUED, f"would queue: {reason}")
            return None
        item = new_item(ex, self._runtime.clock.time(), policy.max_age)
        try:
            stored = await self.shared.add(policy.store, item, policy.max_items,
                                           timeout=min(ADD_TIMEOUT, max(ex.remaining(), 0.05)))
        except Full:
            if route.name not in self._full:
                self._full.add(route.name)
                log.warning("queue: route %s is full (max_items %d): writes are not queued until it "
                            "drains", route.name, policy.max_items)
            ex.decide(Decision.QUEUE_UNAVAILABLE, f"not queued: {reason}; the route's queue holds "
                                                  f"max_items ({policy.max_items})")
            return None
        except RedisUnavailable as exc:
            # No 202 for a write nobody holds: the route's normal failure or fallback answers instead.
            ex.decide(Decision.QUEUE_UNAVAILABLE, f"not queued: {reason}; queue store {exc}")
            return None
        self._full.discard(route.name)
        ex.decide(Decision.QUEUED, f"{reason}; stored as {stored.name} in {self.shared.links.get(policy.store).where}, "
                                   f"delivered by any replica when {item.target} recovers", upstream=item.target)
        return queued_reply(route.name, stored.name, item.idempotency_key)

    # -- observing ---------------------------------------------------------------------------------
    def stats(self) -> dict:
        out = self.local.stats() if self.local is not None else {"depth": 0, "oldest_age": 0.0, "by_route": {}}
        if self.shared is not None:
            shared = self.shared.stats()
            for route, doc in shared.items():
                if route in out["by_route"]:          # a handoff route: local items and the shared stream
                    doc = {**doc, "depth": doc["depth"] + out["by_route"][route]["depth"],
                           "local": out["by_route"][route]}
                out["by_route"][route] = doc
            out["depth"] = sum(r["depth"] for r in out["by_route"].values())
            out["oldest_age"] = max((r["oldest_age"] for r in out["by_route"].values()), default=0.0)
        return out

    async def listing(self, limit: int = LISTING_LIMIT) -> dict:
        doc = await self.local.listing(limit) if self.local is not None else {"items": [], "depth": 0}
        if self.shared is not None:
            items = await self.shared.listing(limit)
            doc["items"].extend(items)
            doc["depth"] = self.stats()["depth"]
        doc["truncated"] = doc["depth"] > len(doc["items"])
        return doc

    async def close(self) -> None:
        """Stop delivering. Local writes not delivered stay in state_dir, or go to the handoff store."""
        if self.shared is not None:
            await self.shared.close()
        if self.local is not None:
            handoff = None
            if self.shared is not None and self._runtime is not None:
                targets = {name: url for name, url in shared_routes(self._runtime.gen.policy).items()}
                handoff = (targets, self.shared.hand_off)
            await self.local.close(handoff)


async def open_queues(policy: Policy) -> Queues | None:
    """The queues when some route has `queue:`, else None (no file is created)."""
    routes = [r for r in (*policy.routes, policy.defaults) if r.queue is not None]
    if not routes:
        return None
    local = await DurableQueue.open(policy.state_dir) if uses_state_dir(policy) else None
    return Queues(local, bool(shared_routes(policy)))
