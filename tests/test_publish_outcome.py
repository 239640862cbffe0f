"""
Honest publish answers on the Redis engine when Redis's answer is lost.

A tiny TCP proxy of the test's own stands between the daemon and a real
redis-server.  It forwards everything, but can be told to lose the answer to
the one publish whose request carries a marker: Redis runs the script (the
message is stored and sent to every node), and the daemon never hears so.
The daemon must then ask again with the same publish id and answer C{200}
with the offset Redis really assigned, the message delivered once; when
Redis stays out of reach, C{503 outcome_unknown}; and a publish that was
never sent stays C{503 engine_unavailable}, with nothing published.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol

from tests.helpers import Daemon, assert_reactor_clean, sleep, start_daemon, wait_for
from tests.redis_server import RedisServer
from tests.test_pusher import APPS, api

REDIS_TIMEOUT = 1.0


class _Back(Protocol):
    """The proxy's connection to redis-server, for one daemon connection."""

    def __init__(self, front: _Front) -> None:
        self.front = front

    def dataReceived(self, data: bytes) -> None:
        self.front.from_redis(data)

    def connectionLost(self, reason: Any) -> None:
        self.front.transport.loseConnection()


class _Front(Protocol):
    """A daemon's connection to the proxy."""

    def connectionMade(self) -> None:
        proxy: RedisProxy = self.factory.proxy
        self.proxy = proxy
        self.back: _Back | None = None
        self.waiting: list[bytes] = []
        self.losing = False  # the answer to a marked request is on its way: lose it
        if proxy.down:
            self.transport.abortConnection()
            return
        proxy.fronts.add(self)
        d = TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.redis_port).connect(Factory.forProtocol(lambda: _Back(self)))
        d.addCallbacks(self._connected, lambda failure: self.transport.abortConnection())

    def _connected(self, back: _Back) -> None:
        if not self.transport.connected:
            back.transport.loseConnection()
            return
        self.back = back
        for data in self.waiting:
            back.transport.write(data)
        self.waiting = []

    def dataReceived(self, data: bytes) -> None:
        marker = self.proxy.marker
        if marker is not None and marker in data:
            self.proxy.marker = None  # only the first call: the retry goes through
            self.losing = True
        if self.back is None:
            self.waiting.append(data)
        else:
            self.back.transport.write(data)

    def from_redis(self, data: bytes) -> None:
        if not self.losing:
            self.transport.write(data)
            return
        # Redis has answered the marked request (and maybe others): lose it all.
        self.proxy.lost += 1
        if self.proxy.mode == "drop":
            self.cut()
        elif self.proxy.mode == "down":
            self.proxy.set_down(True)
        # "hold": relay nothing more on this connection; the daemon gives up on it.

    def cut(self) -> None:
        self.transport.abortConnection()
        if self.back is not None:
            self.back.transport.abortConnection()

    def connectionLost(self, reason: Any) -> None:
        self.proxy.fronts.discard(self)
        if self.back is not None:
            self.back.transport.loseConnection()


class RedisProxy:
    """
    Forwards TCP from the daemon to redis-server, on a port of its own.

    After L{lose_answer_to}, the first request that carries the marker is
    forwarded, and Redis's answer is lost: C{drop} cuts that connection,
    C{hold} relays nothing more on it (the answer comes too late), C{down}
    cuts every connection and refuses new ones until L{set_down}C{(False)}.
    """

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.marker: bytes | None = None
        self.mode = "drop"
        self.down = False
        self.lost = 0
        self.fronts: set[_Front] = set()
        self.port: Any = None

    async def start(self) -> None:
        factory = Factory.forProtocol(_Front)
        factory.proxy = self
        self.port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port.getHost().port}/0"

    def lose_answer_to(self, marker: bytes, mode: str) -> None:
        self.marker = marker
        self.mode = mode

    def set_down(self, down: bool) -> None:
        self.down = down
        if down:
            for front in list(self.fronts):
                front.cut()

    async def stop(self) -> None:
        self.set_down(True)
        await self.port.stopListening()


@pytest.fixture
def redis(redis_server: RedisServer) -> RedisServer:
    redis_server.cli("FLUSHALL")
    return redis_server


async def setup(redis: RedisServer, **settings: Any) -> tuple[RedisProxy, Daemon]:
    proxy = RedisProxy(redis.port)
    await proxy.start()
    settings.setdefault("redis_timeout", REDIS_TIMEOUT)
    daemon = await start_daemon(engine=proxy.url, **settings)
    return proxy, daemon


async def teardown(proxy: RedisProxy, daemon: Daemon) -> None:
    await daemon.stop()
    await proxy.stop()
    await assert_reactor_clean()


def stored(redis: RedisServer, channel: str) -> list[dict[str, Any]]:
    """The envelopes Redis holds for C{channel}, read directly."""
    out = redis.cli("--raw", "XRANGE", f"pushie:0:hist:{channel}", "-", "+").split("\n")
    return [json.loads(line) for line in out if line.startswith("{")]


async def subscribed(daemon: Daemon, channel: str):
    client = await daemon.connect(f"channel={channel}")
    await client.next_of("welcome")
    await client.next_of("subscribed")
    return client


@pytest.mark.parametrize("mode", ["drop", "hold"])
@pytest_twisted.ensureDeferred
async def test_a_lost_answer_is_asked_again_and_the_real_offset_answered(redis, mode):
    """
    The script ran but its answer was lost (connection cut, or the answer
    later than redis_timeout): the daemon asks again with the same publish
    id and answers 200 with the offset Redis assigned; the message is
    stored and delivered once.
    """
    proxy, daemon = await setup(redis)
    try:
        client = await subscribed(daemon, "outcome")
        status, body, _ = await daemon.publish({"channel": "outcome", "data": "before"})
        assert (status, body["offset"]) == (200, 1)
        assert (await client.next_of("message"))["data"] == "before"

        proxy.lose_answer_to(b"lost-reply", mode)
        status, body, _ = await daemon.publish({"channel": "outcome", "data": "lost-reply"})
        assert proxy.lost == 1  # the answer really was lost
        assert status == 200, body
        in_redis = stored(redis, "outcome")
        assert [(e["offset"], e["data"]) for e in in_redis] == [(1, "before"), (2, "lost-reply")]
        assert (body["offset"], body["epoch"]) == (2, in_redis[1]["epoch"])

        message = await client.next_of("message")
        assert (message["offset"], message["data"]) == (2, "lost-reply")
        status, body, _ = await daemon.publish({"channel": "outcome", "data": "after"})
        assert (status, body["offset"]) == (200, 3)
        message = await client.next_of("message")
        assert (message["offset"], message["data"]) == (3, "after")
        assert client.pending() == []  # delivered exactly once
    finally:
        await teardown(proxy, daemon)


@pytest_twisted.ensureDeferred
async def test_a_lost_answer_to_a_batch_answers_every_real_offset(redis):
    """A batch (and a C{channels} list) is one script call: the retry answers all of it, published once."""
    proxy, daemon = await setup(redis)
    try:
        a = await subscribed(daemon, "oa")
        b = await subscribed(daemon, "ob")
        await daemon.publish({"channel": "oa", "data": "first"})
        await a.next_of("message")
        proxy.lose_answer_to(b"lost-list", "drop")
        status, body, _ = await daemon.publish({"channels": ["oa", "ob"], "data": "lost-list"})
        assert proxy.lost == 1
        assert status == 200, body
        assert [(r["channel"], r["offset"]) for r in body["results"]] == [("oa", 2), ("ob", 1)]
        proxy.lose_answer_to(b"lost-batch", "drop")
        batch = [
            {"channel": "oa", "data": "lost-batch"},
            {"channel": "ob", "data": "second", "idempotency_key": "k1"},
        ]
        status, body, _ = await daemon.publish(batch)
        assert proxy.lost == 2
        assert status == 200, body
        assert [(r["channel"], r["offset"]) for r in body["results"]] == [("oa", 3), ("ob", 2)]
        assert [e["data"] for e in stored(redis, "oa")] == ["first", "lost-list", "lost-batch"]
        assert [e["data"] for e in stored(redis, "ob")] == ["lost-list", "second"]
        got_a = [await a.next_of("message") for _ in range(2)]
        got_b = [await b.next_of("message") for _ in range(2)]
        assert [(m["offset"], m["data"]) for m in got_a] == [(2, "lost-list"), (3, "lost-batch")]
        assert [(m["offset"], m["data"]) for m in got_b] == [(1, "lost-list"), (2, "second")]
        # The idempotency key was stored once, with the offset answered.
        status, again, _ = await daemon.publish({"channel": "ob", "data": "second", "idempotency_key": "k1"})
        assert (status, again["offset"]) == (200, 2)
        status, _, _ = await daemon.publish({"channel": "oa", "data": "end"})
        assert (await a.next_of("message"))["data"] == "end"
        assert a.pending() == [] and b.pending() == []
    finally:
        await teardown(proxy, daemon)


@pytest_twisted.ensureDeferred
async def test_an_answer_that_cannot_be_settled_is_outcome_unknown(redis):
    """
    Redis ran the script, then stays out of reach past the retry window:
    C{503 outcome_unknown}, not C{engine_unavailable}, because the message
    may well have been published (here it was); a retry with the same
    idempotency_key then publishes it exactly once.
    """
    proxy, daemon = await setup(redis)
    try:
        client = await subscribed(daemon, "outcome")
        proxy.lose_answer_to(b"lost-reply", "down")
        publication = {"channel": "outcome", "data": "lost-reply", "idempotency_key": "order-17"}
        status, body, response = await daemon.publish(publication)
        assert proxy.lost == 1
        assert (status, body["error"]) == (503, "outcome_unknown"), body
        assert "may or may not have been published" in body["message"]
        assert "idempotency_key" in body["message"]
        assert response.headers.getRawHeaders("retry-after") == ["1"]
        # It was published: the subscriber has it (through the pub/sub
        # connection, before the proxy went down), and Redis holds it.
        assert [e["data"] for e in stored(redis, "outcome")] == ["lost-reply"]

        proxy.set_down(False)
        await wait_for(daemon.engine.healthy, timeout=15)
        status, body, _ = await daemon.publish(publication)
        assert (status, body["offset"]) == (200, 1)  # the retry the message advises: not published again
        assert [e["data"] for e in stored(redis, "outcome")] == ["lost-reply"]
        assert (await client.next_of("message"))["data"] == "lost-reply"
        assert client.pending() == []
    finally:
        await teardown(proxy, daemon)


@pytest_twisted.ensureDeferred
async def test_a_publish_never_sent_is_engine_unavailable_and_nothing_appears(redis):
    """No connection to Redis: the script is never sent, C{503 engine_unavailable}, and nothing is published."""
    proxy, daemon = await setup(redis)
    try:
        client = await subscribed(daemon, "outcome")
        engine = daemon.engine
        proxy.set_down(True)
        await wait_for(lambda: not engine.healthy() and not engine._commands.size, timeout=5)
        status, body, response = await daemon.publish({"channel": "outcome", "data": "refused"})
        assert (status, body["error"]) == (503, "engine_unavailable"), body
        assert "nothing was published" in body["message"]
        assert response.headers.getRawHeaders("retry-after") == ["1"]

        proxy.set_down(False)
        await wait_for(engine.healthy, timeout=15)
        assert stored(redis, "outcome") == []
        status, info, _ = await daemon.get("/channels/outcome")
        assert json.loads(info)["offset"] == 0
        status, body, _ = await daemon.publish({"channel": "outcome", "data": "after"})
        assert (status, body["offset"]) == (200, 1)
        frames = []
        while True:
            frame = await client.next()
            if frame["type"] == "message":
                frames.append(frame["data"])
                if frame["data"] == "after":
                    break
        assert frames == ["after"]  # "refused" never reached anyone
    finally:
        await teardown(proxy, daemon)


@pytest_twisted.ensureDeferred
async def test_pusher_triggers_answer_the_same_way(redis):
    """The Pusher HTTP API: a lost answer settled is a 200; one that cannot be is 503 outcome_unknown."""
    proxy, daemon = await setup(redis, pusher_apps=APPS)
    path = f"/apps/{APPS[0].split(':')[0]}/events"
    try:
        proxy.lose_answer_to(b"lost-one", "drop")
        status, body = await api(daemon, "POST", path, {"name": "e", "channel": "pc", "data": "lost-one"})
        assert proxy.lost == 1
        assert (status, body) == (200, {})
        proxy.lose_answer_to(b"lost-two", "down")
        status, body = await api(daemon, "POST", path, {"name": "e", "channel": "pc", "data": "lost-two"})
        assert proxy.lost == 2
        assert (status, body["error"]) == (503, "outcome_unknown"), body
        assert "may or may not have been triggered" in body["message"]
        proxy.set_down(False)
        await wait_for(daemon.engine.healthy, timeout=15)
        assert [e["data"] for e in stored(redis, "pc")] == ["lost-one", "lost-two"]
    finally:
        await teardown(proxy, daemon)


@pytest_twisted.ensureDeferred
async def test_pusher_trigger_answers_200_when_only_its_info_read_fails(redis):
    """
    The event is published and only the user_count read after it fails:
    the answer is 200 (without the info), not a 503 that would say nothing
    was published.
    """
    proxy, daemon = await setup(redis, pusher_apps=APPS)
    path = f"/apps/{APPS[0].split(':')[0]}/events"
    try:
        # The presence listing script's text (sent with EVAL the first time) carries this comment.
        proxy.lose_answer_to(b"Sweeps the fields", "down")
        event = {"name": "e", "channel": "presence-room", "data": "shown", "info": "user_count"}
        status, body = await api(daemon, "POST", path, event)
        assert proxy.lost == 1
        assert (status, body) == (200, {})
        assert [e["data"] for e in stored(redis, "presence-room")] == ["shown"]
        proxy.set_down(False)
        await wait_for(daemon.engine.healthy, timeout=15)
    finally:
        await teardown(proxy, daemon)


@pytest_twisted.ensureDeferred
async def test_connections_dropped_during_their_handshake_do_not_stop_reconnecting(redis):
    """
    A Redis (or a proxy in front of it) that accepts connections and drops
    them at once, for a while: txredisapi would stop reconnecting for good
    (SELECT failed); the daemon comes back as soon as Redis does.
    """
    proxy, daemon = await setup(redis)
    try:
        engine = daemon.engine
        proxy.set_down(True)
        await wait_for(lambda: not engine.healthy(), timeout=5)
        await sleep(1.5)  # several reconnections refused
        proxy.set_down(False)
        await wait_for(engine.healthy, timeout=15)
        status, body, _ = await daemon.publish({"channel": "outcome", "data": "back"})
        assert (status, body["offset"]) == (200, 1)
    finally:
        await teardown(proxy, daemon)
