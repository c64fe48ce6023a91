"""Unit tests of the pipeline layers: each layer is `(ex, call, next)`, so a test hands it a fake `next`
(what the layers below would have answered) and an Exchange built on a real policy, with a fake clock,
zero-jitter randomness and a sleep that only records. No sockets: the transport is never reached."""
from __future__ import annotations

import random
import textwrap
from pathlib import Path

from multidict import CIMultiDict
from yarl import URL

from sidecar.core.clock import FakeClock
from sidecar.exchange.body import RequestBody
from sidecar.exchange.calls import make_call
from sidecar.exchange.context import Context, Services
from sidecar.exchange.records import request_record
from sidecar.exchange.state import StateRegistry
from sidecar.exchange.types import Call, Exchange, Reply
from sidecar.fleet.limits import limiter_factory
from sidecar.pipeline.generation import build_generation
from sidecar.policy.load import load_policy


class Sink:
    def __init__(self) -> None:
        self.decisions: list = []

    def decision(self, record) -> None:
        self.decisions.append(record)

    def request_finished(self, record) -> None:
        pass


class NoTransport:
    async def send(self, *args, **kwargs):
        raise AssertionError("a layer test reached the transport")


class Sleeps:
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.asked: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.asked.append(seconds)
        self.clock.advance(seconds)


class Relays:
    async def run(self, relay) -> None:
        raise AssertionError("no relay in a layer test")


class Store:
    """A store-and-forward queue that takes writes (or refuses them, as a full one does) and counts them."""

    def __init__(self, full: bool = False) -> None:
        self.full = full
        self.taken: list[str] = []

    async def accept(self, ex: Exchange, reason: str) -> Reply | None:
        if self.full:
            return None
        self.taken.append(reason)
        return Reply(status=202, headers=CIMultiDict(), upstream="queue", body=b"")


class NoEndpoints:
    def get(self, name):
        return None

    def background(self, *args) -> None:
        pass


def context(tmp_path: Path, route_yaml: str, *, upstreams: str = 'svc: {url: "http://127.0.0.1:9"}',
            seed: int = 0, queue=None) -> Context:
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent(f"""\
        version: 1
        upstreams:
          {upstreams}
        routes:
          - name: r
            match: {{path_prefix: /}}
            upstream: svc
        """) + textwrap.indent(textwrap.dedent(route_yaml), "    "))
    clock = FakeClock()
    services = Services(transport=NoTransport(), sink=Sink(), clock=clock, rng=random.Random(seed),
                        sleep=Sleeps(clock), health={}, relays=Relays(), endpoints=NoEndpoints(),
                        queue=queue)
    ctx, binding = build_generation(load_policy(str(path)), services, StateRegistry(clock, limiter_factory(clock)))
    binding.commit()
    return ctx


def exchange(ctx: Context, method: str = "GET", path: str = "/x", body: bytes = b"",
             headers: dict | None = None) -> tuple[Exchange, Call]:
    route = ctx.policy.routes[0]
    url = URL(f"http://app.local{path}")
    record = request_record(ctx, route=route.name, listener="test", method=method, url=str(url))
    ex = Exchange(route=route, state=ctx.states[route.name], ctx=ctx, method=method, url=url,
                  headers=CIMultiDict(headers or {}), body=RequestBody(body), record=record,
                  deadline=ctx.clock.monotonic() + route.timeout)
    return ex, make_call(ex, ctx.upstream("svc"))


def reply(status: int, body: bytes = b"", **headers: str) -> Reply:
    return Reply(status=status, headers=CIMultiDict(headers), upstream="svc", body=body)


class Next:
    """A fake `next`: answers (or raises) from a script, one item per call, and counts the calls."""

    def __init__(self, *script) -> None:
        self.script = list(script)
        self.calls = 0

    async def __call__(self, ex: Exchange, call: Call) -> Reply:
        self.calls += 1
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item


def decided(ex: Exchange) -> list[str]:
    return [d.decision.value for d in ex.record.decisions]
