"""
Redis Sentinel: the engine finds the primary through the sentinels and
follows a failover without a restart; and writes that Redis lost (a failover
with asynchronous replication, a restart from an older file) never make a
node drop new publications as duplicates, nor let clients recover across
them: the channel moves to a new epoch and subscribers learn
C{recovered: false}.
"""

from __future__ import annotations

import json
import time

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ConnectError
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.client import HTTPConnectionPool

from pushie.config import Settings
from pushie.engines.redis import RedisEngine, SentinelEndpoint
from pushie.records import ChannelState, History, Publication, PublishRequest
from pushie.tap import PushieService
from tests.helpers import LogWatcher, sleep, start_daemon, wait_for
from tests.redis_server import RedisServer, free_port, require_redis
from tests.sentinel_servers import SERVICE, SentinelSetup


@pytest.fixture
def sentinels(tmp_path):
    require_redis()
    setup = SentinelSetup(str(tmp_path))
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()


@pytest.fixture
def replicated(tmp_path):
    """A primary and its replica, no sentinels."""
    require_redis()
    setup = SentinelSetup(str(tmp_path))
    try:
        setup.start(sentinels=False)
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

        lose_last_writes(own_redis, "c", 2)
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


def lose_last_writes(redis: RedisServer, channel: str, count: int) -> None:
    """Make Redis forget the last C{count} publications of C{channel}, as a failover to a lagging replica does."""
    meta, hist = f"pushie:0:meta:{channel}", f"pushie:0:hist:{channel}"
    offset = int(redis.cli("HGET", meta, "offset"))
    ids = redis.cli("XREVRANGE", hist, "+", "-", "COUNT", str(count)).split()
    redis.cli("XDEL", hist, *[i for i in ids if "-" in i and i.split("-")[0].isdigit()])
    redis.cli("HSET", meta, "offset", str(offset - count))


@pytest_twisted.ensureDeferred
async def test_lost_writes_found_when_another_node_published_past_them_first(own_redis):
    """
    The race of a failover: another node publishes on the new primary
    before this node's pub/sub connection is back, past the offset this node
    dispatched.  Offsets alone look fine then; the history holding other
    publications at the offsets it dispatched gives it away.
    """
    first = await start_daemon(engine=own_redis.url)
    second = await start_daemon(engine=own_redis.url)
    try:
        client = await first.connect("channel=c")
        await client.next_of("welcome")
        epoch = (await client.next_of("subscribed"))["epoch"]
        for i in range(5):
            await second.publish({"channel": "c", "data": f"old-{i + 1}"})
        assert [(await client.next_of("message"))["offset"] for _ in range(5)] == [1, 2, 3, 4, 5]

        own_redis.cli("CLIENT", "KILL", "TYPE", "pubsub")  # the first node is deaf for about a second
        lose_last_writes(own_redis, "c", 2)
        for i in range(4, 7):
            status, body, _ = await second.publish({"channel": "c", "data": f"new-{i}"})
            assert (status, body["offset"], body["epoch"]) == (200, i, epoch)
        await wait_for(lambda: client.closed.called, timeout=15)
        assert client.close_code == 4002
        assert [f["data"] for f in client.pending() if f["type"] == "message"] == []  # not new-6 after old-5
        moved = own_redis.cli("HGET", "pushie:0:meta:c", "epoch").strip()
        assert moved != epoch
    finally:
        await first.stop()
        await second.stop()


# -- Sentinel -----------------------------------------------------------------


class Subscriber:
    """
    A WebSocket subscriber that keeps every message, and when told that
    continuity was lost (close 4002) resubscribes from where it was and
    notes what it was told.
    """

    def __init__(self, daemon, channel: str) -> None:
        self.daemon = daemon
        self.channel = channel
        self.messages: list[dict] = []
        self.told: list[bool] = []  # the recovered flag of each resubscribe after a 4002
        self.resubscribed: list[dict] = []  # where each resubscribe left it
        self.retries = 0  # subscribes answered engine_unavailable
        self.position: dict | None = None
        self.running = True

    async def run(self) -> None:
        since = None
        while self.running:
            client = await self.daemon.connect()
            await client.next_of("welcome")
            frame = {"type": "subscribe", "channel": self.channel}
            if since is not None:
                frame["since"] = since
            while True:
                client.send(frame)
                subscribed = await client.next(timeout=30)
                if subscribed["type"] != "error" or subscribed["code"] != "engine_unavailable":
                    break
                self.retries += 1  # during the failover: try again, as clients do
                await sleep(0.1)
            assert subscribed["type"] == "subscribed", subscribed
            self.position = {"offset": subscribed["offset"], "epoch": subscribed["epoch"]}
            if since is not None:
                self.told.append(subscribed["recovered"])
                self.resubscribed.append(self.position)
            while not client.closed.called:
                frame = await self._next(client)
                if frame is None:
                    break
                if frame["type"] == "message":
                    self.messages.append(frame)
                    self.position = {"offset": frame["offset"], "epoch": frame["epoch"]}
            if not self.running:
                client.close()
                return
            assert client.close_code == 4002, client.close_code
            since = self.position

    async def _next(self, client):
        closed = client.closed
        got = client.frames.get()
        first = await DeferredList([got, closed], fireOnOneCallback=True, consumeErrors=True)
        if first[1] == 0:
            return first[0]
        got.cancel()
        leftovers = client.pending()
        for frame in leftovers:
            if frame["type"] == "message":
                self.messages.append(frame)
                self.position = {"offset": frame["offset"], "epoch": frame["epoch"]}
        return None


@pytest.mark.parametrize("lose_writes", [False, True], ids=["replica-in-sync", "replica-behind"])
@pytest_twisted.ensureDeferred
async def test_sentinel_failover_while_publishing_flat_out(sentinels, lose_writes):
    """
    Two daemons on the sentinels' URL; publishers and subscribers on both
    run flat out; the primary is killed (-9).  Publishes answer 503 only
    until the daemon reaches the new primary, then succeed; no daemon is
    restarted.  Subscribers see every acknowledged message once, in order,
    or are told to recover and learn C{recovered: false}.

    With C{replica-behind}, the replica is cut off for the last 0.3 s before
    the kill: the promoted replica lacks writes that were acknowledged and
    delivered, so every subscriber must be told.
    """
    notes: list[str] = []  # what the engines said about continuity

    def observe(event: dict) -> None:
        text = formatEvent(event) or ""
        if text.startswith("Channel c:"):
            notes.append(text.split(":", 1)[1].split(";")[0].strip())

    globalLogPublisher.addObserver(observe)
    watcher = LogWatcher().start()
    dead = free_port()
    asked = [("127.0.0.1", dead), ("127.0.0.1", sentinels.sentinel_ports[0])]
    unknown_service = SentinelEndpoint(reactor, asked, "nope", 1.0)
    with pytest.raises(ConnectError) as caught:
        await Deferred.fromCoroutine(unknown_service.find_primary())
    assert f"127.0.0.1:{dead}: ConnectionRefusedError" in str(caught.value)
    assert f"127.0.0.1:{sentinels.sentinel_ports[0]} knows no primary named 'nope'" in str(caught.value)
    # The first sentinel named is down: the daemons ask the next ones.
    url = sentinels.url.replace("://", f"://127.0.0.1:{free_port()},")
    # History long enough for what one daemon publishes on the new primary
    # before the other's pub/sub connection is back (else its subscribers
    # are told to recover: honest, but not what this test looks at).
    daemons = [await start_daemon(engine=url, redis_timeout=1.0, history_size=1000) for _ in range(2)]
    pool = HTTPConnectionPool(reactor, persistent=True)
    subscribers = [Subscriber(d, "c") for d in daemons for _ in range(2)]
    runs = [Deferred.fromCoroutine(s.run()) for s in subscribers]
    await wait_for(lambda: all(s.position is not None for s in subscribers), timeout=10)
    acknowledged: list[tuple[float, int, int, str, str]] = []  # (time, daemon, offset, epoch, data)
    refused: list[tuple[float, int, str, str]] = []  # (time, daemon, error, data)
    publishing = [True]

    async def publisher(index: int, name: str) -> None:
        n = 0
        while publishing[0]:
            n += 1
            data = f"{name}-{n}"
            response = await treq.post(daemons[index].url + "/publish", json={"channel": "c", "data": data}, pool=pool)
            body = json.loads(await response.content())
            now = time.monotonic()
            if response.code == 200:
                acknowledged.append((now, index, body["offset"], body["epoch"], data))
            else:
                assert response.code == 503, (response.code, body)
                assert body["error"] in ("engine_unavailable", "outcome_unknown"), body
                refused.append((now, index, body["error"], data))
                await sleep(0.02)

    publishers = [Deferred.fromCoroutine(publisher(i, f"p{i}{j}")) for i in range(2) for j in range(2)]
    await sleep(1.0)
    if lose_writes:
        sentinels.cut_off_replica()
        await sleep(0.3)
    old_primary = sentinels.primary_address()
    killed_at = time.monotonic()
    before = len(acknowledged)
    sentinels.kill_primary()
    if lose_writes:
        sentinels.resume_replica()
    await wait_for(lambda: sentinels.primary_address() != old_primary, timeout=30)
    promoted_at = time.monotonic()
    for index in range(2):  # each daemon publishes again once it has found the new primary
        await wait_for(lambda i=index: any(a[1] == i and a[0] > promoted_at for a in acknowledged), timeout=20)
    # A daemon is back at its first success after its first 503 (answers that
    # were on their way when the primary died may still say 200 after the kill).
    back = []
    for i in range(2):
        first_refusal = min([r[0] for r in refused if r[1] == i], default=killed_at)
        back.append(min(a[0] for a in acknowledged if a[1] == i and a[0] >= first_refusal))
    after_back = len(acknowledged)
    await sleep(1.0)
    publishing[0] = False
    for d in publishers:
        await d
    assert len(acknowledged) > after_back + 10  # publishing again after the failover
    for t, index, error, _ in refused:  # 503 only during the failover
        assert killed_at <= t <= back[index], (t - killed_at, index, error)

    # The subscribers catch up: a last message, published once everything
    # settled, reaches every one of them.  (Should a node find lost writes
    # only now and move the channel, this one is in the abandoned epoch:
    # publish another.)
    for attempt in range(5):
        status, body, _ = await daemons[0].publish({"channel": "c", "data": f"end-{attempt}"})
        assert status == 200, body
        acknowledged.append((time.monotonic(), 0, body["offset"], body["epoch"], f"end-{attempt}"))
        try:
            await wait_for(
                lambda a=attempt: all(any(m["data"] == f"end-{a}" for m in s.messages) for s in subscribers),
                timeout=5,
            )
            break
        except AssertionError:
            continue
    else:
        for s in subscribers:
            print("subscriber:", len(s.messages), s.told, s.resubscribed, s.position)
        for d in daemons:
            e = d.engine
            print("engine:", e._last.get("c"), e._resyncing.get("c"), e._resync_running.get("c"), e._resync_again)
            print("healthy", e.healthy(), e._pubsub, e._unsynced, e._catching_up)
        raise AssertionError("the subscribers did not catch up")
    for s in subscribers:
        s.running = False
    for client in [c for d in daemons for c in d.clients]:
        client.close()
    for run in runs:
        await run

    unknown = {r[3] for r in refused if r[2] == "outcome_unknown"}
    not_published = {r[3] for r in refused if r[2] == "engine_unavailable"}
    epochs = list(dict.fromkeys(a[3] for a in sorted(acknowledged)))
    channel_order = [a[4] for a in sorted(acknowledged, key=lambda a: (epochs.index(a[3]), a[2]))]
    outcomes = []
    for s in subscribers:
        seen = [(m["epoch"], m["offset"]) for m in s.messages]
        assert len(seen) == len(set(seen)), "a message was delivered twice"
        data = [m["data"] for m in s.messages]
        assert len(data) == len(set(data)), "a message was delivered twice"
        assert not set(data) & not_published, "a publish answered engine_unavailable was delivered"
        for a, b in zip(s.messages, s.messages[1:], strict=False):
            if a["epoch"] == b["epoch"]:
                assert b["offset"] > a["offset"], (a, b)
        if not s.told:
            got = [d for d in data if d not in unknown]
            assert got == channel_order, "an acknowledged message is missing or out of order"
            outcomes.append("every message")
        else:
            assert s.told == [False] * len(s.told), s.told
            # From where it resubscribed last, again every acknowledged message of that epoch, in order.
            position = s.resubscribed[-1]
            since = [
                a[4]
                for a in sorted(acknowledged, key=lambda a: a[2])
                if a[3] == position["epoch"] and a[2] > position["offset"]
            ]
            later = [d for d in data if d in set(since)]
            assert later == since
            outcomes.append(f"told {len(s.told)}x recovered:false, {s.retries} retried subscribes")
    if lose_writes:
        assert all(s.told for s in subscribers), "writes were lost: every subscriber must be told"
        assert len(epochs) == 2
    else:
        assert len(epochs) == 1
    for daemon in daemons:
        assert daemon.engine.healthy()
        await daemon.stop()
    await pool.closeCachedConnections()
    globalLogPublisher.removeObserver(observe)
    watcher.stop()
    watcher.check("a failover")
    print(
        f"\nsentinel failover ({'replica behind' if lose_writes else 'replica in sync'}): replica promoted"
        f" {promoted_at - killed_at:.2f} s after kill -9 of the primary; daemons publishing again after"
        f" {back[0] - killed_at:.2f} s and {back[1] - killed_at:.2f} s; acknowledged {len(acknowledged)}"
        f" ({before} before the kill), 503 {len(refused)} (outcome_unknown {len(unknown)}),"
        f" delivered {[len(s.messages) for s in subscribers]}, epochs {len(epochs)}, subscribers: {outcomes};"
        f" engines: {sorted(set(notes))}"
    )


@pytest_twisted.ensureDeferred
async def test_wait_replicas_answers_outcome_unknown_while_the_replica_lags(replicated):
    """
    With redis_wait_replicas=1 a publish answers 200 only once the replica
    has it; when the replica does not acknowledge in time the publication is
    on the primary (and delivered) but could be lost by a failover: the
    answer is 503 outcome_unknown, and the retry with the same idempotency
    key finds it once the replica is back.
    """
    sentinels = replicated
    daemon = await start_daemon(engine=sentinels.primary_url, redis_timeout=0.5, redis_wait_replicas=1)
    try:
        client = await daemon.connect("channel=c")
        await client.next_of("welcome")
        await client.next_of("subscribed")
        status, body, _ = await daemon.publish({"channel": "c", "data": "replicated"})
        assert (status, body["offset"]) == (200, 1)
        assert sentinels.cli(sentinels.replica_port, "HGET", "pushie:0:meta:c", "offset").strip() == "1"
        assert (await client.next_of("message"))["data"] == "replicated"

        sentinels.cut_off_replica()
        request = {"channel": "c", "data": "on the primary only", "idempotency_key": "k1"}
        status, body, _ = await daemon.publish(request)
        assert (status, body["error"]) == (503, "outcome_unknown")
        message = await client.next_of("message")  # published on the primary all the same
        assert (message["data"], message["offset"]) == ("on the primary only", 2)

        sentinels.resume_replica()
        await wait_for(
            lambda: "master_link_status:up" in sentinels.cli(sentinels.replica_port, "INFO", "replication"),
            timeout=15,
        )
        status, body, _ = await daemon.publish(request)
        assert (status, body["offset"]) == (200, 2)  # the retry finds it
        status, body, _ = await daemon.publish({"channel": "c", "data": "next"})
        assert (status, body["offset"]) == (200, 3)
        assert (await client.next_of("message"))["data"] == "next"
        assert client.pending() == []
    finally:
        await daemon.stop()


@pytest_twisted.ensureDeferred
async def test_a_server_named_by_a_sentinel_that_is_not_a_primary_is_not_used(sentinels):
    """
    A sentinel that names a replica (a stale view, or a misconfigured one:
    here it is made to monitor the replica) does not get the daemon
    publishing to it: ROLE is checked on every new connection, which is
    dropped, and the sentinels asked again until one names a primary.
    """
    port = sentinels.sentinel_ports[0]
    sentinels.cli(port, "SENTINEL", "REMOVE", SERVICE)
    sentinels.cli(port, "SENTINEL", "MONITOR", SERVICE, "127.0.0.1", str(sentinels.replica_port), "2")
    said: list[str] = []

    def observe(event: dict) -> None:
        said.append(formatEvent(event) or "")

    globalLogPublisher.addObserver(observe)
    service = PushieService(
        Settings.defaults().replace(
            listen=["tcp:0:interface=127.0.0.1"], engine=f"redis+sentinel://127.0.0.1:{port}/{SERVICE}/0"
        ),
        reactor,
    )
    await service.startService()
    try:
        await wait_for(lambda: any("which is not a primary" in text for text in said), timeout=10)
        assert any(f"127.0.0.1:{sentinels.replica_port}, which is not a primary" in text for text in said)
        assert not service.engine.healthy()

        sentinels.cli(port, "SENTINEL", "REMOVE", SERVICE)
        sentinels.cli(port, "SENTINEL", "MONITOR", SERVICE, "127.0.0.1", str(sentinels.primary_port), "2")
        await wait_for(service.engine.healthy, timeout=10)
        publication = (await service.engine.append([PublishRequest("c", b'"hello"')]))[0]
        assert publication.offset == 1
        await wait_for(
            lambda: sentinels.cli(sentinels.replica_port, "HGET", "pushie:0:meta:c", "offset").strip() == "1",
            timeout=5,
        )
    finally:
        globalLogPublisher.removeObserver(observe)
        await service.stopService()
