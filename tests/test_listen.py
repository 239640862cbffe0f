"""
Listening (issue 12, A12 and A13): endpoints get a production backlog unless
they name one, and an endpoint that cannot listen fails start-up with one
clear line and no traceback.  The twistd processes themselves are in
test_daemon.py.
"""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.logger import globalLogPublisher

from pushie.config import Settings
from pushie.tap import ListenFailed, PushieService, with_backlog
from tests.helpers import start_daemon


@pytest.mark.parametrize(
    "description,expected",
    [
        ("tcp:8080", "tcp:8080:backlog=511"),
        ("tcp:8080:interface=127.0.0.1", "tcp:8080:interface=127.0.0.1:backlog=511"),
        ("TCP6:8080", "TCP6:8080:backlog=511"),
        ("ssl:443:privateKey=k.pem", "ssl:443:privateKey=k.pem:backlog=511"),
        ("unix:/run/p.sock", "unix:/run/p.sock:backlog=511"),
        ("tcp:8080:backlog=64", "tcp:8080:backlog=64"),
        ("tcp:8080:Backlog=64:interface=::1", "tcp:8080:Backlog=64:interface=::1"),
        ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
        ("unix:/tmp/a\\:backlog=1", "unix:/tmp/a\\:backlog=1:backlog=511"),  # an escaped colon: part of the path
    ],
)
def test_with_backlog(description, expected):
    assert with_backlog(description, 511) == expected


@pytest_twisted.ensureDeferred
async def test_listening_ports_have_the_backlog():
    daemon = await start_daemon(
        listen=["tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1:backlog=64"], listen_backlog=1024
    )
    try:
        assert [port.backlog for port in daemon.service.ports()] == [1024, 64]
    finally:
        await daemon.stop()
    daemon = await start_daemon()
    try:
        assert [port.backlog for port in daemon.service.ports()] == [511]
    finally:
        await daemon.stop()


@pytest_twisted.ensureDeferred
async def test_an_endpoint_that_cannot_listen_fails_startup_in_one_line():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    busy = holder.getsockname()[1]
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    settings = Settings.defaults().replace(listen=["tcp:0:interface=127.0.0.1", f"tcp:{busy}:interface=127.0.0.1"])
    service = PushieService(settings, reactor)
    try:
        with pytest.raises(ListenFailed) as raised:
            await service.startService()
        assert str(raised.value).startswith(f"Pushie could not listen on tcp:{busy}:interface=127.0.0.1: ")
    finally:
        globalLogPublisher.removeObserver(events.append)
        await service.stopService()
        holder.close()
    lines = [e for e in events if "could not" in str(e.get("reason", "")) + e.get("log_format", "")]
    assert len(lines) == 1, lines
    assert not [e for e in events if "log_failure" in e]
