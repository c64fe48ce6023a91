"""Storing an answer while it streams to the app: a tee that keeps a bounded copy on the side."""
from __future__ import annotations

from typing import AsyncIterator


class Capture:
    """The copy a tee keeps for the store: up to `limit` bytes, then nothing (never buffered past it)."""
    __slots__ = ("limit", "parts", "size", "overflow", "complete")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.overflow = False
        self.complete = False

    def add(self, chunk: bytes) -> None:
        if self.overflow:
            return
        self.size += len(chunk)
        if self.size > self.limit:
            self.overflow = True
            self.parts = []
        else:
            self.parts.append(chunk)


async def tee(source: AsyncIterator[bytes], capture: Capture) -> AsyncIterator[bytes]:
    """Pass each chunk to the app as it comes, keeping a copy on the side."""
    try:
        async for chunk in source:
            capture.add(chunk)
            yield chunk
        capture.complete = True
    finally:
        aclose = getattr(source, "aclose", None)
        if aclose is not None and not capture.complete:
            await aclose()
