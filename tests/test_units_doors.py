"""
The WebSocket doors' protocols with no sockets: the native door
(L{pushie.doors.websocket}) and the Pusher door (L{pushie.doors.pusher.door})
behind the daemon's own site, wired as twistd wires it on a
L{MemoryReactorClock}, with a raw client (masked frames written by hand, the
server's frames read byte for byte) through L{twisted.test.iosim}.  Token
expiry and Pusher's activity timeout fire because a test moved the fake
clock.

The contract: docs/PROTOCOL.md §5.3 and docs/PROTOCOL.md §5.4 (frames),
docs/PROTOCOL.md §5.5 (error frames), docs/PROTOCOL.md §5.6 (close codes),
docs/PROTOCOL.md §8.8 (token expiry), docs/PROTOCOL.md §13 (the Pusher door).
The same behaviours cross real sockets in tests/test_websocket.py and
tests/test_pusher.py.
"""

from __future__ import annotations

import json
import re

import jwt
import pytest
from twisted.internet import reactor

from tests.helpers import LogWatcher
from tests.iosim_helpers import START, Node, WSClient, client_frame, close_code, publish_request, text

SECRET = "subscriber-secret-units-doors-0000000000"
APP_ID, APP_KEY, APP_SECRET = "7", "unitsdoorskey0001", "unitsdoorssecret0001"
LEEWAY = 5.0  # token_leeway's default


@pytest.fixture
def make_node():
    """Nodes for a test; each is stopped at the end, and none may leave a timer on the real reactor."""
    nodes: list[Node] = []
    before = set(reactor.getDelayedCalls())
    watcher = LogWatcher().start()

    def make(**settings) -> Node:
        node = Node(**settings)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        if node.service.running:
            node.stop()
    watcher.stop()
    watcher.check()
    left = [call for call in reactor.getDelayedCalls() if call.active() and call not in before]
    assert not left, f"timers left on the real reactor: {left}"


def token(channels: list[str], exp: float, sub: str = "ann") -> str:
    return jwt.encode({"sub": sub, "channels": channels, "exp": exp}, SECRET, algorithm="HS256")


def assert_closed_with(client: WSClient, code: int) -> bytes:
    """The server's close frame has C{code}; the client answers, and the connection ends. Returns the reason."""
    closes = [payload for opcode, payload in client.frames() if opcode == 0x8]
    assert [close_code(payload) for payload in closes] == [code]
    client.close(code)
    assert client.closed
    return closes[0][2:]


# -- the native door ---------------------------------------------------------


def test_native_welcome_subscribed_and_a_publication(make_node):
    """welcome, then subscribed for ?channel=, then a publication as a message frame."""
    node = make_node()
    client = WSClient(node, "/websocket?channel=news")
    assert client.status_line == b"HTTP/1.1 101 Switching Protocols"
    welcome, subscribed = client.messages()
    assert welcome["type"] == "welcome" and re.fullmatch(r"[A-Za-z0-9_-]{16}", welcome["client"])
    assert subscribed == {"type": "subscribed", "channel": "news", "offset": 0, "epoch": subscribed["epoch"]}
    publish_request(node, b'{"channel": "news", "data": {"n": 1}}')
    client.pump.flush()
    [message] = client.messages()
    assert message["type"] == "message"
    assert (message["channel"], message["offset"], message["data"]) == ("news", 1, {"n": 1})


def test_native_subscribe_and_unsubscribe_frames(make_node):
    node = make_node()
    client = WSClient(node)
    client.messages()  # welcome
    client.send(text({"type": "subscribe", "channel": "a"}))
    [subscribed] = client.messages()
    assert (subscribed["type"], subscribed["channel"]) == ("subscribed", "a")
    assert node.hub.subscriber_count("a") == 1
    client.send(text({"type": "unsubscribe", "channel": "a"}))
    assert client.messages() == [{"type": "unsubscribed", "channel": "a"}]
    assert node.hub.subscriber_count("a") == 0


@pytest.mark.parametrize(
    "payload, code",
    [(b"{not json", "invalid_json"), (b"[1, 2]", "invalid_frame"), (b'{"type": "dance"}', "unknown_type")],
)
def test_native_bad_frames_get_an_error_frame_and_the_connection_stays(make_node, payload, code):
    node = make_node()
    client = WSClient(node)
    client.messages()
    client.send(text(payload))
    [error] = client.messages()
    assert (error["type"], error["code"]) == ("error", code)
    assert error["message"]
    client.send(text({"type": "ping"}))
    assert client.messages() == [{"type": "pong"}]
    assert not client.closed


def test_native_websocket_ping_gets_a_pong_with_its_payload(make_node):
    node = make_node()
    client = WSClient(node)
    client.messages()
    client.send(client_frame(0x9, b"are you there"))
    assert client.frames() == [(0xA, b"are you there")]


def test_native_shutdown_closes_with_1001(make_node):
    """Stopping the daemon sends every open connection a 1001 close; a client that answers is gone cleanly."""
    node = make_node()
    client = WSClient(node, "/websocket?channel=news")
    client.messages()
    stopped = node.service.stopService()
    client.pump.flush()
    assert assert_closed_with(client, 1001) == b"server shutting down"
    assert len(node.hub.connections) == 0
    assert stopped.called  # the drain was done when the last client left, with no timer fired


def test_native_token_expiry_closes_with_4001(make_node):
    """A connection holding a guarded channel is closed with 4001 once its token expires (plus the leeway)."""
    node = make_node(subscriber_secrets=[SECRET])
    exp = START + 60
    client = WSClient(node, f"/websocket?channel=private-feed&token={token(['private-*'], exp)}")
    assert [m["type"] for m in client.messages()] == ["welcome", "subscribed"]
    node.clock.advance(exp + LEEWAY - node.clock.seconds() - 0.5)
    client.pump.flush()
    assert client.frames() == []
    node.clock.advance(1)
    client.pump.flush()
    assert assert_closed_with(client, 4001) == b"token expired"
    assert node.hub.subscriber_count("private-feed") == 0


def test_native_refreshed_token_moves_the_expiry(make_node):
    """An auth frame with a later token before expiry: no close at the old time, 4001 at the new one."""
    node = make_node(subscriber_secrets=[SECRET])
    first, second = START + 60, START + 600
    client = WSClient(node, f"/websocket?channel=private-feed&token={token(['private-*'], first)}")
    client.messages()
    client.send(text({"type": "auth", "token": token(["private-*"], second)}))
    assert client.messages() == [{"type": "authorized", "sub": "ann", "exp": int(second)}]
    node.clock.advance(first + LEEWAY + 1 - node.clock.seconds())
    client.pump.flush()
    assert client.frames() == [] and not client.closed
    node.clock.advance(second + LEEWAY + 1 - node.clock.seconds())
    client.pump.flush()
    assert_closed_with(client, 4001)


# -- the Pusher door ---------------------------------------------------------


def pusher_node(make_node, **settings) -> Node:
    return make_node(pusher_apps=[f"{APP_ID}:{APP_KEY}:{APP_SECRET}"], **settings)


def pusher_client(node: Node, key: str = APP_KEY) -> WSClient:
    return WSClient(node, f"/app/{key}?protocol=7&client=js&version=8.4.0")


def events(client: WSClient) -> list[tuple[str, object]]:
    """The Pusher events received since the last call, as (event, data decoded from its JSON string)."""
    return [(m["event"], json.loads(m["data"])) for m in client.messages()]


def test_pusher_connection_established(make_node):
    node = pusher_node(make_node, pusher_activity_timeout=45)
    client = pusher_client(node)
    assert client.status_line == b"HTTP/1.1 101 Switching Protocols"
    [(event, data)] = events(client)
    assert event == "pusher:connection_established"
    assert re.fullmatch(r"\d+\.\d+", data["socket_id"])
    assert data["activity_timeout"] == 45
    assert data["socket_id"] == client.protocol.socket_id


def test_pusher_unknown_app_key_gets_an_error_and_4001(make_node):
    """Pusher refuses after the handshake: a pusher:error naming the code, then a close with it."""
    node = pusher_node(make_node)
    client = pusher_client(node, key="nosuchkey")
    (opcode, payload), (close_opcode, close) = client.frames()
    assert opcode == 0x1 and close_opcode == 0x8
    error = json.loads(payload)
    assert (error["event"], json.loads(error["data"])["code"]) == ("pusher:error", 4001)
    assert close_code(close) == 4001
    client.close(4001)
    assert client.closed
    assert len(node.hub.connections) == 0


def test_pusher_ping_gets_pong(make_node):
    node = pusher_node(make_node)
    client = pusher_client(node)
    events(client)
    client.send(text({"event": "pusher:ping", "data": {}}))
    assert events(client) == [("pusher:pong", {})]


def test_pusher_silence_gets_a_ping_then_4201(make_node):
    """After activity_timeout of silence the server sends pusher:ping; with no pong within pong_timeout, 4201."""
    node = pusher_node(make_node, pusher_activity_timeout=30, pusher_pong_timeout=10)
    client = pusher_client(node)
    events(client)
    node.clock.advance(29)
    client.pump.flush()
    assert client.frames() == []
    node.clock.advance(3)  # the sweep runs every 2.5 s
    client.pump.flush()
    assert events(client) == [("pusher:ping", {})]
    node.clock.advance(9)
    client.pump.flush()
    assert client.frames() == []
    node.clock.advance(3)
    client.pump.flush()
    assert assert_closed_with(client, 4201) == b"Pong reply not received"
    assert len(node.hub.connections) == 0


def test_pusher_pong_keeps_the_connection(make_node):
    """A client that answers the server's pusher:ping stays, and is pinged again only after more silence."""
    node = pusher_node(make_node, pusher_activity_timeout=30, pusher_pong_timeout=10)
    client = pusher_client(node)
    events(client)
    node.clock.advance(32)
    client.pump.flush()
    assert events(client) == [("pusher:ping", {})]
    client.send(text({"event": "pusher:pong", "data": {}}))
    node.clock.advance(20)
    client.pump.flush()
    assert client.frames() == [] and not client.closed
    node.clock.advance(13)
    client.pump.flush()
    assert events(client) == [("pusher:ping", {})]


def test_pusher_shutdown_closes_with_4200(make_node):
    node = pusher_node(make_node)
    client = pusher_client(node)
    events(client)
    node.service.stopService()
    client.pump.flush()
    assert_closed_with(client, 4200)
