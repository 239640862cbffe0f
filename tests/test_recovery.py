"""
Recovery: a client that resubscribes with `since` gets exactly what it missed,
in order, with nothing doubled, or is told `recovered: false`.

The property tests drive the real Hub and memory engine (with a controllable
clock, and with engine answers that can be held back so that publishes land
while a subscribe is in flight); the socket tests do the same through real
WebSocket connections.
"""

from __future__ import annotations

import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from pushie.channels import Position
from pushie.engines.memory import MemoryEngine
from pushie.hub import Hub
from pushie.records import Publication, PublishRequest
from tests.helpers import wait_for


class HeldEngine(MemoryEngine):
    """The memory engine, with history/state answers held until released."""

    hold = False
    held: list[tuple[Deferred, object]] = []

    def _held(self, answer: Deferred) -> Deferred:
        if not self.hold:
            return answer
        later: Deferred = Deferred()
        self.held = [*self.held, (later, answer.result)]
        return later

    def history(self, name, since, limit):
        return self._held(super().history(name, since, limit))

    def state(self, name):
        return self._held(super().state(name))

    def release(self) -> None:
        held, self.held = self.held, []
        for d, result in held:
            d.callback(result)


class Client:
    """A subscriber that records what it receives, session by session."""

    def __init__(self, name: str) -> None:
        self.client_id = name
        self.received: list[Publication] = []
        self.position: Position | None = None
        self.answers = []

    def deliver(self, publication: Publication) -> None:
        self.received.append(publication)
        self.position = Position(publication.offset, publication.epoch)

    def deliver_burst(self, burst) -> None:
        for publication in burst.publications:
            self.deliver(publication)

    def presence(self, event) -> None:
        pass

    def subscribed(self, answer) -> None:
        self.answers.append(answer)
        if answer.recovered is False or self.position is None:
            self.position = Position(answer.state.offset, answer.state.epoch)
        for item in answer.replay:
            self.deliver(item)


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.integers(1, 6)),
        st.tuples(st.just("disconnect"), st.just(0)),
        st.tuples(st.just("resubscribe"), st.just(0)),
        st.tuples(st.just("publish_while_subscribing"), st.integers(1, 6)),
        st.tuples(st.just("wait"), st.integers(1, 4)),
    ),
    max_size=40,
)


def run_ops(ops, history_size, history_ttl, coalesce):
    clock = Clock()
    engine = HeldEngine(clock=clock, history_size=history_size, history_ttl=history_ttl)
    # Coalesced, publications wait for the end of the reactor turn (a
    # `wait`, or the end of the run): unsubscribes and resubscribes happen
    # while bursts are pending.
    hub = Hub(engine, clock, coalesce=coalesce)
    hub.startService()
    watcher = Client("watcher")  # keeps the channel alive, never leaves
    hub.subscribe("c", watcher).addCallback(watcher.subscribed)
    client = Client("client")
    hub.subscribe("c", client).addCallback(client.subscribed)
    connected = True
    published = 0

    def publish(n):
        nonlocal published
        hub.publish([PublishRequest("c", b"%d" % (published + i + 1)) for i in range(n)])
        published += n

    for op, n in ops:
        if op == "publish":
            publish(n)
        elif op == "disconnect" and connected:
            hub.unsubscribe("c", client)
            connected = False
        elif op in ("resubscribe", "publish_while_subscribing") and not connected:
            if op == "resubscribe":
                # The WebSocket door's way with the memory engine: answered at once.
                answer = hub.subscribe_now("c", client, since=client.position)
                assert answer is not None
                client.subscribed(answer)
                connected = True
                continue
            engine.hold = True
            d = hub.subscribe("c", client, since=client.position)
            publish(n)
            engine.hold = False
            engine.release()
            d.addCallback(client.subscribed)
            connected = True
        elif op == "wait":
            clock.advance(n)
    if not connected:  # the client always comes back in the end
        hub.subscribe("c", client, since=client.position).addCallback(client.subscribed)
    clock.advance(0)
    engine.stop()
    return watcher, client, published


@settings(max_examples=300, deadline=None)
@given(ops=OPS, coalesce=st.booleans())
def test_resumed_sequence_equals_the_published_one(ops, coalesce):
    watcher, client, published = run_ops(ops, history_size=1000, history_ttl=3600, coalesce=coalesce)
    expected = list(range(1, published + 1))
    assert [p.offset for p in watcher.received] == expected
    # History reaches back far enough: every recovery succeeds, and the
    # client's sessions put together are exactly the publications.
    assert all(a.recovered is not False for a in client.answers)
    assert [p.offset for p in client.received] == expected
    assert [p.data for p in client.received] == [b"%d" % i for i in expected]


@settings(max_examples=300, deadline=None)
@given(ops=OPS, coalesce=st.booleans())
def test_short_history_never_lies(ops, coalesce):
    watcher, client, published = run_ops(ops, history_size=3, history_ttl=2, coalesce=coalesce)
    offsets = [p.offset for p in client.received]
    # Never a duplicate, never out of order.
    assert offsets == sorted(set(offsets))
    # A gap only ever follows an honest `recovered: false`.
    gaps = sum(1 for a, b in zip([0, *offsets], offsets, strict=False) if b != a + 1)
    assert gaps <= sum(1 for a in client.answers if a.recovered is False)


# -- the same through real WebSockets ---------------------------------------


@pytest_twisted.ensureDeferred
async def test_websocket_resubscribe_replays_what_was_missed(daemon):
    first = await daemon.connect("channel=news")
    await first.next_of("welcome")
    subscribed = await first.next_of("subscribed")
    for i in range(3):
        await daemon.publish({"channel": "news", "data": i})
    got = [await first.next_of("message") for _ in range(3)]
    last = got[-1]
    first.close()
    await first.closed
    for i in range(3, 8):
        await daemon.publish({"channel": "news", "data": i})

    again = await daemon.connect()
    await again.next_of("welcome")
    again.send({"type": "subscribe", "channel": "news", "since": {"offset": last["offset"], "epoch": last["epoch"]}})
    answer = await again.next_of("subscribed")
    assert (answer["recovered"], answer["offset"], answer["epoch"]) == (True, 8, subscribed["epoch"])
    replay = [await again.next_of("message") for _ in range(5)]
    assert [m["data"] for m in replay] == [3, 4, 5, 6, 7]
    await daemon.publish({"channel": "news", "data": 8})
    assert (await again.next_of("message"))["offset"] == 9
    assert again.pending() == []


@pytest_twisted.ensureDeferred
async def test_websocket_recovery_fails_honestly(make_daemon):
    daemon = await make_daemon(history_size=2)
    client = await daemon.connect()
    await client.next_of("welcome")
    for i in range(5):
        await daemon.publish({"channel": "c", "data": i})
    status, state, _ = await daemon.publish({"channel": "c", "data": 5})
    cases = [
        {"offset": 1, "epoch": state["epoch"]},  # history no longer reaches back
        {"offset": 3, "epoch": "another-epoch"},  # epoch changed
        {"offset": 99, "epoch": state["epoch"]},  # ahead of the channel
    ]
    for since in cases:
        client.send({"type": "subscribe", "channel": "c", "since": since})
        answer = await client.next_of("subscribed")
        assert (answer["recovered"], answer["offset"]) == (False, 6)
        client.send({"type": "unsubscribe", "channel": "c"})
        await client.next_of("unsubscribed")
    # Up to date: recovered, nothing to replay.
    client.send({"type": "subscribe", "channel": "c", "since": {"offset": 6, "epoch": state["epoch"]}})
    assert (await client.next_of("subscribed"))["recovered"] is True
    client.send({"type": "ping"})
    assert await client.next() == {"type": "pong"}


@pytest_twisted.ensureDeferred
async def test_invalid_since_is_an_error_frame(daemon):
    client = await daemon.connect()
    await client.next_of("welcome")
    for since in ({"offset": -1, "epoch": "e"}, {"offset": 1}, {"offset": "1", "epoch": "e"}, 5):
        client.send({"type": "subscribe", "channel": "c", "since": since})
        error = await client.next_of("error")
        assert (error["code"], error["channel"]) == ("invalid_since", "c")


@pytest_twisted.ensureDeferred
async def test_recovery_under_a_flat_out_publisher(make_daemon):
    """Publishes keep landing while clients drop and resubscribe with `since`."""
    daemon = await make_daemon(history_size=100_000)
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred as D

    stop = False
    published = 0

    async def publisher():
        nonlocal published
        while not stop:
            status, _, _ = await daemon.publish([{"channel": "flood", "data": published + i} for i in range(10)])
            assert status == 200
            published += 10

    running = D.fromCoroutine(publisher())
    seen = []
    position = None
    for _ in range(5):
        client = await daemon.connect()
        await client.next_of("welcome")
        frame = {"type": "subscribe", "channel": "flood"}
        if position:
            frame["since"] = position
        client.send(frame)
        answer = await client.next_of("subscribed")
        assert answer.get("recovered", True) is True
        if position is None:
            seen.extend(range(answer["offset"]))  # what came before the first subscribe
        for _ in range(30):
            message = await client.next_of("message")
            seen.append(message["offset"] - 1)
            position = {"offset": message["offset"], "epoch": message["epoch"]}
        client.close()
        await client.closed
        d = D()
        reactor.callLater(0.01, d.callback, None)
        await d
    stop = True
    await running
    assert seen == list(range(len(seen)))
    await wait_for(lambda: not daemon.hub.connections)
