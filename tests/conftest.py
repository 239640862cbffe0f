"""
Shared fixtures: a real Pushie daemon on port 0 in this process, real clients
(Autobahn WebSocket, treq over a private connection pool), and a check after
every test that no connection, listening port or delayed call is left behind.
"""

from __future__ import annotations

import os

import pytest
import pytest_twisted

from tests.helpers import Daemon, assert_reactor_clean, start_daemon
from tests.redis_server import RedisServer, require_redis


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One redis-server for the session (tests that need their own start one)."""
    require_redis()
    server = RedisServer(str(tmp_path_factory.mktemp("redis")))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def second_redis_server(tmp_path_factory):
    """Another redis-server for the session: with redis_server, two Redis shards."""
    require_redis()
    server = RedisServer(str(tmp_path_factory.mktemp("redis2")))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of this test's own, which it may stop and start."""
    require_redis()
    server = RedisServer(str(tmp_path))
    server.start()
    yield server
    server.stop()


ENGINES = ["memory", "redis"] + (["shards"] if os.environ.get("PUSHIE_TEST_SHARDS") == "1" else [])
"""
The engines of the behaviour tests.  PUSHIE_TEST_SHARDS=1 adds a third run,
on two Redis shards (.ci/run does it for the modules of the publish and
subscribe paths, selected with -k shards).
"""


@pytest.fixture(params=ENGINES)
def engine(request):
    """
    The engine every daemon of a test runs on: each behaviour test runs
    against both (all three with PUSHIE_TEST_SHARDS=1), with the same assertions.
    """
    if request.param == "memory":
        return "memory"
    server = request.getfixturevalue("redis_server")
    server.cli("FLUSHALL")
    if request.param == "redis":
        return server.url
    second = request.getfixturevalue("second_redis_server")
    second.cli("FLUSHALL")
    return f"{server.url},{second.url}"


@pytest_twisted.async_yield_fixture
async def make_daemon(engine):
    """Start daemons with given settings; all are stopped and checked at the end."""
    started: list[Daemon] = []

    async def make(**settings) -> Daemon:
        settings.setdefault("engine", engine)
        daemon = await start_daemon(**settings)
        started.append(daemon)
        return daemon

    yield make

    for daemon in started:
        await daemon.stop()
    await assert_reactor_clean()


@pytest_twisted.async_yield_fixture
async def daemon(make_daemon):
    """One daemon with default settings (memory engine, open publishing)."""
    yield await make_daemon()


@pytest.fixture
def log_events():
    """Every log event emitted while the test runs (see test_hostile_input.assert_no_traceback)."""
    from twisted.logger import globalLogPublisher

    events: list = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)
