"""The memory engine with a controllable clock: offsets, history bounds, TTL, idle channels, presence."""

from __future__ import annotations

from twisted.internet.task import Clock

from pushie.engines.memory import CHANNEL_COST, IDEMPOTENCY_WINDOW, MemoryEngine, entry_cost
from pushie.records import Member, Publication, PublishRequest


class Recorder:
    """An engine listener that records what it hears."""

    def __init__(self) -> None:
        self.publications = []
        self.presence = []

    def dispatch(self, publication) -> None:
        self.publications.append(publication)

    def presence_changed(self, event) -> None:
        self.presence.append(event)


def started(**kwargs):
    clock = Clock()
    engine = MemoryEngine(clock=clock, **kwargs)
    listener = Recorder()
    engine.start(listener)
    return engine, clock, listener


def publish(engine, channel, count, key=None):
    return engine.append([PublishRequest(channel, b"%d" % i, idempotency_key=key) for i in range(count)]).result


def test_offsets_epochs_and_idempotency_window():
    engine, clock, listener = started()
    first = engine.append([PublishRequest("c", b"1", idempotency_key="k")]).result[0]
    assert (first.offset, engine.state_now("c").offset) == (1, 1)
    repeat = engine.append([PublishRequest("c", b"1", idempotency_key="k")]).result[0]
    assert (repeat.offset, repeat.epoch) == (first.offset, first.epoch)
    assert engine.append([PublishRequest("d", b"1", idempotency_key="k")]).result[0].offset == 1
    assert [p.offset for p in listener.publications] == [1, 1]
    clock.advance(IDEMPOTENCY_WINDOW + 1)
    assert engine.append([PublishRequest("c", b"1", idempotency_key="k")]).result[0].offset == 1
    assert list(engine._idempotency) == [("c", "k")]  # expired keys are forgotten
    engine.stop()


def test_history_is_bounded_by_size():
    engine, clock, _ = started(history_size=100)
    publish(engine, "c", 150)
    everything = engine.history("c", 0, None).result
    assert [p.offset for p in everything.publications] == list(range(51, 151))
    assert not everything.complete  # 1..50 are gone
    recent = engine.history("c", 50, None).result
    assert recent.complete and len(recent.publications) == 100
    limited = engine.history("c", 60, 5).result
    assert [p.offset for p in limited.publications] == [61, 62, 63, 64, 65] and limited.complete
    up_to_date = engine.history("c", 150, None).result
    assert up_to_date.complete and up_to_date.publications == [] and up_to_date.state.offset == 150
    engine.stop()


def test_history_expires_with_the_ttl():
    engine, clock, _ = started(history_size=100, history_ttl=10)
    engine.watch("c")
    publish(engine, "c", 3)
    clock.advance(5)
    publish(engine, "c", 2)
    clock.advance(6)  # the first three are 11 s old
    history = engine.history("c", 0, None).result
    assert [p.offset for p in history.publications] == [4, 5] and not history.complete
    assert engine.history("c", 3, None).result.complete
    clock.advance(10)
    history = engine.history("c", 3, None).result
    assert history.publications == [] and not history.complete and history.state.offset == 5
    engine.stop()


def test_idle_channels_leave_nothing_behind():
    engine, clock, _ = started(history_size=10, history_ttl=10)
    for i in range(1000):
        publish(engine, f"c{i}", 2, key=f"k{i}")
    engine.watch("kept")
    engine.unwatch("kept")
    assert engine.channel_count() == 1000
    old_epoch = engine.state_now("c1").epoch
    clock.advance(IDEMPOTENCY_WINDOW + 1)
    assert engine.channel_count() == 0
    assert not engine._kept and not engine._idempotency and engine.used == 0
    # Used again, a forgotten channel starts over in a new epoch.
    again = publish(engine, "c1", 1)[0]
    assert (again.offset, again.epoch != old_epoch) == (1, True)
    engine.stop()


def test_watched_channel_keeps_its_offset_after_history_expires():
    engine, clock, _ = started(history_ttl=1)
    engine.watch("c")
    publish(engine, "c", 4)
    epoch = engine.state_now("c").epoch
    clock.advance(2)
    assert engine.state_now("c").offset == 4 and engine.state_now("c").epoch == epoch
    assert publish(engine, "c", 1)[0].offset == 5
    engine.stop()


def test_zero_history_keeps_nothing():
    engine, clock, _ = started(history_size=0)
    publish(engine, "c", 3)
    assert engine.channel_count() == 0
    engine.stop()


def test_presence_counts_connections_per_member():
    engine, clock, listener = started()
    ann, bob = Member("ann", {"n": 1}), Member("bob")
    engine.presence_add("presence-r", ann, "tab1")
    engine.presence_add("presence-r", ann, "tab2")
    engine.presence_add("presence-r", bob, "tab3")
    assert [(e.kind, e.member.id, e.origin) for e in listener.presence] == [
        ("join", "ann", "tab1"),
        ("join", "bob", "tab3"),
    ]
    assert sorted(m.id for m in engine.presence("presence-r").result) == ["ann", "bob"]
    engine.presence_remove("presence-r", ann, "tab1")
    assert len(listener.presence) == 2  # ann still has a tab
    engine.presence_remove("presence-r", ann, "tab2")
    engine.presence_remove("presence-r", bob, "tab3")
    assert [(e.kind, e.member.id) for e in listener.presence[2:]] == [("leave", "ann"), ("leave", "bob")]
    assert engine.presence("presence-r").result == [] and engine.channel_count() == 0
    engine.stop()


# -- the memory budget and the idempotency bound ----------------------------------


def _warnings(namespace):
    """Warnings logged under C{namespace} while the returned list is watched (remove with .stop())."""
    from twisted.logger import LogLevel, globalLogPublisher

    events = []

    def observe(event):
        if event.get("log_namespace") == namespace and event["log_level"] == LogLevel.warn:
            events.append(event)

    globalLogPublisher.addObserver(observe)
    return events, lambda: globalLogPublisher.removeObserver(observe)


def test_the_budget_evicts_the_globally_oldest_history_and_says_so():
    from twisted.logger import formatEvent

    one = entry_cost(Publication("c000", 1, "x" * 11, b"0")) + CHANNEL_COST
    budget = 20 * one
    engine, clock, _ = started(history_size=100, history_ttl=300, memory_budget=budget)
    logged, stop = _warnings("pushie.engines.memory")
    try:
        engine.watch("kept-open")  # a subscribed channel: it keeps its offset and epoch
        publish(engine, "kept-open", 3)
        for i in range(200):
            clock.advance(0.01)
            publish(engine, f"c{i:03d}", 1)
            assert engine.used <= budget
    finally:
        stop()
    # The newest publications, across channels, are what is left; the oldest went first.
    kept_channels = sorted(name for name, _ in engine._kept)
    assert kept_channels == [f"c{i:03d}" for i in range(200 - len(kept_channels), 200)]
    assert 15 <= len(kept_channels) <= 20
    assert engine.evicted == 3 + 200 - len(kept_channels)
    # Evicted channels that nobody watches are forgotten entirely; the watched one keeps its place.
    assert engine.channel_count() == len(kept_channels) + 1
    state = engine.state_now("kept-open")
    assert state.offset == 3
    history = engine.history("kept-open", 1, None).result
    assert history.publications == [] and not history.complete  # so a client recovering from 1 gets recovered: false
    assert engine.history("kept-open", 3, None).result.complete  # nothing was missed by one that is up to date
    assert logged and "memory_budget" in formatEvent(logged[0]) and "recovered: false" in formatEvent(logged[0])
    assert len(logged) == 1  # throttled: once a minute at most
    engine.stop()


def test_a_batch_bigger_than_the_budget_keeps_its_newest_part():
    engine, clock, _ = started(history_size=1000, memory_budget=10_000)
    publications = engine.append([PublishRequest("c", b"x" * 100) for _ in range(500)]).result
    assert [p.offset for p in publications] == list(range(1, 501))  # all published, in order
    kept = engine.history("c", 0, None).result.publications
    assert engine.used <= 10_000 and kept and kept[-1].offset == 500
    assert [p.offset for p in kept] == list(range(501 - len(kept), 501))
    engine.stop()


def test_history_size_keeps_the_age_order_bounded_too():
    engine, clock, _ = started(history_size=10, memory_budget=0)
    publish(engine, "c", 1000)
    assert len(engine._kept) == 10  # not one expiry entry per publication for history_ttl
    assert engine.used == 10 * entry_cost(engine.history("c", 0, None).result.publications[0]) + CHANNEL_COST
    clock.advance(1000)
    engine.sweep()
    assert engine.used == 0 and engine.channel_count() == 0
    engine.stop()


def test_the_idempotency_store_is_bounded_oldest_first():
    engine, clock, _ = started(idempotency_max_keys=10)
    for i in range(100):
        engine.append([PublishRequest("c", b"1", idempotency_key=f"k{i}")])
    assert len(engine._idempotency) == 10 and engine.idempotency_evicted == 90
    # The newest keys are remembered: a repeat answers the first offset.
    assert engine.append([PublishRequest("c", b"1", idempotency_key="k99")]).result[0].offset == 100
    # The oldest were forgotten: a repeat publishes again.
    assert engine.append([PublishRequest("c", b"1", idempotency_key="k0")]).result[0].offset == 101
    assert len(engine._idempotency) == 10
    engine.stop()


def test_a_publish_to_a_channel_nobody_follows_leaves_only_its_history():
    engine, clock, _ = started(history_size=5, history_ttl=10)
    publish(engine, "nobody", 3)
    assert engine.channel_count() == 1 and len(engine._kept) == 3
    clock.advance(11)
    engine.sweep()
    assert engine.channel_count() == 0 and not engine._kept and engine.used == 0


def test_idempotency_keys_are_per_channel_whatever_the_text():
    """(channel, key) is a pair, never joined into one string (issue 12 A6)."""
    engine, clock, listener = started()
    first = engine.append([PublishRequest("orders", b"1", idempotency_key="eu:17")]).result[0]
    other = engine.append([PublishRequest("orders:eu", b"2", idempotency_key="17")]).result[0]
    assert (first.channel, first.offset, other.channel, other.offset) == ("orders", 1, "orders:eu", 1)
    assert [p.channel for p in listener.publications] == ["orders", "orders:eu"]
    engine.stop()
