"""Where cached responses live: a bounded in-process LRU, or Redis shared by every replica."""
