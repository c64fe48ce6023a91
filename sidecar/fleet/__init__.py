"""State shared by every replica, kept in Redis: global rate limits (ratelimit.py) and the shared
durable queue (queue.py). One connection handler per Redis URL (link.py), as the cache's store does:
a timeout on every call, one warning then backoff, reconnection on the next call after the backoff."""
