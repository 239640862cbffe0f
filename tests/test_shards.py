"""
Channels sharded over several Redis servers (pushie.engines.sharded): real
redis-servers of the tests' own, daemons with both, keys checked on the
server that should hold them, one shard stopped or refusing while the other
works, and a restart with another shard list.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool

from pushie.config import ConfigError, load_settings
from pushie.engines.sharded import (
    ShardedEngine,
    ring_fingerprint,
    shard_identity,
    shard_index,
    split_shard_urls,
)
from pushie.errors import EngineUnavailable, OutcomeUnknown, PartiallyPublished
from pushie.records import Publication, PublishRequest
from tests.helpers import connect_ws, start_daemon, wait_for
from tests.redis_server import RedisServer, require_redis
from tests.test_auth import SECRET_1, token
from tests.test_daemon import spawn, stop
from tests.test_pusher import APP_ID, APPS, api

# -- settings and routing (no Redis needed) ------------------------------------


def test_shard_lists_are_validated_with_clear_errors():
    assert split_shard_urls("redis://a:6379/0, rediss://b/1") == ["redis://a:6379/0", "rediss://b/1"]
    for bad, words in (
        ("redis://a:6379/0,", "empty item"),
        ("redis://a:6379/0,,redis://b", "empty item"),
        ("redis://a:6379/0,http://b", "is not"),
        ("redis://a:6379/0,redis://a/0", "listed twice"),  # the same shard, another spelling
        ("redis://a/0,redis://b/x", "database must be a number"),
    ):
        with pytest.raises(ValueError, match=words):
            split_shard_urls(bad)
        with pytest.raises(ConfigError, match="engine"):
            load_settings({"engine": bad})
    with pytest.raises(ValueError, match="at most 64"):
        split_shard_urls(",".join(f"redis://h{i}" for i in range(65)))
    # Spaces after commas are tidied; TOML may give a list.
    assert load_settings({"engine": "redis://a/0, redis://b/0"}).engine == "redis://a/0,redis://b/0"
    assert load_settings({"engine": ["redis://a/0", "redis://b/0"]}).engine == "redis://a/0,redis://b/0"
    # A shard's identity is host, port and db as written: no scheme, no password.
    assert shard_identity("rediss://:secret@cache.example/2") == "cache.example:6379/2"


def test_routing_is_stable_documented_and_spread():
    ids = ["10.0.0.1:6379/0", "10.0.0.2:6379/0"]
    # Pinned: the mapping is part of the stored format (changing it moves channels).
    assert [shard_index(ids, c) for c in ("news", "chat", "presence-room", "orders:eu", "1|my-channel")] == [
        0,
        1,
        1,
        0,
        0,
    ]
    assert ring_fingerprint(ids) == ring_fingerprint(list(reversed(ids))) == "99572774"
    # The order of the list does not move channels; adding a shard moves only channels to it.
    names = [f"channel-{i}" for i in range(2000)]
    two = [shard_index(ids, n) for n in names]
    assert [1 - shard_index(list(reversed(ids)), n) for n in names] == two
    three = [shard_index([*ids, "10.0.0.3:6379/0"], n) for n in names]
    assert all(after in (before, 2) for before, after in zip(two, three, strict=True))
    assert 600 <= three.count(2) <= 730  # about a third moves, to the new shard only
    assert 900 <= two.count(0) <= 1100  # spread evenly


def test_outcomes_of_a_request_spanning_shards_are_told_per_publication():
    engine = ShardedEngine(["redis://127.0.0.1:1/0", "redis://127.0.0.1:2/0"], reactor)
    requests = [PublishRequest("a", b"1"), PublishRequest("b", b"2"), PublishRequest("c", b"3")]
    a_part = (True, [Publication.of(requests[0], 7, "E1"), Publication.of(requests[2], 3, "E1")])
    down = (False, Failure(EngineUnavailable()))
    lost = (False, Failure(OutcomeUnknown()))
    # Both parts published: the publications, in request order.
    ok = engine._settle(requests, [[0, 2], [1]], [a_part, (True, [Publication.of(requests[1], 1, "E2")])])
    assert [(p.channel, p.offset) for p in ok] == [("a", 7), ("b", 1), ("c", 3)]
    # One part published, one certainly not: partially_published, per publication.
    with pytest.raises(PartiallyPublished) as partial:
        engine._settle(requests, [[0, 2], [1]], [a_part, down])
    assert partial.value.status == 503
    assert json.loads(partial.value.to_json())["results"] == [
        {"channel": "a", "offset": 7, "epoch": "E1"},
        {"channel": "b", "error": "engine_unavailable"},
        {"channel": "c", "offset": 3, "epoch": "E1"},
    ]
    # Nothing certainly published, something maybe: outcome_unknown, with results.
    with pytest.raises(OutcomeUnknown) as unknown:
        engine._settle(requests, [[0, 2], [1]], [down, lost])
    errors = [r["error"] for r in unknown.value.results]
    assert errors == ["engine_unavailable", "outcome_unknown", "engine_unavailable"]
    # Nothing published anywhere: the plain engine_unavailable.
    with pytest.raises(EngineUnavailable) as none:
        engine._settle(requests, [[0, 2], [1]], [down, down])
    assert none.value.results is None


# -- two real redis-servers ------------------------------------------------------


@pytest.fixture
def two_redis(tmp_path):
    require_redis()
    servers = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        server = RedisServer(str(tmp_path / name))
        server.start()
        servers.append(server)
    yield servers
    for server in servers:
        server.stop()


def engine_setting(*servers: RedisServer) -> str:
    return ",".join(s.url for s in servers)


def channels_on(engine: ShardedEngine, shard: int, count: int, stem: str = "c") -> list[str]:
    """The first C{count} names C{stem}-<n> that live on shard C{shard}."""
    names = (f"{stem}-{i}" for i in range(1000))
    return [n for n in names if engine.shard_of(n) is engine.shards[shard]][:count]


@pytest_twisted.ensureDeferred
async def test_channels_spread_over_both_servers_and_keys_land_on_theirs(two_redis):
    a, b = two_redis
    daemon = await start_daemon(engine=engine_setting(a, b))
    try:
        engine = daemon.engine
        assert isinstance(engine, ShardedEngine)
        prefix = f"pushie:0:shards-{engine.fingerprint}:"
        names = [f"spread-{i}" for i in range(20)]
        for name in names:
            status, body, _ = await daemon.publish({"channel": name, "data": name})
            assert (status, body["offset"]) == (200, 1)
        homes = [engine.shards.index(engine.shard_of(n)) for n in names]
        assert set(homes) == {0, 1}  # both servers hold channels
        for name, home in zip(names, homes, strict=True):
            expected, other = (a, b) if home == 0 else (b, a)
            assert expected.cli("EXISTS", prefix + "meta:" + name).strip() == "1"
            assert expected.cli("XLEN", prefix + "hist:" + name).strip() == "1"
            assert other.cli("EXISTS", prefix + "meta:" + name).strip() == "0"
        # A subscriber makes its node SUBSCRIBE on its channel's server only.
        on_a, on_b = channels_on(engine, 0, 1)[0], channels_on(engine, 1, 1)[0]
        client = await daemon.connect(f"channel={on_a}&channel={on_b}")
        await client.next_of("welcome")
        await client.next_of("subscribed")
        await client.next_of("subscribed")
        assert sorted(a.cli("PUBSUB", "CHANNELS").split()) == [prefix + "m:" + on_a, prefix + "p:" + on_a]
        assert sorted(b.cli("PUBSUB", "CHANNELS").split()) == [prefix + "m:" + on_b, prefix + "p:" + on_b]
        # Each shard has this node's heartbeat (within a heartbeat interval).
        for server in (a, b):
            await wait_for(lambda s=server: len(s.cli("KEYS", prefix + "node:*").split()) == 1, timeout=5)
        # healthz names both shards.
        status, health, _ = await daemon.get("/healthz")
        health = json.loads(health)
        assert status == 200 and health["status"] == "ok"
        assert health["shards"] == {s.name: "ok" for s in engine.shards}
    finally:
        await daemon.stop()


@pytest_twisted.ensureDeferred
async def test_two_daemons_two_shards_fan_out_history_recovery_presence_and_batches(two_redis):
    a, b = two_redis
    setting = engine_setting(a, b)
    one = await start_daemon(engine=setting, subscriber_secrets=[SECRET_1])
    two = await start_daemon(engine=setting, subscriber_secrets=[SECRET_1])
    try:
        engine = one.engine
        on_a, on_b = channels_on(engine, 0, 1)[0], channels_on(engine, 1, 1)[0]
        client = await one.connect(f"channel={on_a}&channel={on_b}")
        await client.next_of("welcome")
        first = {f["channel"]: f for f in [await client.next_of("subscribed"), await client.next_of("subscribed")]}
        # Publishes through the other daemon reach this one, for both shards.
        for i in range(3):
            for name in (on_a, on_b):
                status, body, _ = await two.publish({"channel": name, "data": i})
                assert (status, body["offset"]) == (200, i + 1)
        got = [await client.next_of("message") for _ in range(6)]
        assert [(m["channel"], m["offset"]) for m in got] == [(c, i + 1) for i in range(3) for c in (on_a, on_b)]
        # A batch spanning both shards: one result per publication, in order.
        batch = [{"channel": on_b, "data": "x"}, {"channel": on_a, "data": "y"}, {"channel": on_b, "data": "z"}]
        status, body, _ = await two.publish(batch)
        assert status == 200
        assert [(r["channel"], r["offset"]) for r in body["results"]] == [(on_b, 4), (on_a, 4), (on_b, 5)]
        got = [await client.next_of("message") for _ in range(3)]
        assert sorted((m["channel"], m["offset"], m["data"]) for m in got) == sorted(
            [(on_b, 4, "x"), (on_a, 4, "y"), (on_b, 5, "z")]
        )
        # The same data to channels of both shards.
        status, body, _ = await one.publish({"channels": [on_a, on_b], "data": "both", "idempotency_key": "k"})
        assert [(r["channel"], r["offset"]) for r in body["results"]] == [(on_a, 5), (on_b, 6)]
        status, again, _ = await two.publish({"channels": [on_a, on_b], "data": "both", "idempotency_key": "k"})
        assert again == body  # the keys live on each channel's shard, seen from either daemon
        # History and recovery through the other daemon.
        code, history, _ = await two.get(f"/channels/{on_b}/history?since=3")
        assert [m["offset"] for m in json.loads(history)["messages"]] == [4, 5, 6]
        late = await two.connect()
        await late.next_of("welcome")
        for name in (on_a, on_b):
            late.send({"type": "subscribe", "channel": name, "since": {"offset": 2, "epoch": first[name]["epoch"]}})
            answer = await late.next_of("subscribed")
            assert answer["recovered"] is True
            offsets = [(await late.next_of("message"))["offset"] for _ in range(answer["offset"] - 2)]
            assert offsets == list(range(3, answer["offset"] + 1))
        # Presence on a channel of each shard, across the two daemons.
        for room in (channels_on(engine, 0, 1, "presence-r")[0], channels_on(engine, 1, 1, "presence-r")[0]):
            ann = await one.connect(f"channel={room}&token={token(sub='ann', channels=[room])}")
            await ann.next_of("welcome")
            await ann.next_of("subscribed")
            bob = await two.connect(f"channel={room}&token={token(sub='bob', channels=[room])}")
            await bob.next_of("welcome")
            assert sorted(m["id"] for m in (await bob.next_of("subscribed"))["members"]) == ["ann", "bob"]
            assert (await ann.next_of("join"))["member"]["id"] == "bob"
            bob.close()
            await bob.closed
            assert (await ann.next_of("leave"))["member"]["id"] == "bob"
        # occupied() is the union of both shards (the Pusher API's channel list uses it).
        occupied = await one.hub.occupied("")
        assert {on_a, on_b} <= set(occupied)
    finally:
        await one.stop()
        await two.stop()


@pytest_twisted.ensureDeferred
async def test_one_shard_down_its_channels_answer_503_the_others_work(two_redis):
    a, b = two_redis
    daemon = await start_daemon(engine=engine_setting(a, b), redis_timeout=1.0, pusher_apps=APPS)
    try:
        engine = daemon.engine
        on_a, on_b = channels_on(engine, 0, 1)[0], channels_on(engine, 1, 1)[0]
        client = await daemon.connect(f"channel={on_a}")
        await client.next_of("welcome")
        await client.next_of("subscribed")
        b.stop()
        await wait_for(lambda: not engine.shards[1].healthy(), timeout=10)
        assert engine.shards[0].healthy() and not daemon.hub.healthy()
        # The healthy shard's channels publish and deliver.
        status, body, _ = await daemon.publish({"channel": on_a, "data": "still"})
        assert (status, body["offset"]) == (200, 1)
        assert (await client.next_of("message"))["data"] == "still"
        # The stopped shard's answer 503, and say nothing was published.
        status, body, response = await daemon.publish({"channel": on_b, "data": "lost"})
        assert (status, body["error"]) == (503, "engine_unavailable")
        assert response.headers.getRawHeaders("retry-after") == ["1"]
        # A batch touching the stopped shard publishes nothing, not even the healthy shard's part.
        status, body, _ = await daemon.publish([{"channel": on_a, "data": 1}, {"channel": on_b, "data": 2}])
        assert (status, body["error"]) == (503, "engine_unavailable")
        assert engine.shards[1].name in body["message"]
        code, info, _ = await daemon.get(f"/channels/{on_a}")
        assert (code, json.loads(info)["offset"]) == (200, 1)
        # Subscribing: the stopped shard's channel is refused, the other's works.
        other = await daemon.connect()
        await other.next_of("welcome")
        other.send({"type": "subscribe", "channel": on_b})
        refused = await other.next_of("error", timeout=5)
        assert (refused["code"], refused["channel"]) == ("engine_unavailable", on_b)
        other.send({"type": "subscribe", "channel": on_a})
        assert (await other.next_of("subscribed"))["offset"] == 1
        # Health: degraded (200, so load balancers keep the daemon), naming the shard.
        status, health, _ = await daemon.get("/healthz")
        health = json.loads(health)
        assert (status, health["status"]) == (200, "degraded")
        assert health["shards"] == {engine.shards[0].name: "ok", engine.shards[1].name: "unavailable"}
        # The Pusher channel list needs every shard: 503 rather than a list without b's channels.
        status, body = await api(daemon, "GET", f"/apps/{APP_ID}/channels")
        assert (status, body["error"]) == (503, "engine_unavailable")
        status, metrics, _ = await daemon.get("/metrics")
        assert f'pushie_redis_shard_up{{shard="{engine.shards[0].name}"}} 1.0'.encode() in metrics
        assert f'pushie_redis_shard_up{{shard="{engine.shards[1].name}"}} 0.0'.encode() in metrics
        # Both down: 503.
        a.stop()
        await wait_for(lambda: not engine.shards[0].healthy(), timeout=10)
        status, health, _ = await daemon.get("/healthz")
        assert (status, json.loads(health)["status"]) == (503, "engine_unavailable")
        a.start()
        b.start()
        await wait_for(engine.healthy, timeout=15)
        status, health, _ = await daemon.get("/healthz")
        assert (status, json.loads(health)["status"]) == (200, "ok")
        # Both back (empty): new subscribers on both shards, and the channel list has both.
        fresh = await daemon.connect(f"channel={on_a}&channel={on_b}")
        await fresh.next_of("welcome")
        await fresh.next_of("subscribed")
        await fresh.next_of("subscribed")
        status, body = await api(daemon, "GET", f"/apps/{APP_ID}/channels")
        assert status == 200 and {on_a, on_b} <= set(body["channels"])
    finally:
        await daemon.stop()


@pytest_twisted.ensureDeferred
async def test_a_shard_that_refuses_its_part_gives_partially_published(two_redis):
    a, b = two_redis
    daemon = await start_daemon(engine=engine_setting(a, b), pusher_apps=APPS)
    try:
        engine = daemon.engine
        on_a, on_b = channels_on(engine, 0, 1)[0], channels_on(engine, 1, 1)[0]
        client = await daemon.connect(f"channel={on_a}&channel={on_b}")
        await client.next_of("welcome")
        await client.next_of("subscribed")
        await client.next_of("subscribed")
        # Shard b is connected (so the request is sent) but refuses to write: out of memory.
        b.cli("CONFIG", "SET", "maxmemory-policy", "noeviction")
        b.cli("CONFIG", "SET", "maxmemory", "1")
        batch = [
            {"channel": on_a, "data": 1, "idempotency_key": "k1"},
            {"channel": on_b, "data": 2, "idempotency_key": "k2"},
        ]
        status, body, _ = await daemon.publish(batch)
        assert (status, body["error"]) == (503, "partially_published")
        a_epoch = body["results"][0]["epoch"]
        assert body["results"] == [
            {"channel": on_a, "offset": 1, "epoch": a_epoch},
            {"channel": on_b, "error": "engine_unavailable"},
        ]
        message = await client.next_of("message")
        assert (message["channel"], message["offset"]) == (on_a, 1)
        # The Pusher HTTP API says the same, in words (its channel names are not the Hub's).
        status, body = await api(
            daemon, "POST", f"/apps/{APP_ID}/events", {"name": "e", "channels": [on_a, on_b], "data": "{}"}
        )
        assert (status, body["error"]) == (503, "partially_published") and "results" not in body
        assert (await client.next_of("message"))["channel"] == on_a  # native subscribers see Pusher events too
        # Retrying the whole request with its keys publishes the rest, and on_a's part once.
        b.cli("CONFIG", "SET", "maxmemory", "0")
        status, body, _ = await daemon.publish(batch)
        assert status == 200
        assert [(r["channel"], r["offset"]) for r in body["results"]] == [(on_a, 1), (on_b, 1)]
        assert (await client.next_of("message"))["offset"] == 1
        assert client.pending() == []
        status, metrics, _ = await daemon.get("/metrics")
        assert b"pushie_engine_errors_total 2.0" in metrics
    finally:
        await daemon.stop()


@pytest_twisted.ensureDeferred
async def test_another_shard_list_starts_channels_over_and_never_continues_offsets(two_redis):
    a, b = two_redis
    daemon = await start_daemon(engine=engine_setting(a, b))
    try:
        engine = daemon.engine
        on_a, on_b = channels_on(engine, 0, 1)[0], channels_on(engine, 1, 1)[0]
        positions = {}
        for name in (on_a, on_b):
            for i in range(3):
                status, body, _ = await daemon.publish({"channel": name, "data": i})
            positions[name] = {"offset": 2, "epoch": body["epoch"]}
    finally:
        await daemon.stop()

    async def resubscribe(setting: str) -> dict[str, dict]:
        daemon = await start_daemon(engine=setting)
        try:
            client = await daemon.connect()
            await client.next_of("welcome")
            answers = {}
            for name, since in positions.items():
                client.send({"type": "subscribe", "channel": name, "since": since})
                answers[name] = await client.next_of("subscribed")
                if answers[name]["recovered"]:
                    assert (await client.next_of("message"))["offset"] == 3
            return answers
        finally:
            await daemon.stop()

    # The same shards in another order: the same set, nothing moves, recovery continues.
    same = await resubscribe(engine_setting(b, a))
    for name, since in positions.items():
        assert (same[name]["recovered"], same[name]["epoch"], same[name]["offset"]) == (True, since["epoch"], 3)
    # Another shard list (b's database 1 instead of 0): every channel starts over in a
    # new epoch, even the one that stays on a, whose old keys are still there.
    moved = await resubscribe(f"{a.url},redis://127.0.0.1:{b.port}/1")
    for name, since in positions.items():
        assert moved[name]["recovered"] is False
        assert moved[name]["epoch"] != since["epoch"] and moved[name]["offset"] == 0
    assert a.cli("EXISTS", f"pushie:0:shards-{engine.fingerprint}:meta:{on_a}").strip() == "1"
    # Back to one Redis (not sharded, keys without a fingerprint): the same.
    single = await resubscribe(a.url)
    for name, since in positions.items():
        assert (single[name]["recovered"], single[name]["offset"]) == (False, 0)
        assert single[name]["epoch"] not in (since["epoch"], moved[name]["epoch"])


@pytest_twisted.ensureDeferred
async def test_twistd_daemons_take_shards_from_the_command_line_and_the_environment(two_redis):
    a, b = two_redis
    nodes = [
        spawn(["-n", "--pidfile=", "pushie", "--listen", "tcp:0:interface=127.0.0.1", "--engine", f"{a.url},{b.url}"]),
        spawn(
            ["-n", "--pidfile=", "pushie", "--listen", "tcp:0:interface=127.0.0.1"],
            {"PUSHIE_ENGINE": f"{b.url}, {a.url}"},  # another order, a space: the same shards
        ),
    ]
    pool = HTTPConnectionPool(reactor, persistent=False)
    try:
        for proc in nodes:
            await wait_for(lambda p=proc: p.addresses or p.ended.called, timeout=20)
            assert proc.addresses, proc.output.decode()
            await wait_for(lambda p=proc: p.output.count(b"Redis engine connected") == 2, timeout=10)
        ports = [int(next(iter(p.addresses.values())).rsplit(":", 1)[1]) for p in nodes]
        client = await connect_ws(ports[1], "/websocket?channel=x&channel=y&channel=z")
        await client.next_of("welcome")
        for _ in range(3):
            await client.next_of("subscribed")
        response = await treq.post(
            f"http://127.0.0.1:{ports[0]}/publish",
            json=[{"channel": c, "data": c} for c in ("x", "y", "z")],
            pool=pool,
        )
        assert response.code == 200, await response.content()
        got = [(await client.next_of("message"))["data"] for _ in range(3)]
        assert sorted(got) == ["x", "y", "z"]
        client.close()
        await client.closed
        # Each channel's keys are on its shard, under one fingerprint for both daemons.
        identities = [shard_identity(a.url), shard_identity(b.url)]
        fingerprint = ring_fingerprint(identities)
        for channel in ("x", "y", "z"):
            home = (a, b)[shard_index(identities, channel)]
            assert (
                home.cli("KEYS", "pushie:0:shards-*:meta:*")
                .split()
                .count(f"pushie:0:shards-{fingerprint}:meta:{channel}")
                == 1
            )
        assert sum(len(s.cli("KEYS", "pushie:0:shards-*:meta:*").split()) for s in (a, b)) == 3
    finally:
        for proc in nodes:
            assert await stop(proc) == 0
        await pool.closeCachedConnections()
