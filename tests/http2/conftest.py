import pytest

from grpc_kit import EchoServer
from harness import stopped_after


@pytest.fixture
async def grpc_server_factory():
    async with stopped_after(lambda behaviour=None: EchoServer(behaviour).start()) as make:
        yield make
