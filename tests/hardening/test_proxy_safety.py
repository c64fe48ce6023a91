"""Proxy-mode safety: the proxy listener refuses the sidecar's own ports and link-local / cloud metadata
addresses, in every spelling and behind a host name, unless a route says `allow_internal: true`;
`unmatched: deny` answers 403 with a JSON reason; mutating admin endpoints answer loopback only.
No test here sends a packet anywhere but loopback: refusals happen before any connection."""
import asyncio
import fcntl
import socket
import struct
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from sidecar.admin.app import admin_app
from sidecar.admin.events import EventHub
from sidecar.transport import egress

from .kit import assert_healthy, exchange, get, policy_text, read_answer


def proxied(url: str) -> bytes:
    return get(url, host="ignored.example")


OWN_PORT_SPELLINGS = ["127.0.0.1", "localhost", "LOCALHOST.", "api.localhost", "[::1]", "0.0.0.0", "[::]",
                      "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "127.1", "2130706433", "0x7f.1", "127.0.0.2"]
METADATA_SPELLINGS = ["169.254.169.254", "169.254.169.254.", "[::ffff:169.254.169.254]", "[::ffff:a9fe:a9fe]",
                      "0xa9.0xfe.0xa9.0xfe", "2852039166", "0251.0376.0251.0376", "169.254.0.1",
                      "[fd00:ec2::254]", "[FD00:EC2:0:0::254]"]


@pytest.mark.parametrize("host", OWN_PORT_SPELLINGS)
@pytest.mark.parametrize("which", ["admin", "proxy", "health"])
async def test_own_ports_are_refused_in_every_spelling(sidecar, ports, upstream, host, which):
    port = getattr(ports, which)
    answer = await exchange(ports.proxy, proxied(f"http://{host}:{port}/status"), close_wait=0)
    assert answer.status == 403, answer
    assert answer.headers["content-type"] == "application/json"
    assert "allow_internal" in answer.json()["error"]
    await assert_healthy(sidecar, ports, upstream.url)


@pytest.mark.parametrize("host", METADATA_SPELLINGS)
async def test_metadata_addresses_are_refused_in_every_spelling(sidecar, ports, host):
    answer = await exchange(ports.proxy, proxied(f"http://{host}/latest/meta-data/"), close_wait=0)
    assert answer.status == 403, answer
    assert "link-local" in answer.json()["error"]


async def test_loopback_services_that_are_not_the_sidecar_stay_reachable(sidecar, ports, upstream):
    for host in ("127.0.0.1", "localhost", "[::ffff:127.0.0.1]"):
        answer = await exchange(ports.proxy, proxied(f"http://{host}:{upstream.port}/fine"), close_wait=0)
        assert answer.status == 200, (host, answer)


class FakeResolver:
    """Stands in for DNS: names that resolve to metadata or to loopback."""
    names = {"metadata.test": "169.254.169.254", "me.test": "127.0.0.1"}

    def __init__(self, *args, **kwargs):
        pass

    async def resolve(self, host, port=0, family=socket.AF_INET):
        addr = self.names.get(host)
        if addr is None:
            raise OSError(f"{host}: no such name")
        return [{"hostname": host, "host": addr, "port": port, "family": socket.AF_INET, "proto": 0, "flags": 0}]

    async def close(self):
        pass


@pytest.fixture
def fake_dns(monkeypatch):
    monkeypatch.setattr(egress, "DefaultResolver", FakeResolver)


async def test_host_names_resolving_to_internal_addresses_are_refused(fake_dns, sidecar, ports, upstream):
    answer = await exchange(ports.proxy, proxied("http://metadata.test/latest/meta-data/"), close_wait=0)
    assert answer.status in (502, 503) and "link-local" in answer.json()["error"]
    answer = await exchange(ports.proxy, proxied(f"http://me.test:{ports.admin}/status"), close_wait=0)
    assert answer.status in (502, 503) and "the sidecar itself" in answer.json()["error"]
    # The same name on a port that is not the sidecar's resolves and connects: the guard is not a wall.
    answer = await exchange(ports.proxy, proxied(f"http://me.test:{upstream.port}/named"), close_wait=0)
    assert answer.status == 200 and upstream.seen[-1]["path"] == "/named"


async def test_allow_internal_route_may_reach_the_admin_port(sidecar_factory, ports, upstream):
    sc = await sidecar_factory(policy_text(ports, upstream.url, """
        routes:
          - name: ops
            match: {host: 127.0.0.1}
            allow_internal: true
        """))
    answer = await exchange(ports.proxy, proxied(f"http://127.0.0.1:{ports.admin}/healthz"), close_wait=0)
    assert answer.status == 200 and answer.json() == {"status": "ok"}
    # ...while the same port by another spelling, matching no allowing route, is still refused
    answer = await exchange(ports.proxy, proxied(f"http://localhost:{ports.admin}/healthz"), close_wait=0)
    assert answer.status == 403
    await assert_healthy(sc, ports, upstream.url)


def _local_addresses() -> list[str]:
    """This machine's non-loopback IPv4 addresses, read with SIOCGIFADDR (no traffic)."""
    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
            addr = socket.inet_ntoa(packed[20:24])
            if not addr.startswith("127."):
                found.append(addr)
    return found


async def test_the_sidecar_on_its_own_pod_ip_is_refused(sidecar, ports):
    addresses = _local_addresses()
    if not addresses:
        pytest.skip("no non-loopback address on this machine")
    for addr in addresses:
        answer = await exchange(ports.proxy, proxied(f"http://{addr}:{ports.proxy}/loop"), close_wait=0)
        assert answer.status == 403 and "the sidecar itself" in answer.json()["error"]


async def connect(port: int, authority: str) -> tuple:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    return reader, writer


@pytest.mark.parametrize("authority", ["127.0.0.1:{admin}", "localhost:{admin}", "[::ffff:7f00:1]:{admin}",
                                       "0.0.0.0:{proxy}", "169.254.169.254:80", "[fd00:ec2::254]:443",
                                       "0xa9.0xfe.0xa9.0xfe:80"])
async def test_connect_tunnels_to_internal_targets_are_refused(sidecar, ports, upstream, authority):
    reader, writer = await connect(ports.proxy, authority.format(admin=ports.admin, proxy=ports.proxy))
    answer = await read_answer(reader, close_wait=0)
    writer.close()
    assert answer.status == 403 and "allow_internal" in answer.json()["error"]
    await assert_healthy(sidecar, ports, upstream.url)


async def test_connect_via_a_name_resolving_inside_is_refused(monkeypatch, sidecar, ports):
    loop = asyncio.get_running_loop()

    async def fake_getaddrinfo(host, port, **kwargs):
        assert host == "inside.test"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", port))]
    monkeypatch.setattr(loop, "getaddrinfo", fake_getaddrinfo)
    reader, writer = await connect(ports.proxy, "inside.test:80")
    answer = await read_answer(reader, close_wait=0)
    writer.close()
    assert answer.status == 403 and "resolves to" in answer.json()["error"]


async def test_connect_to_an_ordinary_target_still_tunnels(sidecar, ports, upstream):
    reader, writer = await connect(ports.proxy, f"127.0.0.1:{upstream.port}")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    writer.write(get("/through-tunnel"))
    answer = await read_answer(reader, close_wait=0)
    writer.close()
    assert answer.status == 200 and upstream.seen[-1]["path"] == "/through-tunnel"


async def test_unmatched_deny_answers_403_with_a_json_reason(sidecar_factory, ports, upstream):
    sc = await sidecar_factory(policy_text(ports, upstream.url, """
        unmatched: deny
        routes:
          - name: allowed
            match: {host: 127.0.0.1, path_prefix: /allowed/}
        """))
    answer = await exchange(ports.proxy, proxied(f"{upstream.url}/elsewhere"), close_wait=0)
    assert answer.status == 403
    assert answer.headers["content-type"] == "application/json"
    doc = answer.json()
    assert doc["decisions"] == ["unmatched_denied"] and "no route matches" in doc["error"]
    assert upstream.seen == []
    answer = await exchange(ports.proxy, proxied(f"{upstream.url}/allowed/x"), close_wait=0)
    assert answer.status == 200
    reader, writer = await connect(ports.proxy, "example.invalid:443")
    tunnel = await read_answer(reader, close_wait=0)
    writer.close()
    assert tunnel.status == 403 and tunnel.json()["error"]
    assert sc.runtime.status()["ready"]


async def test_every_mutating_admin_endpoint_refuses_non_loopback_callers(sidecar):
    """Built from the real admin app: any route that is not a GET/HEAD must answer 403 to a peer that
    is not loopback, so an endpoint added later without the check fails here."""
    app = admin_app(sidecar.runtime, sidecar.metrics, EventHub())
    mutating = [r for r in app.router.routes() if r.method not in ("GET", "HEAD")]
    assert mutating, "expected at least POST /reload"
    reloads_before = dict(sidecar.runtime.reloads)
    for route in mutating:
        for peer in ("192.0.2.10", "::ffff:192.0.2.10", "10.0.0.1"):
            transport = mock.Mock()
            transport.get_extra_info.side_effect = lambda key, default=None, p=peer: (
                (p, 4321) if key == "peername" else default)
            path = route.resource.canonical if route.resource is not None else "/"
            request = make_mocked_request(route.method, path, transport=transport, app=app)
            response = await route.handler(request)
            assert isinstance(response, web.Response) and response.status == 403, (route, peer)
    assert sidecar.runtime.reloads == reloads_before


async def test_a_queued_passthrough_write_keeps_the_guard_when_delivered_later(monkeypatch, fake_dns, tmp_path,
                                                                               sidecar_factory, ports, upstream):
    """A write refused by the guard and then queued must not get through from the queue either: it
    waits (and fails) instead of reaching the sidecar's own health port."""
    import aiohttp.connector
    monkeypatch.setattr(aiohttp.connector, "DefaultResolver", FakeResolver)   # unguarded pools too
    text = policy_text(ports, upstream.url, f"""
        state_dir: {tmp_path / "state"}
        routes:
          - name: writes
            match: {{host: me.test, methods: [POST]}}
            retry: {{max_retries: 0}}
            queue: {{when: [retries-exhausted, connect-failure], max_age: 1h}}
        """)
    first = await sidecar_factory(text)
    raw = (f"POST http://me.test:{ports.health}/healthz HTTP/1.1\r\nHost: me.test\r\n"
           "Content-Length: 2\r\n\r\n{}").encode()
    answer = await exchange(ports.proxy, raw, close_wait=0)
    assert answer.status == 202, answer
    # A restart: the write is delivered from disk by a worker that no request started.
    await first.stop()
    second = await sidecar_factory(text)
    await asyncio.sleep(1.0)                          # deliveries were tried (and refused) meanwhile
    stats = second.runtime.queue.stats()["by_route"]["writes"]
    assert stats["depth"] == 1 and stats["delivered"] == 0, stats
    assert (await second.runtime.queue.listing())["items"][0]["last_error"] == "connect-failure"
