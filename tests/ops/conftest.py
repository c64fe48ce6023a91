import pytest

from harness import stopped_after
from ops_support import Upstream, free_port
from sidecar.app import start
from sidecar.policy.load import load_policy


@pytest.fixture
async def upstream_factory():
    async with stopped_after(lambda handler=None, name="up": Upstream(handler, name).start()) as make:
        yield make


@pytest.fixture
async def run_sidecar():
    """Start the sidecar in-process from a policy file (watcher on by default); stopped at teardown."""
    async with stopped_after(lambda path, *, watch=True: start(load_policy(str(path)), watch=watch)) as make:
        yield make


@pytest.fixture
def ports():
    return {name: free_port() for name in ("api", "api2", "admin", "health", "extra")}
