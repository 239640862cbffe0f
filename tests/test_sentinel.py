"""
Redis Sentinel: the engine finds the primary through the sentinels and
follows a failover without a restart; and writes that Redis lost (a failover
with asynchronous replication, a restart from an older file) never make a
node drop new publications as duplicates, nor let clients recover across
them: the channel moves to a new epoch and subscribers learn
C{recovered: false}.
"""

from __future__ import annotations

import time

import pytest
import pytest_twisted
from twisted.internet import reactor

from pushie.engines.redis import RedisEngine
from pushie.records import ChannelState, History, Publication
from tests.helpers import sleep, start_daemon, wait_for
from tests.redis_server import RedisServer, require_redis
from tests.sentinel_servers import SentinelSetup


@pytest.fixture
def own_redis(tmp_path):
    require_redis()
    server = RedisServer(str(tmp_path))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def sentinels(tmp_path):
    require_redis()
    setup = SentinelSetup(str(tmp_path))
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()


# -- lost writes --------------------------------------------------------------


def test_went_back_compares_offset_and_the_envelope_last_dispatched():
    engine = RedisEngine("redis://127.0.0.1:1/0", reactor)
    kept = [Publication("c", n, "e1", b'"new"') for n in (3, 4, 5)]
    dispatched = Publication("c", 5, "e1", b'"old"').envelope
    history = History(ChannelState(5, "e1"), kept, True)
    assert engine._went_back((5, "e1"), dispatched, history)  # same offset, another publication
    assert not engine._went_back((5, "e1"), kept[2].envelope, history)  # the same one
    assert engine._went_back((6, "e1"), None, history)  # the offset went back
    assert not engine._went_back((6, "e0"), None, history)  # another epoch: not this check's business
    assert not engine._went_back((2, "e1"), dispatched, history)  # behind: nothing to compare


@pytest_twisted.ensureDeferred
async def test_a_channel_whose_writes_were_lost_moves_to_a_new_epoch(own_redis):
    """
    Rewinding a channel's offset is what a failover to a replica that lacks
    the last writes does: new publications reuse offsets the node already
    dispatched, with other content.  The node must not drop them as
    duplicates: it moves the channel to a new epoch, once, and every node's
    subscribers learn that continuity was lost.
    """
    first = await start_daemon(engine=own_redis.url)
    second = await start_daemon(engine=own_redis.url)
    try:
        clients = []
        for daemon in (first, second):
            client = await daemon.connect("channel=c")
            await client.next_of("welcome")
            subscribed = await client.next_of("subscribed")
            clients.append(client)
        epoch = subscribed["epoch"]
        for i in range(5):
            status, body, _ = await first.publish({"channel": "c", "data": f"old-{i}"})
            assert (status, body["offset"]) == (200, i + 1)
        for client in clients:
            assert [(await client.next_of("message"))["data"] for _ in range(5)] == [f"old-{i}" for i in range(5)]

        own_redis.cli("HSET", "pushie:0:meta:c", "offset", "3")  # the last two writes are "lost"
        status, body, _ = await second.publish({"channel": "c", "data": "new-4"})
        assert (status, body["offset"], body["epoch"]) == (200, 4, epoch)  # Redis cannot know
        for client in clients:
            await wait_for(lambda c=client: c.closed.called, timeout=10)
            assert client.close_code == 4002  # resubscribe: continuity lost
            assert [f for f in client.pending() if f.get("data") == "new-4"] == []
        moved = own_redis.cli("HGET", "pushie:0:meta:c", "epoch").strip()
        assert moved != epoch
        assert own_redis.cli("HGET", "pushie:0:meta:c", "offset").strip() == "0"

        again = await second.connect()
        await again.next_of("welcome")
        again.send({"type": "subscribe", "channel": "c", "since": {"offset": 5, "epoch": epoch}})
        answer = await again.next_of("subscribed")
        assert (answer["recovered"], answer["epoch"], answer["offset"]) == (False, moved, 0)
        status, body, _ = await first.publish({"channel": "c", "data": "after"})
        assert (status, body["offset"], body["epoch"]) == (200, 1, moved)
        message = await again.next_of("message")
        assert (message["data"], message["offset"], message["epoch"]) == ("after", 1, moved)
        await sleep(0.2)
        assert again.pending() == []  # the mark of the move (offset 0) is never sent
    finally:
        await first.stop()
        await second.stop()
