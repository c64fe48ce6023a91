"""Store-and-forward for writes (SPEC `queue`, `state_dir`): see queue.py (SQLite, this pod),
sidecar/queue/shared.py (Redis, every replica) and queues.py (which route uses which)."""
from sidecar.queue.queue import DurableQueue, open_queue
from sidecar.queue.queues import Queues, open_queues, uses_state_dir
from sidecar.queue.store import QueueError

__all__ = ["DurableQueue", "QueueError", "Queues", "open_queue", "open_queues", "uses_state_dir"]
