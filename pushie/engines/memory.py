# -*- test-case-name: tests.test_units -*-
"""
The in-memory engine: one process, nothing shared.

Offsets and epochs live in a dict.  An epoch is random per channel state, so a
restarted daemon never hands out an epoch that a client could mistake for the
old one.  Idempotency keys are remembered for L{IDEMPOTENCY_WINDOW} seconds,
as the channel state they were first published at (never the data).
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Callable, Sequence

import attr
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from pushie.channels import ChannelState, Publication, PublishRequest
from pushie.engines import IEngine

IDEMPOTENCY_WINDOW = 300.0


def new_epoch() -> str:
    """A fresh opaque epoch string."""
    return secrets.token_urlsafe(8)


@attr.s(slots=True, auto_attribs=True)
class _Channel:
    offset: int
    epoch: str


@implementer(IEngine)
@attr.s(auto_attribs=True)
class MemoryEngine:
    """An L{IEngine} for a single process: append and delivery are synchronous."""

    clock: IReactorTime
    name: str = "memory"
    _idempotency: OrderedDict[tuple[str, str], tuple[float, ChannelState]] = attr.ib(factory=OrderedDict, init=False)
    _channels: dict[str, _Channel] = attr.ib(factory=dict, init=False)
    _deliver: Callable[[Publication], None] | None = attr.ib(default=None, init=False)

    def start(self, deliver: Callable[[Publication], None]) -> Deferred[None]:
        self._deliver = deliver
        return succeed(None)

    def stop(self) -> Deferred[None]:
        self._deliver = None
        return succeed(None)

    def _channel(self, name: str) -> _Channel:
        channel = self._channels.get(name)
        if channel is None:
            channel = self._channels[name] = _Channel(0, new_epoch())
        return channel

    def _forget_old_keys(self, now: float) -> None:
        keys = self._idempotency
        while keys:
            first = next(iter(keys.values()))
            if first[0] > now:
                break
            keys.popitem(last=False)

    def append(self, requests: Sequence[PublishRequest]) -> Deferred[list[Publication]]:
        now = self.clock.seconds()
        self._forget_old_keys(now)
        publications = []
        fresh = []
        for request in requests:
            key = None
            if request.idempotency_key is not None:
                key = (request.channel, request.idempotency_key)
                seen = self._idempotency.get(key)
                if seen is not None:
                    first = seen[1]
                    publications.append(
                        Publication(request.channel, first.offset, first.epoch, request.data, request.event)
                    )
                    continue
            channel = self._channel(request.channel)
            channel.offset += 1
            publication = Publication(
                channel=request.channel,
                offset=channel.offset,
                epoch=channel.epoch,
                data=request.data,
                event=request.event,
            )
            if key is not None:
                self._idempotency[key] = (now + IDEMPOTENCY_WINDOW, ChannelState(channel.offset, channel.epoch))
            publications.append(publication)
            fresh.append(publication)
        deliver = self._deliver
        if deliver is not None:
            for publication in fresh:
                deliver(publication)
        return succeed(publications)

    def state(self, channel: str) -> Deferred[ChannelState]:
        return succeed(self.state_now(channel))

    def state_now(self, channel: str) -> ChannelState:
        """The channel's state, synchronously (this engine never waits)."""
        known = self._channel(channel)
        return ChannelState(known.offset, known.epoch)

    def watch(self, channel: str) -> None:
        """Every publication is local: nothing to do."""

    def unwatch(self, channel: str) -> None:
        """Every publication is local: nothing to do."""

    def healthy(self) -> bool:
        return True
