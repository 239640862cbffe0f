"""
What the server writes on its WebSocket doors, whatever the client does:
member lists far over the client-frame limit (and the presence cap that
bounds them), replies to a client's own frames counted against the
slow-consumer budget, a 1002 close frame (not a reset) for a bad close
frame, and handshake answers that carry neither client input nor library
versions.  Raw TCP where every byte matters; each test on both engines.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time

import jwt
import pytest
import pytest_twisted

from pushie.records import Member
from tests.helpers import HANDSHAKE, raw_connect, raw_handshake, sleep, wait_for
from tests.test_fastpath import OP_CLOSE, OP_TEXT, server_frames
from tests.test_hostile_input import assert_no_traceback
from tests.test_operations import metric
from tests.test_pusher import APPS, SDK, connect, expect, next_event, subscribe

SECRET = "subscriber-secret-wsframes-000000000000"
CLIENT_LIMIT = 64 * 1024  # the default max_message_size: what a client may send


def token(sub: str, channel: str, info: object = None) -> str:
    claims = {"sub": sub, "channels": [channel], "exp": time.time() + 600}
    if info is not None:
        claims["info"] = info
    return jwt.encode(claims, SECRET, algorithm="HS256")


async def add_members(daemon, channel: str, count: int, info: object) -> None:
    """Members that joined from elsewhere (another node, say), through the engine's presence API."""
    engine = daemon.engine
    for i in range(count):
        await engine.presence_add(channel, Member(f"m{i:05}", info), f"elsewhere{i}")


async def member_count(daemon, channel: str) -> int:
    return len(await daemon.engine.presence(channel))


async def next_message(client) -> dict:
    """The next C{message} frame, past the joins and leaves before it."""
    while True:
        frame = await client.next()
        if frame["type"] not in ("join", "leave"):
            assert frame["type"] == "message", frame
            return frame


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (RFC 6455 5.2)."""
    mask = os.urandom(4)
    size = len(payload)
    if size < 126:
        head = bytes((0x80 | opcode, 0x80 | size))
    elif size < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + size.to_bytes(8, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def server_side(daemon, client):
    """The daemon's protocol object for a raw or Autobahn client connection."""
    port = client.transport.getHost().port
    (protocol,) = [c for c in daemon.hub.connections if c.transport.getPeer().port == port]
    return protocol


# -- A3: presence answers of any size, within presence_max_members -----------


def big_count(daemon) -> int:
    # The Redis engine's join scans the channel's hash: 10,000 joins one by
    # one are quadratic there, so it proves the size with fewer, larger ones.
    return 10_000 if daemon.engine.name == "memory" else 1_500


@pytest_twisted.ensureDeferred
async def test_native_member_list_far_over_the_client_frame_limit_is_delivered(make_daemon):
    daemon = await make_daemon(subscriber_secrets=[SECRET], presence_max_members=10_001)
    count = big_count(daemon)
    info = {"name": "x" * 20} if count == 10_000 else {"name": "x" * 60}
    await add_members(daemon, "presence-big", count, info)
    joiner = await daemon.connect(f"channel=presence-big&token={token('joiner', 'presence-big', {'n': 1})}")
    await joiner.next_of("welcome")
    subscribed = await joiner.next_of("subscribed")
    assert len(subscribed["members"]) == count + 1
    assert len(json.dumps(subscribed)) > 2 * CLIENT_LIMIT
    assert daemon.hub.subscriber_count("presence-big") == 1
    # The explicit presence ask gets the same list, as large.
    joiner.send({"type": "presence", "channel": "presence-big"})
    answer = await joiner.next_of("presence")
    assert len(answer["members"]) == count + 1
    # Live after the answer: publications arrive.
    await daemon.publish({"channel": "presence-big", "data": 1})
    assert (await joiner.next_of("message"))["data"] == 1


@pytest_twisted.ensureDeferred
async def test_sse_presence_cap_refuses_that_channel_and_keeps_the_stream(make_daemon, log_events):
    from tests.test_sse import open_stream

    daemon = await make_daemon(subscriber_secrets=[SECRET], presence_max_members=1)
    ann = await daemon.connect(f"channel=presence-room&token={token('ann', 'presence-room')}")
    await ann.next_of("welcome")
    await ann.next_of("subscribed")
    grant = jwt.encode({"sub": "dan", "channels": ["*"], "exp": time.time() + 600}, SECRET, algorithm="HS256")
    response, reader = await open_stream(daemon, f"channel=presence-room&channel=news&token={grant}")
    assert response.code == 200
    seen = {}
    for _ in range(2):
        event = await reader.next()
        seen[event["event"]] = json.loads(event["data"])
    assert (seen["error"]["code"], seen["error"]["channel"]) == ("presence_full", "presence-room")
    assert seen["subscribed"]["channel"] == "news"
    assert daemon.hub.subscriber_count("presence-room") == 1
    # The stream lives on for its other channel, and only for it.
    await daemon.publish({"channel": "presence-room", "data": "not for dan"})
    await daemon.publish({"channel": "news", "data": "for dan"})
    message = await reader.next("message")
    assert (json.loads(message["data"])["channel"], json.loads(message["data"])["data"]) == ("news", "for dan")
    assert_no_traceback(log_events)


@pytest_twisted.ensureDeferred
async def test_native_presence_cap_refuses_a_new_member_and_counts_it_nowhere(make_daemon):
    daemon = await make_daemon(subscriber_secrets=[SECRET], presence_max_members=3)
    members = []
    for name in ("ann", "bob", "cat"):
        client = await daemon.connect(f"channel=presence-room&token={token(name, 'presence-room')}")
        await client.next_of("welcome")
        await client.next_of("subscribed")
        members.append(client)
    late = await daemon.connect()
    await late.next_of("welcome")
    late.send({"type": "subscribe", "channel": "presence-room", "token": token("dan", "presence-room")})
    error = await late.next_of("error")
    assert (error["code"], error["channel"]) == ("presence_full", "presence-room")
    assert "presence_max_members" in error["message"]
    assert daemon.hub.subscriber_count("presence-room") == 3
    assert await member_count(daemon, "presence-room") == 3
    await daemon.publish({"channel": "presence-room", "data": "after"})
    assert (await next_message(members[0]))["data"] == "after"
    assert late.pending() == []  # neither a member's join nor the message
    # A second connection of a member already present takes no new place.
    again = await daemon.connect(f"channel=presence-room&token={token('bob', 'presence-room')}")
    await again.next_of("welcome")
    assert len((await again.next_of("subscribed"))["members"]) == 3
    # When one leaves, the next may join.
    members[0].close()
    await members[0].closed
    await wait_for(lambda: daemon.hub.subscriber_count("presence-room") == 3)
    late.send({"type": "subscribe", "channel": "presence-room", "token": token("dan", "presence-room")})
    assert {m["id"] for m in (await late.next_of("subscribed"))["members"]} == {"bob", "cat", "dan"}
    status, body, _ = await daemon.get("/metrics")
    assert metric(body.decode(), 'pushie_rejected_requests_total{reason="presence_full"}') == 1


@pytest_twisted.ensureDeferred
async def test_pusher_member_list_far_over_the_client_frame_limit_is_delivered(make_daemon):
    daemon = await make_daemon(pusher_apps=APPS, presence_max_members=10_001)
    count = big_count(daemon)
    await add_members(daemon, "presence-big", count, {"name": "x" * 60})
    sdk = SDK(daemon)
    joiner = await connect(daemon)
    auth = sdk.authenticate("presence-big", joiner.socket_id, {"user_id": "joiner", "user_info": {"n": 1}})
    answer = await subscribe(joiner, "presence-big", **auth)
    presence = answer["data"]["presence"]
    assert presence["count"] == len(presence["ids"]) == count + 1
    assert presence["hash"]["joiner"] == {"n": 1}
    # pusher-js subscribing again gets the list again (a re-send), as large.
    joiner.send({"event": "pusher:subscribe", "data": {"channel": "presence-big", **auth}})
    again = await expect(joiner, "pusher_internal:subscription_succeeded")
    assert again["data"]["presence"]["count"] == count + 1
    await daemon.publish({"channel": "presence-big", "data": "live"})
    assert (await expect(joiner, "message"))["channel"] == "presence-big"


@pytest_twisted.ensureDeferred
async def test_pusher_presence_cap_refuses_with_limit_reached(make_daemon):
    daemon = await make_daemon(pusher_apps=APPS, presence_max_members=2)
    sdk = SDK(daemon)
    clients = []
    for user in ("ann", "bob"):
        client = await connect(daemon)
        await subscribe(
            client, "presence-room", **sdk.authenticate("presence-room", client.socket_id, {"user_id": user})
        )
        clients.append(client)
    await expect(clients[0], "pusher_internal:member_added")
    late = await connect(daemon)
    auth = sdk.authenticate("presence-room", late.socket_id, {"user_id": "cat"})
    late.send({"event": "pusher:subscribe", "data": {"channel": "presence-room", **auth}})
    frames = [await next_event(late), await next_event(late)]
    error = [f for f in frames if f["event"] == "pusher:subscription_error"][0]
    assert error["channel"] == "presence-room"
    assert error["data"]["type"] == "LimitReached" and error["data"]["status"] == 4100
    assert daemon.hub.subscriber_count("presence-room") == 2
    assert await member_count(daemon, "presence-room") == 2
    await daemon.publish({"channel": "presence-room", "data": "x"})
    assert (await expect(clients[1], "message"))["channel"] == "presence-room"
    await sleep(0.05)
    assert late.pending() == []
    # The same user on a second socket is no new member.
    second = await connect(daemon)
    answer = await subscribe(
        second, "presence-room", **sdk.authenticate("presence-room", second.socket_id, {"user_id": "bob"})
    )
    assert answer["data"]["presence"]["count"] == 2


# -- A4: replies to a client's own frames count against slow_consumer_buffer --

LIMIT = 128 * 1024


def starve(daemon, client) -> dict:
    """
    Make the client a reader that never reads, with small socket buffers at
    both ends (so the daemon's own buffer fills soon), and record the most
    bytes the daemon's transport ever held for it.
    """
    client.transport.pauseProducing()
    client.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    protocol = server_side(daemon, client)
    transport = protocol.transport
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    seen = {"peak": 0}
    write = transport.write

    def counting_write(data):
        write(data)
        seen["peak"] = max(seen["peak"], len(transport.dataBuffer) - transport.offset + transport._tempDataLen)

    transport.write = counting_write
    return seen


async def assert_dropped_within_budget(daemon, client, seen, answer_size: int, code: int) -> None:
    await wait_for(lambda: len(daemon.hub.connections) == 0, timeout=20)
    # The transport's own 64 KiB, the frame that filled it, then the budget.
    assert seen["peak"] <= 64 * 1024 + answer_size + LIMIT + answer_size, seen
    client.transport.resumeProducing()
    await wait_for(lambda: client.lost.called)
    closes = [payload for first, payload in server_frames(client.received) if first & 0x0F == OP_CLOSE]
    if closes:  # the abort may cut it off; when it arrived, it says why
        assert int.from_bytes(closes[0][:2], "big") == code
    status, body, _ = await daemon.get("/metrics")
    assert metric(body.decode(), "pushie_slow_consumer_disconnects_total") == 1


@pytest.mark.parametrize("kind", ["presence", "ping", "control-ping"])
@pytest_twisted.ensureDeferred
async def test_native_replies_to_a_client_that_never_reads_are_bounded(make_daemon, kind):
    daemon = await make_daemon(subscriber_secrets=[SECRET], slow_consumer_buffer=LIMIT, slow_consumer_grace=60)
    if kind == "presence":
        await add_members(daemon, "presence-flood", 30, {"bio": "y" * 1000})  # answers of ~31 KB
        frame, count, answer_size = {"type": "presence", "channel": "presence-flood"}, 1_000, 32 * 1024
    else:
        frame, count, answer_size = {"type": "ping"}, 30_000, 20
    status, client = await raw_handshake(
        daemon.port, f"/websocket?channel=presence-flood&token={token('flooder', 'presence-flood')}"
    )
    assert status == 101
    await wait_for(lambda: b'"subscribed"' in client.received)
    seen = starve(daemon, client)
    if kind == "control-ping":
        data, answer_size = client_frame(0x9, b"p" * 125) * 6_000, 127
    else:
        data = client_frame(OP_TEXT, json.dumps(frame).encode()) * count
    client.transport.write(data)
    await assert_dropped_within_budget(daemon, client, seen, answer_size, 1013)


@pytest_twisted.ensureDeferred
async def test_pusher_resends_to_a_client_that_never_reads_are_bounded(make_daemon):
    daemon = await make_daemon(pusher_apps=APPS, slow_consumer_buffer=LIMIT, slow_consumer_grace=60)
    await add_members(daemon, "presence-flood", 30, {"bio": "y" * 1000})
    sdk = SDK(daemon)
    status, client = await raw_handshake(daemon.port, "/app/" + APPS[0].split(":")[1] + "?protocol=7")
    assert status == 101
    await wait_for(lambda: b"connection_established" in client.received)
    (_, payload), *_ = server_frames(client.received)
    socket_id = json.loads(json.loads(payload)["data"])["socket_id"]
    auth = sdk.authenticate("presence-flood", socket_id, {"user_id": "flooder"})
    subscribe_frame = {"event": "pusher:subscribe", "data": {"channel": "presence-flood", **auth}}
    client.transport.write(client_frame(OP_TEXT, json.dumps(subscribe_frame).encode()))
    await wait_for(lambda: b"subscription_succeeded" in client.received)
    seen = starve(daemon, client)
    # Each repeated subscribe re-sends the member list (~31 KB); pings get pongs.
    ping = client_frame(OP_TEXT, b'{"event":"pusher:ping","data":{}}')
    client.transport.write((client_frame(OP_TEXT, json.dumps(subscribe_frame).encode()) + ping * 10) * 1_000)
    await assert_dropped_within_budget(daemon, client, seen, 32 * 1024, 4100)


# -- A14: close frames, refusals and Server headers ---------------------------


@pytest.mark.parametrize(
    "payload",
    [
        struct.pack("!H", 5000),  # out of range
        struct.pack("!H", 1005),  # reserved: never on the wire
        struct.pack("!H", 999),
        struct.pack("!H", 2999) + b"why",
        b"\x03",  # a 1-byte payload
    ],
    ids=["5000", "1005", "999", "2999-reason", "1-byte"],
)
@pytest_twisted.ensureDeferred
async def test_bad_close_frame_gets_a_1002_close_frame_not_a_reset(daemon, payload):
    status, client = await raw_handshake(daemon.port, "/websocket")
    assert status == 101
    client.transport.write(client_frame(OP_CLOSE, payload))
    await wait_for(lambda: client.lost.called)
    closes = [p for first, p in server_frames(client.received) if first & 0x0F == OP_CLOSE]
    assert len(closes) == 1 and int.from_bytes(closes[0][:2], "big") == 1002, client.received
    await wait_for(lambda: not daemon.hub.connections)


@pytest_twisted.ensureDeferred
async def test_pusher_bad_close_frame_gets_a_1002_close_frame(make_daemon):
    daemon = await make_daemon(pusher_apps=APPS)
    status, client = await raw_handshake(daemon.port, "/app/" + APPS[0].split(":")[1] + "?protocol=7")
    assert status == 101
    await wait_for(lambda: b"connection_established" in client.received)
    client.transport.write(client_frame(OP_CLOSE, struct.pack("!H", 5000)))
    await wait_for(lambda: client.lost.called)
    closes = [p for first, p in server_frames(client.received) if first & 0x0F == OP_CLOSE]
    assert len(closes) == 1 and int.from_bytes(closes[0][:2], "big") == 1002, client.received


async def raw_request(port: int, request: bytes) -> bytes:
    client = await raw_connect(port)
    client.transport.write(request)
    await wait_for(lambda: client.lost.called or b"\r\n\r\n" in client.received)
    client.transport.loseConnection()
    await wait_for(lambda: client.lost.called)
    return client.received


MARK = "Zq9mark"

HOSTILE_HANDSHAKES = [
    # Autobahn's own refusals quote the value they refuse.
    HANDSHAKE.replace("Upgrade: websocket", f"Upgrade: {MARK}"),
    HANDSHAKE.replace("Sec-WebSocket-Version: 13", f"Sec-WebSocket-Version: 13{MARK}"),
    HANDSHAKE.replace("Sec-WebSocket-Version: 13", f"Sec-WebSocket-Version: 99{MARK}"),
    HANDSHAKE.replace("Connection: Upgrade", f"Connection: {MARK}"),
    HANDSHAKE.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", f"Sec-WebSocket-Key: {MARK}"),
    HANDSHAKE.replace("Host: 127.0.0.1:{port}", f"Host: {MARK}:x:y"),
    # twisted.web's way (a body): the request line goes to Autobahn as it came.
    HANDSHAKE.replace("GET {path} HTTP/1.1", "POST {path} HTTP/1.1").replace("{extra}", "Content-Length: 0\r\n"),
]


@pytest.mark.parametrize("path", ["/websocket?channel=" + MARK, "/app/" + APPS[0].split(":")[1]])
@pytest.mark.parametrize("template", HOSTILE_HANDSHAKES)
@pytest_twisted.ensureDeferred
async def test_handshake_refusals_carry_no_client_input(make_daemon, path, template):
    daemon = await make_daemon(pusher_apps=APPS)
    request = template.replace("{path}", path).replace("{port}", str(daemon.port)).replace("{extra}", "")
    answer = await raw_request(daemon.port, request.encode())
    head = answer.split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"HTTP/1.1 4"), answer
    assert MARK.encode() not in head and MARK.lower().encode() not in head.lower(), head
    assert b"autobahn" not in answer.lower() and b"twisted" not in answer.lower()


@pytest_twisted.ensureDeferred
async def test_no_answer_names_a_library_or_its_version(make_daemon):
    daemon = await make_daemon(pusher_apps=APPS)
    heads = []
    for path in ("/websocket", "/app/" + APPS[0].split(":")[1] + "?protocol=7"):
        status, client = await raw_handshake(daemon.port, path)
        assert status == 101
        heads.append(client.received.split(b"\r\n\r\n", 1)[0])
        client.transport.loseConnection()
        await client.lost
    # twisted.web's answers, and the publish short path's.
    for request in (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
        b'POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: 29\r\n\r\n{"channel": "c", "data": 1}\r\n',
    ):
        heads.append((await raw_request(daemon.port, request)).split(b"\r\n\r\n", 1)[0])
    for head in heads:
        lines = head.lower().split(b"\r\n")
        assert b"server: pushie" in lines, head
        assert b"autobahn" not in head.lower() and b"twisted" not in head.lower(), head
    await wait_for(lambda: not daemon.hub.connections)
