"""
PROXY protocol (issue 14): Pushie listening on Twisted's C{haproxy:} endpoint
wrapper (C{--listen haproxy:tcp:8080:interface=127.0.0.1}) sees each
client's own address, from the PROXY v1 or v2 header a load balancer sends
first, in its per-address limits (connections, and the publish rate of open
publishing) and in its log lines.  The headers are sent by hand on raw TCP
connections here; tests/test_load_balancers.py goes through a real HAProxy.
"""

from __future__ import annotations

import ipaddress
import json
import struct

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import formatEvent

from pushie.tap import with_backlog
from tests.helpers import HANDSHAKE, _RawClient, assert_reactor_clean, parse_http_answers, start_daemon, wait_for

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_v1(source: str, source_port: int = 40000) -> bytes:
    family = "TCP6" if ":" in source else "TCP4"
    destination = "::1" if family == "TCP6" else "127.0.0.1"
    return f"PROXY {family} {source} {destination} {source_port} 443\r\n".encode()


def proxy_v2(source: str, source_port: int = 40000) -> bytes:
    """A binary PROXY v2 header: PROXY command over TCP (IPv4 or IPv6)."""
    address = ipaddress.ip_address(source)
    if address.version == 4:
        family, destination = 0x11, ipaddress.ip_address("127.0.0.1")
    else:
        family, destination = 0x21, ipaddress.ip_address("::1")
    body = address.packed + destination.packed + struct.pack("!HH", source_port, 443)
    return V2_SIGNATURE + bytes((0x21, family)) + struct.pack("!H", len(body)) + body


HEADERS = {"v1": proxy_v1, "v2": proxy_v2}


async def proxied_connect(port: int) -> _RawClient:
    return await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(_RawClient))


async def proxied_handshake(port: int, header: bytes, channel: str = "room") -> tuple[int, _RawClient]:
    """A PROXY header then a WebSocket handshake on one TCP connection: the HTTP status, and the client."""
    client = await proxied_connect(port)
    handshake = HANDSHAKE.format(path=f"/websocket?channel={channel}", port=port, extra="")
    client.transport.write(header + handshake.encode())
    await wait_for(lambda: b"\r\n\r\n" in client.received or client.lost.called)
    status = int(client.received.split(b" ", 2)[1])
    if status == 101:
        await wait_for(lambda: b'"type":"subscribed"' in client.received)
    return status, client


async def proxied_publish(port: int, header: bytes, channel: str = "room") -> int:
    """A PROXY header then one POST /publish; the answer's status."""
    client = await proxied_connect(port)
    body = json.dumps({"channel": channel, "data": {"n": 1}}).encode()
    client.transport.write(
        header
        + b"POST /publish HTTP/1.1\r\nHost: push\r\nContent-Type: application/json\r\n"
        + b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
    )
    await wait_for(lambda: client.lost.called)
    return parse_http_answers(client.received)[0].status


async def close_all(clients: list[_RawClient]) -> None:
    for client in clients:
        if not client.lost.called:
            client.transport.abortConnection()
        await client.lost


@pytest.fixture
def events():
    from twisted.logger import globalLogPublisher

    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest_twisted.ensureDeferred
async def test_per_address_limit_counts_the_proxied_address(version, events):
    header = HEADERS[version]
    daemon = await start_daemon(listen=["haproxy:tcp:0:interface=127.0.0.1"], max_connections_per_ip=2)
    clients: list[_RawClient] = []
    try:
        # More connections than the per-address limit arrive from the proxy
        # (127.0.0.1) before any sends its header: none may be refused for
        # the proxy's own address.
        early = [await proxied_connect(daemon.port) for _ in range(3)]
        clients += early
        await wait_for(lambda: daemon.service.site.limits.pending == 3)
        for client, source in zip(early, ["203.0.113.7", "203.0.113.8", "2001:db8::9"], strict=True):
            client.transport.write(
                header(source) + HANDSHAKE.format(path="/websocket?channel=room", port=daemon.port, extra="").encode()
            )
        await wait_for(lambda: all(b'"type":"subscribed"' in c.received for c in early))
        # Two from one proxied address are fine, the third is refused...
        for _ in range(2):
            status, client = await proxied_handshake(daemon.port, header("198.51.100.1"))
            clients.append(client)
            assert status == 101
        status, refused = await proxied_handshake(daemon.port, header("198.51.100.1"))
        clients.append(refused)
        assert status == 429
        assert refused.received.startswith(b"HTTP/1.1 429 too many connections")
        # ...while another address behind the same proxy is counted apart.
        status, client = await proxied_handshake(daemon.port, header("198.51.100.2"))
        clients.append(client)
        assert status == 101
        addresses = sorted(daemon.hub.connections.values())
        assert addresses == [
            "198.51.100.1", "198.51.100.1", "198.51.100.2", "2001:db8::9", "203.0.113.7", "203.0.113.8",
        ]  # fmt: skip
        assert daemon.service.site.limits.pending == 0
        # Messages reach them through the wrapper (write_now writes under it).
        assert await proxied_publish(daemon.port, header("192.0.2.1")) == 200
        await wait_for(lambda: all(b'"type":"message"' in c.received for c in early))
        # The refusal's log line names the client, not the proxy.
        refusals = [formatEvent(e) for e in events if "Refused" in e.get("log_format", "")]
        assert refusals and "198.51.100.1" in refusals[-1], refusals
    finally:
        await close_all(clients)
        await daemon.stop()
    await assert_reactor_clean()


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest_twisted.ensureDeferred
async def test_open_publishing_rate_is_per_proxied_address(version):
    header = HEADERS[version]
    daemon = await start_daemon(listen=["haproxy:tcp:0:interface=127.0.0.1"], publish_rate=1)
    try:
        assert await proxied_publish(daemon.port, header("192.0.2.10")) == 200
        assert await proxied_publish(daemon.port, header("192.0.2.10")) == 429
        assert await proxied_publish(daemon.port, header("192.0.2.11")) == 200
    finally:
        await daemon.stop()
    await assert_reactor_clean()


@pytest_twisted.ensureDeferred
async def test_a_connection_without_a_proxy_header_is_dropped():
    daemon = await start_daemon(listen=["haproxy:tcp:0:interface=127.0.0.1"])
    try:
        client = await proxied_connect(daemon.port)
        client.transport.write(HANDSHAKE.format(path="/websocket?channel=room", port=daemon.port, extra="").encode())
        await client.lost
        assert client.received == b""
        assert daemon.service.site.limits.pending == 0
        assert not daemon.hub.connections
    finally:
        await daemon.stop()
    await assert_reactor_clean()


@pytest_twisted.ensureDeferred
async def test_proxy_header_that_never_comes_times_out():
    """A connection that sends nothing is closed after handshake_timeout, as without PROXY, and uncounted."""
    daemon = await start_daemon(listen=["haproxy:tcp:0:interface=127.0.0.1"], handshake_timeout=0.5)
    try:
        client = await proxied_connect(daemon.port)
        await wait_for(lambda: daemon.service.site.limits.pending == 1)
        await client.lost
        assert daemon.service.site.limits.pending == 0
    finally:
        await daemon.stop()
    await assert_reactor_clean()


def test_backlog_reaches_the_wrapped_endpoint():
    assert with_backlog("haproxy:tcp:8080", 511) == "haproxy:tcp:8080:backlog=511"
    assert with_backlog("haproxy:tcp:8080:backlog=64", 511) == "haproxy:tcp:8080:backlog=64"
    assert with_backlog("haproxy:unix:/run/p.sock", 511) == "haproxy:unix:/run/p.sock:backlog=511"


@pytest_twisted.ensureDeferred
async def test_haproxy_endpoint_listens_with_the_backlog():
    daemon = await start_daemon(listen=["haproxy:tcp:0:interface=127.0.0.1"], listen_backlog=1024)
    try:
        assert [port.backlog for port in daemon.service.ports()] == [1024]
    finally:
        await daemon.stop()
    await assert_reactor_clean()


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest_twisted.ensureDeferred
async def test_half_sent_requests_are_limited_per_proxied_address(version):
    """Past the per-address limit of half-sent requests, the header's address gets the JSON 429 at once."""
    header = HEADERS[version]
    daemon = await start_daemon(listen=["haproxy:tcp:0:interface=127.0.0.1"], max_connections_per_ip=1)
    clients: list[_RawClient] = []
    try:
        for source in ("198.51.100.1", "198.51.100.1", "198.51.100.2"):
            client = await proxied_connect(daemon.port)
            clients.append(client)
            client.transport.write(header(source) + b"GET /websocket?channel=room HTTP/1.1\r\n")
        await wait_for(lambda: clients[1].lost.called)
        answer = parse_http_answers(clients[1].received)[0]
        assert answer.status == 429
        assert b"too_many_connections_from_address" in clients[1].received
        assert not clients[0].lost.called and not clients[2].lost.called
        assert daemon.service.site.limits.pending == 2
    finally:
        await close_all(clients)
        await daemon.stop()
    await assert_reactor_clean()
