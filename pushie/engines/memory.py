# -*- test-case-name: tests.test_engine -*-
"""
The in-memory engine: one process, nothing shared.

Each channel in use has an offset, an epoch and a history: the last
C{history_size} publications, each kept for C{history_ttl} seconds.  Memory is
bounded by both.  A channel with no history left, no watching node and no
presence members is forgotten; if it is used again it starts over at offset 0
with a new epoch, so no client can mistake the new offsets for the old ones.
An epoch is random, so a restarted daemon never reuses one.

Idempotency keys are remembered for L{IDEMPOTENCY_WINDOW} seconds, as the
channel state they were first published at (never the data).
"""

from __future__ import annotations

import secrets
from collections import OrderedDict, deque
from collections.abc import Sequence

import attr
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from zope.interface import implementer

from pushie.channels import ChannelState, History, Member, PresenceEvent, Publication, PublishRequest
from pushie.engines import EngineListener, IEngine

IDEMPOTENCY_WINDOW = 300.0
SWEEP_INTERVAL = 1.0


def new_epoch() -> str:
    """A fresh opaque epoch string."""
    return secrets.token_urlsafe(8)


@attr.s(slots=True, auto_attribs=True, eq=False)
class _Channel:
    offset: int
    epoch: str
    # None while the channel keeps nothing: a deque costs 600 bytes even empty,
    # and an idle channel (subscribed, nothing published lately) keeps nothing.
    history: deque[tuple[float, Publication]] | None = None
    watchers: int = 0
    members: dict[str, list] = attr.ib(factory=dict)  # sub -> [connections, Member]


@implementer(IEngine)
@attr.s(auto_attribs=True)
class MemoryEngine:
    """An L{IEngine} for a single process: every answer is immediate."""

    clock: IReactorTime
    history_size: int = 100
    history_ttl: float = 300.0
    name: str = "memory"
    _channels: dict[str, _Channel] = attr.ib(factory=dict, init=False)
    _idempotency: OrderedDict[tuple[str, str], tuple[float, ChannelState]] = attr.ib(factory=OrderedDict, init=False)
    # (expires at, channel, offset) in publish order: the sweep pops from the left.
    _expiries: deque[tuple[float, str, int]] = attr.ib(factory=deque, init=False)
    _listener: EngineListener | None = attr.ib(default=None, init=False)
    _sweeper: LoopingCall | None = attr.ib(default=None, init=False)

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
        if channel is not None and not channel.history and not channel.watchers and not channel.members:
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
        expiries = self._expiries
        while expiries and expiries[0][0] <= now:
            _, name, offset = expiries.popleft()
            channel = self._channels.get(name)
            if channel is None:
                continue
            history = channel.history
            while history and history[0][1].offset <= offset:
                history.popleft()
            if not history:
                channel.history = None
            self._forget_if_idle(name)

    # -- publishing ------------------------------------------------------

    def append(self, requests: Sequence[PublishRequest]) -> Deferred[list[Publication]]:
        now = self.clock.seconds()
        self.sweep()
        publications = []
        fresh = []
        for request in requests:
            key = None
            if request.idempotency_key is not None:
                key = (request.channel, request.idempotency_key)
                seen = self._idempotency.get(key)
                if seen is not None:
                    first = seen[1]
                    publications.append(Publication.of(request, first.offset, first.epoch))
                    continue
            channel = self._channel(request.channel)
            channel.offset += 1
            publication = Publication.of(request, channel.offset, channel.epoch)
            if self.history_size > 0:
                history = channel.history
                if history is None:
                    history = channel.history = deque()
                history.append((now, publication))
                if len(history) > self.history_size:
                    history.popleft()
                self._expiries.append((now + self.history_ttl, request.channel, channel.offset))
            if key is not None:
                self._idempotency[key] = (now + IDEMPOTENCY_WINDOW, ChannelState(channel.offset, channel.epoch))
            publications.append(publication)
            fresh.append(publication)
        listener = self._listener
        for publication in fresh:
            if listener is not None:
                listener.dispatch(publication)
            self._forget_if_idle(publication.channel)
        return succeed(publications)

    def state(self, channel: str) -> Deferred[ChannelState]:
        return succeed(self.state_now(channel))

    def state_now(self, name: str) -> ChannelState:
        """The channel's state, synchronously.  An unknown channel is at 0 in a new epoch."""
        channel = self._channels.get(name)
        if channel is None:
            return ChannelState(0, new_epoch())
        return ChannelState(channel.offset, channel.epoch)

    def history(self, name: str, since: int, limit: int | None) -> Deferred[History]:
        self.sweep()
        channel = self._channels.get(name)
        if channel is None:
            return succeed(History(ChannelState(0, new_epoch()), [], since == 0))
        kept = [p for _, p in channel.history or () if p.offset > since]
        first_kept = kept[0].offset if kept else channel.offset + 1
        complete = first_kept <= since + 1
        if limit is not None:
            kept = kept[:limit]
        return succeed(History(ChannelState(channel.offset, channel.epoch), kept, complete))

    # -- interest --------------------------------------------------------

    def watch(self, name: str) -> Deferred[None]:
        self._channel(name).watchers += 1
        return succeed(None)

    def occupied(self, prefix: str) -> Deferred[list[str]]:
        return succeed([name for name, c in self._channels.items() if c.watchers and name.startswith(prefix)])

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
