"""DNS discovery against a real DNS server on loopback (dnslib, UDP): the answer is the endpoint set,
changes are followed, and an outage keeps the last good set (logged once)."""
import asyncio
import logging

import pytest

from dnsserver import DnsServer
from sidecar.policy.model import Upstream
from sidecar.transport.discovery import DnsDiscovery


@pytest.fixture
def dns():
    server = DnsServer()
    yield server
    server.stop()


def upstream(dns: DnsServer, host: str = "orders.test", refresh: float = 0.05) -> Upstream:
    return Upstream(name="orders", url=f"http://{host}:8080", scheme="http", host=host, port=8080,
                    discovery="dns", refresh=refresh, resolver=(dns.address,))


async def test_three_records_follow_changes_and_survive_an_outage(dns, caplog):
    dns.set("orders.test", ["127.0.0.3", "127.0.0.1", "127.0.0.2"])
    answers: list[list[str]] = []
    disc = DnsDiscovery(upstream(dns), answers.append)
    task = asyncio.create_task(disc.run())
    try:
        await asyncio.wait_for(disc.resolved.wait(), 10)
        assert answers == [["127.0.0.1", "127.0.0.2", "127.0.0.3"]]

        dns.set("orders.test", ["127.0.0.1", "127.0.0.3"])
        await _until(lambda: len(answers) == 2)
        assert answers[-1] == ["127.0.0.1", "127.0.0.3"]

        caplog.set_level(logging.WARNING, logger="sidecar.discovery")
        dns.silence()
        queries = dns.resolver.queries
        await _until(lambda: disc.failing and dns.resolver.queries >= queries + 2, timeout=30)
        assert disc.addresses == ["127.0.0.1", "127.0.0.3"] and len(answers) == 2   # the last set stays
        warnings = [r for r in caplog.records if r.name == "sidecar.discovery" and r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "keeping the last 2 endpoint(s)" in warnings[0].getMessage()

        dns.silence(False)
        dns.set("orders.test", ["127.0.0.2"])
        await _until(lambda: answers[-1] == ["127.0.0.2"], timeout=30)
        assert not disc.failing
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_an_empty_answer_keeps_the_last_set(dns):
    dns.set("orders.test", ["127.0.0.1"])
    answers = []
    disc = DnsDiscovery(upstream(dns), answers.append)
    await disc.refresh()
    dns.set("orders.test", [])
    await disc.refresh()
    assert disc.addresses == ["127.0.0.1"] and disc.failing and answers == [["127.0.0.1"]]


async def test_an_ip_literal_is_its_own_answer(dns):
    answers = []
    disc = DnsDiscovery(upstream(dns, host="127.0.0.9"), answers.append)
    await disc.refresh()
    assert answers == [["127.0.0.9"]] and dns.resolver.queries == 0


async def _until(cond, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):          # a hang guard only: the condition decides
        while not cond():
            await asyncio.sleep(0.02)


async def test_aaaa_records_are_endpoints_too(dns):
    from sidecar.transport.endpoints import dns_targets
    dns.set("orders.test", ["::1", "127.0.0.1"])
    answers = []
    up = upstream(dns)
    disc = DnsDiscovery(up, answers.append)
    await disc.refresh()
    assert answers == [["127.0.0.1", "::1"]]
    targets = {key: target for key, _, source, target in dns_targets(up, answers[0])}
    assert list(targets) == ["127.0.0.1:8080", "[::1]:8080"]
    v6 = targets["[::1]:8080"]
    assert str(v6.url("/x")) == "http://[::1]:8080/x" and v6.host_header == "orders.test:8080"


async def test_a_just_started_group_waits_for_dns_first_answer_and_no_longer_than_told(dns):
    """What a first request (live, or a queued delivery) waits on: right after start the set is empty
    until DNS answers; `first_answer` returns once it has (the set filled), and a wait cut short by
    its time returns quietly with the set still empty."""
    from sidecar.core.clock import SYSTEM_CLOCK
    from sidecar.transport.endpoints import EndpointRegistry

    class Sink:
        def decision(self, record):
            pass

    dns.set("orders.test", ["127.0.0.1", "127.0.0.2"])
    registry = EndpointRegistry(transport=None, sink=Sink(), clock=SYSTEM_CLOCK)
    registry.sync({"orders": upstream(dns)})
    registry.start()
    group = registry.get("orders")
    try:
        assert not group.set.endpoints                   # nothing known before DNS answers
        await group.first_answer(10.0)
        assert sorted(ep.key for ep in group.set.endpoints) == ["127.0.0.1:8080", "127.0.0.2:8080"]

        dns.silence()                                    # a name nobody answers for: the wait times out
        silent = EndpointRegistry(transport=None, sink=Sink(), clock=SYSTEM_CLOCK)
        silent.sync({"quiet": Upstream(name="quiet", url="http://quiet.test:8080", scheme="http",
                                       host="quiet.test", port=8080, discovery="dns", refresh=5.0,
                                       resolver=(dns.address,))})
        silent.start()
        try:
            await silent.get("quiet").first_answer(0.05)
            assert not silent.get("quiet").set.endpoints
        finally:
            silent.close()
    finally:
        registry.close()
