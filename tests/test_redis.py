"""
The Redis engine: several daemons as separate processes sharing one Redis,
fan-out only where needed, presence across nodes (and a crashed node's members
going away), and faults (Redis stopped and restarted, the pub/sub connection
killed) with nothing accepted lost and nothing doubled.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
import treq
from twisted.web.client import HTTPConnectionPool

from pushie.config import ConfigError, load_settings
from pushie.engines.redis import HEARTBEAT_INTERVAL, HEARTBEAT_TTL, meta_header, parse_redis_url, read_meta_header
from tests.helpers import connect_ws, port_of, sleep, start_daemon, start_nodes, wait_for
from tests.test_auth import token
from tests.test_daemon import stop


def test_redis_urls():
    assert parse_redis_url("redis://127.0.0.1:6380/2") == {
        "host": "127.0.0.1",
        "port": 6380,
        "db": 2,
        "password": None,
        "username": None,
        "tls": False,
        "sentinels": [],
        "service": None,
    }
    assert parse_redis_url("rediss://:s%40cret@cache.example/0")["password"] == "s@cret"
    assert parse_redis_url("rediss://cache.example")["tls"] is True
    for bad in ("http://x", "redis://h:port/0", "redis://h/db"):
        with pytest.raises(ValueError):
            parse_redis_url(bad)
    with pytest.raises(ConfigError, match="bad value for 'engine'"):
        load_settings({"engine": "mongo://x"})


# -- several daemons, one Redis ---------------------------------------------


async def publish(pool, port, body):
    response = await treq.post(f"http://127.0.0.1:{port}/publish", json=body, pool=pool)
    return response.code, json.loads(await response.content())


@pytest_twisted.ensureDeferred
async def test_three_nodes_share_offsets_history_and_presence(own_redis):
    nodes = await start_nodes(own_redis.url, 3)
    pool = HTTPConnectionPool(__import__("twisted.internet.reactor").internet.reactor, persistent=False)
    clients = []
    try:
        ports = [port_of(p) for p in nodes]
        subscribers = []
        for port in ports:
            client = await connect_ws(port, "/websocket?channel=news")
            clients.append(client)
            await client.next_of("welcome")
            subscribers.append(await client.next_of("subscribed"))
        assert len({s["epoch"] for s in subscribers}) == 1
        # Each node publishes in turn; every node's subscriber gets every message, in one order.
        for i, port in enumerate(ports * 3):
            status, body = await publish(pool, port, {"channel": "news", "data": i})
            assert (status, body["offset"]) == (200, i + 1)
        for client in clients:
            got = [await client.next_of("message") for _ in range(9)]
            assert [m["data"] for m in got] == list(range(9))
        # The same idempotency key through two nodes publishes once.
        first = await publish(pool, ports[0], {"channel": "news", "data": "x", "idempotency_key": "k1"})
        again = await publish(pool, ports[1], {"channel": "news", "data": "x", "idempotency_key": "k1"})
        assert first == again and first[1]["offset"] == 10
        # History and channel info agree from any node.
        response = await treq.get(f"http://127.0.0.1:{ports[2]}/channels/news/history?since=7", pool=pool)
        history = json.loads(await response.content())
        assert [m["offset"] for m in history["messages"]] == [8, 9, 10]
        # Recovery through another node than the one the client left.
        last = await clients[0].next_of("message")
        again_client = await connect_ws(ports[1], "/websocket")
        clients.append(again_client)
        await again_client.next_of("welcome")
        again_client.send({"type": "subscribe", "channel": "news", "since": {"offset": 7, "epoch": last["epoch"]}})
        assert (await again_client.next_of("subscribed"))["recovered"] is True
        assert [(await again_client.next_of("message"))["offset"] for _ in range(3)] == [8, 9, 10]
    finally:
        for client in clients:
            client.close()
        for client in clients:
            await client.closed
        for proc in nodes:
            assert await stop(proc) == 0
        await pool.closeCachedConnections()


@pytest_twisted.ensureDeferred
async def test_presence_across_nodes_and_a_crashed_node(own_redis):
    nodes = await start_nodes(own_redis.url, 2)
    clients = []
    room = "presence-room"
    try:
        a, b = (port_of(p) for p in nodes)
        ann = await connect_ws(a, f"/websocket?channel={room}&token={token(sub='ann', channels=[room])}")
        clients.append(ann)
        await ann.next_of("welcome")
        assert [m["id"] for m in (await ann.next_of("subscribed"))["members"]] == ["ann"]
        bob = await connect_ws(b, f"/websocket?channel={room}&token={token(sub='bob', channels=[room])}")
        clients.append(bob)
        await bob.next_of("welcome")
        assert sorted(m["id"] for m in (await bob.next_of("subscribed"))["members"]) == ["ann", "bob"]
        assert (await ann.next_of("join"))["member"]["id"] == "bob"
        # A second tab of ann's, on the other node: no join.
        ann2 = await connect_ws(b, f"/websocket?channel={room}&token={token(sub='ann', channels=[room])}")
        clients.append(ann2)
        await ann2.next_of("welcome")
        await ann2.next_of("subscribed")
        ann2.close()
        await ann2.closed
        bob.send({"type": "ping"})
        assert await bob.next() == {"type": "pong"}  # no leave: ann is still on node A
        # Node A dies without a word: its member goes within the stated time.
        nodes[0].transport.signalProcess("KILL")
        await nodes[0].ended
        leave = await bob.next_of("leave", timeout=HEARTBEAT_TTL + 3 * HEARTBEAT_INTERVAL)
        assert leave["member"]["id"] == "ann"
        bob.send({"type": "presence", "channel": room})
        assert [m["id"] for m in (await bob.next_of("presence"))["members"]] == ["bob"]
    finally:
        for client in clients:
            client.close()
        for proc in nodes:
            await stop(proc)


@pytest_twisted.ensureDeferred
async def test_nodes_subscribe_in_redis_only_to_channels_with_local_subscribers(own_redis):
    daemon = await start_daemon(engine=own_redis.url)
    try:
        assert own_redis.cli("PUBSUB", "CHANNELS").split() == []
        client = await daemon.connect("channel=wanted")
        await client.next_of("welcome")
        await client.next_of("subscribed")
        assert sorted(own_redis.cli("PUBSUB", "CHANNELS").split()) == ["pushie:0:m:wanted", "pushie:0:p:wanted"]
        await daemon.publish({"channel": "unwanted", "data": 1})  # nobody here listens: not subscribed
        client.send({"type": "unsubscribe", "channel": "wanted"})
        await client.next_of("unsubscribed")
        await wait_for(lambda: own_redis.cli("PUBSUB", "CHANNELS").split() == [])
    finally:
        await daemon.stop()


# -- faults -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_redis_restart_answers_503_then_recovers(own_redis):
    daemon = await start_daemon(engine=own_redis.url, redis_timeout=1.0)
    try:
        client = await daemon.connect("channel=c")
        await client.next_of("welcome")
        first = await client.next_of("subscribed")
        accepted = []
        for i in range(5):
            status, body, _ = await daemon.publish({"channel": "c", "data": i})
            assert status == 200
            accepted.append(body["offset"])
        got = [await client.next_of("message") for _ in range(5)]
        assert [m["offset"] for m in got] == accepted  # everything accepted, once, in order

        own_redis.stop()
        await wait_for(lambda: not daemon.engine.healthy(), timeout=5)
        for _ in range(3):
            status, body, response = await daemon.publish({"channel": "c", "data": "lost?"})
            assert (status, body["error"]) == (503, "engine_unavailable")
            assert response.headers.getRawHeaders("retry-after") == ["1"]
        status, health, _ = await daemon.get("/healthz")
        assert (status, json.loads(health)["status"]) == (503, "engine_unavailable")
        assert not client.closed.called  # WebSocket clients stay connected

        own_redis.start()  # same port, empty: the channels' history is gone
        await wait_for(daemon.engine.healthy, timeout=15)
        # The node cannot tell whether another node published before Redis
        # died: its subscribers are closed (4002) to recover, and learn
        # that history was lost.
        await wait_for(lambda: client.closed.called, timeout=15)
        assert client.close_code == 4002
        again = await daemon.connect()
        await again.next_of("welcome")
        again.send({"type": "subscribe", "channel": "c", "since": {"offset": 5, "epoch": first["epoch"]}})
        answer = await again.next_of("subscribed")
        assert answer["recovered"] is False and answer["epoch"] != first["epoch"]
        status, body, _ = await daemon.publish({"channel": "c", "data": "after"})
        assert (status, body["offset"], body["epoch"]) == (200, answer["offset"] + 1, answer["epoch"])
        message = await again.next_of("message")
        assert (message["data"], message["offset"]) == ("after", answer["offset"] + 1)
        assert again.pending() == []
        status, health, _ = await daemon.get("/healthz")
        assert status == 200
    finally:
        await daemon.stop()


@pytest_twisted.ensureDeferred
async def test_killed_pubsub_connection_resubscribes_and_fills_the_gap(own_redis):
    daemon = await start_daemon(engine=own_redis.url)
    other = await start_daemon(engine=own_redis.url)  # publishes while the first one is deaf
    try:
        client = await daemon.connect("channel=c")
        await client.next_of("welcome")
        await client.next_of("subscribed")
        await other.publish({"channel": "c", "data": 0})
        assert (await client.next_of("message"))["offset"] == 1
        own_redis.cli("CLIENT", "KILL", "TYPE", "pubsub")
        for i in range(1, 4):
            await other.publish({"channel": "c", "data": i})
        await wait_for(daemon.engine.healthy, timeout=15)
        await other.publish({"channel": "c", "data": 4})
        got = [await client.next_of("message", timeout=15) for _ in range(4)]
        assert [m["offset"] for m in got] == [2, 3, 4, 5]
        await sleep(0.2)
        assert client.pending() == []
    finally:
        await daemon.stop()
        await other.stop()


# -- keys ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_idempotency_keys_of_different_channels_never_meet(make_daemon):
    """(channel, key) pairs that join to the same text are different keys (issue 12 A6)."""
    daemon = await make_daemon()
    client = await daemon.connect("channel=orders:eu&channel=orders")
    await client.next_of("welcome")
    await client.next_of("subscribed")
    await client.next_of("subscribed")
    pairs = [("orders", "eu:17"), ("orders:eu", "17"), ("orders:eu:", "17"), ("orders", "eu::17"), ("orders", "eu")]
    for i, (channel, key) in enumerate(pairs):
        status, body, _ = await daemon.publish({"channel": channel, "data": i, "idempotency_key": key})
        assert (status, body["channel"]) == (200, channel)
        assert body["offset"] == sum(1 for c, _ in pairs[: i + 1] if c == channel), (channel, key, body)
    got = [await client.next_of("message") for _ in range(4)]  # orders:eu: has no subscriber here
    assert sorted((m["channel"], m["data"]) for m in got) == [
        ("orders", 0),
        ("orders", 3),
        ("orders", 4),
        ("orders:eu", 1),
    ]
    # The same pair again is still recognised.
    status, body, _ = await daemon.publish({"channel": "orders:eu", "data": "again", "idempotency_key": "17"})
    assert (status, body["offset"]) == (200, 1)
    await sleep(0.1)
    assert client.pending() == []


# -- continuity (issue 12 A15) --------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_new_subscriber_never_costs_older_ones_what_is_on_its_way(own_redis):
    """
    While a node's pub/sub connection is down, a second subscriber of a
    channel reads the channel's state: that position must not make the
    node drop, for its first subscriber, what it reads back after the
    reconnect (it did: the Hub took the state as already dispatched).
    """
    daemon = await start_daemon(engine=own_redis.url, redis_timeout=10.0)
    other = await start_daemon(engine=own_redis.url)
    try:
        first = await daemon.connect("channel=c")
        await first.next_of("welcome")
        await first.next_of("subscribed")
        own_redis.cli("CLIENT", "KILL", "TYPE", "pubsub")
        await wait_for(lambda: not daemon.engine.healthy(), timeout=5)
        for i in range(1, 4):
            status, body, _ = await other.publish({"channel": "c", "data": i})
            assert (status, body["offset"]) == (200, i)
        second = await daemon.connect()
        await second.next_of("welcome")
        second.send({"type": "subscribe", "channel": "c"})
        await sleep(0.1)
        assert not daemon.engine.healthy(), "the node reconnected too soon for this test to mean anything"
        answer = await second.next_of("subscribed", timeout=15)
        assert answer["offset"] == 3
        await wait_for(daemon.engine.healthy, timeout=15)
        await other.publish({"channel": "c", "data": 4})
        assert [(await first.next_of("message", timeout=15))["offset"] for _ in range(4)] == [1, 2, 3, 4]
        assert (await second.next_of("message", timeout=15))["offset"] == 4
        await sleep(0.2)
        assert first.pending() == [] and second.pending() == []
    finally:
        await daemon.stop()
        await other.stop()


# -- what older daemons wrote (issue 13 item 4) -------------------------------


def test_publication_metadata_travels_as_a_header_older_daemons_header_is_read():
    """Any metadata round-trips through the pub/sub header; a 0.1.0 header (C{!<socket id>}) means exclude."""
    for meta in ({}, {"exclude": "123.456"}, {"a b": "c=d&e f", "é": "!\u2028", "": ""}):
        header = meta_header(meta)
        assert " " not in header.rstrip(" ") and (header == "" or header.endswith(" "))
        assert (read_meta_header(header[:-1].encode()) if header else {}) == meta
    assert read_meta_header(b"!123.456") == {"exclude": "123.456"}


@pytest_twisted.ensureDeferred
async def test_a_new_daemon_reads_the_history_and_live_messages_of_an_older_one(own_redis):
    """
    A rolling upgrade: what a 0.1.0 daemon stored (the envelope, in the
    stream) and published (C{!<socket id> <envelope>}) is read by this one:
    history replays it and the Pusher socket named in the header is left out.
    """
    from tests.test_pusher import APPS, connect, expect, subscribe

    daemon = await start_daemon(engine=own_redis.url, pusher_apps=APPS)
    try:
        a, b = await connect(daemon), await connect(daemon)
        await subscribe(a, "chat")
        await subscribe(b, "chat")
        status, _, _ = await daemon.publish({"channel": "chat", "event": "said", "data": "one"})
        assert status == 200
        assert (await expect(a, "said"))["data"] == "one"
        assert (await expect(b, "said"))["data"] == "one"
        epoch = own_redis.cli("HGET", "pushie:0:meta:chat", "epoch").strip()
        # Exactly what the 0.1.0 publish script wrote for a client event of a on offset 2.
        old = f'{{"type":"message","channel":"chat","event":"said","offset":2,"epoch":"{epoch}","data":"two"}}'
        assert own_redis.cli("HINCRBY", "pushie:0:meta:chat", "offset", "1").strip() == "2"
        own_redis.cli("XADD", "pushie:0:hist:chat", "*", "e", old)
        own_redis.cli("PUBLISH", "pushie:0:m:chat", f"!{a.socket_id} {old}")
        assert (await expect(b, "said"))["data"] == "two"
        status, _, _ = await daemon.publish({"channel": "chat", "event": "said", "data": "three"})
        assert (await expect(a, "said"))["data"] == "three"  # "two" never came to a
        assert (await expect(b, "said"))["data"] == "three"
        native = await daemon.connect()
        await native.next_of("welcome")
        native.send({"type": "subscribe", "channel": "chat", "since": {"offset": 0, "epoch": epoch}})
        assert (await native.next_of("subscribed"))["recovered"] is True
        replayed = [await native.next_of("message") for _ in range(3)]
        assert [(m["offset"], m["data"], m["epoch"]) for m in replayed] == [
            (i, d, epoch) for i, d in [(1, "one"), (2, "two"), (3, "three")]
        ]
    finally:
        await daemon.stop()
