"""The WebSocket door, exactly as docs/PROTOCOL.md §5, with real Autobahn clients."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import error

from tests.helpers import HANDSHAKE, connect_ws, raw_connect, raw_handshake, sleep, wait_for


async def welcomed(daemon, query=""):
    client = await daemon.connect(query)
    welcome = await client.next_of("welcome")
    assert isinstance(welcome["client"], str) and welcome["client"]
    return client


@pytest_twisted.ensureDeferred
async def test_url_subscription_listen_only(daemon):
    await daemon.publish({"channel": "b", "data": 0})
    client = await welcomed(daemon, "channel=a&channel=b&channel=a")
    # One answer per channel, each when its engine call answers: not always in URL order (PROTOCOL 5.1).
    first, second = sorted([await client.next_of("subscribed") for _ in range(2)], key=lambda f: f["channel"])
    assert (first["channel"], first["offset"]) == ("a", 0)
    assert (second["channel"], second["offset"]) == ("b", 1)
    assert isinstance(first["epoch"], str) and first["epoch"]
    await daemon.publish({"channel": "b", "data": "hello"})
    message = await client.next_of("message")
    got = (message["channel"], message["offset"], message["epoch"], message["data"])
    assert got == ("b", 2, second["epoch"], "hello")


@pytest_twisted.ensureDeferred
async def test_welcome_ids_differ(daemon):
    one = await daemon.connect()
    two = await daemon.connect()
    assert (await one.next())["client"] != (await two.next())["client"]


@pytest_twisted.ensureDeferred
async def test_subscribe_unsubscribe_ping_frames(daemon):
    client = await welcomed(daemon)
    client.send({"type": "subscribe", "channel": "news"})
    subscribed = await client.next_of("subscribed")
    assert (subscribed["channel"], subscribed["offset"]) == ("news", 0)
    await daemon.publish({"channel": "news", "data": 1})
    assert (await client.next_of("message"))["data"] == 1

    client.send({"type": "subscribe", "channel": "news"})
    error = await client.next_of("error")
    assert (error["code"], error["channel"]) == ("already_subscribed", "news")

    client.send({"type": "ping"})
    assert await client.next() == {"type": "pong"}

    client.send({"type": "unsubscribe", "channel": "news"})
    assert await client.next() == {"type": "unsubscribed", "channel": "news"}
    await daemon.publish({"channel": "news", "data": 2})
    client.send({"type": "unsubscribe", "channel": "news"})
    error = await client.next_of("error")
    assert error["code"] == "not_subscribed"
    assert client.pending() == []
    assert daemon.hub.subscriber_count("news") == 0


BAD_FRAMES = [
    (b"not json", "invalid_json"),
    (b"[1, 2]", "invalid_frame"),
    (b'"ping"', "invalid_frame"),
    (b"{}", "unknown_type"),
    (b'{"type": "dance"}', "unknown_type"),
    (b'{"type": 7}', "unknown_type"),
    (b'{"type": "subscribe"}', "missing_channel"),
    (b'{"type": "subscribe", "channel": "a b"}', "invalid_channel"),
    (b'{"type": "subscribe", "channel": ["a"]}', "invalid_channel"),
    (b'{"type": "subscribe", "channel": "ok", "token": 5}', "invalid_token"),
    (b'{"type": "unsubscribe"}', "missing_channel"),
    (b'{"type": "subscribe", "channel": "private-x"}', "unauthorized"),
]


@pytest.mark.parametrize("payload,code", BAD_FRAMES)
@pytest_twisted.ensureDeferred
async def test_bad_frames_get_an_error_and_the_connection_lives(daemon, payload, code):
    client = await welcomed(daemon)
    client.send(payload)
    error = await client.next_of("error")
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    client.send({"type": "ping"})
    assert await client.next() == {"type": "pong"}


@pytest_twisted.ensureDeferred
async def test_binary_frame_closes_with_1003(daemon):
    client = await welcomed(daemon)
    client.send_binary(b"\x00\x01")
    code, reason = await client.closed
    assert code == 1003


@pytest_twisted.ensureDeferred
async def test_oversize_frame_closes_with_1009(make_daemon):
    daemon = await make_daemon(max_message_size=1000)
    client = await welcomed(daemon)
    client.send({"type": "ping", "padding": "x" * 1000})
    code, reason = await client.closed
    assert code == 1009


@pytest_twisted.ensureDeferred
async def test_frame_at_the_limit_is_accepted(make_daemon):
    daemon = await make_daemon(max_message_size=1000)
    client = await welcomed(daemon)
    frame = b'{"type": "ping", "p": "' + b"x" * (1000 - 25) + b'"}'
    assert len(frame) == 1000
    client.send(frame)
    assert await client.next() == {"type": "pong"}


@pytest_twisted.ensureDeferred
async def test_invalid_utf8_closes_with_1007(daemon):
    client = await welcomed(daemon)
    # Autobahn's client validates nothing it sends: this is a real bad frame.
    client.protocol.sendMessage(b'{"type": "\xff"}', isBinary=False)
    code, _ = await client.closed
    assert code == 1007


@pytest.mark.parametrize(
    "query,status",
    [
        ("channel=bad%20name", 400),
        ("channel=ok&channel=", 400),
        ("channel=private-secret", 401),
        ("channel=presence-room", 401),
    ],
)
@pytest_twisted.ensureDeferred
async def test_handshake_refusals(daemon, query, status):
    got, client = await raw_handshake(daemon.port, "/websocket?" + query)
    assert got == status
    # The refusal is a fixed text: nothing of the request is echoed.
    assert b"bad name" not in client.received and b"secret" not in client.received
    await client.lost


@pytest_twisted.ensureDeferred
async def test_handshake_accepted_by_hand(daemon):
    status, client = await raw_handshake(daemon.port, "/websocket?channel=a")
    assert status == 101
    client.transport.loseConnection()
    await client.lost


@pytest_twisted.ensureDeferred
async def test_plain_get_on_websocket_path_is_refused(daemon):
    status, body, _ = await daemon.get("/websocket")
    assert status >= 400
    assert b"<html" not in body.lower()  # webStatus is off


@pytest_twisted.ensureDeferred
async def test_heartbeat_drops_a_dead_peer(make_daemon):
    daemon = await make_daemon(ping_interval=1.0, ping_timeout=1.0)
    status, peer = await raw_handshake(daemon.port, "/websocket?channel=a")
    assert status == 101
    await wait_for(lambda: daemon.hub.subscriber_count("a") == 1)
    # The peer never answers the server's ping: the server drops it.
    await wait_for(lambda: peer.lost.called, timeout=6)
    assert b"\x89" in peer.received  # a ping frame was sent first
    assert daemon.hub.subscriber_count("a") == 0
    assert not daemon.hub.connections


@pytest_twisted.ensureDeferred
async def test_live_peer_survives_heartbeats(make_daemon):
    daemon = await make_daemon(ping_interval=1.0, ping_timeout=1.0)
    client = await welcomed(daemon, "channel=a")
    await client.next_of("subscribed")
    await sleep(3.5)
    assert not client.closed.called
    await daemon.publish({"channel": "a", "data": "still here"})
    assert (await client.next_of("message"))["data"] == "still here"


@pytest_twisted.ensureDeferred
async def test_handshake_timeout_drops_a_silent_peer(make_daemon):
    daemon = await make_daemon(handshake_timeout=1.0)
    peer = await raw_connect(daemon.port)
    peer.transport.write(b"GET /websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n")
    await wait_for(lambda: peer.lost.called, timeout=4)
    assert b"101" not in peer.received


@pytest_twisted.ensureDeferred
async def test_ordering_of_1000_messages(daemon):
    client = await welcomed(daemon, "channel=order")
    await client.next_of("subscribed")
    for start in range(0, 1000, 100):
        status, _, _ = await daemon.publish([{"channel": "order", "data": i} for i in range(start, start + 100)])
        assert status == 200
    got = [await client.next_of("message") for _ in range(1000)]
    assert [m["offset"] for m in got] == list(range(1, 1001))
    assert [m["data"] for m in got] == list(range(1000))


@pytest_twisted.ensureDeferred
async def test_concurrent_publishers_keep_order_without_gaps(daemon):
    from twisted.internet.defer import Deferred, gatherResults

    client = await welcomed(daemon, "channel=race")
    await client.next_of("subscribed")
    answers = await gatherResults(
        [Deferred.fromCoroutine(daemon.publish({"channel": "race", "data": i})) for i in range(200)]
    )
    offsets = sorted(a[1]["offset"] for a in answers)
    assert offsets == list(range(1, 201))
    got = [await client.next_of("message") for _ in range(200)]
    assert [m["offset"] for m in got] == list(range(1, 201))
    by_offset = {a[1]["offset"]: a for a in answers}
    assert all(by_offset[m["offset"]][1]["channel"] == "race" for m in got)


@pytest_twisted.ensureDeferred
async def test_fan_out_to_300_subscribers(daemon):
    clients = []
    for _ in range(300):
        client = await daemon.connect("channel=fan")
        clients.append(client)
    for client in clients:
        await client.next_of("welcome")
        await client.next_of("subscribed")
    assert daemon.hub.subscriber_count("fan") == 300
    for i in range(20):
        await daemon.publish({"channel": "fan", "data": i})
    for client in clients:
        got = [await client.next_of("message") for _ in range(20)]
        assert [m["offset"] for m in got] == list(range(1, 21))
    # One encoding per publication: every subscriber got byte-identical frames.
    assert len({id(c) for c in clients}) == 300


@pytest_twisted.ensureDeferred
async def test_unsubscribe_on_close_forgets_the_channel(daemon):
    client = await welcomed(daemon, "channel=gone")
    await client.next_of("subscribed")
    assert daemon.hub.channel_names() == ["gone"]
    client.close()
    await client.closed
    await wait_for(lambda: daemon.hub.channel_names() == [])
    await wait_for(lambda: not daemon.hub.connections)


@pytest_twisted.ensureDeferred
async def test_shutdown_sends_1001_and_stops(daemon):
    clients = [await welcomed(daemon, "channel=a") for _ in range(5)]
    await daemon.service.stopService()
    for client in clients:
        code, _ = await client.closed
        assert code == 1001
    assert not daemon.hub.connections
    # New connections are refused once stopped.
    with pytest.raises(error.ConnectionRefusedError):
        await connect_ws(daemon.port, "/websocket")


@pytest_twisted.ensureDeferred
async def test_shutdown_aborts_a_peer_that_never_closes(make_daemon):
    daemon = await make_daemon(shutdown_timeout=1.0)
    status, peer = await raw_handshake(daemon.port, "/websocket")
    assert status == 101
    await wait_for(lambda: len(daemon.hub.connections) == 1)
    await daemon.service.stopService()
    await wait_for(lambda: peer.lost.called, timeout=3)
    assert b"\x88\x02\x03\xe9" in peer.received or b"\x88" in peer.received  # close frame 1001 was sent


# -- the short way of opening handshakes (pushie.doors._http.PushieHTTPChannel) -----


def masked_text(payload: bytes) -> bytes:
    mask = b"\x01\x02\x03\x04"
    return bytes((0x81, 0x80 | len(payload))) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@pytest_twisted.ensureDeferred
async def test_frames_in_the_same_packet_as_the_handshake_are_read(daemon):
    client = await raw_connect(daemon.port)
    handshake = HANDSHAKE.format(path="/websocket?channel=a", port=daemon.port, extra="").encode()
    client.transport.write(handshake + masked_text(b'{"type":"ping"}'))
    await wait_for(lambda: b'{"type":"pong"}' in client.received)
    assert client.received.startswith(b"HTTP/1.1 101 ")
    client.transport.loseConnection()
    await client.lost


@pytest_twisted.ensureDeferred
async def test_handshake_headers_over_16_kib_are_refused(daemon):
    extra = "".join(f"X-Pad-{i}: {'p' * 6000}\r\n" for i in range(3))
    status, client = await raw_handshake(daemon.port, "/websocket?channel=a", extra)
    assert status == 400
    await client.lost


@pytest.mark.parametrize(
    "request_line, extra",
    [
        ("GET /websocket?channel=a HTTP/1.1", "X-Folded: one\r\n  two\r\n"),  # obs-fold
        ("GET /websocket?channel=a HTTP/1.0", ""),
        ("GET /websocket/?channel=a HTTP/1.1", ""),
    ],
    ids=["folded-header", "http-1.0", "trailing-slash"],
)
@pytest_twisted.ensureDeferred
async def test_other_handshakes_take_twisted_webs_way_and_work(daemon, request_line, extra):
    client = await raw_connect(daemon.port)
    handshake = HANDSHAKE.format(path="/websocket?channel=a", port=daemon.port, extra=extra)
    client.transport.write(handshake.replace("GET /websocket?channel=a HTTP/1.1", request_line).encode())
    await wait_for(lambda: b'"subscribed"' in client.received or client.lost.called)
    assert client.received.startswith(b"HTTP/1.1 101 ")
    client.transport.loseConnection()
    await client.lost


@pytest_twisted.ensureDeferred
async def test_upgrade_after_a_request_on_the_same_connection(daemon):
    client = await raw_connect(daemon.port)
    client.transport.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await wait_for(lambda: b'"status"' in client.received)
    client.received = b""
    client.transport.write(HANDSHAKE.format(path="/websocket?channel=a", port=daemon.port, extra="").encode())
    await wait_for(lambda: b'"subscribed"' in client.received)
    assert client.received.startswith(b"HTTP/1.1 101 ")
    client.transport.loseConnection()
    await client.lost
