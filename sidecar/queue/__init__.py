"""Store-and-forward for writes (SPEC `queue`, `state_dir`): see queue.py (SQLite, this pod),
sidecar/fleet/queue.py (Redis, every replica) and queues.py (which route uses which)."""
from sidecar.queue.queue import DurableQueue, open_queue, queues_writes
from sidecar.queue.queues import Queues, open_queues
from sidecar.queue.store import QueueError

__all__ = ["DurableQueue", "QueueError", "Queues", "open_queue", "open_queues", "queues_writes"]
