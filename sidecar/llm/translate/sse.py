"""Server-sent events, incrementally: bytes in, events out (the WHATWG `text/event-stream` rules).

The parser keeps only the unfinished line and the event being built, so a stream of any length is
translated in constant memory; a single line or event larger than `max_event` is an error rather than
unbounded growth.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

MAX_EVENT = 1 << 20


class StreamError(Exception):
    """The upstream's event stream cannot be read (an oversized or malformed event)."""


@dataclass(frozen=True, slots=True)
class Event:
    event: str | None
    data: str

    def json(self) -> object:
        try:
            return json.loads(self.data)
        except ValueError as exc:
            raise StreamError(f"event data is not JSON: {self.data[:80]!r}") from exc


class SSEParser:
    __slots__ = ("_buf", "_event", "_data", "_size", "_max", "_skip_lf")

    def __init__(self, max_event: int = MAX_EVENT) -> None:
        self._buf = b""
        self._event: str | None = None
        self._data: list[str] = []
        self._size = 0
        self._max = max_event
        self._skip_lf = False                # a chunk ended on CR: a LF starting the next one is its pair

    def feed(self, chunk: bytes) -> list[Event]:
        if self._skip_lf and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._skip_lf = False
        buf = self._buf + chunk
        events: list[Event] = []
        start = 0
        while True:
            cr, lf = buf.find(b"\r", start), buf.find(b"\n", start)
            ends = [i for i in (cr, lf) if i >= 0]
            if not ends:
                break
            end = min(ends)
            line = buf[start:end]
            if end == cr:
                if end + 1 == len(buf):
                    self._skip_lf = True
                    start = end + 1
                elif buf[end + 1:end + 2] == b"\n":
                    start = end + 2
                else:
                    start = end + 1
            else:
                start = end + 1
            event = self._line(line)
            if event is not None:
                events.append(event)
        self._buf = buf[start:]
        if len(self._buf) > self._max:
            raise StreamError(f"an event line over {self._max} bytes")
        return events

    def _line(self, raw: bytes) -> Event | None:
        try:
            line = raw.decode()
        except UnicodeDecodeError as exc:
            raise StreamError("event stream is not UTF-8") from exc
        if not line:
            if not self._data and self._event is None:
                return None
            event = Event(self._event, "\n".join(self._data))
            self._event, self._data, self._size = None, [], 0
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._size += len(value)
            if self._size > self._max:
                raise StreamError(f"an event over {self._max} bytes")
            self._data.append(value)
        return None                          # id, retry and unknown fields change nothing here


def encode(data: object, event: str | None = None) -> bytes:
    """One event: `data` as compact JSON (or a str as is), with an `event:` line when named."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    head = f"event: {event}\n" if event is not None else ""
    return f"{head}data: {text}\n\n".encode()
