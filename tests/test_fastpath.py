"""
The fan-out fast path (frame bytes written straight to the socket, bursts of
a reactor turn in one write) on the connections where it must step aside or
stay correct: a client that offers compression, a connection that is
closing, a client that stops reading.  Raw clients, so that every byte the
server sends is seen.
"""

from __future__ import annotations

import json

import pytest_twisted

from pushie.wire import text_frame
from tests.helpers import raw_handshake, sleep, wait_for
from tests.test_operations import metric

OP_TEXT = 0x1
OP_CLOSE = 0x8


def server_frames(received: bytes) -> list[tuple[int, bytes]]:
    """
    The complete frames after the HTTP answer, as (first byte, payload).
    Server frames are never masked, so a mask bit fails the test.
    """
    data = received.split(b"\r\n\r\n", 1)[1]
    frames = []
    i = 0
    while i + 2 <= len(data):
        first, second = data[i], data[i + 1]
        assert not second & 0x80, "a server frame was masked"
        size, j = second & 0x7F, i + 2
        if size == 126:
            size, j = int.from_bytes(data[j : j + 2], "big"), j + 2
        elif size == 127:
            size, j = int.from_bytes(data[j : j + 8], "big"), j + 8
        if j + size > len(data):
            break
        frames.append((first, data[j : j + size]))
        i = j + size
    return frames


def messages(frames: list[tuple[int, bytes]]) -> list[dict]:
    texts = [json.loads(payload) for first, payload in frames if first & 0x0F == OP_TEXT]
    return [t for t in texts if t["type"] == "message"]


async def subscribed_raw(daemon, channel: str, extra: str = ""):
    status, client = await raw_handshake(daemon.port, f"/websocket?channel={channel}", extra)
    assert status == 101
    await wait_for(lambda: b'"subscribed"' in client.received)
    return client


@pytest_twisted.ensureDeferred
async def test_client_offering_permessage_deflate_gets_plain_frames(daemon):
    offer = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    client = await subscribed_raw(daemon, "z", offer)
    head = client.received.split(b"\r\n\r\n", 1)[0].lower()
    assert b"sec-websocket-extensions" not in head  # compression is never negotiated
    await daemon.publish({"channel": "z", "data": {"n": 0, "text": "é" * 50}})
    # A batch to one channel: a burst, written as one.
    await daemon.publish([{"channel": "z", "data": {"n": i, "text": "x" * 200}} for i in range(1, 6)])
    await wait_for(lambda: len(messages(server_frames(client.received))) == 6)
    frames = server_frames(client.received)
    for first, _ in frames:
        assert first & 0x70 == 0, "RSV1 set: a compressed frame"
        assert first & 0x80, "a fragmented frame"
    got = messages(frames)
    assert [m["offset"] for m in got] == list(range(1, 7))
    assert [m["data"]["n"] for m in got] == list(range(6))
    assert got[0]["data"]["text"] == "é" * 50
    client.transport.loseConnection()
    await client.lost


@pytest_twisted.ensureDeferred
async def test_closing_connection_gets_nothing_after_its_close_frame(daemon):
    client = await subscribed_raw(daemon, "shut")
    other = await daemon.connect("channel=shut")
    await other.next_of("welcome")
    await other.next_of("subscribed")
    port = client.transport.getHost().port
    (protocol,) = [c for c in daemon.hub.connections if c.transport.getPeer().port == port]
    # Publications dispatched in the same reactor turn as the close go out before it...
    await daemon.hub.publish([daemon_request("shut", i) for i in range(3)])
    protocol.close_for_shutdown()  # the raw client never answers: the server stays closing
    # ... and nothing after it, neither single publications nor bursts.
    await daemon.publish({"channel": "shut", "data": 3})
    await daemon.publish([{"channel": "shut", "data": i} for i in range(4, 8)])
    got = [await other.next_of("message") for _ in range(8)]
    assert [m["data"] for m in got] == list(range(8))
    await sleep(0.1)
    frames = server_frames(client.received)
    kinds = [first & 0x0F for first, _ in frames]
    assert kinds.count(OP_CLOSE) == 1
    after_close = frames[kinds.index(OP_CLOSE) + 1 :]
    assert after_close == []
    before = messages(frames)
    assert [m["data"] for m in before] == [m["data"] for m in got[: len(before)]]
    if daemon.engine.name == "memory":  # dispatched at once: all three were out before the close
        assert [m["data"] for m in before] == [0, 1, 2]
    client.transport.loseConnection()
    await client.lost


def daemon_request(channel: str, data: int):
    from pushie.records import PublishRequest

    return PublishRequest(channel, json.dumps(data).encode())


@pytest_twisted.ensureDeferred
async def test_slow_consumer_on_bursts_is_dropped_and_others_keep_up(make_daemon):
    daemon = await make_daemon(slow_consumer_buffer=300 * 1024, slow_consumer_grace=30)
    status, slow = await raw_handshake(daemon.port, "/websocket?channel=flood")
    assert status == 101
    slow.transport.pauseProducing()  # it stops reading
    fast = await daemon.connect("channel=flood")
    await fast.next_of("welcome")
    await fast.next_of("subscribed")
    payload = "x" * 5_000  # ten of them stay under the body limit (64 KiB)
    offset = 0
    while len(daemon.hub.connections) == 2 and offset < 5000:
        status, _, _ = await daemon.publish([{"channel": "flood", "data": payload} for _ in range(10)])
        assert status == 200
        for _ in range(10):
            offset += 1
            assert (await fast.next_of("message"))["offset"] == offset
    assert len(daemon.hub.connections) == 1, "the slow consumer was never dropped"
    slow.transport.resumeProducing()
    await wait_for(lambda: slow.lost.called)
    frames = server_frames(slow.received)
    closes = [payload for first, payload in frames if first & 0x0F == OP_CLOSE]
    if closes:  # the abort may cut it off; when it arrived, it says 1013
        assert int.from_bytes(closes[0][:2], "big") == 1013
    got = messages(frames)
    assert [m["offset"] for m in got] == list(range(1, len(got) + 1))  # what did arrive is whole and in order
    status, body, _ = await daemon.get("/metrics")
    assert metric(body.decode(), "pushie_slow_consumer_disconnects_total") == 1


@pytest_twisted.ensureDeferred
async def test_single_publications_leave_as_the_general_paths_frames(daemon):
    # One publication per request: each is delivered alone (deliver, not
    # deliver_burst); its bytes must be text_frame(envelope), for every
    # length encoding a publish body allows.
    client = await subscribed_raw(daemon, "single")
    start = len(client.received)
    sizes = [1, 100, 1_000, 60_000]  # 7-bit and 16-bit frame lengths
    for i, size in enumerate(sizes):
        status, _, _ = await daemon.publish({"channel": "single", "data": {"i": i, "x": "y" * size}})
        assert status == 200
    await wait_for(lambda: len(messages(server_frames(client.received))) == len(sizes))
    envelopes = [payload for first, payload in server_frames(client.received) if b'"message"' in payload]
    got = [json.loads(e) for e in envelopes]
    assert [(m["offset"], m["data"]) for m in got] == [(i + 1, {"i": i, "x": "y" * n}) for i, n in enumerate(sizes)]
    assert client.received[start:] == b"".join(text_frame(e) for e in envelopes)


@pytest_twisted.ensureDeferred
async def test_slow_consumer_on_single_publications_is_dropped(make_daemon):
    daemon = await make_daemon(slow_consumer_buffer=300 * 1024, slow_consumer_grace=30)
    status, slow = await raw_handshake(daemon.port, "/websocket?channel=alone")
    assert status == 101
    await wait_for(lambda: b'"subscribed"' in slow.received)
    slow.transport.pauseProducing()  # it stops reading
    payload = "x" * 50_000
    sent = 0
    while len(daemon.hub.connections) == 1 and sent < 2000:
        status, _, _ = await daemon.publish({"channel": "alone", "data": payload})
        assert status == 200
        sent += 1
    assert len(daemon.hub.connections) == 0, "the slow consumer was never dropped"
    slow.transport.resumeProducing()
    await wait_for(lambda: slow.lost.called)
    got = messages(server_frames(slow.received))
    assert [m["offset"] for m in got] == list(range(1, len(got) + 1))
    assert len(got) < sent
    status, body, _ = await daemon.get("/metrics")
    assert metric(body.decode(), "pushie_slow_consumer_disconnects_total") == 1
