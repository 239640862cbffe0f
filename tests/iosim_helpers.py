"""
A whole daemon with no sockets: L{pushie.tap.PushieService} wired as twistd
wires it, on a L{MemoryReactorClock} (its ports are records, its time moves
only when a test says so), and clients joined to its site through
L{twisted.test.iosim}'s in-memory transports.

Unit tests of the hand-written HTTP channel and of the door protocols use it
(tests/test_units_http.py, tests/test_units_doors.py); the behaviour tests
beside them (tests/helpers.py) cross real sockets.

Autobahn schedules its own timers (closing handshakes, pings) on txaio's
reactor, the global one: the doors here run with C{ping_interval=0}, tests
finish the closing handshakes they start, L{Node.stop} moves bytes until every
connection is gone, and the tests' fixtures check that no timer is left on the
real reactor.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connect

from pushie.config import Settings
from pushie.tap import PushieService

WS_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
WS_ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
"""RFC 6455 section 1.3's example key and the Sec-WebSocket-Accept it must get."""
START = 1_800_000_000.0
"""Where a L{Node}'s clock starts: a plausible time, so that token times make sense."""


class Node:
    """
    One daemon on a fake reactor: the memory engine by default, listening
    (as far as the L{MemoryReactorClock} knows) on the usual endpoint, with
    WebSocket pings off (see the module docstring).
    """

    def __init__(self, **overrides: Any) -> None:
        overrides.setdefault("engine", "memory")
        overrides.setdefault("ping_interval", 0)
        self.clock = MemoryReactorClock()
        self.clock.advance(START)
        self.settings = Settings.defaults().replace(**overrides)
        self.service = PushieService(self.settings, self.clock)
        started = self.service.startService()
        outcome: list[Any] = []
        started.addBoth(outcome.append)
        assert outcome and not isinstance(outcome[0], Failure), outcome
        self._peers = 0
        self.pumps: list[IOPump] = []

    @property
    def hub(self) -> Any:
        return self.service.hub

    def connect(self, client: Protocol | None = None, host: str | None = None) -> tuple[Any, RawClient, IOPump]:
        """
        A new connection to the site from C{client} (a L{RawClient} if none),
        from address C{host} (a new one each time by default, so that
        per-address limits stay out of the way).

        @return: the server's protocol, the client and the pump between them.
        """
        self._peers += 1
        if host is None:
            host = f"10.0.{self._peers // 250}.{self._peers % 250 + 1}"
        server = self.service.site.buildProtocol(IPv4Address("TCP", host, 40000 + self._peers))
        client = client if client is not None else RawClient()
        server_transport = FakeTransport(
            server,
            isServer=True,
            hostAddress=IPv4Address("TCP", "127.0.0.1", 8080),
            peerAddress=IPv4Address("TCP", host, 40000 + self._peers),
        )
        client_transport = FakeTransport(client, isServer=False)
        pump = connect(server, server_transport, client, client_transport, clock=self.clock)
        self.pumps.append(pump)
        return server, client, pump  # type: ignore[return-value]

    def flush(self) -> None:
        """Move every connection's bytes (and closes) until none move."""
        for pump in self.pumps:
            pump.flush()

    def stop(self) -> None:
        """
        Stop the daemon, moving the fake clock on (and the bytes: clients
        that do not answer the closes are dropped) until the Hub's drain is
        done and every connection is gone.
        """
        stopped = self.service.stopService()
        outcome: list[Any] = []
        stopped.addBoth(outcome.append)
        for _ in range(200):
            self.flush()
            if outcome:
                break
            self.clock.advance(0.1)
        assert outcome and not isinstance(outcome[0], Failure), outcome


def publish_request(node: Node, body: bytes) -> bytes:
    """C{POST /publish} C{body} on a connection of its own; the answer's bytes."""
    _, client, pump = node.connect()
    client.send(
        b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body)
    )
    pump.flush()
    answer = client.take()
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    return answer


class RawClient(Protocol):
    """A client that records what it receives and sends only what a test writes."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.lost = reason

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def take(self) -> bytes:
        """What arrived since the last take."""
        data, self.received = self.received, b""
        return data


def ws_handshake(path: str = "/websocket", extra: bytes = b"") -> bytes:
    """A client's opening handshake for C{path}, with RFC 6455's example key."""
    return (
        b"GET %s HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n%s\r\n" % (path.encode(), WS_KEY, extra)
    )


def client_frame(opcode: int, payload: bytes, mask: bytes = b"\x0f\x1e\x2d\x3c") -> bytes:
    """One final, masked client frame (payloads under 64 KiB)."""
    length = len(payload)
    head = bytes([0x80 | opcode]) + (
        bytes([0x80 | length]) if length < 126 else bytes([0x80 | 126]) + length.to_bytes(2, "big")
    )
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def text(payload: Any) -> bytes:
    """A masked client text frame carrying C{payload} (JSON-encoded unless bytes)."""
    return client_frame(0x1, payload if isinstance(payload, bytes) else json.dumps(payload).encode())


def server_frames(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """
    The whole unmasked server frames at the start of C{data}, as (opcode,
    payload) pairs, and the bytes after them (a frame not all here yet).
    """
    frames = []
    while len(data) >= 2:
        opcode, length, at = data[0] & 0x0F, data[1] & 0x7F, 2
        assert not data[1] & 0x80, "server frames are not masked"
        if length == 126:
            length, at = int.from_bytes(data[2:4], "big"), 4
        elif length == 127:
            length, at = int.from_bytes(data[2:10], "big"), 10
        if len(data) < at + length:
            break
        frames.append((opcode, data[at : at + length]))
        data = data[at + length :]
    return frames, data


class WSClient:
    """
    A raw WebSocket client over an iosim pump: it sends the opening
    handshake, then masked frames, and reads the server's frames.
    """

    def __init__(self, node: Node, path: str = "/websocket", extra: bytes = b"") -> None:
        self.node = node
        self.server, self.raw, self.pump = node.connect()
        self.raw.send(ws_handshake(path, extra))
        self.pump.flush()
        head, _, rest = self.raw.take().partition(b"\r\n\r\n")
        self.status_line, *lines = head.split(b"\r\n")
        self.headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines)}
        self._pending = rest
        # The short path hands the connection over: the WebSocket protocol is now the transport's.
        self.protocol = self.pump.serverIO.protocol

    def send(self, frame: bytes) -> None:
        self.raw.send(frame)
        self.pump.flush()

    def frames(self) -> list[tuple[int, bytes]]:
        """Every whole frame received since the last call."""
        frames, self._pending = server_frames(self._pending + self.raw.take())
        return frames

    def messages(self) -> list[Any]:
        """The JSON text messages received since the last call (other frames are dropped)."""
        return [json.loads(payload) for opcode, payload in self.frames() if opcode == 0x1]

    def close(self, code: int = 1000) -> None:
        """Send a close frame (the reply to the server's, or the first)."""
        self.send(client_frame(0x8, code.to_bytes(2, "big")))

    @property
    def closed(self) -> bool:
        return self.raw.lost is not None


def close_code(payload: bytes) -> int:
    return int.from_bytes(payload[:2], "big")
