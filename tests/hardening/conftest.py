import pytest

from .kit import EchoUpstream, Ports, RawUpstream, policy_text, start_sidecar


@pytest.fixture
def ports() -> Ports:
    return Ports()


@pytest.fixture
async def upstream():
    up = await EchoUpstream().start()
    yield up
    await up.stop()


@pytest.fixture
async def raw_upstream_factory():
    started: list[RawUpstream] = []

    async def make(script) -> RawUpstream:
        up = await RawUpstream(script).start()
        started.append(up)
        return up
    yield make
    for up in started:
        await up.stop()


@pytest.fixture
async def sidecar_factory(tmp_path):
    started = []

    async def make(text: str):
        sc = await start_sidecar(tmp_path, text)
        started.append(sc)
        return sc
    yield make
    for sc in started:
        await sc.stop()


@pytest.fixture
async def sidecar(sidecar_factory, ports, upstream):
    """Proxy and reverse listeners in front of the echo upstream, default limits."""
    return await sidecar_factory(policy_text(ports, upstream.url))
