"""
The WebSocket door's own opening handshake (DoorProtocol.open_handshake):
a plain request is answered without Autobahn's processHandshake, anything
else is left to Autobahn, and a client sees the same answer either way.

Each request below is sent twice to the same daemon, with the door's short
way on and off (then Autobahn's processHandshake answers everything, as
before it existed), and the answers are compared byte for byte.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections import deque

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.websocket.protocol import TrafficStats
from autobahn.websocket.protocol import WebSocketServerProtocol as AutobahnServerProtocol
from autobahn.websocket.utf8validator import Utf8Validator

from pushie.doors.websocket import PushieServerProtocol, new_client_id
from tests.helpers import raw_connect, wait_for

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = base64.b64encode(hashlib.sha1(KEY.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
BASE = {
    "Host": "127.0.0.1:{port}",
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": KEY,
    "Sec-WebSocket-Version": "13",
}


def request(port: int, target: str = "/websocket?channel=a", drop=(), replace=None, extra=()) -> bytes:
    headers = {**BASE, **(replace or {})}
    lines = [f"GET {target} HTTP/1.1"]
    lines += [f"{name}: {value.format(port=port)}" for name, value in headers.items() if name not in drop]
    lines += list(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """The server's (unmasked) frames in C{data}: (opcode, payload), as far as they are whole."""
    frames = []
    while len(data) >= 2:
        length, start = data[1] & 0x7F, 2
        if length == 126:
            length, start = int.from_bytes(data[2:4], "big"), 4
        if len(data) < start + length:
            break
        frames.append((data[0] & 0x0F, data[start : start + length]))
        data = data[start + length :]
    return frames


def masked(opcode: int, payload: bytes) -> bytes:
    mask = b"\x0a\x0b\x0c\x0d"
    return bytes((0x80 | opcode, 0x80 | len(payload))) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def frame_types(data: bytes) -> list[object]:
    """The types of the JSON text frames (the close code for a close frame)."""
    kinds: list[object] = []
    for opcode, payload in server_frames(data):
        if opcode == 1:
            frame = json.loads(payload)
            kinds.append((frame["type"], frame.get("channel")))
        elif opcode == 8:
            kinds.append(("close", int.from_bytes(payload[:2], "big")))
    return kinds


async def exchange(port: int, data: bytes, frames: int = 2) -> tuple[bytes, list[object]]:
    """Send C{data}; the answer's head, and the types of the first C{frames} frames after a 101."""
    client = await raw_connect(port)
    client.transport.write(data)
    await wait_for(lambda: b"\r\n\r\n" in client.received or client.lost.called)
    head, _, body = client.received.partition(b"\r\n\r\n")
    kinds: list[object] = []
    if head.startswith(b"HTTP/1.1 101 "):
        await wait_for(
            lambda: len(frame_types(client.received.partition(b"\r\n\r\n")[2])) >= frames or client.lost.called
        )
        kinds = frame_types(client.received.partition(b"\r\n\r\n")[2])[:frames]
    else:
        await client.lost  # a refusal closes the connection
    client.transport.loseConnection()
    await client.lost
    return head, kinds


@pytest.fixture
def processed(monkeypatch):
    """How many handshakes went through Autobahn's processHandshake."""
    calls = []
    original = WebSocketServerProtocol.processHandshake

    def counted(self):
        if not calls or calls[-1] is not self:
            calls.append(self)
        return original(self)

    monkeypatch.setattr(PushieServerProtocol, "processHandshake", counted)
    return calls


CASES = [
    # id, request arguments, status (None: whatever the installed Autobahn answers), answered by the door
    ("plain", {}, 101, True),
    ("no-query", {"target": "/websocket"}, 101, True),
    ("query-channels", {"target": "/websocket?channel=a&channel=b&channel=a&x=1"}, 101, True),
    ("subprotocols", {"extra": ["Sec-WebSocket-Protocol: chat, superchat"]}, 101, True),
    ("duplicate-subprotocol", {"extra": ["Sec-WebSocket-Protocol: chat, chat"]}, 400, False),
    ("origin", {"extra": ["Origin: https://app.example"]}, 101, True),
    ("origin-null", {"extra": ["Origin: null"]}, 101, True),
    ("origin-without-host", {"extra": ["Origin: nohost"]}, 400, False),
    ("origin-bad-port", {"extra": ["Origin: https://app.example:99999"]}, 400, False),
    ("origin-twice", {"extra": ["Origin: https://a.example", "Origin: https://b.example"]}, 400, False),
    ("deflate-offer", {"extra": ["Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"]}, 101, True),
    ("deflate-bad-offer", {"extra": ["Sec-WebSocket-Extensions: permessage-deflate; bogus=1"]}, 400, False),
    ("other-extension", {"extra": ["Sec-WebSocket-Extensions: x-webkit-whatever"]}, 101, True),
    ("key-short", {"replace": {"Sec-WebSocket-Key": "c2hvcnQ="}}, 400, False),
    ("key-bad-character", {"replace": {"Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZ!=="}}, 400, False),
    ("key-no-padding", {"replace": {"Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQAA"}}, 400, False),
    ("key-missing", {"drop": ["Sec-WebSocket-Key"]}, 400, False),
    ("key-twice", {"extra": [f"Sec-WebSocket-Key: {KEY}"]}, 400, False),
    ("version-missing", {"drop": ["Sec-WebSocket-Version"]}, 400, False),
    ("version-12", {"replace": {"Sec-WebSocket-Version": "12"}}, 400, False),
    ("version-8", {"replace": {"Sec-WebSocket-Version": "8"}}, None, False),
    ("version-junk", {"replace": {"Sec-WebSocket-Version": "x"}}, 400, False),
    ("version-twice", {"extra": ["Sec-WebSocket-Version: 13"]}, 400, False),
    ("upgrade-missing", {"drop": ["Upgrade"]}, 426, False),
    ("upgrade-other", {"replace": {"Upgrade": "h2c"}}, 400, False),
    ("upgrade-list", {"replace": {"Upgrade": "foo/1, WebSocket"}}, 101, True),
    ("connection-missing", {"drop": ["Connection"]}, 400, False),
    ("connection-keep-alive", {"replace": {"Connection": "keep-alive"}}, 400, False),
    ("connection-list", {"replace": {"Connection": "keep-alive, Upgrade"}}, 101, True),
    ("host-missing", {"drop": ["Host"]}, 400, False),
    ("host-bad-port", {"replace": {"Host": "127.0.0.1:x"}}, 400, False),
    ("host-ipv6", {"replace": {"Host": "[::1]:80"}}, 101, True),
    ("host-twice", {"extra": ["Host: example.com"]}, 400, False),
    ("fragment", {"target": "/websocket?channel=a#top"}, 400, False),
    ("latin-1-header", {"extra": ["X-Name: caf\xe9"]}, None, False),
    ("space-before-colon", {"extra": ["X-Name : value"]}, None, False),
    ("forwarded-for", {"extra": ["X-Forwarded-For: 10.0.0.1"]}, 101, True),
    ("channel-blank", {"target": "/websocket?channel="}, 400, True),
    ("channel-invalid", {"target": "/websocket?channel=bad%20name"}, 400, True),
    ("channel-guarded", {"target": "/websocket?channel=private-secret"}, 401, True),
    ("token-invalid", {"target": "/websocket?channel=a&token=nope"}, 401, True),
]


@pytest.mark.parametrize("arguments, status, by_door", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
@pytest_twisted.ensureDeferred
async def test_same_answer_as_autobahns(daemon, monkeypatch, processed, arguments, status, by_door):
    data = request(daemon.port, **arguments)
    target = arguments.get("target", "/websocket?channel=a")
    channels = {part.partition("channel=")[2] for part in target.split("&")} - {""}
    frames = 1 + len(channels)  # welcome, then one subscribed each
    ours = await exchange(daemon.port, data, frames)
    assert (not processed) == by_door
    monkeypatch.setattr(PushieServerProtocol, "fast_handshake", False)
    processed.clear()
    autobahns = await exchange(daemon.port, data, frames)
    assert processed, "Autobahn's processHandshake answered"
    if daemon.hub.engine_name != "memory":
        # Redis answers the subscribes of several channels in any order, either way.
        ours, autobahns = [(head, kinds[:1] + sorted(kinds[1:], key=str)) for head, kinds in (ours, autobahns)]
    assert ours == autobahns
    head = ours[0]
    if status is not None:
        assert head.startswith(b"HTTP/1.1 %d " % status), head
    if head.startswith(b"HTTP/1.1 101 "):
        assert b"\r\nSec-WebSocket-Accept: " + ACCEPT in head + b"\r\n"
        assert b"Sec-WebSocket-Protocol" not in head and b"Sec-WebSocket-Extensions" not in head
        assert ours[1][0] == ("welcome", None)


@pytest.mark.parametrize("origin,status", [("https://app.example.com", 101), ("https://evil.example.net", 403)])
@pytest_twisted.ensureDeferred
async def test_origin_allow_list(make_daemon, monkeypatch, processed, origin, status):
    daemon = await make_daemon(allowed_origin=["https://app.example.com:443"])
    data = request(daemon.port, extra=[f"Origin: {origin}"])
    ours = await exchange(daemon.port, data)
    assert not processed
    assert ours[0].startswith(b"HTTP/1.1 %d " % status)
    monkeypatch.setattr(PushieServerProtocol, "fast_handshake", False)
    assert await exchange(daemon.port, data) == ours


@pytest_twisted.ensureDeferred
async def test_query_subscriptions_receive_publications(daemon, processed):
    client = await raw_connect(daemon.port)
    client.transport.write(request(daemon.port, "/websocket?channel=a&channel=b&channel=a"))
    await wait_for(lambda: frame_types(client.received.partition(b"\r\n\r\n")[2]).count(("subscribed", "b")) == 1)
    assert not processed
    for channel in ("b", "a"):
        await daemon.publish({"channel": channel, "data": channel})
    await wait_for(lambda: len(frame_types(client.received.partition(b"\r\n\r\n")[2])) == 5)
    kinds = frame_types(client.received.partition(b"\r\n\r\n")[2])
    if daemon.hub.engine_name != "memory":
        kinds[1:3] = sorted(kinds[1:3])  # Redis answers the two subscribes in any order
    assert kinds == [("welcome", None), ("subscribed", "a"), ("subscribed", "b"), ("message", "b"), ("message", "a")]
    client.transport.loseConnection()
    await client.lost


@pytest_twisted.ensureDeferred
async def test_frames_right_behind_the_handshake_are_answered_in_order(daemon, processed):
    client = await raw_connect(daemon.port)
    frames = masked(1, b'{"type":"subscribe","channel":"b"}') + masked(1, b'{"type":"ping"}')
    client.transport.write(request(daemon.port) + frames)
    await wait_for(lambda: len(frame_types(client.received.partition(b"\r\n\r\n")[2])) == 4)
    assert not processed
    kinds = frame_types(client.received.partition(b"\r\n\r\n")[2])
    # A Redis engine answers subscribes later than the ping: only the memory engine's order is fixed.
    assert kinds[0] == ("welcome", None)
    assert sorted(kinds[1:], key=str) == [("pong", None), ("subscribed", "a"), ("subscribed", "b")]
    if daemon.service.hub.engine_name == "memory":
        assert kinds[1:] == [("subscribed", "a"), ("subscribed", "b"), ("pong", None)]
    client.transport.loseConnection()
    await client.lost


@pytest_twisted.ensureDeferred
async def test_close_right_behind_the_handshake(daemon, processed):
    client = await raw_connect(daemon.port)
    client.transport.write(request(daemon.port) + masked(8, (1000).to_bytes(2, "big") + b"bye"))
    await client.lost  # the server closes the TCP connection after the closing handshake
    assert not processed
    kinds = frame_types(client.received.partition(b"\r\n\r\n")[2])
    assert kinds[0] == ("welcome", None) and kinds[-1] == ("close", 1000)
    assert daemon.service.hub.subscriber_count("a") == 0


@pytest_twisted.ensureDeferred
async def test_bad_frame_right_behind_the_handshake_fails_the_connection(daemon, processed):
    client = await raw_connect(daemon.port)
    unmasked = bytes((0x81, 2)) + b"{}"  # a client frame must be masked
    client.transport.write(request(daemon.port) + unmasked)
    await client.lost
    assert not processed
    assert frame_types(client.received.partition(b"\r\n\r\n")[2])[-1] == ("close", 1002)


def test_client_ids_are_random_and_not_shared_with_a_forked_child():
    ids = [new_client_id() for _ in range(600)]  # past the first pool of 256
    assert len(set(ids)) == 600
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{16}", i) for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id
        os.write(write, new_client_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child) == 16 and child != new_client_id()


@pytest_twisted.ensureDeferred
async def test_connection_made_leaves_the_state_autobahns_would(daemon):
    """DoorProtocol._connectionMade against Autobahn's own, attribute by attribute."""
    factory = daemon.service.websocket_factory
    theirs, ours = factory.buildProtocol(None), factory.buildProtocol(None)
    before = factory.countConnections
    AutobahnServerProtocol._connectionMade(theirs)
    ours._connectionMade()
    assert factory.countConnections == before + 2
    set_by_autobahn = set(vars(theirs)) - set(vars(factory.buildProtocol(None)))
    assert set_by_autobahn  # Autobahn set its state
    for name in sorted(set_by_autobahn):
        expected, got = getattr(theirs, name), getattr(ours, name)
        if isinstance(expected, (TrafficStats, Utf8Validator, deque)):
            assert type(got) is type(expected), name
            assert got is not expected, name  # one per connection
        else:
            assert got == expected, name
    factory.countConnections = before


@pytest.mark.parametrize("how", ["close", "abort"])
@pytest_twisted.ensureDeferred
async def test_client_gone_right_after_its_handshake_leaves_nothing_behind(daemon, monkeypatch, processed, how):
    """A handshake and the client's FIN (or RST) in one go: no connection, subscriber or count is left."""
    hub = daemon.service.hub
    factory = daemon.service.websocket_factory
    before = factory.countConnections
    answered = []
    original = PushieServerProtocol.open_handshake

    def recorded(self, lines, rest):
        answered.append(original(self, lines, rest))
        return answered[-1]

    monkeypatch.setattr(PushieServerProtocol, "open_handshake", recorded)
    clients = []
    for count in range(1, 21):
        client = await raw_connect(daemon.port)
        client.transport.socket.sendall(request(daemon.port, "/websocket?channel=gone"))  # on the wire now
        if how == "close":
            client.transport.loseConnection()  # the FIN right behind the handshake
        else:
            # An RST may overtake data the server has not read yet: it goes once the handshake is read.
            await wait_for(lambda count=count: len(answered) == count)
            client.transport.abortConnection()
        clients.append(client)
    for client in clients:
        await client.lost
    await wait_for(lambda: len(answered) == 20 and not hub.connections and hub.subscriber_count("gone") == 0)
    await wait_for(lambda: factory.countConnections == before)
    assert all(answered) and not processed  # the door's own handshake took them
