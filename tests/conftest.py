"""
Shared fixtures: a real Pushie daemon on port 0 in this process, real clients
(Autobahn WebSocket, treq over a private connection pool), and a check after
every test that no connection, listening port or delayed call is left behind.
"""

from __future__ import annotations

import pytest_twisted

from tests.helpers import Daemon, assert_reactor_clean, start_daemon


@pytest_twisted.async_yield_fixture
async def make_daemon():
    """Start daemons with given settings; all are stopped and checked at the end."""
    started: list[Daemon] = []

    async def make(**settings) -> Daemon:
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
