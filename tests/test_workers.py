"""
One Pushie per core (README, "Using every core"): twistd processes sharing one
port through the C{reuseport:} endpoint (SO_REUSEPORT), a Redis engine carrying
the publications between them.  Real twistd processes, a real redis-server,
real WebSocket and HTTP clients on the shared port; each worker's own
C{--metrics-listen} port says how many connections it holds.
"""

from __future__ import annotations

import json
import re

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.web.client import HTTPConnectionPool

from pushie.config import ConfigError, load_settings
from pushie.reuseport import ReusePortParser, shares_port
from tests.helpers import connect_ws, wait_for
from tests.redis_server import free_port
from tests.test_daemon import _listen_backlogs, spawn, stop

METRICS = re.compile(rb"Metrics endpoint \(/metrics only\) listening on \S+ \(([^)]*)\)")
CLIENTS = 40


def start_worker(port: int, engine: str):
    return spawn(
        [
            "-n",
            "--pidfile=",
            "pushie",
            "--listen",
            f"reuseport:{port}:interface=127.0.0.1",
            "--metrics-listen",
            "tcp:0:interface=127.0.0.1",
            "--engine",
            engine,
            "--max-connections-per-ip",
            "0",
        ]  # fmt: skip
    )


def metrics_port(proc) -> int:
    found = METRICS.search(proc.output)
    assert found, proc.output.decode()
    return int(found.group(1).rsplit(b":", 1)[1])


async def connections_of(proc, pool) -> int:
    """The worker's pushie_connections gauge, read from its own metrics port."""
    response = await treq.get(f"http://127.0.0.1:{metrics_port(proc)}/metrics", pool=pool)
    text = (await response.content()).decode()
    return int(float(re.search(r"^pushie_connections (\S+)$", text, re.M).group(1)))


async def publish(pool, port: int, data) -> dict:
    response = await treq.post(f"http://127.0.0.1:{port}/publish", json={"channel": "all", "data": data}, pool=pool)
    assert response.code == 200
    return json.loads(await response.content())


@pytest_twisted.ensureDeferred
async def test_two_workers_share_a_port_and_their_publications(own_redis):
    port = free_port()
    workers = [start_worker(port, own_redis.url) for _ in range(2)]
    pool = HTTPConnectionPool(reactor, persistent=False)
    clients = []
    try:
        for proc in workers:
            await wait_for(lambda p=proc: (p.addresses and METRICS.search(p.output)) or p.ended.called, timeout=20)
            assert proc.addresses, proc.output.decode()
            assert proc.port_of(f"reuseport:{port}:interface=127.0.0.1") == port
            await wait_for(lambda p=proc: b"Redis engine connected" in p.output, timeout=10)
        # The kernel spreads the connections over both processes' sockets.
        for _ in range(CLIENTS):
            client = await connect_ws(port, "/websocket?channel=all")
            await client.next_of("welcome")
            await client.next_of("subscribed")
            clients.append(client)
        held = [await connections_of(proc, pool) for proc in workers]
        assert sum(held) == CLIENTS and min(held) > 0, held
        # Each publish lands on one worker; every subscriber, on either, gets all of them, in order.
        offsets = [(await publish(pool, port, i))["offset"] for i in range(6)]
        assert offsets == sorted(offsets) and len(set(offsets)) == 6
        for client in clients:
            got = [await client.next_of("message") for _ in range(6)]
            assert [m["data"] for m in got] == list(range(6))
        # The default backlog applies to reuseport: listeners too (the kernel's word, when ss is there).
        try:
            backlogs = _listen_backlogs()
        except OSError:
            backlogs = {}
        if backlogs:
            assert backlogs[port] == 511

        # One worker dies: its clients lose their connection, the other keeps serving the port.
        killed, survivor = workers
        killed.transport.signalProcess("KILL")
        await killed.ended
        # Exactly its clients: the kernel resets their connections when the process goes.
        await wait_for(lambda: sum(c.closed.called for c in clients) >= held[0], timeout=10)
        lost = [c for c in clients if c.closed.called]
        assert len(lost) == held[0]
        await publish(pool, port, "after")
        newcomers = []
        for _ in range(10):
            client = await connect_ws(port, "/websocket?channel=all")
            await client.next_of("welcome")
            await client.next_of("subscribed")
            newcomers.append(client)
        clients += newcomers
        assert await connections_of(survivor, pool) == CLIENTS - len(lost) + len(newcomers)
        await publish(pool, port, "again")
        for client in newcomers:
            assert (await client.next_of("message"))["data"] == "again"
        for client in [c for c in clients if c not in lost and c not in newcomers]:
            assert [(await client.next_of("message"))["data"] for _ in range(2)] == ["after", "again"]
    finally:
        for client in clients:
            if client.protocol is not None and client.protocol.transport is not None:
                client.protocol.transport.abortConnection()
        for proc in workers:
            await stop(proc)
        await pool.closeCachedConnections()


def test_the_memory_engine_refuses_a_shared_port():
    with pytest.raises(ConfigError) as raised:
        load_settings({"listen": ["reuseport:8080"]}, environ={})
    message = str(raised.value)
    assert "memory engine" in message and "redis://" in message and "Using every core" in message
    settings = load_settings({"listen": ["reuseport:8080"], "engine": "redis://127.0.0.1:6379/0"}, environ={})
    assert settings.listen == ["reuseport:8080"]


@pytest_twisted.ensureDeferred
async def test_a_worker_on_the_memory_engine_stops_at_start_up_with_one_line():
    proc = spawn(["-n", "--pidfile=", "pushie", "--listen", f"reuseport:{free_port()}:interface=127.0.0.1"])
    try:
        code = await proc.ended
    finally:
        await stop(proc)
    output = proc.output.decode()
    assert code != 0
    assert "shares its port with other Pushie processes" in output and "Traceback" not in output


def test_reuseport_strings():
    endpoint = ReusePortParser().parseStreamServer(reactor, "8080", interface="::1", backlog="100")
    assert (endpoint.port, endpoint.interface, endpoint.backlog) == (8080, "::1", 100)
    with pytest.raises(ValueError, match="must be numbers"):
        ReusePortParser().parseStreamServer(reactor, "http")
    assert shares_port("reuseport:8080") and shares_port("REUSEPORT:1")
    assert not shares_port("tcp:8080") and not shares_port("unix:/tmp/reuseport:1")


@pytest_twisted.ensureDeferred
async def test_two_reuseport_listeners_in_one_process_share_the_port():
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.protocol import Factory, Protocol

    port = free_port()
    listeners = [
        await serverFromString(reactor, f"reuseport:{port}:interface=127.0.0.1").listen(Factory.forProtocol(Protocol))
        for _ in range(2)
    ]
    try:
        assert [p.getHost().port for p in listeners] == [port, port]
        # A plain listener on the same port is refused: only SO_REUSEPORT sockets may share it.
        with pytest.raises(Exception, match="(?i)address already in use"):
            await serverFromString(reactor, f"tcp:{port}:interface=127.0.0.1").listen(Factory.forProtocol(Protocol))
    finally:
        for p in listeners:
            await p.stopListening()
