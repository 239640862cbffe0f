# -*- test-case-name: tests.test_engine -*-
"""
The in-memory engine: one process, nothing shared.

Each channel in use has an offset, an epoch and a history: the last
C{history_size} publications, each kept for C{history_ttl} seconds.  A channel
with no history left, no watching node and no presence members is forgotten;
if it is used again it starts over at offset 0 with a new epoch, so no client
can mistake the new offsets for the old ones.  An epoch is random, so a
restarted daemon never reuses one.

B{Memory budget.}  The two history limits bound one channel, not the daemon:
publishing to many channels (or fast to a few, for C{history_ttl}) would grow
memory without end.  So all the history together is accounted in bytes (see
L{entry_cost} and L{CHANNEL_COST}) against C{memory_budget}; past it, the
globally oldest publications are evicted first, whatever their channel.  An
eviction is counted (C{evicted}, the C{pushie_history_evicted_total} metric)
and logged at most once a minute.  A client that asks to recover from an
evicted range finds the history no longer reaching back (C{complete} false),
so it gets C{recovered: false}, exactly as after an expiry.

Idempotency keys are remembered for L{IDEMPOTENCY_WINDOW} seconds, as the
channel state they were first published at (never the data), and at most
C{idempotency_max_keys} of them: past it the oldest is forgotten first (a
repeat of a forgotten key publishes again).
"""

from __future__ import annotations

import secrets
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence

import attr
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from pushie.engines import EngineListener, IEngine, TransitionSink
from pushie.logs import Throttle
from pushie.records import (
    NO_META,
    ChannelState,
    History,
    Member,
    PresenceEvent,
    Publication,
    PublishRequest,
    history_after,
)
from pushie.wire import PLAIN_ENVELOPE, json_string

IDEMPOTENCY_WINDOW = 300.0
SWEEP_INTERVAL = 1.0

ENTRY_COST = 600
"""
Bytes accounted for one kept publication beside its data, envelope and frame:
the Publication object, its place in the channel's history and in the global
age order.  Calibrated with C{bench/memory_budget.py} on CPython 3.11
(tracemalloc), on the high side.  History now keeps a tuple and the envelope
(no Publication object, no frame), so the accounting is higher still than
what is kept; it was left as it was so that C{memory_budget} evicts at the
same points as before.
"""

CHANNEL_COST = 1000
"""Bytes accounted for a channel while it keeps history: its record, its name, its epoch, the history deque."""

log = Logger(namespace="pushie.engines.memory")


def entry_cost(publication: Publication) -> int:
    """
    The bytes one kept publication is accounted for: its data, its envelope
    and the WebSocket frame around it (estimated here from their parts,
    without building them) and L{ENTRY_COST}.
    """
    data = len(publication.data)
    envelope = data + len(publication.channel) + len(publication.event) + len(publication.epoch) + 80
    if publication.user_id is not None:
        envelope += len(publication.user_id) + 12
    return ENTRY_COST + data + 2 * envelope


def new_epoch() -> str:
    """A fresh opaque epoch string."""
    return secrets.token_urlsafe(8)


_Kept = tuple[int, bytes, str, "str | None", bytes, "Mapping[str, str] | None"]
"""
A kept publication: offset, data, event, user_id, envelope, meta (None for
none).  Plain values in a tuple rather than the L{Publication}: such a tuple
is no object the garbage collector follows (it untracks it at its first
look), so a full history adds nothing to the full collections that pause
the daemon; the publications of a read are built again around the same
envelope bytes.
"""


@attr.s(slots=True, auto_attribs=True, eq=False)
class _Channel:
    offset: int
    epoch: str
    # None while the channel keeps nothing: a deque costs 600 bytes even empty,
    # and an idle channel (subscribed, nothing published lately) keeps nothing.
    history: deque[_Kept] | None = None  # oldest first (their times are in MemoryEngine._kept)
    watchers: int = 0
    members: dict[str, list] = attr.ib(factory=dict)  # sub -> [connections, Member]
    subscriptions: int = 0  # the Hub's (one process: they are all there is)
    epoch_json: bytes | None = None  # json_string(epoch), once the usual path needed it


@implementer(IEngine)
@attr.s(auto_attribs=True)
class MemoryEngine:
    """An L{IEngine} for a single process: every answer is immediate."""

    clock: IReactorTime
    history_size: int = 100
    history_ttl: float = 300.0
    name: str = "memory"
    memory_budget: int = 512 << 20
    """Bytes all the history together may be accounted for (0: no limit)."""
    idempotency_max_keys: int = 100_000
    """Idempotency keys remembered at most (0: no limit)."""
    _channels: dict[str, _Channel] = attr.ib(factory=dict, init=False)
    _idempotency: OrderedDict[tuple[str, str], tuple[float, ChannelState]] = attr.ib(factory=OrderedDict, init=False)
    # Every kept publication, (channel, offset) -> (expires at, accounted bytes), in publish order: that is
    # both the expiry order (one TTL for all) and the age order the budget evicts in; both pop from the left.
    # A publication pushed out of its channel by history_size leaves it at once, so this never holds more
    # than what the histories hold.
    _kept: OrderedDict[tuple[str, int], tuple[float, int]] = attr.ib(factory=OrderedDict, init=False)
    used: int = attr.ib(default=0, init=False)
    """Bytes the kept history is accounted for now (never above C{memory_budget} once L{append} returns)."""
    evicted: int = attr.ib(default=0, init=False)
    """Publications evicted from history to stay within C{memory_budget}."""
    idempotency_evicted: int = attr.ib(default=0, init=False)
    """Idempotency keys forgotten before their window ended, to stay within C{idempotency_max_keys}."""
    _listener: EngineListener | None = attr.ib(default=None, init=False)
    _sweeper: LoopingCall | None = attr.ib(default=None, init=False)
    _throttle: Throttle | None = attr.ib(default=None, init=False)

    # -- service ---------------------------------------------------------

    def start(self, listener: EngineListener) -> Deferred[None]:
        self._listener = listener
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = self.clock
        self._sweeper.start(SWEEP_INTERVAL, now=False)
        return succeed(None)

    def stop(self) -> Deferred[None]:
        self._listener = None
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        self._sweeper = None
        return succeed(None)

    def healthy(self) -> bool:
        return True

    # -- channels --------------------------------------------------------

    def _channel(self, name: str) -> _Channel:
        channel = self._channels.get(name)
        if channel is None:
            channel = self._channels[name] = _Channel(0, new_epoch())
        return channel

    def _forget_if_idle(self, name: str) -> None:
        channel = self._channels.get(name)
        if (
            channel is not None
            and not channel.history
            and not channel.watchers
            and not channel.members
            and not channel.subscriptions
        ):
            del self._channels[name]

    def channel_count(self) -> int:
        """How many channels the engine holds state for (for tests and metrics)."""
        return len(self._channels)

    def sweep(self) -> None:
        """Drop expired history, idempotency keys and idle channels."""
        now = self.clock.seconds()
        keys = self._idempotency
        while keys and next(iter(keys.values()))[0] <= now:
            keys.popitem(last=False)
        kept = self._kept
        while kept and next(iter(kept.values()))[0] <= now:
            self._drop_oldest()

    def _drop_oldest(self) -> str:
        """Drop the globally oldest kept publication; return its channel's name."""
        (name, offset), (_, cost) = self._kept.popitem(last=False)
        self.used -= cost
        channel = self._channels.get(name)
        if channel is not None and channel.history:
            history = channel.history
            while history and history[0][0] <= offset:
                history.popleft()
            if not history:
                channel.history = None
                self.used -= CHANNEL_COST
                self._forget_if_idle(name)
        return name

    def _keep(self, channel: _Channel, now: float, publication: Publication) -> None:
        """Put C{publication} in its channel's history and account for it (L{entry_cost})."""
        history = channel.history
        if history is None:
            history = channel.history = deque()
            self.used += CHANNEL_COST
        meta = publication.meta
        history.append(
            (
                publication.offset,
                publication.data,
                publication.event,
                publication.user_id,
                publication.envelope,
                None if meta is NO_META else meta,
            )
        )
        # entry_cost(publication), inlined: this runs once per publication.
        data = len(publication.data)
        cost = (
            ENTRY_COST
            + 3 * data
            + 2 * (len(publication.channel) + len(publication.event) + len(publication.epoch) + 80)
            + (0 if publication.user_id is None else 2 * (len(publication.user_id) + 12))
        )
        kept = self._kept
        kept[(publication.channel, publication.offset)] = (now + self.history_ttl, cost)
        self.used += cost
        if len(history) > self.history_size:
            old = history.popleft()
            gone = kept.pop((publication.channel, old[0]), None)
            if gone is not None:
                self.used -= gone[1]

    def _within_budget(self) -> None:
        """Evict the oldest history, across all channels, until the accounted bytes fit the budget."""
        budget = self.memory_budget
        if budget <= 0 or self.used <= budget:
            return
        count = 0
        channels: set[str] = set()
        while self._kept and self.used > budget:
            if len(channels) < 3:
                channels.add(self._drop_oldest())
            else:
                self._drop_oldest()
            count += 1
        self.evicted += count
        if self._throttle is None:
            self._throttle = Throttle(log, self.clock, interval=60.0)
        self._throttle.warn(
            "history_evicted",
            "History reached memory_budget ({budget} bytes): evicted the {count} oldest publications "
            "(of {channels}...); clients recovering from them get recovered: false",
            budget=budget,
            count=count,
            channels=", ".join(sorted(channels)),
        )

    def _remember_key(self, key: tuple[str, str], now: float, state: ChannelState) -> None:
        keys = self._idempotency
        keys[key] = (now + IDEMPOTENCY_WINDOW, state)
        limit = self.idempotency_max_keys
        while limit > 0 and len(keys) > limit:
            keys.popitem(last=False)
            self.idempotency_evicted += 1

    # -- publishing ------------------------------------------------------

    def append(self, requests: Sequence[PublishRequest]) -> Deferred[list[Publication]]:
        return succeed(self.append_now(requests))

    def append_now(self, requests: Sequence[PublishRequest]) -> list[Publication]:
        """
        L{append}, answered at once: the publications themselves rather than
        a Deferred already fired with them (the Hub's L{Hub.publish_now}).
        """
        now = self.clock.seconds()
        self.sweep()
        publications = []
        fresh = []
        channels = self._channels
        keep = self._keep if self.history_size > 0 else None
        of = Publication.of
        for request in requests:
            key = None
            if request.idempotency_key is not None:
                key = (request.channel, request.idempotency_key)
                seen = self._idempotency.get(key)
                if seen is not None:
                    first = seen[1]
                    publications.append(of(request, first.offset, first.epoch))
                    continue
            channel = channels.get(request.channel)
            if channel is None:
                channel = channels[request.channel] = _Channel(0, new_epoch())
            channel.offset += 1
            publication = of(request, channel.offset, channel.epoch)
            if keep is not None:
                keep(channel, now, publication)
            if key is not None:
                self._remember_key(key, now, ChannelState(channel.offset, channel.epoch))
            publications.append(publication)
            fresh.append(publication)
        self._appended(fresh, keep is not None)
        return publications

    def _appended(self, fresh: Sequence[Publication], kept: bool) -> None:
        """
        After a batch of new publications (L{append_now}, L{append_plain}):
        hold the memory budget (after the whole batch: a batch bigger than
        the budget keeps its newest part), dispatch them, and forget the
        channels nobody watches when nothing was kept.
        """
        if self.memory_budget > 0 and self.used > self.memory_budget:
            self._within_budget()
        listener = self._listener
        if listener is not None:
            dispatch = listener.dispatch
            for publication in fresh:
                dispatch(publication)
        if not kept:
            # Nothing kept: a channel nobody watches is forgotten at once.  (With
            # history, a publication was just kept in each of these channels.)
            for publication in fresh:
                self._forget_if_idle(publication.channel)

    def append_plain(self, items: Sequence[tuple[str, bytes]]) -> list[Publication]:
        """
        L{append_now} for publications of the usual shape, given as
        C{(channel, data)}: a valid channel name, compact JSON data, event
        C{message}, no idempotency key, no C{user_id}, no metadata.  The
        same publications (their envelopes built), offsets, history,
        accounting, budget and dispatch, in one pass with no
        L{PublishRequest} per message (C{tests/test_fast_publish.py}
        compares the two).
        """
        now = self.clock.seconds()
        self.sweep()
        publications = []
        channels = self._channels
        history_size = self.history_size
        kept = self._kept
        expires = now + self.history_ttl
        used = self.used
        new_publication = Publication
        for name, data in items:
            channel = channels.get(name)
            if channel is None:
                channel = channels[name] = _Channel(0, new_epoch())
            offset = channel.offset = channel.offset + 1
            epoch = channel.epoch
            epoch_json = channel.epoch_json
            if epoch_json is None:
                epoch_json = channel.epoch_json = json_string(epoch)
            envelope = PLAIN_ENVELOPE % (name.encode("ascii"), offset, epoch_json, data)
            publication = new_publication(name, offset, epoch, data)
            publication._envelope = envelope
            publications.append(publication)
            if history_size > 0:
                # _keep, inlined for this shape (event "message": 7 characters).
                history = channel.history
                if history is None:
                    history = channel.history = deque()
                    used += CHANNEL_COST
                history.append((offset, data, "message", None, envelope, None))
                cost = ENTRY_COST + 3 * len(data) + 2 * (len(name) + len(epoch) + 87)
                kept[(name, offset)] = (expires, cost)
                used += cost
                if len(history) > history_size:
                    gone = kept.pop((name, history.popleft()[0]), None)
                    if gone is not None:
                        used -= gone[1]
        self.used = used
        self._appended(publications, history_size > 0)
        return publications

    def state(self, channel: str) -> Deferred[ChannelState]:
        return succeed(self.state_now(channel))

    def state_now(self, name: str) -> ChannelState:
        """The channel's state, synchronously.  An unknown channel is at 0 in a new epoch."""
        channel = self._channels.get(name)
        if channel is None:
            return ChannelState(0, new_epoch())
        return ChannelState(channel.offset, channel.epoch)

    def history(self, name: str, since: int, limit: int | None) -> Deferred[History]:
        return succeed(self.history_now(name, since, limit))

    def history_now(self, name: str, since: int, limit: int | None) -> History:
        """L{history}, synchronously (the Hub's subscribe answers at once with it)."""
        self.sweep()
        channel = self._channels.get(name)
        if channel is None:
            return History(ChannelState(0, new_epoch()), [], since == 0)
        epoch = channel.epoch
        kept = [
            Publication.kept(name, offset, epoch, data, event, user_id, envelope, meta or NO_META)
            for offset, data, event, user_id, envelope, meta in channel.history or ()
            if offset > since
        ]
        return history_after(ChannelState(channel.offset, epoch), kept, since, limit)

    # -- interest --------------------------------------------------------

    def watch(self, name: str) -> Deferred[None]:
        self._channel(name).watchers += 1
        return succeed(None)

    def occupied(self, prefix: str) -> Deferred[list[str]]:
        return succeed([name for name, c in self._channels.items() if c.watchers and name.startswith(prefix)])

    # -- counts and transitions -------------------------------------------

    def local_count(self, channel: str, count: int) -> None:
        # Kept on the channel's record (a watched channel has one), not in a table of its own.
        entry = self._channels.get(channel)
        if entry is None:
            if count <= 0:
                return
            entry = self._channel(channel)
        entry.subscriptions = max(0, count)
        if count <= 0:
            self._forget_if_idle(channel)

    def counts(self, channels: Sequence[str]) -> Deferred[dict[str, int]]:
        found = {}
        for name in channels:
            entry = self._channels.get(name)
            found[name] = entry.subscriptions if entry is not None else 0
        return succeed(found)

    def channel_counts(self, prefix: str) -> Deferred[dict[str, int]]:
        return succeed(
            {name: c.subscriptions for name, c in self._channels.items() if c.subscriptions and name.startswith(prefix)}
        )

    def send_transitions(self, sink: TransitionSink | None, debounce: float, backlog: int) -> bool:
        # One process: the Hub's local transitions are the cluster's (it tells its webhooks itself).
        return False

    def unwatch(self, name: str) -> None:
        channel = self._channels.get(name)
        if channel is not None:
            channel.watchers = max(0, channel.watchers - 1)
            self._forget_if_idle(name)

    # -- presence --------------------------------------------------------

    def presence_add(self, name: str, member: Member, origin: str) -> Deferred[None]:
        channel = self._channel(name)
        entry = channel.members.get(member.id)
        if entry is None:
            channel.members[member.id] = [1, member]
            self._tell(PresenceEvent(name, "join", member, origin))
        else:
            entry[0] += 1
            entry[1] = member  # the newest connection's info wins
        return succeed(None)

    def presence_remove(self, name: str, member: Member, origin: str) -> Deferred[None]:
        channel = self._channels.get(name)
        entry = channel.members.get(member.id) if channel else None
        if channel is not None and entry is not None:
            entry[0] -= 1
            if entry[0] <= 0:
                del channel.members[member.id]
                self._tell(PresenceEvent(name, "leave", entry[1], origin))
                self._forget_if_idle(name)
        return succeed(None)

    def presence(self, name: str) -> Deferred[list[Member]]:
        channel = self._channels.get(name)
        members = [entry[1] for entry in channel.members.values()] if channel else []
        return succeed(members)

    def _tell(self, event: PresenceEvent) -> None:
        if self._listener is not None:
            self._listener.presence_changed(event)
