import pytest

from harness import stopped_after

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
    async with stopped_after(lambda script: RawUpstream(script).start()) as make:
        yield make


@pytest.fixture
async def sidecar_factory(tmp_path):
    async with stopped_after(lambda text: start_sidecar(tmp_path, text)) as make:
        yield make


@pytest.fixture
async def sidecar(sidecar_factory, ports, upstream):
    """Proxy and reverse listeners in front of the echo upstream, default limits."""
    return await sidecar_factory(policy_text(ports, upstream.url))
