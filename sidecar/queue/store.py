"""The durable half of store-and-forward: one SQLite file under `state_dir`, nothing else on disk.

Why SQLite: one file, crash-safe transactions, and ids that only grow (`AUTOINCREMENT` never reuses an
id, even after the table emptied), which is what "delivered in acceptance order" needs. WAL with
`synchronous=FULL` fsyncs the log on every commit, so once `add()` returns the item survives `kill -9`
and power loss; that is the moment the app may be told `202`.

Every method here blocks. `DurableQueue` calls them from one dedicated thread (SQLite connections
belong to the thread that opened them), so the event loop never waits on the disk.

The store keeps what the app sent, as it sent it (hop-by-hop headers already dropped). The upstream's
configured headers (API keys from the policy) are never written: they are added again at delivery.
"""
from __future__ import annotations

import fcntl
import json
import os
import secrets
import sqlite3
from dataclasses import dataclass

SCHEMA_VERSION = 1
DB_NAME = "queue.sqlite3"
LOCK_NAME = "queue.lock"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,   -- acceptance order
    route           TEXT NOT NULL,
    target          TEXT NOT NULL,       -- breaker key: the upstream name, or host:port of the destination
    upstream        TEXT,                -- the named upstream; NULL: the original destination (url)
    method          TEXT NOT NULL,
    url             TEXT NOT NULL,       -- where the write was going when accepted
    path            TEXT NOT NULL,       -- path and query, re-based on the upstream's url at delivery
    headers         TEXT NOT NULL,       -- JSON [[name, value], ...], the app's own headers
    body            BLOB NOT NULL,
    idempotency_key TEXT NOT NULL,
    trace_id        TEXT,
    span_id         TEXT,
    accepted_at     REAL NOT NULL,       -- wall-clock seconds: ages must survive a restart
    max_age         REAL NOT NULL,       -- the route's max_age when accepted (used if the route goes away)
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL,                -- wall-clock seconds, for /queue
    last_error      TEXT
);
CREATE INDEX IF NOT EXISTS items_by_route ON items (route, id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class QueueError(Exception):
    """The queue cannot be used: `state_dir` not creatable or writable, locked, or not a queue file."""


@dataclass(frozen=True, slots=True)
class NewItem:
    route: str
    target: str
    upstream: str | None
    method: str
    url: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    idempotency_key: str
    trace_id: str | None
    span_id: str | None
    accepted_at: float
    max_age: float


@dataclass(frozen=True, slots=True)
class Item(NewItem):
    id: int
    attempts: int = 0


@dataclass(frozen=True, slots=True)
class IndexRow:
    """What stays in memory per item: enough for order, depth, age and expiry, never the body."""
    id: int
    route: str
    target: str
    accepted_at: float
    max_age: float
    attempts: int


class Store:
    """One SQLite queue file. Not thread-safe: use it from a single thread."""

    def __init__(self, state_dir: str) -> None:
        state_dir = os.path.normpath(state_dir)
        self.dir = state_dir
        self.path = os.path.join(state_dir, DB_NAME)
        try:
            os.makedirs(state_dir, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise QueueError(f"state_dir {state_dir!r} cannot be created ({exc.strerror}); "
                             "point state_dir at a writable directory (an emptyDir in Kubernetes)") from exc
        self._lock_fd = self._lock()
        try:
            self.db = self._open()
            self.tag = self._tag()
        except BaseException:
            os.close(self._lock_fd)
            raise

    def _lock(self) -> int:
        """One sidecar per state_dir: two delivery loops on one file would deliver every write twice.

        flock is dropped by the kernel when the process dies, so a `kill -9`ed sidecar never leaves a
        stale lock behind for its replacement.
        """
        lock_path = os.path.join(self.dir, LOCK_NAME)
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise QueueError(f"state_dir {self.dir!r} is not writable ({exc.strerror})") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise QueueError(f"state_dir {self.dir!r} is in use by another sidecar ({LOCK_NAME} is locked); "
                             "each sidecar needs its own state_dir") from exc
        return fd

    def _open(self) -> sqlite3.Connection:
        fresh = not os.path.exists(self.path)
        try:
            # Autocommit: every statement below is its own transaction, durable when it returns.
            db = sqlite3.connect(self.path, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=5000")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise QueueError(f"{self.path} was written by a newer sidecar (schema {version})")
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise QueueError(f"{self.path} is not a usable queue database: {exc}") from exc
        if fresh:
            os.chmod(self.path, 0o600)       # it holds the app's request headers (its own credentials too)
        return db

    def _tag(self) -> str:
        """A short random tag per database, so ids from a recreated emptyDir do not repeat old ones."""
        row = self.db.execute("SELECT value FROM meta WHERE key = 'tag'").fetchone()
        if row is not None:
            return row[0]
        tag = secrets.token_hex(2)
        self.db.execute("INSERT INTO meta (key, value) VALUES ('tag', ?)", (tag,))
        return tag

    def item_name(self, item_id: int) -> str:
        """The id the app sees in `x-sidecar-queued`."""
        return f"{self.tag}-{item_id}"

    # -- writes ------------------------------------------------------------------------------------

    def add(self, item: NewItem) -> int:
        cur = self.db.execute(
            "INSERT INTO items (route, target, upstream, method, url, path, headers, body, idempotency_key,"
            " trace_id, span_id, accepted_at, max_age) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (item.route, item.target, item.upstream, item.method, item.url, item.path,
             json.dumps([list(h) for h in item.headers]), item.body, item.idempotency_key,
             item.trace_id, item.span_id, item.accepted_at, item.max_age))
        return cur.lastrowid

    def delete(self, item_id: int) -> None:
        self.db.execute("DELETE FROM items WHERE id = ?", (item_id,))

    def note_failure(self, item_id: int, attempts: int, next_attempt_at: float, error: str) -> None:
        self.db.execute("UPDATE items SET attempts = ?, next_attempt_at = ?, last_error = ? WHERE id = ?",
                        (attempts, next_attempt_at, error[:500], item_id))

    # -- reads -------------------------------------------------------------------------------------

    def index(self) -> list[IndexRow]:
        rows = self.db.execute(
            "SELECT id, route, target, accepted_at, max_age, attempts FROM items ORDER BY id").fetchall()
        return [IndexRow(*row) for row in rows]

    def get(self, item_id: int) -> Item | None:
        row = self.db.execute(
            "SELECT route, target, upstream, method, url, path, headers, body, idempotency_key, trace_id,"
            " span_id, accepted_at, max_age, id, attempts FROM items WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            return None
        headers = tuple((str(k), str(v)) for k, v in json.loads(row[6]))
        return Item(*row[:6], headers, bytes(row[7]), *row[8:])

    def listing(self, limit: int) -> list[dict]:
        """Items in acceptance order, without bodies or header values (they may hold credentials)."""
        rows = self.db.execute(
            "SELECT id, route, target, method, path, accepted_at, attempts, next_attempt_at, last_error,"
            " idempotency_key, trace_id, length(body) FROM items ORDER BY id LIMIT ?", (limit,)).fetchall()
        keys = ("id", "route", "upstream", "method", "path", "accepted_at", "attempts", "next_attempt_at",
                "last_error", "idempotency_key", "trace_id", "body_bytes")
        out = []
        for row in rows:
            doc = dict(zip(keys, row))
            doc["id"] = self.item_name(doc["id"])
            out.append(doc)
        return out

    def close(self) -> None:
        try:
            self.db.close()
        finally:
            os.close(self._lock_fd)
