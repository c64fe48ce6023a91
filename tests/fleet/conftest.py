import pytest

from cache.redis_server import RedisServer    # tests/cache/redis_server.py (tests/ is on sys.path)


@pytest.fixture(scope="module")
def redis_module():
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_module):
    redis_module.flush()
    return redis_module.url
