import pytest

from harness import Upstream, ports, start_sidecar


@pytest.fixture
async def upstream_factory():
    started: list[Upstream] = []

    async def make(handler, **kwargs) -> Upstream:
        up = await Upstream(handler, **kwargs).start()
        started.append(up)
        return up
    yield make
    for up in started:
        await up.stop()


@pytest.fixture
async def sidecar_factory(tmp_path):
    started = []

    async def make(text: str, **kwargs):
        sc = await start_sidecar(tmp_path, text, **kwargs)
        started.append(sc)
        return sc
    yield make
    for sc in started:
        await sc.stop()


@pytest.fixture
def port():
    return ports()
