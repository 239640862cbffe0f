"""
Several daemons on one Redis behave as one deployment (issue 14, items 1 and 2):
webhook transitions are decided once for the whole cluster and delivered at
least once, even when the daemon that was delivering them is killed with
SIGKILL; the counts of the Pusher HTTP API, the server API and the cluster
gauges of /metrics are every live daemon's, and a dead daemon's go once its
heartbeat expires.

Everything is real: a redis-server of the test's own (tests/redis_server.py),
daemons in this process or as C{twistd} processes, a twisted.web receiver on
port 0, WebSocket clients.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from typing import Any

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.web.client import HTTPConnectionPool

from pushie.engines.redis import CLAIM_GRACE, HEARTBEAT_INTERVAL, HEARTBEAT_TTL
from tests.helpers import (
    HOOK_DEBOUNCE,
    HOOK_SECRET,
    HOOK_SETTLE,
    Daemon,
    cluster_gauges,
    connect_ws,
    join,
    leave,
    node_id,
    port_of,
    sleep,
    start_hook_daemons,
    start_nodes,
    wait_for,
)
from tests.redis_server import RedisServer, require_redis
from tests.test_auth import SECRET_1, token
from tests.test_daemon import stop
from tests.test_pusher import APP_ID, APPS, SDK, api, subscribe
from tests.test_pusher import connect as pusher_connect
from tests.test_webhooks import Receiver, clean_reactor, receiver  # noqa: F401  (the fixtures)

# A node killed without a word: its heartbeat key expires, and the next heartbeat of a live node sweeps it.
DEATH = HEARTBEAT_TTL + 2 * HEARTBEAT_INTERVAL + HOOK_DEBOUNCE + 2.0
# A killed node's pending transitions: claimed CLAIM_GRACE after a live node first finds its heartbeat gone.
CLAIMED = HEARTBEAT_TTL + 2 * HEARTBEAT_INTERVAL + CLAIM_GRACE + HEARTBEAT_INTERVAL + 2.0


@pytest_twisted.async_yield_fixture
async def cluster(clean_reactor, own_redis, receiver):  # noqa: F811
    """Three in-process daemons on one Redis, with webhooks to the receiver."""
    nodes = await start_hook_daemons(own_redis.url, receiver.url, subscriber_secrets=[SECRET_1], pusher_apps=APPS)
    yield nodes
    for node in nodes:
        await node.stop()


# -- webhooks: one event per cluster-wide transition --------------------------


@pytest_twisted.ensureDeferred
async def test_occupancy_and_presence_transitions_once_cluster_wide(cluster, receiver):  # noqa: F811
    a, b, c = cluster
    room = "presence-room"
    ann_token = token(sub="ann", channels=[room])

    ann = await join(a, "channel=news")
    await wait_for(lambda: receiver.delivered() == [("channel_occupied", "news")])
    # Another subscriber on another node, the first one leaving: the channel never emptied.
    bob = await join(b, "channel=news")
    await leave(ann)
    # The last one leaves node B and a new one arrives on node C within the debounce: no event at all.
    await leave(bob)
    carol = await join(c, "channel=news")

    # Presence: ann's first connection anywhere is member_added; her second tab on
    # another node, and her first tab leaving, are nothing.
    tab1 = await join(a, f"channel={room}&token={ann_token}")
    tab2 = await join(b, f"channel={room}&token={ann_token}")
    await leave(tab1)
    # Her last tab leaves and she is back on a third node within the debounce: nothing.
    await leave(tab2)
    tab3 = await join(c, f"channel={room}&token={ann_token}")
    await sleep(HOOK_SETTLE)
    assert Counter(receiver.delivered()) == Counter(
        [("channel_occupied", "news"), ("channel_occupied", room), ("member_added", room, "ann")]
    )

    # The last subscriber and member anywhere leave: one event each, after the debounce.
    await leave(carol)
    await leave(tab3)
    await wait_for(lambda: len(receiver.delivered()) == 6, timeout=HOOK_SETTLE + 2)
    await sleep(HOOK_SETTLE)
    assert Counter(receiver.delivered()[3:]) == Counter(
        [("channel_vacated", "news"), ("channel_vacated", room), ("member_removed", room, "ann")]
    )
    assert len(receiver.delivered()) == 6
    # Every node reads the stream; what was delivered was settled: nothing is left pending.
    assert all(not node.engine._holding for node in cluster)


@pytest_twisted.ensureDeferred
async def test_subscribers_moving_between_nodes_make_no_duplicate_or_missing_event(cluster, receiver):  # noqa: F811
    rng = random.Random(14)
    channels = [f"move-{n}" for n in range(4)]
    held: dict[str, list] = {name: [] for name in channels}
    for name in channels:
        held[name].append(await join(rng.choice(cluster), f"channel={name}"))
    # Thirty moves: a client opens on one node and another closes on another; sometimes the
    # close comes first (the channel is empty a moment, less than the debounce).
    for _ in range(30):
        name = rng.choice(channels)
        if rng.random() < 0.3 and len(held[name]) == 1:
            await leave(held[name].pop())
            held[name].append(await join(rng.choice(cluster), f"channel={name}"))
            continue
        held[name].append(await join(rng.choice(cluster), f"channel={name}"))
        if len(held[name]) > 1:
            await leave(held[name].pop(rng.randrange(len(held[name]))))
    await sleep(HOOK_SETTLE)
    assert sorted(receiver.delivered()) == sorted(("channel_occupied", name) for name in channels)
    for name in channels:
        for client in held[name]:
            await leave(client)
    await wait_for(lambda: len(receiver.delivered()) == 2 * len(channels), timeout=HOOK_SETTLE + 2)
    await sleep(HOOK_SETTLE)
    assert Counter(receiver.delivered()) == Counter(
        [("channel_occupied", name) for name in channels] + [("channel_vacated", name) for name in channels]
    )


# -- counts across nodes --------------------------------------------------------


async def get_json(node: Daemon, path: str) -> Any:
    status, body, _ = await node.get(path)
    assert status == 200, body
    return json.loads(body)


@pytest_twisted.ensureDeferred
async def test_counts_are_the_clusters(cluster):
    a, b, c = cluster
    await join(a, "channel=news")
    await join(a, "channel=news&channel=sport")
    await join(b, "channel=news")

    async def channels_of(node):
        return (await get_json(node, "/channels"))["channels"]

    expected = [{"name": "news", "subscribers": 3}, {"name": "sport", "subscribers": 1}]
    for node in cluster:
        assert await channels_of(node) == expected
    news = await get_json(c, "/channels/news")
    assert news["subscribers"] == 3

    # The Pusher HTTP API (app APP_ID shares the native channels): subscription_count everywhere it is asked.
    sdk = SDK(c)
    for node in (a, b):
        await subscribe(await pusher_connect(node), "p-chan")
    counted = await sdk("channels_info", "p-", ["subscription_count"])
    assert counted == {"channels": {"p-chan": {"subscription_count": 2}}}
    assert await sdk("channel_info", "p-chan", ["subscription_count"]) == {"occupied": True, "subscription_count": 2}
    assert await sdk("channel_info", "p-none", ["subscription_count"]) == {"occupied": False, "subscription_count": 0}
    status, body = await api(
        c,
        "POST",
        f"/apps/{APP_ID}/events",
        {"name": "e", "data": "{}", "channels": ["p-chan", "news"], "info": "subscription_count"},
    )
    assert (status, body) == (
        200,
        {"channels": {"p-chan": {"subscription_count": 2}, "news": {"subscription_count": 3}}},
    )
    status, body = await api(
        c,
        "POST",
        f"/apps/{APP_ID}/batch_events",
        {"batch": [{"name": "e", "data": "{}", "channel": "p-chan", "info": "subscription_count"}]},
    )
    assert (status, body) == (200, {"batch": [{"subscription_count": 2}]})

    # /metrics: every node's figures, clearly cluster-wide, refreshed by the heartbeat.
    want = {
        "pushie_cluster_nodes": 3.0,
        "pushie_cluster_connections": 5.0,
        "pushie_cluster_subscriptions": 6.0,
        "pushie_cluster_channels": 3.0,
    }
    found: dict[str, float] = {}

    async def poll() -> None:
        found.update(await cluster_gauges(c))

    for _ in range(int(3 * HEARTBEAT_INTERVAL / 0.2)):
        await poll()
        if found == want:
            break
        await sleep(0.2)
    assert found == want
    local = (await c.get("/metrics"))[1].decode()
    assert "\npushie_connections 0.0" in local  # the node's own gauges stay its own

    # A node that stops takes its counts with it.
    await b.stop()
    assert await channels_of(c) == [
        {"name": "news", "subscribers": 2},
        {"name": "p-chan", "subscribers": 1},
        {"name": "sport", "subscribers": 1},
    ]


# -- daemons that die (twistd processes, SIGKILL) -------------------------------


async def start_hook_nodes(redis: RedisServer, count: int, receiver: Receiver, *extra: str) -> list[Any]:  # noqa: F811
    """L{start_nodes} with webhooks to the receiver."""
    hooks = ["--webhook-url", receiver.url, "--webhook-debounce", str(HOOK_DEBOUNCE), *extra]
    return await start_nodes(redis.url, count, *hooks, env={"PUSHIE_WEBHOOK_SECRET": HOOK_SECRET})


def pending(redis: RedisServer) -> list[tuple[str, str]]:
    """(entry id, consumer) of every transition delivered to a node and not settled."""
    lines = redis.cli("XPENDING", "pushie:0:hookq", "hooks", "-", "+", "100").split()
    return [(lines[i], lines[i + 1]) for i in range(0, len(lines), 4)]


@pytest_twisted.ensureDeferred
async def test_a_killed_nodes_occupancy_and_members_go_with_its_heartbeat(own_redis, receiver):  # noqa: F811
    nodes = await start_hook_nodes(own_redis, 2, receiver)
    pool = HTTPConnectionPool(reactor, persistent=False)
    room = "presence-room"
    client = None
    try:
        doomed, survivor = (port_of(p) for p in nodes)
        client = await connect_ws(
            doomed, f"/websocket?channel=news&channel={room}&token={token(sub='ann', channels=[room])}"
        )
        await wait_for(lambda: len(receiver.delivered()) == 3)
        assert Counter(receiver.delivered()) == Counter(
            [("channel_occupied", "news"), ("channel_occupied", room), ("member_added", room, "ann")]
        )

        async def channels() -> Any:
            response = await treq.get(f"http://127.0.0.1:{survivor}/channels", pool=pool)
            return json.loads(await response.content())["channels"]

        assert await channels() == [{"name": "news", "subscribers": 1}, {"name": room, "subscribers": 1}]

        nodes[0].transport.signalProcess("KILL")
        await nodes[0].ended
        await client.closed
        await wait_for(lambda: len(receiver.delivered()) == 6, timeout=DEATH)
        await sleep(HOOK_SETTLE)
        assert Counter(receiver.delivered()[3:]) == Counter(
            [("channel_vacated", "news"), ("channel_vacated", room), ("member_removed", room, "ann")]
        )
        assert len(receiver.delivered()) == 6
        assert await channels() == []
        assert pending(own_redis) == []
        response = await treq.get(f"http://127.0.0.1:{survivor}/metrics", pool=pool)
        figures = (await response.content()).decode()
        for line in ("pushie_cluster_nodes 1.0", "pushie_cluster_connections 0.0", "pushie_cluster_channels 0.0"):
            assert line in figures.splitlines(), figures
    finally:
        if client is not None:
            client.close()
        for proc in nodes:
            await stop(proc)
        await pool.closeCachedConnections()


@pytest_twisted.ensureDeferred
async def test_kill_9_of_the_delivering_node_mid_retry_still_delivers(own_redis, receiver):  # noqa: F811
    receiver.default = 500
    nodes = await start_hook_nodes(own_redis, 3, receiver, "--webhook-retry-for", "200")
    client = None
    try:
        # The first subscriber: the transition is decided, one node takes it and gets 500s.
        subscriber_node = nodes[2]
        client = await connect_ws(port_of(subscriber_node), "/websocket?channel=news")
        await wait_for(lambda: len(receiver.requests) >= 2, timeout=10)  # retrying
        [(entry, consumer)] = pending(own_redis)
        [delivering] = [p for p in nodes if node_id(p) == consumer]
        delivering.transport.signalProcess("KILL")
        await delivering.ended
        attempts = len(receiver.requests)
        receiver.default = 200
        # A live node claims the entry once the killed node's heartbeat has been gone for
        # CLAIM_GRACE, and delivers it.
        await wait_for(lambda: ("channel_occupied", "news") in receiver.delivered(), timeout=CLAIMED)
        await wait_for(lambda: pending(own_redis) == [], timeout=5)
        survivors = [p for p in nodes if p is not delivering]
        claimed = [p for p in survivors if b"Took over 1 webhook transitions" in p.output]
        assert len(claimed) == 1, [p.output.decode()[-2000:] for p in survivors]
        assert all(posted.events == [("channel_occupied", "news")] for _, posted in receiver.answered[:attempts])
        # The survivor sent the very same body (time_ms is when the event was decided), so the same
        # signature (the killed node's channel_vacated, when it held the subscriber, may come first).
        occupied = [request for request in receiver.requests if request.events == [("channel_occupied", "news")]]
        assert len(occupied) == attempts + 1 and len({request.body for request in occupied}) == 1
        await sleep(HOOK_SETTLE)
        if delivering is not subscriber_node:
            # Delivered once; nothing else happened (the subscriber is still there).
            assert receiver.delivered() == [("channel_occupied", "news")]
        else:
            assert receiver.delivered().count(("channel_occupied", "news")) == 1
        assert own_redis.cli("XLEN", "pushie:0:hookq").strip() == "0"
    finally:
        if client is not None:
            client.close()
        for proc in nodes:
            await stop(proc)


def stream_length(redis: RedisServer) -> int:
    return int(redis.cli("XLEN", "pushie:0:hookq").strip())


@pytest_twisted.ensureDeferred
async def test_a_node_reads_only_what_its_queue_takes_and_the_stream_is_bounded(
    clean_reactor,  # noqa: F811
    own_redis,
    receiver,  # noqa: F811
):
    receiver.default = "hang"
    [node] = await start_hook_daemons(own_redis.url, receiver.url, count=1, webhook_timeout=60.0, webhook_max_queue=5)
    webhooks = node.hub.webhooks
    try:
        await join(node, "&".join(f"channel=first-{n}" for n in range(30)))
        # Four POSTs of five events hang (every delivery slot), five events wait in the queue:
        # the node stops reading there, and the other five stay in Redis.
        await wait_for(lambda: webhooks.in_flight == 4 and webhooks.queued == 5)
        await sleep(3 * 0.1 + HEARTBEAT_INTERVAL)  # a few reads (and a heartbeat's claim) later: still so
        assert webhooks.in_flight == 4 and webhooks.queued == 5 and webhooks.dropped == 0
        assert len(node.engine._holding) == 25
        assert stream_length(own_redis) == 30

        # The stream keeps about webhook_max_queue undelivered events (MAXLEN ~: whole
        # blocks of 100 are trimmed), however many more are decided meanwhile.
        for block in range(3):
            await join(node, "&".join(f"channel=more-{block}-{n}" for n in range(100)))
        assert 5 <= stream_length(own_redis) <= 5 + 200

        receiver.default = 200
        for request in receiver.hung:
            request.setResponseCode(200)
            request.finish()
        await wait_for(lambda: stream_length(own_redis) == 0, timeout=10)
        assert pending(own_redis) == []
        sent = [event for request in receiver.requests for event in request.events]
        assert len({event for event in sent if event[1].startswith("first-")}) >= 25  # held: delivered, trimmed or not
        await wait_for(lambda: not node.engine._holding)  # Redis's answers to the settlements are in
    finally:
        await node.stop()


@pytest_twisted.ensureDeferred
async def test_counts_redis_lost_are_sent_again_and_webhooks_survive_a_redis_restart(
    clean_reactor,  # noqa: F811
    own_redis,
    receiver,  # noqa: F811
):
    [node] = await start_hook_daemons(own_redis.url, receiver.url, count=1)
    try:
        client = await join(node, "channel=news")
        await wait_for(lambda: receiver.delivered() == [("channel_occupied", "news")])
        # Redis loses this node's counts (as when another node took it for dead after a long
        # pause and swept it): its next heartbeat sees it and sends them all again; the channel
        # is counted, and occupied once more (at least once: the same state again).
        own_redis.cli("DEL", "pushie:0:occ:news", f"pushie:0:nchan:{node.engine.node}", "pushie:0:chans")
        await wait_for(
            lambda: receiver.delivered() == [("channel_occupied", "news")] * 2, timeout=HEARTBEAT_INTERVAL + 3
        )
        assert json.loads((await node.get("/channels"))[1])["channels"] == [{"name": "news", "subscribers": 1}]
        await leave(client)
        await wait_for(lambda: receiver.delivered()[-1:] == [("channel_vacated", "news")], timeout=HOOK_SETTLE + 2)

        # Redis restarts empty: the consumer group and the webhook settings are made again.
        own_redis.stop()
        own_redis.start()
        await wait_for(
            lambda: node.engine.healthy() and b"hooks" in own_redis.cli("XINFO", "GROUPS", "pushie:0:hookq").encode(),
            timeout=15,
        )
        again = await join(node, "channel=sport")
        await wait_for(lambda: receiver.delivered()[-1:] == [("channel_occupied", "sport")], timeout=5)
        await leave(again)
        await wait_for(lambda: receiver.delivered()[-1:] == [("channel_vacated", "sport")], timeout=HOOK_SETTLE + 2)
    finally:
        await node.stop()


@pytest_twisted.ensureDeferred
async def test_a_redis_outage_longer_than_the_heartbeat_ttl_takes_no_live_nodes_transition(
    clean_reactor,  # noqa: F811
    tmp_path,
    receiver,  # noqa: F811
):
    """
    Every heartbeat expires while Redis is away; the node delivering a
    transition (its POST hanging across the outage) keeps it once Redis is
    back: no other node claims it, and it is delivered exactly once.
    """
    require_redis()
    redis = RedisServer(str(tmp_path), appendonly=True)
    redis.start()
    receiver.default = "hang"
    nodes: list[Daemon] = []
    try:
        nodes = await start_hook_daemons(redis.url, receiver.url, webhook_timeout=120.0)
        client = await join(nodes[0], "channel=news")
        await wait_for(lambda: len(receiver.hung) == 1, timeout=10)
        [(entry, consumer)] = pending(redis)
        [delivering] = [node for node in nodes if node.engine.node == consumer]

        redis.stop()
        await sleep(HEARTBEAT_TTL + 1.0)  # every node's heartbeat key expires meanwhile
        redis.start()
        await wait_for(lambda: all(node.engine.healthy() for node in nodes), timeout=15)
        assert redis.cli("KEYS", "pushie:0:node:*").split(), "the heartbeats are back"
        # Longer than a claim of a dead node takes: the delivering node still holds it.
        await sleep(CLAIM_GRACE + 2 * HEARTBEAT_INTERVAL + 1.0)
        assert pending(redis) == [(entry, consumer)]
        assert len(receiver.requests) == 1
        assert all(not node.engine._holding for node in nodes if node is not delivering)

        receiver.default = 200
        receiver.hung.pop().finish()
        await wait_for(lambda: pending(redis) == [], timeout=5)
        await sleep(HOOK_SETTLE)
        # One POST in all (answered 200 once it was let go), with the one event.
        assert [request.events for request in receiver.requests] == [[("channel_occupied", "news")]]
        await leave(client)
    finally:
        for node in nodes:
            await node.stop()
        redis.stop()


@pytest_twisted.ensureDeferred
async def test_a_node_that_stops_leaves_its_transition_to_another_at_once(
    clean_reactor,  # noqa: F811
    own_redis,
    receiver,  # noqa: F811
):
    """
    A node that stops with a POST hanging leaves the transition pending:
    another node takes it over at its next heartbeat (no CLAIM_GRACE: a node
    that stopped is not coming back) and delivers it.
    """
    receiver.default = "hang"
    nodes = await start_hook_daemons(own_redis.url, receiver.url, count=2, webhook_timeout=60.0)
    try:
        await join(nodes[0], "channel=news")
        await wait_for(lambda: len(receiver.hung) == 1, timeout=10)
        [(entry, consumer)] = pending(own_redis)
        [delivering] = [node for node in nodes if node.engine.node == consumer]
        receiver.default = 200
        await delivering.stop()
        assert own_redis.cli("HGET", "pushie:0:hookdead", consumer).strip() == "0"
        # Taken over within two heartbeats, well before CLAIM_GRACE.
        await wait_for(lambda: ("channel_occupied", "news") in receiver.delivered(), timeout=2 * HEARTBEAT_INTERVAL)
        assert CLAIM_GRACE > 2 * HEARTBEAT_INTERVAL
        await wait_for(lambda: pending(own_redis) == [], timeout=5)
        # (The stopped node may have held the subscriber: then channel_vacated follows.)
        assert receiver.delivered().count(("channel_occupied", "news")) == 1
        # Once it holds nothing, the stopped node's consumer and its hookdead field go.
        await wait_for(
            lambda: own_redis.cli("HGET", "pushie:0:hookdead", consumer).strip() == "",
            timeout=2 * HEARTBEAT_INTERVAL + 1,
        )
        assert consumer not in own_redis.cli("XINFO", "CONSUMERS", "pushie:0:hookq", "hooks")
        assert entry not in own_redis.cli("XRANGE", "pushie:0:hookq", "-", "+")
    finally:
        for node in nodes:
            await node.stop()
