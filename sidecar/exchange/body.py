"""The app's request body: replayable when small, streamed once when large.

Retries, hedges and fallbacks need to send the body again, so a body up to the route's `max_body` is
read whole (it is small by definition). A larger one is streamed straight through, once, in constant
memory: such a request gets no second try (SPEC: "larger request bodies are not retried").
"""
from __future__ import annotations

from typing import AsyncIterator

from aiohttp import StreamReader

CHUNK = 64 * 1024


class RequestBody:
    __slots__ = ("data", "_prefix", "_rest", "_consumed", "length")

    def __init__(self, data: bytes | None, prefix: bytes = b"", rest: StreamReader | None = None,
                 length: int | None = None) -> None:
        self.data = data                     # the whole body when replayable
        self._prefix = prefix                # what was read before we knew it was too large
        self._rest = rest
        self._consumed = False
        self.length = length                 # Content-Length when the app sent one

    EMPTY: "RequestBody"

    @property
    def replayable(self) -> bool:
        return self.data is not None

    def payload(self) -> bytes | AsyncIterator[bytes] | None:
        """What the transport sends. A streamed body can be sent once; later calls get `None`."""
        if self.data is not None:
            # No body: None, not b"" -- aiohttp wraps b"" in a payload and, on Python 3.11, spawns a
            # body-writer task for it on every request. With None it still sends Content-Length: 0
            # for methods that expect a body.
            return self.data or None
        if self._consumed:
            return None
        self._consumed = True
        return self._stream()

    async def _stream(self) -> AsyncIterator[bytes]:
        if self._prefix:
            yield self._prefix
        if self._rest is not None:
            while True:
                chunk = await self._rest.readany()
                if not chunk:
                    return
                yield chunk

    @property
    def used(self) -> bool:
        return self._consumed


RequestBody.EMPTY = RequestBody(b"")


async def read_body(content: StreamReader, *, has_body: bool, limit: int,
                    length: int | None) -> RequestBody:
    """Read up to `limit` bytes; past it, hand the rest over as a one-shot stream."""
    if not has_body:
        return RequestBody.EMPTY
    if length is not None and length > limit:
        return RequestBody(None, b"", content, length)
    parts: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await content.readany()
        if not chunk:
            return RequestBody(b"".join(parts), length=length)
        parts.append(chunk)
        size += len(chunk)
    return RequestBody(None, b"".join(parts), content, length)
