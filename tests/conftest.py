"""Fixtures shared across the test suite: real upstreams and sidecars on loopback, real OTLP receivers.

`tests/` is on sys.path (no __init__.py here), so any test can `from harness import ...`.
"""
import pytest

from harness import Upstream, ports, start_sidecar, stopped_after

# Real OTLP receivers on loopback (HTTP and gRPC), for any test that asserts on exported traces.
from telemetry.receivers import otlp_grpc_receiver, otlp_http_receiver  # noqa: F401,E402 - fixtures


@pytest.fixture
async def upstream_factory():
    async with stopped_after(lambda handler, **kwargs: Upstream(handler, **kwargs).start()) as make:
        yield make


@pytest.fixture
async def sidecar_factory(tmp_path):
    async with stopped_after(lambda text, **kwargs: start_sidecar(tmp_path, text, **kwargs)) as make:
        yield make


@pytest.fixture
def port():
    return ports()
