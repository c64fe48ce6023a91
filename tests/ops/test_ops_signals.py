"""The real `sidecar run` as a child process: SIGHUP reloads; SIGTERM drains (readiness 503 on the health
port, listeners closed, the in-flight request finishes, exit 0); a second SIGTERM exits at once; the drain
timeout bounds a request that never finishes."""
import asyncio
import signal
import time

import aiohttp
import pytest
from aiohttp import web

from ops_support import SidecarProcess, eventually, get, policy, write

START_WITHIN = 20.0          # a cold interpreter importing aiohttp, OpenTelemetry, prometheus_client


@pytest.fixture
def sidecar_process(tmp_path):
    started: list[SidecarProcess] = []

    def launch(path, *extra):
        proc = SidecarProcess(path, tmp_path / f"sidecar-{len(started)}.log", *extra)
        started.append(proc)
        return proc
    yield launch
    for proc in started:
        proc.kill()


@pytest.fixture
def gate():
    """Upstream requests wait on this event; it is set at teardown so no handler outlives the test."""
    event = asyncio.Event()
    yield event
    event.set()


async def status_of(port: int, path: str) -> int:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}{path}") as r:
            return r.status


async def _is(awaitable, expected) -> bool:
    return await awaitable == expected


async def wait_ready(proc: SidecarProcess, ports) -> None:
    async def ready():
        if proc.proc.poll() is not None:
            raise AssertionError(f"sidecar exited with {proc.proc.returncode}:\n{proc.log()}")
        return await status_of(ports["health"], "/readyz") == 200
    await eventually(ready, timeout=START_WITHIN, interval=0.1, what="the sidecar to be ready")


async def refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


async def slow_setup(tmp_path, upstream_factory, sidecar_process, ports, gate, *extra):
    async def slow(request):
        await gate.wait()
        return web.Response(text="finished after the drain began")
    up = await upstream_factory(slow, name="slow")
    path = write(tmp_path / "policy.yaml", policy(ports, {"a": up}))
    proc = sidecar_process(path, *extra)
    await wait_ready(proc, ports)
    in_flight = asyncio.create_task(get(ports["api"], "/slow"))
    await eventually(lambda: up.hits == 1, what="the request to reach the upstream")
    return proc, in_flight


async def test_sigterm_drains_the_request_in_flight_then_exits_0(tmp_path, upstream_factory, sidecar_process,
                                                                  ports, gate):
    proc, in_flight = await slow_setup(tmp_path, upstream_factory, sidecar_process, ports, gate,
                                       "--drain-timeout", "30")
    proc.signal(signal.SIGTERM)
    # readiness fails on the health port (where the kubelet probes) and on the admin port
    await eventually(lambda: _is(status_of(ports["health"], "/readyz"), 503), what="/readyz 503 on the health port")
    assert await status_of(ports["admin"], "/readyz") == 503
    assert await status_of(ports["health"], "/healthz") == 200      # alive, just not ready
    assert await refused(ports["api"])                               # listeners stop accepting
    assert not in_flight.done() and proc.proc.poll() is None

    gate.set()
    code, headers, body = await asyncio.wait_for(in_flight, 10)
    assert (code, body, headers["x-sidecar-upstream"]) == (200, "finished after the drain began", "a")
    assert await proc.wait_exit(10) == 0
    assert "drained" in proc.log()


async def test_second_sigterm_exits_at_once(tmp_path, upstream_factory, sidecar_process, ports, gate):
    proc, in_flight = await slow_setup(tmp_path, upstream_factory, sidecar_process, ports, gate,
                                       "--drain-timeout", "60")
    proc.signal(signal.SIGTERM)
    await eventually(lambda: _is(status_of(ports["health"], "/readyz"), 503), what="draining")
    started = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert await proc.wait_exit(5) == 0
    assert time.monotonic() - started < 5                            # not the 60 s drain
    assert "second SIGTERM" in proc.log()
    with pytest.raises(aiohttp.ClientError):                         # the request was cut, not answered
        await asyncio.wait_for(in_flight, 10)


async def test_drain_timeout_bounds_a_request_that_never_finishes(tmp_path, upstream_factory, sidecar_process,
                                                                   ports, gate):
    proc, in_flight = await slow_setup(tmp_path, upstream_factory, sidecar_process, ports, gate,
                                       "--drain-timeout", "1")
    started = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert await proc.wait_exit(10) == 0
    assert time.monotonic() - started < 6
    try:
        code, _, _ = await asyncio.wait_for(in_flight, 10)
    except aiohttp.ClientError:
        code = None                                                  # cut: the drain timeout ran out
    assert code != 200


async def test_sighup_reloads_the_policy(tmp_path, upstream_factory, sidecar_process, ports):
    a = await upstream_factory(name="a")
    b = await upstream_factory(name="b")
    path = write(tmp_path / "policy.yaml", policy(ports, {"a": a, "b": b}))
    proc = sidecar_process(path)
    await wait_ready(proc, ports)
    assert (await get(ports["api"], "/x"))[2] == "hello from a"

    # The file watcher sees the same edit within a second; SIGHUP sent right after the write nearly
    # always wins. If the watcher got there first, edit again and signal again.
    for attempt, target in enumerate(["b", "a", "b"]):
        write(path, policy(ports, {"a": a, "b": b}, main=target, main_extra=f"timeout: {attempt + 5}s"))
        proc.signal(signal.SIGHUP)
        await eventually(lambda: get(ports["api"], "/x"), what="the sidecar to answer")

        async def switched(target=target):
            return (await get(ports["api"], "/x"))[2] == f"hello from {target}"
        await eventually(switched, timeout=5, what=f"the route to move to {target}")
        if proc.log().count("policy reloaded (SIGHUP)") > 0:
            break
    assert "policy reloaded (SIGHUP)" in proc.log(), proc.log()
    assert proc.proc.poll() is None                                  # SIGHUP does not stop the process
    proc.signal(signal.SIGTERM)
    assert await proc.wait_exit(10) == 0



async def test_workers_all_apply_a_reload_that_adds_a_listener(tmp_path, upstream_factory, sidecar_process,
                                                               ports):
    """`--workers 2`: each process watches the file; a new listener is bound with SO_REUSEPORT in every
    one of them, so no process refuses the change and all serve the new policy."""
    a = await upstream_factory(name="a")
    b = await upstream_factory(name="b")
    path = write(tmp_path / "policy.yaml", policy(ports, {"a": a, "b": b}))
    proc = sidecar_process(path, "--workers", "2")
    await wait_ready(proc, ports)
    write(path, policy(ports, {"a": a, "b": b}, main="b",
                       extra_listeners=f"- {{name: api2, mode: reverse, port: {ports['api2']}, upstream: b}}"))

    def both_reloaded():
        return proc.log().count("policy reloaded (file)") + proc.log().count("policy reloaded (SIGHUP)") >= 2
    try:
        await eventually(both_reloaded, timeout=10, what="both workers to reload")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; log:\n{proc.log()}") from None
    assert "rejected" not in proc.log(), proc.log()
    # fresh connections are spread over both processes by the kernel: every one answers the new way
    for port in (ports["api"], ports["api2"]) * 8:
        assert (await get(port, "/x"))[2] == "hello from b"
    proc.signal(signal.SIGTERM)
    assert await proc.wait_exit(15) == 0
