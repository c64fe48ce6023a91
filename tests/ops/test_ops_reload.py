"""Policy reload (SPEC "Policy reload"): the file watcher (ConfigMap symlink swap, replaced file, in-place
edit), POST /reload, bad files rejected with their line, state carried over, in-flight requests kept on
their policy. The sidecar runs in-process against real upstreams on loopback."""
import asyncio
import logging
import os
import shutil
import subprocess

import aiohttp
import pytest
from aiohttp import web

from ops_support import (ConfigMapDir, admin_json, admin_text, eventually, get, metric, policy, reload_via_admin,
                         version_of, write)

RELOAD_WITHIN = 6.0          # the watcher polls every second; "within seconds"


async def test_configmap_symlink_swap_is_reloaded(tmp_path, upstream_factory, run_sidecar, ports):
    a = await upstream_factory(name="a")
    b = await upstream_factory(name="b")
    cm = ConfigMapDir(tmp_path / "config", policy(ports, {"a": a, "b": b}))
    sc = await run_sidecar(cm.path)
    v1 = version_of(await admin_json(ports["admin"]))
    assert (await get(ports["api"], "/x"))[2] == "hello from a"

    cm.swap(policy(ports, {"a": a, "b": b}, main="b"))

    async def switched():
        status = await admin_json(ports["admin"])
        return version_of(status) != v1 and status
    status = await eventually(switched, timeout=RELOAD_WITHIN, what="the ConfigMap swap to be reloaded")
    v2 = version_of(status)
    assert status["policy"]["last_reload_error"] is None
    assert status["policy"]["source"] == str(cm.path)            # the link, not the versioned dir
    code, headers, body = await get(ports["api"], "/x")
    assert (code, body, headers["x-sidecar-upstream"]) == (200, "hello from b", "b")
    metrics = await admin_text(ports["admin"])
    assert metric(metrics, "sidecar_config_reloads_total", result="success") == 1.0
    assert metric(metrics, "sidecar_policy_info", version=v2) == 1.0
    assert metric(metrics, "sidecar_policy_info", version=v1) is None
    reloaded = [d for d in sc.hub.recent if d["decision"] == "config_reloaded"]
    assert reloaded and v1 in reloaded[-1]["reason"] and v2 in reloaded[-1]["reason"]

    # a second swap, after the first version's directory is gone, is seen as well; it holds the first
    # version's bytes, so it is that version again (the version is a hash of the file)
    cm.swap(policy(ports, {"a": a, "b": b}, main="a"))
    await eventually(lambda: sc.runtime.policy.digest == v1, timeout=RELOAD_WITHIN, what="the second swap")
    assert (await get(ports["api"], "/x"))[2] == "hello from a"


async def test_replaced_file_and_in_place_edit_are_reloaded(tmp_path, upstream_factory, run_sidecar, ports):
    a = await upstream_factory(name="a")
    b = await upstream_factory(name="b")
    path = write(tmp_path / "policy.yaml", policy(ports, {"a": a, "b": b}))
    sc = await run_sidecar(path)
    first = sc.runtime.policy.digest
    assert (await get(ports["api"], "/x"))[2] == "hello from a"    # (the watcher is polling by now)

    # an editor's save: write a temporary file, rename it over the policy (a new inode)
    tmp = write(tmp_path / ".policy.yaml.swp", policy(ports, {"a": a, "b": b}, main="b"))
    os.replace(tmp, path)
    await eventually(lambda: sc.runtime.policy.digest != first, timeout=RELOAD_WITHIN, what="replaced file")
    assert (await get(ports["api"], "/x"))[2] == "hello from b"
    second = sc.runtime.policy.digest

    # `cat > policy.yaml`: same inode, new content
    inode = os.stat(path).st_ino
    write(path, policy(ports, {"a": a, "b": b}, main="a", main_extra="timeout: 7s"))
    assert os.stat(path).st_ino == inode
    await eventually(lambda: sc.runtime.policy.digest not in (first, second), timeout=RELOAD_WITHIN,
                     what="in-place edit")
    assert (await get(ports["api"], "/x"))[2] == "hello from a"


async def test_change_made_while_the_sidecar_starts_is_not_missed(tmp_path, upstream_factory, ports):
    """The file changes after it was read but before the watcher took its first look (listeners binding,
    a slow start): the watcher's first look catches up."""
    from sidecar.app import start
    from sidecar.policy.load import load_policy
    a = await upstream_factory(name="a")
    b = await upstream_factory(name="b")
    path = write(tmp_path / "policy.yaml", policy(ports, {"a": a, "b": b}))
    loaded = load_policy(str(path))
    write(path, policy(ports, {"a": a, "b": b}, main="b"))
    sc = await start(loaded, watch=True)
    try:
        await eventually(lambda: sc.runtime.policy.digest != loaded.digest, timeout=RELOAD_WITHIN,
                         what="the change made during start to be picked up")
        assert (await get(ports["api"], "/x"))[2] == "hello from b"
    finally:
        await sc.stop()


async def test_bad_file_is_rejected_with_its_line_and_old_policy_keeps_serving(
        tmp_path, otlp_http_receiver, upstream_factory, run_sidecar, ports, caplog, monkeypatch):
    # (the receiver is set up first so it outlives the sidecar: its last spans have somewhere to go)
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(var, raising=False)
    caplog.set_level(logging.INFO, logger="sidecar")
    a = await upstream_factory(name="a")
    good = policy(ports, {"a": a}, extra_top=f"""
        telemetry:
          traces: {{endpoint: "{otlp_http_receiver.traces_url}", protocol: http/protobuf, sample_ratio: 0.0}}
    """)
    path = write(tmp_path / "policy.yaml", good)
    sc = await run_sidecar(path)
    v1 = sc.runtime.policy.digest
    assert (await get(ports["api"], "/x"))[2] == "hello from a"    # (the watcher is polling by now)

    bad = good.replace("    match: {path_prefix: /}", "    match: {path_prefix: /}\n    tiemout: 5s")
    lines = bad.splitlines()
    line = next(i for i, text in enumerate(lines, 1) if "tiemout" in text)
    col = lines[line - 1].index("tiemout") + 1
    write(path, bad)

    async def rejected():
        st = await admin_json(ports["admin"])
        return st["policy"]["last_reload_error"] and st
    status = await eventually(rejected, timeout=RELOAD_WITHIN, what="the bad file to be rejected")
    error = status["policy"]["last_reload_error"]
    assert f"{path}:{line}:{col}:" in error, error
    assert "timeout" in error                                     # the "did you mean"
    assert version_of(status) == v1
    code, headers, body = await get(ports["api"], "/x")            # the old policy keeps answering
    assert (code, body, headers["x-sidecar-route"]) == (200, "hello from a", "main")

    metrics = await admin_text(ports["admin"])
    assert metric(metrics, "sidecar_config_reloads_total", result="failure") == 1.0
    assert metric(metrics, "sidecar_decisions_total", route="-", decision="config_rejected") == 1.0
    assert any(d["decision"] == "config_rejected" and f"{path}:{line}:{col}" in d["reason"]
               and d["policy_version"] == v1 for d in sc.hub.recent)
    logged = [r for r in caplog.records if r.levelno == logging.ERROR and "rejected" in r.getMessage()]
    assert logged and f"{path}:{line}:{col}" in logged[0].getMessage()
    for sink in sc.runtime.sink.sinks:
        if hasattr(sink, "force_flush"):
            sink.force_flush()
    [span] = await otlp_http_receiver.wait_for_spans_async(
        1, where=lambda s: s.attributes.get("sidecar.decision") == "config_rejected")
    assert f"{path}:{line}:{col}" in span.attributes["sidecar.reason"]
    assert span.attributes["sidecar.policy.version"] == v1

    # POST /reload of the same bad file: refused with the same error, still on v1
    code, doc = await reload_via_admin(ports)
    assert code == 400 and doc["reloaded"] is False and f"{path}:{line}:{col}" in doc["error"]
    assert doc["version"] == v1

    # the operator reverts: same bytes as the running version, so the error must clear
    write(path, good)
    await eventually(lambda: sc.runtime.last_reload_error is None, timeout=RELOAD_WITHIN,
                     what="the reverted file to clear the error")
    status = await admin_json(ports["admin"])
    assert version_of(status) == v1 and status["policy"]["last_reload_error"] is None


async def test_post_reload_applies_now_and_is_loopback_only(tmp_path, upstream_factory, run_sidecar, ports):
    a = await upstream_factory(name="a")
    b = await upstream_factory(name="b")
    path = write(tmp_path / "policy.yaml", policy(ports, {"a": a, "b": b}))
    sc = await run_sidecar(path, watch=False)
    v1 = sc.runtime.policy.digest
    write(path, policy(ports, {"a": a, "b": b}, main="b"))
    code, doc = await reload_via_admin(ports)
    assert code == 200 and doc["reloaded"] is True and doc["error"] is None
    assert doc["version"] == sc.runtime.policy.digest != v1
    assert (await get(ports["api"], "/x"))[2] == "hello from b"
    # unchanged file: a no-op that still answers 200 with the current version
    code, doc = await reload_via_admin(ports)
    assert code == 200 and doc["reloaded"] is True and doc["version"] == sc.runtime.policy.digest
    assert sc.runtime.reloads == {"success": 1, "failure": 0}
    # GET is not a reload, and the health port (reachable at the pod IP) has no /reload
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{ports['admin']}/reload") as r:
            assert r.status == 405
        async with s.post(f"http://127.0.0.1:{ports['health']}/reload") as r:
            assert r.status == 404
    assert sc.runtime.reloads == {"success": 1, "failure": 0}


def _non_loopback_ipv4() -> str | None:
    done = subprocess.run(["ip", "-o", "-4", "addr", "show", "scope", "global"], capture_output=True, text=True)
    for line in done.stdout.splitlines():
        return line.split()[3].split("/")[0]
    return None


async def test_post_reload_is_refused_from_a_non_loopback_peer(tmp_path, upstream_factory, run_sidecar, ports):
    address = shutil.which("ip") and _non_loopback_ipv4()
    if not address:
        pytest.skip("this host has no non-loopback IPv4 address to call the admin port from")
    a = await upstream_factory(name="a")
    text = policy(ports, {"a": a}).replace(f"admin: {{port: {ports['admin']}}}",
                                           f"admin: {{bind: 0.0.0.0, port: {ports['admin']}}}")
    path = write(tmp_path / "policy.yaml", text)
    sc = await run_sidecar(path, watch=False)
    write(path, text + "unmatched: deny\n")
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://{address}:{ports['admin']}/reload") as r:
            assert r.status == 403 and "loopback" in (await r.json())["error"]
    assert sc.runtime.reloads == {"success": 0, "failure": 0} and sc.runtime.policy.unmatched == "passthrough"


async def test_open_breaker_survives_a_reload_of_an_unrelated_route(tmp_path, upstream_factory, run_sidecar,
                                                                    ports):
    async def broken(request):
        return web.Response(status=500)
    a = await upstream_factory(broken, name="a")
    b = await upstream_factory(name="b")
    flaky = """
      - name: flaky
        match: {path_prefix: /flaky}
        upstream: a
        breaker: {consecutive_failures: 2, open_for: 5m}
    """
    path = write(tmp_path / "policy.yaml", policy(ports, {"a": a, "b": b}, main="b", extra_routes=flaky))
    await run_sidecar(path, watch=False)
    assert [(await get(ports["api"], "/flaky"))[0] for _ in range(2)] == [500, 500]
    code, headers, _ = await get(ports["api"], "/flaky")
    assert code == 503 and "breaker_open" in headers["x-sidecar-degraded"] and a.hits == 2

    # an unrelated route changes (its timeout): flaky's name and upstream are unchanged
    write(path, policy(ports, {"a": a, "b": b}, main="b", extra_routes=flaky, main_extra="timeout: 3s"))
    code, doc = await reload_via_admin(ports)
    assert code == 200 and doc["reloaded"], doc
    code, headers, _ = await get(ports["api"], "/flaky")
    assert code == 503 and "breaker_open" in headers["x-sidecar-degraded"]
    assert a.hits == 2                                            # still open: the upstream is spared
    routes = {r["name"]: r for r in (await admin_json(ports["admin"]))["routes"]}
    assert routes["flaky"]["breakers"]["a"]["state"] == "open"

    # the breaker's own policy may change too (same name and upstream): the state still carries over
    write(path, policy(ports, {"a": a, "b": b}, main="b",
                       extra_routes=flaky.replace("consecutive_failures: 2", "consecutive_failures: 3")))
    assert (await reload_via_admin(ports))[0] == 200
    assert (await get(ports["api"], "/flaky"))[0] == 503 and a.hits == 2

    # a route whose upstream changes starts afresh (a breaker is per route and upstream)
    write(path, policy(ports, {"a": a, "b": b}, main="b", extra_routes=flaky.replace("upstream: a", "upstream: b")))
    assert (await reload_via_admin(ports))[0] == 200
    code, headers, body = await get(ports["api"], "/flaky")
    assert (code, body, headers["x-sidecar-upstream"]) == (200, "hello from b", "b")


async def test_retry_budget_spent_survives_a_reload_of_an_unrelated_route(tmp_path, upstream_factory,
                                                                          run_sidecar, ports):
    async def broken(request):
        return web.Response(status=500)
    a = await upstream_factory(broken, name="a")
    b = await upstream_factory(name="b")
    flaky = """
      - name: flaky
        match: {path_prefix: /flaky}
        upstream: a
        retry:
          max_retries: 1
          when: [500]
          backoff: {base: 1ms, max: 2ms}
          budget: {ratio: 0.0, min_per_second: 0.1, window: 1m}
    """

    def budget(status):
        return next(r for r in status["routes"] if r["name"] == "flaky")["retry_budget_remaining"]
    path = write(tmp_path / "policy.yaml", policy(ports, {"a": a, "b": b}, main="b", extra_routes=flaky))
    await run_sidecar(path, watch=False)
    assert budget(await admin_json(ports["admin"])) == 6              # the floor: 0.1/s over a minute
    for _ in range(4):
        assert (await get(ports["api"], "/flaky"))[0] == 500
    assert a.hits == 8 and budget(await admin_json(ports["admin"])) == 2

    write(path, policy(ports, {"a": a, "b": b}, main="b", extra_routes=flaky, main_extra="timeout: 3s"))
    assert (await reload_via_admin(ports))[0] == 200
    assert budget(await admin_json(ports["admin"])) == 2              # not refilled by the reload
    for _ in range(3):
        await get(ports["api"], "/flaky")
    assert a.hits == 8 + 2 + 3                                        # two retries left, then none


async def test_cache_entries_survive_a_reload_of_an_unrelated_route(tmp_path, upstream_factory, run_sidecar,
                                                                    ports):
    c = await upstream_factory(name="c")
    b = await upstream_factory(name="b")
    cached = """
      - name: cached
        match: {path_prefix: /cached}
        upstream: c
        cache: {ttl: 5m}
    """
    path = write(tmp_path / "policy.yaml", policy(ports, {"c": c, "b": b}, main="b", api_upstream="b",
                                                   extra_routes=cached))
    await run_sidecar(path, watch=False)
    assert (await get(ports["api"], "/cached"))[0] == 200
    code, headers, _ = await get(ports["api"], "/cached")
    assert code == 200 and "hit" in headers.get("cache-status", "") and c.hits == 1

    write(path, policy(ports, {"c": c, "b": b}, main="b", api_upstream="b", extra_routes=cached,
                       main_extra="timeout: 3s"))
    assert (await reload_via_admin(ports))[0] == 200
    code, headers, body = await get(ports["api"], "/cached")
    assert (code, body) == (200, "hello from c")
    assert "hit" in headers.get("cache-status", "") and c.hits == 1


async def test_request_in_flight_finishes_under_the_policy_it_started_with(
        tmp_path, otlp_http_receiver, upstream_factory, run_sidecar, ports, monkeypatch):
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_SDK_DISABLED",
                "OTEL_TRACES_SAMPLER", "OTEL_SERVICE_NAME"):
        monkeypatch.delenv(var, raising=False)
    traced = f"""
        telemetry:
          traces: {{endpoint: "{otlp_http_receiver.traces_url}", protocol: http/protobuf, sample_ratio: 1.0}}
    """
    release = asyncio.Event()

    async def slow(request):
        await release.wait()
        return web.Response(text="late answer from a")
    a = await upstream_factory(slow, name="a")
    b = await upstream_factory(name="b")
    path = write(tmp_path / "policy.yaml", policy(ports, {"a": a, "b": b}, extra_top=traced))
    sc = await run_sidecar(path, watch=False)
    v1 = sc.runtime.policy.digest
    in_flight = asyncio.create_task(get(ports["api"], "/slow"))
    await eventually(lambda: a.hits == 1, what="the request to reach upstream a")

    # the new policy sends the route to b, drops upstream a altogether, and shortens the route timeout
    write(path, policy(ports, {"b": b}, main="b", api_upstream="b", main_extra="timeout: 250ms", extra_top=traced))
    code, doc = await reload_via_admin(ports)
    assert code == 200 and doc["reloaded"], doc
    v2 = doc["version"]
    code, headers, body = await get(ports["api"], "/new")         # new requests: the new policy
    assert (code, body, headers["x-sidecar-upstream"]) == (200, "hello from b", "b")
    assert not in_flight.done()
    await asyncio.sleep(0.5)          # longer than the new policy's timeout: the old one (15s) applies

    release.set()
    code, headers, body = await asyncio.wait_for(in_flight, 10)
    assert (code, body, headers["x-sidecar-upstream"]) == (200, "late answer from a", "a")
    assert "x-sidecar-degraded" not in headers
    assert a.hits == 1 and b.hits == 1

    # the spans say which policy each request ran under
    for sink in sc.runtime.sink.sinks:
        if hasattr(sink, "force_flush"):
            sink.force_flush()
    spans = await otlp_http_receiver.wait_for_spans_async(2, where=lambda s: s.name == "main")
    versions = {s.attributes["url.full"].rsplit("/", 1)[1]: s.attributes["sidecar.policy.version"] for s in spans}
    assert versions == {"slow": v1, "new": v2}


async def test_concurrent_reloads_do_not_trip_over_each_other(tmp_path, upstream_factory, run_sidecar, ports):
    a = await upstream_factory(name="a")
    path = write(tmp_path / "policy.yaml", policy(ports, {"a": a}))
    sc = await run_sidecar(path, watch=False)
    # the change adds a listener: each reload would bind it, so reloads must run one at a time
    write(path, policy(ports, {"a": a}, extra_listeners=f"- {{name: api2, mode: reverse, port: {ports['api2']}, "
                                                        "upstream: a}"))
    results = await asyncio.gather(*(reload_via_admin(ports) for _ in range(4)))
    assert all(code == 200 and doc["reloaded"] for code, doc in results), results
    assert sc.runtime.reloads == {"success": 1, "failure": 0}
    assert (await get(ports["api2"], "/x"))[2] == "hello from a"

