"""Store-and-forward end to end, in-process: a real upstream on loopback, a real sidecar in front."""
import asyncio
import json

import aiohttp
from aiohttp import web

from harness import Upstream, free_port
from sidecar.core.clock import FakeClock
from sidecar.telemetry.records import RequestRecord


def policy(port, upstream_url, tmp_path, *, queue="{when: [retries-exhausted, breaker-open]}",
           breaker="{consecutive_failures: 2, open_for: 200ms, max_open_for: 400ms}", upstream=None):
    upstream = upstream or f'{{url: "{upstream_url}", headers: {{authorization: "Bearer upstream-secret"}}}}'
    return f"""
    version: 1
    listeners:
      - {{name: api, mode: reverse, port: {port['reverse']}, upstream: svc}}
    admin: {{port: {port['admin']}}}
    health: {{bind: 127.0.0.1, port: {port['health']}}}
    upstreams:
      svc: {upstream}
    routes:
      - name: orders
        match: {{path_prefix: /}}
        upstream: svc
        timeout: 5s
        retry: {{max_retries: 1, when: [connect-failure, 503], backoff: {{base: 10ms, max: 20ms}}}}
        breaker: {breaker}
        queue: {queue}
    state_dir: {tmp_path / "state"}
    """


class Recorder:
    """An upstream handler that keeps what it was sent, in arrival order."""

    def __init__(self, status: int = 201) -> None:
        self.status = status
        self.got: list[dict] = []

    async def __call__(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.status < 300:
            self.got.append({"body": json.loads(body), "path": request.path_qs,
                             "headers": {k.lower(): v for k, v in request.headers.items()}})
        return web.Response(status=self.status, text="{}", content_type="application/json")


async def post(port, n, headers=None, path="/orders"):
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{port['reverse']}{path}", json={"n": n},
                          headers=headers) as r:
            return r.status, dict(r.headers), await r.read()


async def admin(port, path):
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port['admin']}{path}") as r:
            return await (r.json() if path != "/metrics" else r.text())


async def until(predicate, timeout=15.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_writes_to_a_down_upstream_are_delivered_in_order_once(sidecar_factory, port, tmp_path):
    recorder = Recorder()
    up = Upstream(recorder)                  # not listening yet: every connect is refused
    sc = await sidecar_factory(policy(port, up.url, tmp_path))
    accepted = []
    for n in range(6):
        headers = {"Idempotency-Key": "app-key-2"} if n == 2 else None
        status, h, body = await post(port, n, headers, path=f"/orders?n={n}")
        assert status == 202, body
        doc = json.loads(body)
        assert h["x-sidecar-queued"] == doc["queued"]
        assert "queued" in h["x-sidecar-degraded"].split(",")
        assert h["x-sidecar-upstream"] == "queue"
        accepted.append((doc["queued"], doc["idempotency_key"], h["x-sidecar-trace-id"]))
    assert accepted[2][1] == "app-key-2"     # the app's own key is kept, the others are generated
    assert len({key for _, key, _ in accepted}) == 6

    listing = await admin(port, "/queue")
    assert listing["depth"] == 6
    assert [i["id"] for i in listing["items"]] == [a[0] for a in accepted]
    assert [i["path"] for i in listing["items"]] == [f"/orders?n={n}" for n in range(6)]
    text = json.dumps(listing)
    assert "upstream-secret" not in text and '"n": 3' not in text and "application/json" not in text
    status = await admin(port, "/status")
    assert status["queue"]["depth"] == 6 and status["queue"]["by_route"]["orders"]["depth"] == 6
    assert "sidecar_queue_depth 6.0" in await admin(port, "/metrics")

    await up.start()                         # the upstream comes back: the breaker probes, then closes
    try:
        await until(lambda: len(recorder.got) >= 6)
        await until(lambda: sc.runtime.queue.stats()["depth"] == 0)
        await asyncio.sleep(0.3)             # nothing more trickles in
    finally:
        await up.stop()
    assert [g["body"]["n"] for g in recorder.got] == list(range(6))
    assert [g["path"] for g in recorder.got] == [f"/orders?n={n}" for n in range(6)]
    assert [g["headers"]["idempotency-key"] for g in recorder.got] == [key for _, key, _ in accepted]
    # the upstream's secret header is re-added from the policy; the trace continues the original one
    assert all(g["headers"]["authorization"] == "Bearer upstream-secret" for g in recorder.got)
    assert [g["headers"]["traceparent"].split("-")[1] for g in recorder.got] == [t for _, _, t in accepted]

    assert (await admin(port, "/queue"))["items"] == []
    delivered = [d for d in sc.hub.recent if d["decision"] == "queue_delivered"]
    assert [d["trace_id"] for d in delivered] == [t for _, _, t in accepted]
    assert sc.runtime.queue.stats()["by_route"]["orders"]["delivered"] == 6


async def test_max_age_expiry_is_a_decision_never_silent(upstream_factory, sidecar_factory, port, tmp_path):
    clock = FakeClock()
    recorder = Recorder(status=503)          # down for the whole test
    up = await upstream_factory(recorder)
    sc = await sidecar_factory(policy(port, up.url, tmp_path, queue="{max_age: 10m}"), clock=clock)
    traces = []
    for n in range(2):
        status, h, _ = await post(port, n)
        assert status == 202
        traces.append(h["x-sidecar-trace-id"])
    assert sc.runtime.queue.stats()["depth"] == 2
    clock.advance(599)
    await asyncio.sleep(0.3)                 # a few polls of the delivery loop: nothing expires early
    assert sc.runtime.queue.stats()["depth"] == 2
    clock.advance(2)
    await until(lambda: sc.runtime.queue.stats()["depth"] == 0)
    expired = [d for d in sc.hub.recent if d["decision"] == "queue_expired"]
    assert [d["trace_id"] for d in expired] == traces
    assert "max_age 600s" in expired[0]["reason"]
    assert sc.runtime.queue.stats()["by_route"]["orders"]["expired"] == 2
    assert recorder.got == []
    assert (await admin(port, "/queue"))["items"] == []


async def test_max_items_bounds_the_queue(sidecar_factory, port, tmp_path):
    up = Upstream(Recorder())                # never started
    await sidecar_factory(policy(port, up.url, tmp_path, queue="{max_items: 3}"))
    statuses = [(await post(port, n))[0] for n in range(5)]
    assert statuses[:3] == [202, 202, 202]
    assert all(s == 503 for s in statuses[3:])   # full: the chain answers as if there were no queue
    assert (await admin(port, "/queue"))["depth"] == 3


async def test_reads_and_large_bodies_are_not_queued(sidecar_factory, port, tmp_path):
    up = Upstream(Recorder())
    await sidecar_factory(policy(port, up.url, tmp_path))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port['reverse']}/orders") as r:
            assert r.status == 503
        async with s.post(f"http://127.0.0.1:{port['reverse']}/orders", data=b"x" * (200 * 1024)) as r:
            assert r.status == 503           # past the replay limit: it could not be stored whole
    assert (await admin(port, "/queue"))["depth"] == 0


async def test_queued_writes_survive_a_clean_restart(sidecar_factory, port, tmp_path):
    recorder = Recorder()
    up = Upstream(recorder)
    text = policy(port, up.url, tmp_path)
    first = await sidecar_factory(text)
    for n in range(3):
        assert (await post(port, n))[0] == 202
    await first.stop()                       # SIGTERM path: items stay on disk
    await up.start()
    try:
        second = await sidecar_factory(text)
        await until(lambda: len(recorder.got) == 3)
        await until(lambda: second.runtime.queue.stats()["depth"] == 0)
    finally:
        await up.stop()
    assert [g["body"]["n"] for g in recorder.got] == [0, 1, 2]


async def test_delivery_retries_5xx_and_429_and_takes_other_4xx_as_final(sidecar_factory, port, tmp_path):
    answers = [503, 429, 422]                # for the first write; everything after that is 201
    seen = []

    async def scripted(request):
        seen.append((await request.json())["n"])
        return web.Response(status=answers.pop(0) if answers else 201)
    up = Upstream(scripted)
    sc = await sidecar_factory(policy(port, up.url, tmp_path, queue="{when: [retries-exhausted]}",
                                      breaker="{consecutive_failures: 50}"))
    for n in range(2):
        assert (await post(port, n))[0] == 202
    await up.start()
    try:
        await until(lambda: sc.runtime.queue.stats()["depth"] == 0)
    finally:
        await up.stop()
    assert seen == [0, 0, 0, 1]
    delivered = [d for d in sc.hub.recent if d["decision"] == "queue_delivered"]
    assert "refused for good by the upstream (422)" in delivered[0]["reason"]
    assert "delivered (201)" in delivered[1]["reason"]


async def test_shadow_mode_only_says_it_would_queue(sidecar_factory, port, tmp_path):
    up = Upstream(Recorder())
    text = policy(port, up.url, tmp_path).replace("        queue:", "        mode: shadow\n        queue:")
    sc = await sidecar_factory(text)
    status, headers, _ = await post(port, 1)
    assert status == 503 and "x-sidecar-queued" not in headers
    assert any(d["decision"] == "queued" and d["reason"].startswith("would queue")
               for d in sc.hub.recent)
    assert sc.runtime.queue.stats()["depth"] == 0


async def test_each_delivery_is_a_span_in_the_original_trace(sidecar_factory, port, tmp_path, otlp_http_receiver,
                                                             monkeypatch):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_TRACES_SAMPLER"):
        monkeypatch.delenv(name, raising=False)
    recorder = Recorder()
    up = Upstream(recorder)
    text = policy(port, up.url, tmp_path) + f"""
    telemetry:
      traces: {{endpoint: "{otlp_http_receiver.endpoint}", protocol: http/protobuf, sample_ratio: 0.0}}
    """
    sc = await sidecar_factory(text)
    status, headers, _ = await post(port, 1)
    assert status == 202
    trace_id = headers["x-sidecar-trace-id"]
    await up.start()
    try:
        await until(lambda: len(recorder.got) == 1)
        await until(lambda: sc.runtime.queue.stats()["depth"] == 0)
    finally:
        await up.stop()
    for sink in sc.runtime.sink.sinks:
        if hasattr(sink, "force_flush"):
            await asyncio.to_thread(sink.force_flush)
    spans = await otlp_http_receiver.wait_for_spans_async(
        1, where=lambda s: s.trace_id == trace_id and s.attributes.get("sidecar.listener") == "queue"
        and s.attributes.get("http.response.status_code") == 201)
    trace = otlp_http_receiver.trace(trace_id)
    [original] = [s for s in trace if s.name == "orders" and s.attributes.get("sidecar.listener") == "api"]
    assert "queued" in original.attributes["sidecar.decisions"]
    delivery = spans[0]
    assert delivery.parent_span_id == original.span_id
    [client] = [s for s in trace if s.kind == "CLIENT" and s.parent_span_id == delivery.span_id]
    assert client.attributes["http.response.status_code"] == 201
    assert recorder.got[0]["headers"]["traceparent"].split("-")[2] == client.span_id
    decided = [s for s in trace if s.attributes.get("sidecar.decision") == "queue_delivered"]
    assert decided and decided[0].parent_span_id == original.span_id


async def test_concurrent_writes_are_delivered_in_the_order_they_were_accepted(sidecar_factory, port, tmp_path):
    recorder = Recorder()
    up = Upstream(recorder)
    sc = await sidecar_factory(policy(port, up.url, tmp_path))
    results = await asyncio.gather(*(post(port, n) for n in range(20)))
    assert all(status == 202 for status, _, _ in results)
    by_id = sorted(results, key=lambda r: int(r[1]["x-sidecar-queued"].rsplit("-", 1)[1]))
    order = [json.loads(body)["idempotency_key"] for _, _, body in by_id]
    await up.start()
    try:
        await until(lambda: sc.runtime.queue.stats()["depth"] == 0)
    finally:
        await up.stop()
    assert [g["headers"]["idempotency-key"] for g in recorder.got] == order


async def drain_through(sc, *replicas) -> None:
    """Bring `replicas` up until the queue has delivered everything, then down again."""
    for replica in replicas:
        await replica.start()
    try:
        await until(lambda: sc.runtime.queue.stats()["depth"] == 0)
    finally:
        for replica in replicas:
            await replica.stop()


class Deliveries:
    """A telemetry sink beside the real ones: the records of the queue's delivery attempts."""

    def __init__(self) -> None:
        self.records: list[RequestRecord] = []

    def decision(self, record) -> None:
        pass

    def request_finished(self, record: RequestRecord) -> None:
        if record.listener == "queue":
            self.records.append(record)


def keyed(key: str):
    """A replica that takes only its own API key (401 otherwise) and keeps what it took."""
    async def handler(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {key}":
            return web.Response(status=401)
        return web.Response(status=201)
    return handler


async def test_a_balanced_upstreams_writes_go_to_an_endpoint_with_its_own_key(sidecar_factory, port, tmp_path):
    a, b = Upstream(keyed("key-a")), Upstream(keyed("key-b"))     # both down while the writes come in
    upstream = (f'{{balance: round-robin, endpoints: ['
                f'{{url: "{a.url}", headers: {{Authorization: "Bearer key-a"}}}}, '
                f'{{url: "{b.url}", headers: {{Authorization: "Bearer key-b"}}}}]}}')
    sc = await sidecar_factory(policy(port, None, tmp_path, upstream=upstream,
                                      breaker="{consecutive_failures: 50}"))
    deliveries = Deliveries()
    sc.runtime.sink.sinks.append(deliveries)
    keys = []
    for n in range(4):
        status, _, body = await post(port, n)
        assert status == 202, body
        keys.append(json.loads(body)["idempotency_key"])
    await drain_through(sc, a, b)
    # round-robin: two writes each, every one with that replica's own key (none refused with a 401)
    for replica, key in ((a, "key-a"), (b, "key-b")):
        assert [r["headers"].get("Authorization") for r in replica.requests] == [f"Bearer {key}"] * 2
    got = sorted(r["headers"]["Idempotency-Key"] for r in a.requests + b.requests)
    assert got == sorted(keys)
    delivered = [d["reason"] for d in sc.hub.recent if d["decision"] == "queue_delivered"]
    assert len(delivered) == 4 and all("delivered (201)" in r for r in delivered)
    # each delivery's try names its endpoint and that endpoint's address
    by_port = {a.port: f"127.0.0.1:{a.port}", b.port: f"127.0.0.1:{b.port}"}
    tries = [t for rec in deliveries.records for t in rec.tries if t.status == 201]
    assert len(tries) == 4
    assert all(t.server_address == "127.0.0.1" and t.endpoint == by_port[t.server_port] for t in tries)
    assert {t.server_port for t in tries} == {a.port, b.port}


async def test_a_dead_first_endpoint_does_not_hold_the_queue(sidecar_factory, port, tmp_path):
    recorder = Recorder()
    alive = Upstream(recorder)                       # down while the writes come in, then up for good
    dead = f"http://127.0.0.1:{free_port()}"         # nothing ever listens there
    upstream = f'{{endpoints: [{{url: "{dead}"}}, {{url: "{alive.url}"}}]}}'
    sc = await sidecar_factory(policy(port, None, tmp_path, upstream=upstream))
    keys = []
    for n in range(3):
        status, _, body = await post(port, n)
        assert status == 202, body
        keys.append(json.loads(body)["idempotency_key"])
    await alive.start()
    try:
        await until(lambda: sc.runtime.queue.stats()["depth"] == 0)
    finally:
        await alive.stop()
    assert [g["body"]["n"] for g in recorder.got] == [0, 1, 2]
    assert [g["headers"]["idempotency-key"] for g in recorder.got] == keys
    assert sc.runtime.queue.stats()["by_route"]["orders"]["delivered"] == 3


async def test_a_delivery_that_finds_every_endpoint_ejected_records_the_panic(sidecar_factory, port, tmp_path):
    """Deliveries pick as live tries do, and say so as they do: once both replicas are ejected, the
    next attempt balances over all of them and its record (its span) carries `upstream_unhealthy`
    and `balancer_panic`, as a live request's would."""
    recorder = Recorder()
    a, b = Upstream(recorder), Upstream(recorder)          # both down while the write comes in
    upstream = (f'{{balance: round-robin, outlier: {{consecutive_failures: 1, eject_for: 60s}}, '
                f'endpoints: [{{url: "{a.url}"}}, {{url: "{b.url}"}}]}}')
    sc = await sidecar_factory(policy(port, None, tmp_path, upstream=upstream,
                                      breaker="{consecutive_failures: 50}"))
    deliveries = Deliveries()
    sc.runtime.sink.sinks.append(deliveries)
    status, _, body = await post(port, 0)
    assert status == 202, body
    panicked = lambda: [rec for rec in deliveries.records
                        if any(d.decision.value == "balancer_panic" for d in rec.decisions)]
    await until(lambda: panicked())
    await drain_through(sc, a, b)
    assert [g["body"]["n"] for g in recorder.got] == [0]
    rec = panicked()[0]
    assert [(d.decision.value, d.upstream) for d in rec.decisions] == [
        ("upstream_unhealthy", "svc"), ("balancer_panic", "svc")]
    assert "balancing over all" in rec.decisions[1].reason
    assert rec.decisions[0].trace_id == rec.trace_id          # on the attempt's own span
    assert any(d["decision"] == "balancer_panic" for d in sc.hub.recent)
