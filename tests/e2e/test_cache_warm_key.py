"""A warmed entry is found by the requests it is meant for, whatever listener or host they arrive with:
the cache key's URL is the upstream's view (`upstream://NAME/path?query`, as nginx keys on
`$proxy_host$request_uri`), and `sidecar explain` prints that same URL. Real upstream, real sidecar."""
import asyncio

import aiohttp
import yaml
from aiohttp import web

from sidecar.cli import main as cli


def policy(port, upstream_url):
    return f"""
    version: 1
    listeners:
      - {{name: egress, mode: proxy, port: {port['proxy']}}}
      - {{name: api, mode: reverse, port: {port['reverse']}, upstream: backup}}
    admin: {{port: {port['admin']}}}
    health: {{bind: 127.0.0.1, port: {port['health']}}}
    upstreams:
      backup: {{url: "{upstream_url}"}}
    routes:
      - name: w
        match: {{path_prefix: /w/}}
        upstream: backup
        cache: {{ttl: 10m, warm: [{{path: /w/catalog, every: 1h}}]}}
    """


async def catalog(request: web.Request) -> web.Response:
    return web.Response(text=f"catalog for {request.path_qs}")


async def eventually(predicate, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.01)


async def test_a_warmed_entry_is_hit_through_the_proxy_and_the_reverse_listener(upstream_factory,
                                                                                sidecar_factory, port):
    up = await upstream_factory(catalog)
    sc = await sidecar_factory(policy(port, up.url))
    await eventually(lambda: up.hits == 1)              # the warm fetch
    await sc.runtime.gen.states["w"].cache.drain()      # stored
    async with aiohttp.ClientSession() as s:
        # as an app calls a named upstream: absolute-form through HTTP_PROXY, under its public host name
        async with s.get("http://api.example.com/w/catalog", proxy=f"http://127.0.0.1:{port['proxy']}") as r:
            assert r.headers["cache-status"].startswith("sidecar; hit"), r.headers.get("cache-status")
            assert await r.text() == "catalog for /w/catalog"
        async with s.get(f"http://127.0.0.1:{port['reverse']}/w/catalog") as r:
            assert r.headers["cache-status"].startswith("sidecar; hit"), r.headers.get("cache-status")
    assert up.hits == 1


def test_explain_prints_the_url_the_cache_keys_on(tmp_path, capsys, port):
    path = tmp_path / "policy.yaml"
    path.write_text(policy(port, "http://127.0.0.1:9"))
    urls = set()
    for url in ("http://api.example.com/w/catalog", f"http://127.0.0.1:{port['reverse']}/w/catalog"):
        assert cli(["explain", "-c", str(path), "GET", url]) == 0
        urls.add(yaml.safe_load(capsys.readouterr().out)["cache_url"])
    assert urls == {"upstream://backup/w/catalog"}
