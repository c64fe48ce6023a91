"""Fixtures shared across the test suite: real upstreams and sidecars on loopback, real OTLP receivers.

`tests/` is on sys.path (no __init__.py here), so any test can `from harness import ...`.
"""
import pytest

from harness import Upstream, ports, start_sidecar

# Real OTLP receivers on loopback (HTTP and gRPC), for any test that asserts on exported traces.
from telemetry.receivers import otlp_grpc_receiver, otlp_http_receiver  # noqa: F401,E402 - fixtures


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
