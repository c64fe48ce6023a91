"""Issue 4 (degradation chain) and issue 7 (faults, rate limits, per-caller chains, content failover),
end to end with real upstreams on loopback."""
import asyncio
import json

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from harness import free_port


def chat_completion(model: str, text: str) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


async def fake_provider(name, status=200):
    async def handler(request):
        body = await request.read()
        if status != 200:
            return web.json_response({"error": {"message": "overloaded"}}, status=status)
        doc = json.loads(body) if body else {}
        return web.json_response(chat_completion(doc.get("model", "?"), f"from {name}"),
                                 headers={"x-seen-path": request.path,
                                          "x-seen-auth": request.headers.get("authorization", ""),
                                          "x-seen-served-by": request.headers.get("x-served-by", "")})
    return handler


def llm_policy(port, primary, backup, route_extra="", when="[breaker-open, retries-exhausted, timeout, 5xx]"):
    return f"""
    version: 1
    listeners:
      - {{name: llm, mode: reverse, port: {port['reverse']}, upstream: primary}}
    admin: {{port: {port['admin']}}}
    health: {{bind: 127.0.0.1, port: {port['health']}}}
    upstreams:
      primary: {{url: "{primary}", headers: {{authorization: "Bearer primary-key"}}}}
      backup: {{url: "{backup}/api", headers: {{authorization: "Bearer ${{BACKUP_KEY:-none}}"}}}}
    routes:
      - name: chat
        match: {{path_prefix: /v1/chat/, methods: [POST]}}
        upstream: primary
        timeout: 10s
        retry: {{max_retries: 1, when: [connect-failure, 503], methods: [POST], backoff: {{base: 1ms, max: 2ms}}}}
{route_extra}
        fallback:
          when: {when}
          targets:
            - upstream: backup
              rewrite:
                path: /v2/complete
                json_map: {{model: {{gpt-4o: backup-large, "*": backup-small}}}}
                headers: {{x-served-by: fallback}}
            - static: {{status: 200, json: {{error: degraded, message: "Try again shortly"}}}}
    """


def primary_backup(port, primary_url, backup_url, routes):
    """A reverse listener in front of `primary`, with a `backup` upstream beside it."""
    return f"""
    version: 1
    listeners: [{{name: api, mode: reverse, port: {port['reverse']}, upstream: primary}}]
    admin: {{port: {port['admin']}}}
    health: {{bind: 127.0.0.1, port: {port['health']}}}
    upstreams:
      primary: {{url: "{primary_url}"}}
      backup: {{url: "{backup_url}"}}
    routes:
{routes}
    """


async def post_chat(port, model="gpt-4o"):
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{port['reverse']}/v1/chat/completions",
                          json={"model": model, "messages": [{"role": "user", "content": "hi"}]}) as r:
            return r.status, CIMultiDict(r.headers), await r.json()


async def test_primary_down_backup_answers_with_rewrites(upstream_factory, sidecar_factory, port, monkeypatch):
    monkeypatch.setenv("BACKUP_KEY", "backup-secret")
    backup = await upstream_factory(await fake_provider("backup"))
    await sidecar_factory(llm_policy(port, f"http://127.0.0.1:{free_port()}", backup.url))
    status, headers, doc = await post_chat(port, "gpt-4o")
    assert status == 200
    assert doc["model"] == "backup-large"                     # json_map
    assert doc["choices"][0]["message"]["content"] == "from backup"
    assert headers["x-seen-path"] == "/api/v2/complete"       # rewrite.path under the upstream's base path
    assert headers["x-seen-auth"] == "Bearer backup-secret"   # the backup's own key, not the primary's
    assert headers["x-seen-served-by"] == "fallback"
    assert headers["x-sidecar-upstream"] == "backup"
    assert headers["x-sidecar-degraded"] == "retry,fallback"
    assert headers["x-sidecar-attempts"] == "3"               # 2 tries to the primary + 1 to the backup
    status, headers, doc = await post_chat(port, "gpt-3.5")
    assert doc["model"] == "backup-small"                     # the "*" default


async def test_breaker_open_goes_straight_to_backup(upstream_factory, sidecar_factory, port):
    primary = await upstream_factory(await fake_provider("primary", status=503))
    backup = await upstream_factory(await fake_provider("backup"))
    await sidecar_factory(llm_policy(port, primary.url, backup.url,
                                     route_extra="        breaker: {consecutive_failures: 2, open_for: 60s}"))
    for _ in range(2):
        status, headers, _ = await post_chat(port)
        assert status == 200 and headers["x-sidecar-upstream"] == "backup"
    hits = primary.hits
    status, headers, doc = await post_chat(port)
    assert status == 200 and doc["choices"][0]["message"]["content"] == "from backup"
    assert primary.hits == hits                               # the open breaker kept it away
    assert headers["x-sidecar-degraded"].startswith("breaker_open")
    assert headers["x-sidecar-attempts"] == "1"


async def test_everything_down_static_answer(sidecar_factory, port):
    await sidecar_factory(llm_policy(port, f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"))
    status, headers, doc = await post_chat(port)
    assert status == 200
    assert doc == {"error": "degraded", "message": "Try again shortly"}
    assert headers["x-sidecar-upstream"] == "static"
    assert headers["x-sidecar-degraded"] == "retry,fallback,static_response"
    assert headers["content-type"].startswith("application/json")


async def test_nothing_answers_gives_json_503_with_decisions(sidecar_factory, port):
    dead = f"http://127.0.0.1:{free_port()}"
    await sidecar_factory(primary_backup(port, dead, dead, """
      - name: chat
        match: {path_prefix: /}
        upstream: primary
        fallback:
          when: [retries-exhausted]
          targets: [{upstream: backup}]
"""))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port['reverse']}/x") as r:
            assert r.status == 503
            doc = await r.json()
    assert doc["route"] == "chat"
    assert doc["decisions"] == ["fallback"]


async def test_hedged_fallback_beats_a_primary_that_never_answers(upstream_factory, sidecar_factory, port):
    async def silent(reader, writer):
        await asyncio.sleep(30)
    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    hung = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    backup = await upstream_factory(await fake_provider("backup"))
    await sidecar_factory(primary_backup(port, hung, backup.url, """
      - name: models
        match: {path_prefix: /}
        upstream: primary
        timeout: 20s
        fallback:
          when: [timeout, 5xx]
          hedge: 100ms
          targets: [{upstream: backup}]
"""))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port['reverse']}/v1/models") as r:
            assert r.status == 200
            assert r.headers["x-sidecar-upstream"] == "backup"
            assert "hedge" in r.headers["x-sidecar-degraded"]
    assert backup.hits == 1
    server.close()


async def test_openai_client_gets_completion_from_backup(upstream_factory, sidecar_factory, port, monkeypatch):
    import openai
    monkeypatch.setenv("BACKUP_KEY", "k")
    primary = await upstream_factory(await fake_provider("primary", status=503))
    backup = await upstream_factory(await fake_provider("backup"))
    await sidecar_factory(llm_policy(port, primary.url, backup.url))
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port['reverse']}/v1", api_key="sk-app",
                                max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hello"}])
    completion = raw.parse()
    assert completion.choices[0].message.content == "from backup"
    assert completion.model == "backup-large"
    assert raw.headers["x-sidecar-degraded"] == "retry,fallback"
    assert primary.hits == 2
    await client.close()


def guarded_policy(port, up_url, route):
    return f"""
    version: 1
    listeners: [{{name: api, mode: reverse, port: {port['reverse']}, upstream: svc}}]
    admin: {{port: {port['admin']}}}
    health: {{bind: 127.0.0.1, port: {port['health']}}}
    upstreams:
      svc: {{url: "{up_url}"}}
    routes:
{route}
    """


async def test_fault_injection_drives_the_chain_without_touching_upstream(upstream_factory, sidecar_factory, port):
    async def ok(request):
        return web.Response(text="real")
    up = await upstream_factory(ok)
    await sidecar_factory(guarded_policy(port, up.url, """
      - name: rehearsal
        match: {path_prefix: /}
        upstream: svc
        fault: {abort: {status: 503, percent: 100}, header: {name: x-chaos, value: "on"}}
        fallback:
          when: [5xx]
          targets: [{static: {status: 200, body: "rehearsed fallback"}}]
    """))
    async with aiohttp.ClientSession() as s:
        url = f"http://127.0.0.1:{port['reverse']}/x"
        async with s.get(url, headers={"x-chaos": "on"}) as r:
            assert r.status == 200 and await r.text() == "rehearsed fallback"
            assert r.headers["x-sidecar-degraded"] == "fault_injected,static_response"
        assert up.hits == 0
        async with s.get(url) as r:                # without the header: the real upstream
            assert await r.text() == "real"
    assert up.hits == 1


async def test_rate_limit_answers_429_with_retry_after(upstream_factory, sidecar_factory, port):
    async def ok(request):
        return web.Response(text="ok")
    up = await upstream_factory(ok)
    await sidecar_factory(guarded_policy(port, up.url, """
      - name: limited
        match: {path_prefix: /}
        upstream: svc
        rate_limit: {per_second: 0.5, burst: 3}
    """))
    statuses = []
    async with aiohttp.ClientSession() as s:
        for _ in range(5):
            async with s.get(f"http://127.0.0.1:{port['reverse']}/x") as r:
                statuses.append(r.status)
                if r.status == 429:
                    assert int(r.headers["retry-after"]) >= 1
                    assert r.headers["x-sidecar-degraded"] == "rate_limited"
    assert statuses == [200, 200, 200, 429, 429]
    assert up.hits == 3


async def test_two_tenants_get_different_chains(upstream_factory, sidecar_factory, port):
    async def down(request):
        return web.Response(status=503)
    async def backup_handler(request):
        return web.Response(text="premium backup")
    primary = await upstream_factory(down)
    backup = await upstream_factory(backup_handler)
    await sidecar_factory(primary_backup(port, primary.url, backup.url, """
      - name: premium
        match: {path_prefix: /search, headers: [{name: x-tenant-plan, exact: premium}]}
        upstream: primary
        fallback: {when: [5xx], targets: [{upstream: backup}]}
      - name: free
        match: {path_prefix: /search}
        upstream: primary
        fallback: {when: [5xx], targets: [{static: {status: 200, body: "cached results only"}}]}
"""))
    async with aiohttp.ClientSession() as s:
        url = f"http://127.0.0.1:{port['reverse']}/search?q=x"
        async with s.get(url, headers={"x-tenant-plan": "premium"}) as r:
            assert await r.text() == "premium backup"
            assert r.headers["x-sidecar-route"] == "premium"
        async with s.get(url, headers={"x-tenant-plan": "free"}) as r:
            assert await r.text() == "cached results only"
            assert r.headers["x-sidecar-route"] == "free"
    assert backup.hits == 1


async def test_failover_on_response_content(upstream_factory, sidecar_factory, port):
    async def overloaded(request):
        return web.json_response({"type": "error", "error": {"type": "overloaded_error"}})
    async def healthy(request):
        return web.json_response({"type": "message", "content": "fine"})
    primary = await upstream_factory(overloaded)
    backup = await upstream_factory(healthy)
    await sidecar_factory(primary_backup(port, primary.url, backup.url, """
      - name: messages
        match: {path_prefix: /}
        upstream: primary
        fallback:
          when: [5xx, {json: "error.type", equals: overloaded_error}]
          targets: [{upstream: backup}]
"""))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{port['reverse']}/v1/messages", json={"x": 1}) as r:
            assert r.status == 200
            assert (await r.json())["content"] == "fine"
            assert r.headers["x-sidecar-upstream"] == "backup"
    assert primary.hits == 1 and backup.hits == 1
