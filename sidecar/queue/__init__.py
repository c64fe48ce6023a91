"""Store-and-forward for writes (SPEC `queue`, `state_dir`): see queue.py for the shape."""
from sidecar.queue.queue import DurableQueue, open_queue
from sidecar.queue.store import QueueError

__all__ = ["DurableQueue", "QueueError", "open_queue"]
