"""SIGTERM with writes still in the local (SQLite) queue: counted in the log, or, with `handoff:`, moved
to the route's shared stream, where another replica delivers them."""
import asyncio

import aiohttp

from fleet_support import Pod, RecordingUpstream, wait_for


def policy(upstream: RecordingUpstream, handoff: str | None):
    extra = f', handoff: "{handoff}"' if handoff else ""

    def text(pod: Pod) -> str:
        return f"""
        version: 1
        listeners:
          - {{name: api, mode: reverse, port: {pod.listen}, upstream: svc}}
        admin: {{port: {pod.admin}}}
        health: {{bind: 127.0.0.1, port: {pod.health}}}
        upstreams:
          svc: {{url: "{upstream.url}"}}
        routes:
          - name: orders
            match: {{path_prefix: /}}
            upstream: svc
            retry: {{max_retries: 1, when: [503], methods: [POST], backoff: {{base: 10ms, max: 20ms}}}}
            breaker: {{consecutive_failures: 2, open_for: 200ms, max_open_for: 500ms}}
            queue: {{when: [breaker-open, retries-exhausted]{extra}}}
        state_dir: {pod.state_dir}
        """
    return text


async def accept(pod: Pod, count: int) -> list[tuple[str, int, str]]:
    keys = []
    async with aiohttp.ClientSession() as s:
        for n in range(count):
            async with s.post(pod.url + "/orders", json={"n": n}) as r:
                assert r.status == 202, await r.text()
                keys.append(("/orders", n, (await r.json())["idempotency_key"]))
    return keys


async def test_sigterm_hands_local_writes_to_redis_and_another_replica_delivers_them(tmp_path, redis_url):
    upstream = await RecordingUpstream().start()
    a, b, plain = Pod(tmp_path, "a", policy(upstream, redis_url)), Pod(tmp_path, "b", policy(upstream, redis_url)), \
        Pod(tmp_path, "plain", policy(upstream, None))
    try:
        a.start(), b.start(), plain.start()
        await asyncio.gather(a.ready(), b.ready(), plain.ready())
        keys = await accept(a, 4)
        await accept(plain, 2)
        assert await a.terminate() == 0 and await plain.terminate() == 0
        assert "4 undelivered write(s) handed off to the shared queue" in a.log.read_text()
        assert "2 write(s) undelivered at shutdown" in plain.log.read_text()
        upstream.down = False
        await wait_for(lambda: len(upstream.got) >= 4, 30, f"handed-off writes delivered: {upstream.got}")
        await asyncio.sleep(0.5)
        assert upstream.got == keys, (upstream.got, keys)   # once each, in acceptance order, by B
    finally:
        for pod in (a, b, plain):
            pod.stop()
        await upstream.stop()
