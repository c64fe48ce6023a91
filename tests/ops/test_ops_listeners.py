"""Listener changes on reload: applied whole, or refused whole with the old listeners still serving.

A listener whose address (bind, port) stays keeps its socket and takes its new settings in place; a new
address is bound before anything else changes, and if any bind fails nothing of the new policy applies.
"""
import asyncio
import socket

import aiohttp
import pytest
from aiohttp import web

from ops_support import admin_json, admin_text, eventually, get, metric, policy, reload_via_admin, write


@pytest.fixture
def busy_port():
    """A port another process might hold: a listening socket on 127.0.0.1."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s
    s.close()


def listener(name, port, upstream="a", mode="reverse", bind=None):
    where = f", bind: {bind}" if bind else ""
    up = f", upstream: {upstream}" if mode == "reverse" else ""
    return f"- {{name: {name}, mode: {mode}, port: {port}{where}{up}}}"


async def refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


async def test_new_listener_on_a_busy_port_refuses_the_whole_reload(tmp_path, upstream_factory, run_sidecar,
                                                                    ports, busy_port):
    a = await upstream_factory(name="a")
    b = await upstream_factory(name="b")
    path = write(tmp_path / "policy.yaml", policy(ports, {"a": a, "b": b}))
    sc = await run_sidecar(path, watch=False)
    v1 = sc.runtime.policy.digest
    taken = busy_port.getsockname()[1]

    # one new listener can bind, one cannot, and the route changes too: none of it may apply
    write(path, policy(ports, {"a": a, "b": b}, main="b",
                       extra_listeners=f"{listener('ok', ports['api2'])}\n{listener('clash', taken)}"))
    code, doc = await reload_via_admin(ports)
    assert code == 400 and doc["reloaded"] is False and doc["version"] == v1
    assert f"{path}:1:1: listener change refused" in doc["error"]
    assert str(taken) in doc["error"] and "address already in use" in doc["error"]

    code, headers, body = await get(ports["api"], "/x")            # old listener, old route
    assert (code, body, headers["x-sidecar-upstream"]) == (200, "hello from a", "a")
    assert await refused(ports["api2"])                            # the one that could bind was let go
    status = await admin_json(ports["admin"])
    assert [lst["name"] for lst in status["listeners"]] == ["api"]
    assert status["policy"]["version"] == v1 and "address already in use" in status["policy"]["last_reload_error"]
    assert metric(await admin_text(ports["admin"]), "sidecar_config_reloads_total", result="failure") == 1.0

    # once the port is free the same file applies whole
    busy_port.close()
    code, doc = await reload_via_admin(ports)
    assert code == 200 and doc["reloaded"], doc
    for port in (ports["api"], ports["api2"], taken):
        assert (await get(port, "/x"))[2] == "hello from b"
    assert (await admin_json(ports["admin"]))["policy"]["last_reload_error"] is None


async def test_listener_moving_to_a_busy_port_keeps_the_old_one_serving(tmp_path, upstream_factory, run_sidecar,
                                                                        ports, busy_port):
    a = await upstream_factory(name="a")
    path = write(tmp_path / "policy.yaml", policy(ports, {"a": a}))
    sc = await run_sidecar(path, watch=False)
    moved = dict(ports, api=busy_port.getsockname()[1])
    write(path, policy(moved, {"a": a}))
    code, doc = await reload_via_admin(ports)
    assert code == 400 and "address already in use" in doc["error"]
    assert (await get(ports["api"], "/x"))[2] == "hello from a"

    busy_port.close()
    code, doc = await reload_via_admin(ports)
    assert code == 200 and doc["reloaded"], doc
    assert (await get(moved["api"], "/x"))[2] == "hello from a"
    await eventually(lambda: refused(ports["api"]), what="the old port to be closed")
    assert [(lst["name"], lst["port"]) for lst in sc.runtime.status()["listeners"]] == [("api", moved["api"])]


async def test_listener_settings_change_in_place_on_the_same_socket(tmp_path, upstream_factory, run_sidecar,
                                                                    ports):
    a = await upstream_factory(name="a")
    b = await upstream_factory(name="b")
    path = write(tmp_path / "policy.yaml", policy(ports, {"a": a, "b": b}, main="b"))
    sc = await run_sidecar(path, watch=False)
    # a reverse listener points at a (the route, not the listener, picks who answers: b)
    code, headers, _ = await get(ports["api"], "/x")
    assert (code, headers["x-sidecar-upstream"]) == (200, "b")
    sockets_before = [srv for _, _, srv in sc.runtime._servers.values()]

    # same port: the listener becomes a forward proxy; no new socket is needed, so it applies
    ups = {"a": a, "b": b}
    text = policy(ports, ups, main="b").replace(
        f"{{name: api, mode: reverse, port: {ports['api']}, upstream: a}}",
        f"{{name: egress, mode: proxy, port: {ports['api']}}}")
    write(path, text)
    code, doc = await reload_via_admin(ports)
    assert code == 200 and doc["reloaded"], doc
    assert [srv for _, _, srv in sc.runtime._servers.values()] == sockets_before
    code, _, body = await get(ports["api"], "/x")                 # origin-form: not for a forward proxy
    assert code == 400 and "absolute-form" in body
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{a.url}/via-proxy", proxy=f"http://127.0.0.1:{ports['api']}") as r:
            assert r.status == 200 and r.headers["x-sidecar-route"] == "main"
    assert [lst["name"] for lst in sc.runtime.status()["listeners"]] == ["egress"]


async def test_removed_listener_stops_accepting_but_finishes_its_request(tmp_path, upstream_factory,
                                                                         run_sidecar, ports):
    release = asyncio.Event()

    async def slow(request):
        await release.wait()
        return web.Response(text="finished")
    a = await upstream_factory(slow, name="a")
    path = write(tmp_path / "policy.yaml", policy(ports, {"a": a}, extra_listeners=listener("api2", ports["api2"])))
    await run_sidecar(path, watch=False)
    in_flight = asyncio.create_task(get(ports["api2"], "/slow"))
    await eventually(lambda: a.hits == 1, what="the request to reach the upstream")
    write(path, policy(ports, {"a": a}))                          # api2 is gone
    code, doc = await reload_via_admin(ports)
    assert code == 200 and doc["reloaded"], doc
    await eventually(lambda: refused(ports["api2"]), what="the removed listener to stop accepting")
    release.set()
    code, _, body = await asyncio.wait_for(in_flight, 10)
    assert (code, body) == (200, "finished")


async def test_changes_that_need_a_restart_are_refused_clearly(tmp_path, upstream_factory, run_sidecar, ports):
    a = await upstream_factory(name="a")
    path = write(tmp_path / "policy.yaml", policy(ports, {"a": a}))
    sc = await run_sidecar(path, watch=False)
    v1 = sc.runtime.policy.digest
    cases = {
        # the admin API and the health port are the way in for the operator and the kubelet
        "admin and health endpoints change only on restart":
            policy(dict(ports, admin=ports["extra"]), {"a": a}),
        # 127.0.0.1:P -> 0.0.0.0:P: the kernel will not bind the second while the first listens
        "on the same port needs a restart":
            policy(ports, {"a": a}).replace(f"port: {ports['api']}, upstream: a}}",
                                            f"port: {ports['api']}, bind: 0.0.0.0, upstream: a}}"),
    }
    for expected, text in cases.items():
        write(path, text)
        code, doc = await reload_via_admin(ports)
        assert code == 400 and expected in doc["error"], doc
        assert sc.runtime.policy.digest == v1
        assert (await get(ports["api"], "/x"))[2] == "hello from a"
