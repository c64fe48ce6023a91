"""Issue 14: an upstream is a set of endpoints. Real aiohttp replicas on loopback, a real sidecar in
front, the balancing, ejection, retries-elsewhere, cooldown and split that the issue's "Must show" names."""
import asyncio
import math
import time

import aiohttp
import openai
from aiohttp import web

from dnsserver import DnsServer
from harness import free_port


def policy(port, endpoints: list[str], route: str, *, balance: str = "ewma", outlier: str = "",
           extra_upstreams: str = "") -> str:
    eps = "\n".join(f"          - {{url: \"{u}\"}}" for u in endpoints)
    return f"""
    version: 1
    listeners:
      - {{name: api, mode: reverse, port: {port['reverse']}, upstream: svc}}
    admin: {{port: {port['admin']}}}
    health: {{bind: 127.0.0.1, port: {port['health']}}}
    upstreams:
      svc:
        balance: {balance}
        {outlier}
        endpoints:
{eps}
{extra_upstreams}
    routes:
      - name: r
        match: {{path_prefix: /}}
        upstream: svc
{route}
    """


async def fire(port, n, *, concurrency=20, path="/x", method="GET"):
    results = []
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession() as s:
        async def one(i):
            async with sem:
                async with s.request(method, f"http://127.0.0.1:{port['reverse']}{path}?i={i}") as r:
                    await r.read()
                    results.append((r.status, dict(r.headers)))
        await asyncio.gather(*(one(i) for i in range(n)))
    return results


async def status(port) -> dict:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port['admin']}/status") as r:
            return await r.json()


def finished_records(sc) -> list:
    """The sidecar's finished-request records (with their tries, the spans' source) from now on."""
    captured: list = []
    sc.runtime.sink.sinks.append(type("Capture", (), {"decision": lambda self, d: None,
                                                       "request_finished": lambda self, r: captured.append(r)})())
    return captured


def ok_handler(text="ok"):
    async def handler(request):
        return web.Response(text=text)
    return handler


async def always(status_code):
    async def handler(request):
        return web.Response(status=status_code)
    return handler


async def test_one_replica_of_three_answering_503_is_ejected_and_the_breaker_never_opens(
        upstream_factory, sidecar_factory, port):
    good1 = await upstream_factory(ok_handler())
    bad = await upstream_factory(await always(503))
    good2 = await upstream_factory(ok_handler())
    await sidecar_factory(policy(port, [good1.url, bad.url, good2.url], """
        retry:
          max_retries: 2
          when: [503]
          backoff: {base: 1ms, max: 5ms}
          budget: {ratio: 0.2, min_per_second: 10, window: 10s}
        breaker: {consecutive_failures: 5, failure_rate: 0.5, min_requests: 20, window: 30s}
    """, outlier="outlier: {consecutive_failures: 5, eject_for: 5m}"))
    results = await fire(port, 2000)
    ok = sum(1 for s, _ in results if s == 200)
    assert ok / 2000 >= 0.999, ok
    tries = good1.hits + bad.hits + good2.hits
    print(f"\none bad of three: {ok}/2000 ok, tries {tries}, bad replica {bad.hits}")
    after_ejection = tries - 5 - 20              # its 5 failures, and at most one try in flight per client
    assert (bad.hits - 5) / after_ejection < 0.02, (bad.hits, tries)
    assert not any("breaker" in h.get("x-sidecar-degraded", "") for _, h in results)
    st = await status(port)
    route = next(r for r in st["routes"] if r["name"] == "r")
    assert route["breakers"]["svc"]["state"] == "closed" and route["breakers"]["svc"]["trip_reason"] is None
    endpoints = {e["endpoint"]: e for e in st["endpoints"]["svc"]["endpoints"]}
    assert endpoints[f"127.0.0.1:{bad.port}"]["state"] == "ejected"
    assert {e["state"] for k, e in endpoints.items() if k != f"127.0.0.1:{bad.port}"} == {"active"}
    answered_by = {h["x-sidecar-endpoint"] for s, h in results if s == 200}
    assert answered_by == {f"127.0.0.1:{good1.port}", f"127.0.0.1:{good2.port}"}
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port['admin']}/metrics") as r:
            text = await r.text()
    bad_key = f"127.0.0.1:{bad.port}"
    assert f'sidecar_endpoint_requests_total{{code="503",endpoint="{bad_key}",upstream="svc"}} {bad.hits}.0' in text
    assert f'sidecar_endpoint_state{{endpoint="{bad_key}",state="ejected",upstream="svc"}} 1.0' in text


async def test_all_replicas_failing_open_the_breaker_and_the_fallback_answers(
        upstream_factory, sidecar_factory, port):
    reps = [await upstream_factory(await always(503)) for _ in range(3)]
    await sidecar_factory(policy(port, [r.url for r in reps], """
        breaker: {consecutive_failures: 5, open_for: 5m}
        fallback:
          when: [breaker-open, 5xx]
          targets:
            - static: {status: 200, json: {served: fallback}}
    """, outlier="outlier: {consecutive_failures: 3, eject_for: 5m}"))
    results = await fire(port, 40, concurrency=1)
    assert all(s == 200 for s, _ in results)
    assert all(h["x-sidecar-upstream"] == "static" for _, h in results)
    later = [h["x-sidecar-degraded"] for _, h in results[-10:]]
    assert all("breaker_open" in d for d in later), later
    route = next(r for r in (await status(port))["routes"] if r["name"] == "r")
    assert route["breakers"]["svc"]["state"] == "open"
    print(f"\nall failing: replica tries {[r.hits for r in reps]} for 40 requests")
    assert sum(r.hits for r in reps) < 40          # the open breaker spared the replicas


async def test_a_slow_replica_gets_a_small_share_under_ewma(upstream_factory, sidecar_factory, port):
    async def slow(request):
        await asyncio.sleep(0.2)
        return web.Response(text="slow")
    fast1 = await upstream_factory(ok_handler())
    slowr = await upstream_factory(slow)
    fast2 = await upstream_factory(ok_handler())
    await sidecar_factory(policy(port, [fast1.url, slowr.url, fast2.url], "", balance="ewma"))
    results = await fire(port, 400, concurrency=4)
    assert all(s == 200 for s, _ in results)
    print(f"\newma: fast {fast1.hits}, slow {slowr.hits}, fast {fast2.hits}")
    assert slowr.hits / 400 < 0.05, (fast1.hits, slowr.hits, fast2.hits)
    assert fast1.hits > 100 and fast2.hits > 100    # P2C spreads the rest over both fast ones


async def test_a_retry_goes_to_a_replica_not_yet_tried(upstream_factory, sidecar_factory, port):
    reps = [await upstream_factory(await always(503)) for _ in range(3)]
    sc = await sidecar_factory(policy(port, [r.url for r in reps], """
        retry: {max_retries: 2, when: [503], backoff: {base: 1ms, max: 2ms}}
    """, balance="random"))
    captured = finished_records(sc)
    for round_ in range(1, 6):
        results = await fire(port, 1, concurrency=1)
        assert results[0][0] == 503 and results[0][1]["x-sidecar-attempts"] == "3"
        assert [r.hits for r in reps] == [round_] * 3      # each replica exactly once per request
    tried = [(t.server_address, t.server_port) for t in captured[-1].tries]
    assert sorted(tried) == sorted(("127.0.0.1", r.port) for r in reps)   # spans carry the endpoint


async def test_two_keyed_endpoints_one_rate_limited_with_the_openai_sdk(upstream_factory, sidecar_factory, port):
    events: dict[str, list] = {"east": [], "west": []}

    def deployment(name):
        async def handler(request):
            events[name].append((time.monotonic(), request.headers.get("api-key")))
            if name == "east" and len(events["east"]) == 1:
                return web.json_response({"error": {"message": "rate limited"}}, status=429,
                                         headers={"Retry-After": "2"})
            return web.json_response({
                "id": "c1", "object": "chat.completion", "created": 0, "model": "gpt-4o",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": name}}]})
        return handler
    east = await upstream_factory(deployment("east"))
    west = await upstream_factory(deployment("west"))
    await sidecar_factory(f"""
    version: 1
    listeners:
      - {{name: llm, mode: reverse, port: {port['reverse']}, upstream: gpt}}
    admin: {{port: {port['admin']}}}
    health: {{bind: 127.0.0.1, port: {port['health']}}}
    upstreams:
      gpt:
        balance: round-robin
        headers: {{api-key: shared, x-team: shop}}
        endpoints:
          - {{url: "{east.url}", headers: {{api-key: key-east}}}}
          - {{url: "{west.url}", headers: {{api-key: key-west}}}}
    routes:
      - name: chat
        match: {{path_prefix: /}}
        upstream: gpt
        retry: {{max_retries: 2, methods: [POST], when: [429, 503], backoff: {{base: 1ms, max: 2ms}}}}
    """)
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port['reverse']}/v1", api_key="app-key",
                                max_retries=0)
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        first = raw.parse()
        assert first.choices[0].message.content == "west"          # east's 429 was retried on west at once
        assert raw.headers["x-sidecar-endpoint"] == f"127.0.0.1:{west.port}"
        assert "endpoint_cooldown" in raw.headers["x-sidecar-degraded"]
        limited_at = events["east"][0][0]
        # While east cools down, west serves every request; then east comes back.
        async with asyncio.timeout(30):                           # a hang guard only
            while len(events["east"]) == 1:
                reply = await client.chat.completions.create(model="gpt-4o",
                                                             messages=[{"role": "user", "content": "x"}])
                assert reply.choices[0].message.content in ("east", "west")
                await asyncio.sleep(0.05)
        back_at = events["east"][1][0]
        print(f"\ncooldown: east back after {back_at - limited_at:.2f}s, west served "
              f"{sum(1 for t, _ in events['west'] if limited_at < t < back_at)} meanwhile")
        assert back_at - limited_at >= 2.0                         # nothing reached east inside its 2 s
        during = [t for t, _ in events["west"] if limited_at < t < limited_at + 2.0]
        assert len(during) >= 2                                    # west carried the traffic meanwhile
        assert {key for _, key in events["east"]} == {"key-east"}
        assert {key for _, key in events["west"]} == {"key-west"}
    finally:
        await client.close()


async def test_a_90_10_split_over_1000_requests(upstream_factory, sidecar_factory, port, tmp_path):
    stable = await upstream_factory(ok_handler("stable"))
    canary = await upstream_factory(ok_handler("canary"))
    sc = await sidecar_factory(f"""
    version: 1
    listeners:
      - {{name: api, mode: reverse, port: {port['reverse']}, upstream: stable}}
    admin: {{port: {port['admin']}}}
    health: {{bind: 127.0.0.1, port: {port['health']}}}
    upstreams:
      stable: {{url: "{stable.url}"}}
      canary: {{url: "{canary.url}"}}
    routes:
      - name: checkout
        match: {{path_prefix: /}}
        split: [{{upstream: stable, weight: 90}}, {{upstream: canary, weight: 10}}]
        breaker: {{consecutive_failures: 5}}
    """)
    results = await fire(port, 1000)
    assert all(s == 200 for s, _ in results)
    n, p = 1000, 0.1
    sigma = math.sqrt(n * p * (1 - p))
    print(f"\nsplit 90/10: stable {stable.hits}, canary {canary.hits}")
    assert abs(canary.hits - n * p) <= 5 * sigma, canary.hits       # 5 sigma: 53..147
    assert stable.hits + canary.hits == 1000
    assert sum(1 for _, h in results if h["x-sidecar-upstream"] == "canary") == canary.hits
    # A reload moves the weights; the route's state (one breaker per upstream) carries over.
    state = sc.runtime.gen.states["checkout"]
    breakers = dict(state.breakers)
    assert set(breakers) == {"stable", "canary"}
    path = tmp_path / "policy.yaml"
    path.write_text(path.read_text().replace("weight: 90", "weight: 0").replace("weight: 10", "weight: 1"))
    ok, error = await sc.runtime.reload()
    assert ok, error
    assert sc.runtime.gen.states["checkout"] is state and state.breakers == breakers
    before = stable.hits
    results = await fire(port, 50)
    assert stable.hits == before and all(h["x-sidecar-upstream"] == "canary" for _, h in results)


class Replica:
    """An aiohttp replica on one loopback address (127.0.0.x or ::1) and a port other replicas may share;
    keeps the Host header of every request it saw."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port, self.hits = host, port, 0
        self.hosts: list[str] = []
        self._runner = None

    async def start(self) -> "Replica":
        async def handler(request):
            self.hits += 1
            self.hosts.append(request.headers.get("Host", ""))
            return web.Response(text=self.host)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        return self

    async def stop(self) -> None:
        await self._runner.cleanup()


def dns_policy(port, dns: DnsServer, shared: int) -> str:
    """Upstream `orders`: every A/AAAA record of orders.test on port `shared`, round-robin."""
    return f"""
    version: 1
    listeners:
      - {{name: api, mode: reverse, port: {port['reverse']}, upstream: orders}}
    admin: {{port: {port['admin']}}}
    health: {{bind: 127.0.0.1, port: {port['health']}}}
    upstreams:
      orders:
        url: http://orders.test:{shared}
        discovery: dns
        refresh: 200ms
        resolver: {{servers: ["{dns.address}"]}}
        balance: round-robin
    routes:
      - name: orders
        match: {{path_prefix: /}}
        upstream: orders
    """


async def test_dns_discovery_against_a_real_dns_server(sidecar_factory, port):
    dns = DnsServer()
    shared = free_port()
    replicas = [await Replica(f"127.0.0.{i}", shared).start() for i in (1, 2, 3)]
    try:
        dns.set("orders.test", ["127.0.0.1", "127.0.0.2", "127.0.0.3"])
        await sidecar_factory(dns_policy(port, dns, shared))
        results = await fire(port, 60, concurrency=1)
        assert all(s == 200 for s, _ in results)
        assert [r.hits for r in replicas] == [20, 20, 20]
        assert {h["x-sidecar-endpoint"] for _, h in results} == {f"127.0.0.{i}:{shared}" for i in (1, 2, 3)}

        dns.set("orders.test", ["127.0.0.1", "127.0.0.3"])
        async with asyncio.timeout(20):                     # hang guard; refresh is 200 ms
            while len((await status(port))["endpoints"]["orders"]["endpoints"]) != 2:
                await asyncio.sleep(0.05)
        before = [r.hits for r in replicas]
        results = await fire(port, 30, concurrency=1)
        assert all(s == 200 for s, _ in results)
        assert replicas[1].hits == before[1]                # the removed replica gets nothing

        dns.silence()
        async with asyncio.timeout(20):
            while not (await status(port))["endpoints"]["orders"]["dns"]["failing"]:
                await asyncio.sleep(0.1)
        results = await fire(port, 30, concurrency=1)
        assert all(s == 200 for s, _ in results)            # the last good set keeps serving
        assert replicas[0].hits > before[0] and replicas[2].hits > before[2]
    finally:
        dns.stop()
        for r in replicas:
            await r.stop()


async def test_health_checks_run_per_endpoint(upstream_factory, sidecar_factory, port):
    def replica(name, healthy):
        async def handler(request):
            if request.path == "/health":
                return web.Response(status=200 if healthy else 503)
            return web.Response(text=name)
        return handler
    reps = [await upstream_factory(replica(n, n != "b")) for n in "abc"]
    await sidecar_factory(policy(port, [r.url for r in reps], "", balance="round-robin").replace(
        "        balance: round-robin",
        "        balance: round-robin\n        health_check: {path: /health, interval: 100ms, timeout: 1s, "
        "unhealthy_after: 1, healthy_after: 1}"))
    async with asyncio.timeout(20):                          # a hang guard only
        while True:
            states = {e["endpoint"]: e["state"] for e in (await status(port))["endpoints"]["svc"]["endpoints"]}
            if states[f"127.0.0.1:{reps[1].port}"] == "unhealthy":
                break
            await asyncio.sleep(0.05)
    before = [sum(1 for q in r.requests if q["path"] != "/health") for r in reps]
    results = await fire(port, 30, concurrency=1)
    after = [sum(1 for q in r.requests if q["path"] != "/health") for r in reps]
    assert all(s == 200 for s, _ in results)
    assert after[1] == before[1]                             # the unhealthy replica is out of rotation
    assert after[0] - before[0] == 15 and after[2] - before[2] == 15


async def test_a_hedge_goes_to_another_replica(upstream_factory, sidecar_factory, port):
    release = asyncio.Event()

    async def stuck(request):
        await release.wait()
        return web.Response(text="slow")
    slow = await upstream_factory(stuck)
    fast = await upstream_factory(ok_handler("fast"))
    await sidecar_factory(policy(port, [slow.url, fast.url], """
        hedge: {delay: 50ms, max_extra: 1}
    """, balance="round-robin"))
    try:
        results = await fire(port, 1, concurrency=1)
    finally:
        release.set()
    status_code, headers = results[0]
    assert status_code == 200 and headers["x-sidecar-endpoint"] == f"127.0.0.1:{fast.port}"
    assert (slow.hits, fast.hits) == (1, 1)              # the hedged try did not go back to the slow one
    assert "hedge" in headers["x-sidecar-degraded"]


async def test_a_streamed_answer_counts_in_flight_until_it_ends(upstream_factory, sidecar_factory, port):
    go_on = asyncio.Event()

    async def streaming(request):
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"data: one\n\n")
        await go_on.wait()
        await resp.write(b"data: two\n\n")
        await resp.write_eof()
        return resp
    reps = [await upstream_factory(streaming) for _ in range(2)]
    await sidecar_factory(policy(port, [r.url for r in reps], "", balance="least-request"))

    def in_flight(st):
        return sum(e["in_flight"] for e in st["endpoints"]["svc"]["endpoints"])
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port['reverse']}/stream") as r:
            assert await r.content.readuntil(b"\n\n") == b"data: one\n\n"
            assert in_flight(await status(port)) == 1           # the body is still flowing
            go_on.set()
            assert await r.read() == b"data: two\n\n"
    async with asyncio.timeout(10):                             # a hang guard only
        while in_flight(await status(port)) != 0:
            await asyncio.sleep(0.02)


async def test_one_listed_endpoint_gets_its_own_headers(upstream_factory, sidecar_factory, port):
    up = await upstream_factory(ok_handler())
    await sidecar_factory(policy(port, [up.url], "").replace(
        f'- {{url: "{up.url}"}}', f'- {{url: "{up.url}", headers: {{api-key: only-one}}}}'))
    results = await fire(port, 2, concurrency=1)
    assert all(s == 200 and h["x-sidecar-endpoint"] == f"127.0.0.1:{up.port}" for s, h in results)
    assert [r["headers"].get("api-key") for r in up.requests] == ["only-one", "only-one"]


async def test_a_listed_ipv6_endpoint_gets_requests_with_a_bracketed_host(sidecar_factory, port):
    v6 = await Replica("::1", free_port()).start()
    v4 = await Replica("127.0.0.1", free_port()).start()
    try:
        sc = await sidecar_factory(policy(port, [f"http://[::1]:{v6.port}", f"http://127.0.0.1:{v4.port}"], "",
                                          balance="round-robin"))
        finished = finished_records(sc)
        results = await fire(port, 20, concurrency=1)
        assert all(s == 200 for s, _ in results)
        assert (v6.hits, v4.hits) == (10, 10)
        v6_key, v4_key = f"[::1]:{v6.port}", f"127.0.0.1:{v4.port}"
        assert sorted(h["x-sidecar-endpoint"] for _, h in results) == [v4_key] * 10 + [v6_key] * 10
        assert set(v6.hosts) == {v6_key} and set(v4.hosts) == {v4_key}      # RFC 9110 7.2: IP-literal
        endpoints = (await status(port))["endpoints"]["svc"]["endpoints"]
        assert {e["endpoint"]: e["state"] for e in endpoints} == {v6_key: "active", v4_key: "active"}
        tried = {(t.server_address, t.server_port) for r in finished for t in r.tries}
        assert tried == {("::1", v6.port), ("127.0.0.1", v4.port)}          # semconv: the address unbracketed
    finally:
        await v6.stop()
        await v4.stop()


async def test_dns_discovery_with_an_aaaa_record_reaches_the_ipv6_replica(sidecar_factory, port):
    dns = DnsServer()
    shared = free_port()
    v6 = await Replica("::1", shared).start()
    v4 = await Replica("127.0.0.1", shared).start()
    try:
        dns.set("orders.test", ["::1", "127.0.0.1"])
        await sidecar_factory(dns_policy(port, dns, shared))
        results = await fire(port, 20, concurrency=1)
        assert all(s == 200 for s, _ in results)
        assert (v6.hits, v4.hits) == (10, 10)
        v6_key, v4_key = f"[::1]:{shared}", f"127.0.0.1:{shared}"
        assert sorted(h["x-sidecar-endpoint"] for _, h in results) == [v4_key] * 10 + [v6_key] * 10
        assert set(v6.hosts) == set(v4.hosts) == {f"orders.test:{shared}"}   # the Service's name, not the IP
        st = (await status(port))["endpoints"]["orders"]
        assert {e["endpoint"] for e in st["endpoints"]} == {v6_key, v4_key}
        assert st["dns"]["addresses"] == ["127.0.0.1", "::1"]
    finally:
        dns.stop()
        await v6.stop()
        await v4.stop()
