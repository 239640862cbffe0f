"""
Webhooks and counts with channels sharded over two Redis servers: each shard
decides the transitions of its own channels (its own heartbeat keys, stream
and consumer group under its prefix), the daemons deliver them to one
receiver; counts and the cluster gauges add up over both shards; with one
shard down, what needs every shard answers 503 (never a partial list) while
the other shard's webhooks keep flowing, and everything catches up once it
is back.

Everything is real: two redis-servers of the test's own, three daemons in
this process with both in their shard list, a twisted.web receiver on port 0,
WebSocket and Pusher clients.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from pushie.engines.redis import HEARTBEAT_INTERVAL, READ_BLOCK
from pushie.engines.sharded import ShardedEngine
from tests.helpers import (
    HOOK_SETTLE,
    Daemon,
    cluster_gauges,
    join,
    leave,
    sleep,
    start_hook_daemons,
    wait_for,
)
from tests.redis_server import RedisServer, require_redis
from tests.test_auth import SECRET_1, token
from tests.test_pusher import APP_ID, APPS, SDK, api, subscribe
from tests.test_pusher import connect as pusher_connect
from tests.test_shards import channels_on
from tests.test_webhooks import Receiver, clean_reactor, receiver  # noqa: F401  (the fixtures)


@pytest.fixture
def two_redis(tmp_path):
    """Two redis-servers that keep their data across a restart (AOF), as a production shard would."""
    require_redis()
    servers = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        server = RedisServer(str(tmp_path / name), appendonly=True)
        server.start()
        servers.append(server)
    yield servers
    for server in servers:
        server.stop()


@pytest_twisted.async_yield_fixture
async def daemons(clean_reactor, two_redis, receiver):  # noqa: F811
    """Three in-process daemons with both shards, webhooks to the receiver."""
    nodes = await start_hook_daemons(
        ",".join(s.url for s in two_redis), receiver.url, subscriber_secrets=[SECRET_1], pusher_apps=APPS
    )
    yield nodes
    for node in nodes:
        await node.stop()


def names(engine: ShardedEngine) -> tuple[str, str, str, str]:
    """A channel and a presence channel on shard 0, the same on shard 1."""
    return (
        channels_on(engine, 0, 1, "chan")[0],
        channels_on(engine, 0, 1, "presence-room")[0],
        channels_on(engine, 1, 1, "chan")[0],
        channels_on(engine, 1, 1, "presence-room")[0],
    )


@pytest_twisted.ensureDeferred
async def test_each_shards_transitions_once_cluster_wide_debounced_across_daemons(daemons, receiver, two_redis):  # noqa: F811
    a, b, c = daemons
    engine = a.engine
    assert isinstance(engine, ShardedEngine)
    chan_0, room_0, chan_1, room_1 = names(engine)
    prefix = f"pushie:0:shards-{engine.fingerprint}:"
    # Each shard has every daemon's heartbeat and a consumer group of its own.
    for server in two_redis:
        assert len(server.cli("KEYS", prefix + "node:*").split()) == 3
        assert "hooks" in server.cli("XINFO", "GROUPS", prefix + "hookq")

    first = []
    for chan, room in ((chan_0, room_0), (chan_1, room_1)):
        ann = token(sub="ann", channels=[room])
        # Occupied on daemon A; a second subscriber on B, the first leaving: never empty.
        one = await join(a, f"channel={chan}")
        two = await join(b, f"channel={chan}")
        await leave(one)
        # The last one leaves B and a new one comes on C within the debounce: no event.
        await leave(two)
        first.append(await join(c, f"channel={chan}"))
        # Presence: ann's first tab anywhere is member_added; a second tab on another
        # daemon, the first leaving, the last leaving and a new one within the debounce: nothing.
        tab1 = await join(a, f"channel={room}&token={ann}")
        tab2 = await join(b, f"channel={room}&token={ann}")
        await leave(tab1)
        await leave(tab2)
        first.append(await join(c, f"channel={room}&token={ann}"))
    await sleep(HOOK_SETTLE)
    assert Counter(receiver.delivered()) == Counter(
        [
            ("channel_occupied", chan_0),
            ("channel_occupied", room_0),
            ("member_added", room_0, "ann"),
            ("channel_occupied", chan_1),
            ("channel_occupied", room_1),
            ("member_added", room_1, "ann"),
        ]
    )
    # The stream of each shard holds what that shard decided, and nothing is left in it.
    for server in two_redis:
        assert server.cli("XLEN", prefix + "hookq").strip() == "0"

    for client in first:
        await leave(client)
    await wait_for(lambda: len(receiver.delivered()) == 12, timeout=HOOK_SETTLE + 3)
    await sleep(HOOK_SETTLE)
    assert Counter(receiver.delivered()[6:]) == Counter(
        [
            ("channel_vacated", chan_0),
            ("channel_vacated", room_0),
            ("member_removed", room_0, "ann"),
            ("channel_vacated", chan_1),
            ("channel_vacated", room_1),
            ("member_removed", room_1, "ann"),
        ]
    )
    assert len(receiver.delivered()) == 12
    for node in daemons:
        assert not any(shard._holding for shard in node.engine.shards)


async def channel_list(node: Daemon) -> tuple[int, Any]:
    status, body, _ = await node.get("/channels")
    return status, json.loads(body)


async def gauges(node: Daemon, want: dict[str, float]) -> dict[str, float]:
    """The pushie_cluster_* gauges once they equal C{want} (they follow the heartbeats), else as last read."""
    found: dict[str, float] = {}
    for _ in range(int(3 * HEARTBEAT_INTERVAL / 0.2)):
        found = await cluster_gauges(node)
        if found == want:
            break
        await sleep(0.2)
    return found


@pytest_twisted.ensureDeferred
async def test_counts_and_gauges_add_up_over_both_shards(daemons):
    a, b, c = daemons
    chan_0, _, chan_1, _ = names(a.engine)
    await join(a, f"channel={chan_0}&channel={chan_1}")
    await join(b, f"channel={chan_0}")
    await join(c, f"channel={chan_1}")
    await join(c, f"channel={chan_1}")
    # Pusher channels on each shard (app APP_ID shares the native channels).
    p_0, p_1 = channels_on(a.engine, 0, 1, "p-chan")[0], channels_on(a.engine, 1, 1, "p-chan")[0]
    for node in (a, b):
        socket = await pusher_connect(node)
        await subscribe(socket, p_0)
        await subscribe(socket, p_1)
    await subscribe(await pusher_connect(c), p_1)

    expected = sorted(
        [
            {"name": chan_0, "subscribers": 2},
            {"name": chan_1, "subscribers": 3},
            {"name": p_0, "subscribers": 2},
            {"name": p_1, "subscribers": 3},
        ],
        key=lambda item: item["name"],
    )
    for node in daemons:
        assert await channel_list(node) == (200, {"channels": expected})
    for name, count in ((chan_0, 2), (chan_1, 3)):
        status, body, _ = await b.get(f"/channels/{name}")
        assert (status, json.loads(body)["subscribers"]) == (200, count)

    sdk = SDK(b)
    assert await sdk("channels_info", "p-", ["subscription_count"]) == {
        "channels": {p_0: {"subscription_count": 2}, p_1: {"subscription_count": 3}}
    }
    assert await sdk("channel_info", p_1, ["subscription_count"]) == {"occupied": True, "subscription_count": 3}
    status, body = await api(
        a,
        "POST",
        f"/apps/{APP_ID}/events",
        {"name": "e", "data": "{}", "channels": [p_0, p_1], "info": "subscription_count"},
    )
    assert (status, body) == (200, {"channels": {p_0: {"subscription_count": 2}, p_1: {"subscription_count": 3}}})

    # 3 daemons, 7 connections (4 native, 3 Pusher), 10 subscriptions, 4 channels: over both shards.
    want = {
        "pushie_cluster_nodes": 3.0,
        "pushie_cluster_connections": 7.0,
        "pushie_cluster_subscriptions": 10.0,
        "pushie_cluster_channels": 4.0,
    }
    assert await gauges(c, want) == want
    text = (await c.get("/metrics"))[1].decode()
    for shard in c.engine.shards:
        assert f'pushie_redis_shard_up{{shard="{shard.name}"}} 1.0' in text
    # Every cluster and shard metric the Grafana dashboard plots is one this daemon exposes.
    dashboard = json.loads((Path(__file__).resolve().parent.parent / "contrib" / "grafana-dashboard.json").read_text())
    plotted = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"pushie_[a-z_]+", target["expr"])
        if name.startswith(("pushie_cluster_", "pushie_redis_shard_"))
    }
    assert plotted == {*want, "pushie_redis_shard_up"}
    exposed = {line.split("{")[0].split()[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert plotted <= exposed, plotted - exposed


@pytest_twisted.ensureDeferred
async def test_one_shard_down_503_for_counts_the_other_shard_flows_then_everything_catches_up(
    daemons,
    receiver,  # noqa: F811
    two_redis,
):
    a, b, c = daemons
    chan_0, _, chan_1, _ = names(a.engine)
    _, server_1 = two_redis
    stay = await join(a, f"channel={chan_0}&channel={chan_1}")
    going = await join(b, f"channel={chan_1}")
    await wait_for(
        lambda: Counter(receiver.delivered()) == Counter([("channel_occupied", chan_0), ("channel_occupied", chan_1)])
    )
    await leave(stay)  # chan_0: still nothing (the next one comes within the debounce); chan_1 still has `going`
    stay = await join(c, f"channel={chan_0}")

    server_1.stop()
    await wait_for(lambda: not any(node.engine.shards[1].healthy() for node in daemons), timeout=10)
    # What needs shard 1 answers 503, never a partial list.
    for node in daemons:
        status, body = await channel_list(node)
        assert status == 503 and body["error"] == "engine_unavailable", body
    status, body, _ = await a.get(f"/channels/{chan_1}")
    assert status == 503, body
    status, body, _ = await a.get(f"/channels/{chan_0}")  # a channel of the live shard is counted
    assert (status, json.loads(body)["subscribers"]) == (200, 1)
    status, body = await api(a, "GET", f"/apps/{APP_ID}/channels", None)
    assert status == 503, body
    # The cluster gauges go (no figure leaving a shard out); the shard's gauge says why.
    for _ in range(20):
        if not await cluster_gauges(a):
            break
        await sleep(0.2)
    assert await cluster_gauges(a) == {}
    text = (await a.get("/metrics"))[1].decode()
    assert f'pushie_redis_shard_up{{shard="{a.engine.shards[1].name}"}} 0.0' in text

    # Shard 0's webhooks keep flowing: chan_0 is vacated and comes back.
    await leave(stay)
    await wait_for(lambda: receiver.delivered()[-1:] == [("channel_vacated", chan_0)], timeout=HOOK_SETTLE + 3)
    again = await join(b, f"channel={chan_0}")
    await wait_for(lambda: receiver.delivered()[-1:] == [("channel_occupied", chan_0)], timeout=5)
    # Shard 1's last subscriber leaves while it is down: decided once it is back.
    await leave(going)
    await sleep(HOOK_SETTLE)
    assert ("channel_vacated", chan_1) not in receiver.delivered()

    server_1.start()
    await wait_for(lambda: all(node.engine.healthy() for node in daemons), timeout=15)
    await wait_for(
        lambda: receiver.delivered()[-1:] == [("channel_vacated", chan_1)], timeout=2 * HEARTBEAT_INTERVAL + HOOK_SETTLE
    )
    await sleep(HOOK_SETTLE)
    # Each transition is decided once and delivered once, the recovered shard's
    # too: every heartbeat on shard 1 expired while it was down, and no node
    # claims what another is delivering before it has had time to beat again
    # (CLAIM_GRACE).
    assert Counter(receiver.delivered()) == Counter(
        [
            ("channel_occupied", chan_0),
            ("channel_occupied", chan_1),
            ("channel_vacated", chan_0),
            ("channel_occupied", chan_0),
            ("channel_vacated", chan_1),
        ]
    )
    for node in daemons:
        assert await channel_list(node) == (200, {"channels": [{"name": chan_0, "subscribers": 1}]})
    want = {
        "pushie_cluster_nodes": 3.0,
        "pushie_cluster_connections": 1.0,
        "pushie_cluster_subscriptions": 1.0,
        "pushie_cluster_channels": 1.0,
    }
    assert await gauges(a, want) == want
    await leave(again)


@pytest_twisted.ensureDeferred
async def test_a_burst_on_both_shards_stays_within_the_webhook_queue(clean_reactor, two_redis, receiver):  # noqa: F811
    receiver.default = "hang"
    [node] = await start_hook_daemons(
        ",".join(s.url for s in two_redis), receiver.url, count=1, webhook_timeout=60.0, webhook_max_queue=6
    )
    webhooks = node.hub.webhooks
    try:
        engine = node.engine
        # Every delivery slot hangs, one event each; the queue is empty and both shards wait
        # on a blocking read (each for its share of the room).
        first = channels_on(engine, 0, 2, "first") + channels_on(engine, 1, 2, "first")
        for slot, name in enumerate(first):
            await join(node, f"channel={name}")
            await wait_for(lambda n=slot + 1: webhooks.in_flight == n)
        await sleep(0.2 + READ_BLOCK)
        burst = channels_on(engine, 0, 18, "burst") + channels_on(engine, 1, 18, "burst")
        # Thirty-six channels occupied in one reactor turn: both shards' blocked reads wake together.
        await join(node, "&".join(f"channel={name}" for name in burst))
        # Every delivery slot hangs, the queue is full: the shards stop reading there, and
        # nothing was dropped (each read no more than its share of the room).
        await wait_for(lambda: webhooks.in_flight == 4 and webhooks.queued == 6)
        await sleep(3 * 0.1 + HEARTBEAT_INTERVAL)  # a few reads (and a heartbeat's claim) later: still so
        assert webhooks.in_flight == 4 and webhooks.queued == 6 and webhooks.dropped == 0
        sent = [event for request in receiver.requests for event in request.events]
        waiting = sum(len(shard._holding) for shard in engine.shards)
        assert waiting == len(sent) + 6  # handed over: being delivered or queued, nothing else

        receiver.default = 200
        for request in receiver.hung:
            request.setResponseCode(200)
            request.finish()

        def posted() -> Counter:
            return Counter(event for request in receiver.requests for event in request.events)

        # Every transition of both shards is delivered once (the hung POSTs were answered 200 late).
        await wait_for(lambda: sum(posted().values()) == 40, timeout=15)
        await sleep(HOOK_SETTLE)
        assert posted() == Counter(("channel_occupied", name) for name in first + burst)
        assert webhooks.dropped == 0
    finally:
        await node.stop()
