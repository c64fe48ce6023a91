"""rate_limit.tokens_per_minute through the real data plane: 1,000 tokens/min, answers of 300 tokens."""
import aiohttp

from llm_upstreams import LlmApi


def policy(port, primary, backup):
    return f"""
    version: 1
    listeners:
      - {{name: a, mode: reverse, port: {port['reverse']}, upstream: primary}}
      - {{name: b, mode: reverse, port: {port['reverse2']}, upstream: primary}}
    admin: {{port: {port['admin']}}}
    health: {{bind: 127.0.0.1, port: {port['health']}}}
    upstreams:
      primary: {{url: "{primary}"}}
      backup: {{url: "{backup}"}}
    routes:
      - name: limited
        match: {{path_prefix: /v1/, headers: [{{name: x-app, exact: a}}]}}
        upstream: primary
        rate_limit: {{tokens_per_minute: 1000}}
      - name: spills-over
        match: {{path_prefix: /v1/, headers: [{{name: x-app, exact: b}}]}}
        upstream: primary
        rate_limit: {{tokens_per_minute: 1000}}
        fallback: {{when: [rate-limited], targets: [{{upstream: backup}}]}}
    """


async def test_fourth_call_in_the_minute_is_429_or_goes_to_the_backup(upstream_factory, sidecar_factory, port):
    primary_api = LlmApi(input_tokens=100, output_tokens=200)
    backup_api = LlmApi(input_tokens=100, output_tokens=200)
    primary = await upstream_factory(primary_api)
    backup = await upstream_factory(backup_api)
    await sidecar_factory(policy(port, primary.url, backup.url))
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as s:
        async def post(app, stream=False):
            async with s.post(f"http://127.0.0.1:{port['reverse']}/v1/chat/completions",
                              json=dict(body, stream=stream, stream_options={"include_usage": True}),
                              headers={"x-app": app}) as r:
                return r.status, r.headers.copy(), await r.read()
        answers = [await post("a", stream=i == 1) for i in range(4)]
        assert [a[0] for a in answers] == [200, 200, 200, 429]
        status, headers, text = answers[3]
        assert 1 <= int(headers["retry-after"]) <= 60
        assert headers["x-sidecar-degraded"] == "rate_limited" and b"tokens per minute" in text
        assert primary.hits == 3
        async with s.get(f"http://127.0.0.1:{port['admin']}/status") as r:
            limited = next(route for route in (await r.json())["routes"] if route["name"] == "limited")
        assert limited["tokens_per_minute"] == {"limit": 1000, "spent": 900}

        served_by = [(await post("b"))[1]["x-sidecar-upstream"] for _ in range(4)]
        assert served_by == ["primary", "primary", "primary", "backup"]
        assert len(backup_api.bodies) == 1


def keyed_policy(port, primary):
    return f"""
    version: 1
    listeners:
      - {{name: a, mode: reverse, port: {port['reverse']}, upstream: primary}}
    admin: {{port: {port['admin']}}}
    health: {{bind: 127.0.0.1, port: {port['health']}}}
    upstreams:
      primary: {{url: "{primary}"}}
    routes:
      - name: per-tenant
        match: {{path_prefix: /v1/}}
        upstream: primary
        rate_limit: {{tokens_per_minute: 1000, key: "header:x-tenant", max_keys: 2}}
    """


async def test_each_key_value_has_its_own_minute_and_at_most_max_keys_are_kept(upstream_factory, sidecar_factory,
                                                                              port):
    api = LlmApi(input_tokens=100, output_tokens=200)
    primary = await upstream_factory(api)
    await sidecar_factory(keyed_policy(port, primary.url))
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as s:
        async def post(tenant):
            async with s.post(f"http://127.0.0.1:{port['reverse']}/v1/chat/completions", json=body,
                              headers={"x-tenant": tenant}) as r:
                return r.status, r.headers.copy(), await r.read()

        async def tokens_status():
            async with s.get(f"http://127.0.0.1:{port['admin']}/status") as r:
                return next(route for route in (await r.json())["routes"]
                            if route["name"] == "per-tenant")["tokens_per_minute"]

        acme = [await post("acme") for _ in range(4)]
        assert [a[0] for a in acme] == [200, 200, 200, 429]
        status, headers, text = acme[3]
        assert 1 <= int(headers["retry-after"]) <= 60
        assert headers["x-sidecar-degraded"] == "rate_limited" and b"tokens per minute" in text
        # acme's minute is spent; zeta's is its own
        assert [(await post("zeta"))[0] for _ in range(3)] == [200, 200, 200]
        assert (await post("zeta"))[0] == 429
        assert api.bodies and len(api.bodies) == 6
        assert await tokens_status() == {"limit": 1000, "spent": 1800, "keys": 2, "evictions": 0}
        # a third value past max_keys: 2 drops the least recently used window (acme's), which starts
        # again from an empty minute
        assert (await post("omega"))[0] == 200
        assert await tokens_status() == {"limit": 1000, "spent": 1200, "keys": 2, "evictions": 1}
        assert (await post("acme"))[0] == 200
