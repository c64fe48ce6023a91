"""The live decision feed behind `GET /events`: a telemetry sink that fans decisions out to SSE clients.

Each client has a bounded buffer; a slow client loses its oldest events (and is told how many), never
slows the data plane or grows memory.
"""
from __future__ import annotations

import asyncio
import collections
import json

from sidecar.core.decisions import DecisionRecord
from sidecar.telemetry.records import RequestRecord

CLIENT_BUFFER = 256
RECENT = 100


class _Client:
    __slots__ = ("items", "wake", "dropped")

    def __init__(self) -> None:
        self.items: collections.deque[str] = collections.deque(maxlen=CLIENT_BUFFER)
        self.wake = asyncio.Event()
        self.dropped = 0


class EventHub:
    def __init__(self) -> None:
        self._clients: set[_Client] = set()
        self.recent: collections.deque[dict] = collections.deque(maxlen=RECENT)

    def decision(self, record: DecisionRecord) -> None:
        doc = record.as_dict()
        self.recent.append(doc)
        if not self._clients:
            return
        line = json.dumps(doc)
        for client in self._clients:
            if len(client.items) == CLIENT_BUFFER:
                client.dropped += 1
            client.items.append(line)
            client.wake.set()

    def request_finished(self, record: RequestRecord) -> None:
        return None

    def subscribe(self) -> _Client:
        client = _Client()
        self._clients.add(client)
        return client

    def unsubscribe(self, client: _Client) -> None:
        self._clients.discard(client)

    @property
    def clients(self) -> int:
        return len(self._clients)
