import pytest

from ops_support import Upstream, free_port
from sidecar.app import start
from sidecar.policy.load import load_policy


@pytest.fixture
async def upstream_factory():
    started: list[Upstream] = []

    async def make(handler=None, name: str = "up") -> Upstream:
        up = await Upstream(handler, name).start()
        started.append(up)
        return up
    yield make
    for up in started:
        await up.stop()


@pytest.fixture
async def run_sidecar():
    """Start the sidecar in-process from a policy file (watcher on by default); stopped at teardown."""
    started = []

    async def make(path, *, watch: bool = True):
        sc = await start(load_policy(str(path)), watch=watch)
        started.append(sc)
        return sc
    yield make
    for sc in started:
        await sc.stop()


@pytest.fixture
def ports():
    return {name: free_port() for name in ("api", "api2", "admin", "health", "extra")}
