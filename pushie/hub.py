# -*- test-case-name: tests.test_websocket -*-
"""
The Hub: the registry of channels and local subscribers, shared by every
front door.

Front doors call L{Hub.publish}, L{Hub.subscribe} and L{Hub.unsubscribe}; the
engine calls L{Hub.dispatch} for every publication of a watched channel.  Per
channel, the Hub hands publications to subscribers in offset order and never
twice: it remembers the last offset it dispatched.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import attr
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from pushie.channels import ChannelState, Publication, PublishRequest
from pushie.engines import IEngine


class Subscriber(Protocol):
    """What the Hub needs of a subscriber (a WebSocket connection, an SSE stream)."""

    def deliver(self, publication: Publication) -> None:
        """Send one publication; must not raise and must not block."""


class Connection(Protocol):
    """What the Hub needs of a client connection to end it on shutdown."""

    def close_for_shutdown(self) -> None:
        """Start a clean close (WebSocket 1001, end of an SSE stream)."""

    def abort(self) -> None:
        """Drop the connection now."""


@attr.s(slots=True, auto_attribs=True, eq=False)
class _LocalChannel:
    subscribers: dict[Subscriber, None] = attr.ib(factory=dict)
    snapshot: tuple[Subscriber, ...] | None = None
    last_offset: int = 0
    epoch: str | None = None


class Hub(Service):
    """
    Channels, their local subscribers, and the path of each publication.

    @ivar engine: the L{IEngine} that assigns offsets and fans out to nodes.
    @ivar connections: every open client connection, for shutdown.
    """

    log = Logger()
    name = "hub"

    def __init__(self, engine: IEngine, reactor: IReactorTime, shutdown_timeout: float = 5.0) -> None:
        self.engine = engine
        self.reactor = reactor
        self.shutdown_timeout = shutdown_timeout
        self.connections: dict[Connection, None] = {}
        self._channels: dict[str, _LocalChannel] = {}
        self._closing: list[Deferred[None]] = []
        self.draining = False

    # -- service ---------------------------------------------------------

    def startService(self) -> Deferred[None]:  # type: ignore[override]
        super().startService()
        return self.engine.start(self.dispatch)

    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        """
        Drain: ask every connection to close cleanly, wait up to
        C{shutdown_timeout} seconds for them, abort the rest, stop the engine.
        """
        super().stopService()
        self.draining = True
        d = self._drain()
        d.addCallback(lambda _: self.engine.stop())
        return d

    def _drain(self) -> Deferred[None]:
        if not self.connections:
            return succeed(None)
        self.log.info(
            "Closing {count} client connections (timeout {timeout}s)",
            count=len(self.connections),
            timeout=self.shutdown_timeout,
        )
        done: Deferred[None] = Deferred()
        self._closing.append(done)
        for connection in list(self.connections):
            connection.close_for_shutdown()

        def give_up() -> None:
            left = list(self.connections)
            if left:
                self.log.warn("Aborting {count} connections that did not close in time", count=len(left))
            for connection in left:
                connection.abort()
            if not done.called:
                done.callback(None)

        timer = self.reactor.callLater(self.shutdown_timeout, give_up)

        def cancel_timer(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        done.addBoth(cancel_timer)
        return done

    # -- connections -----------------------------------------------------

    def connection_opened(self, connection: Connection) -> None:
        self.connections[connection] = None

    def connection_closed(self, connection: Connection) -> None:
        self.connections.pop(connection, None)
        if not self.connections:
            closing, self._closing = self._closing, []
            for d in closing:
                if not d.called:
                    d.callback(None)

    # -- publishing ------------------------------------------------------

    def publish(self, requests: Sequence[PublishRequest]) -> Deferred[list[Publication]]:
        """
        Publish validated requests, in order, all or none.

        @return: a Deferred firing with one L{Publication} per request once the
            engine has stored them and sent them to every node.
        """
        return self.engine.append(requests)

    def dispatch(self, publication: Publication) -> None:
        """
        Hand one publication to every local subscriber of its channel.

        Called by the engine, in offset order per channel.  A publication at
        or below the last dispatched offset of the same epoch is a duplicate
        and is dropped.
        """
        channel = self._channels.get(publication.channel)
        if channel is None:
            return
        if channel.epoch == publication.epoch and publication.offset <= channel.last_offset:
            return
        channel.epoch = publication.epoch
        channel.last_offset = publication.offset
        subscribers = channel.snapshot
        if subscribers is None:
            subscribers = channel.snapshot = tuple(channel.subscribers)
        for subscriber in subscribers:
            subscriber.deliver(publication)

    # -- subscriptions ---------------------------------------------------

    def subscribe(self, name: str, subscriber: Subscriber) -> Deferred[ChannelState]:
        """
        Add C{subscriber} to channel C{name}.

        The subscriber receives every publication after the offset of the
        returned state, and none at or before it.
        """
        channel = self._channels.get(name)
        if channel is None:
            channel = self._channels[name] = _LocalChannel()
            self.engine.watch(name)
        channel.subscribers[subscriber] = None
        channel.snapshot = None
        d = self.engine.state(name)

        def remember(state: ChannelState) -> ChannelState:
            # Later dispatches compare against this: nothing at or below it
            # reaches the new subscriber twice.
            if channel.epoch != state.epoch or channel.last_offset < state.offset:
                channel.epoch = state.epoch
                channel.last_offset = state.offset
            return state

        return d.addCallback(remember)

    def unsubscribe(self, name: str, subscriber: Subscriber) -> None:
        """Remove C{subscriber} from channel C{name}; forget the channel when it empties."""
        channel = self._channels.get(name)
        if channel is None or subscriber not in channel.subscribers:
            return
        del channel.subscribers[subscriber]
        channel.snapshot = None
        if not channel.subscribers:
            del self._channels[name]
            self.engine.unwatch(name)

    def unsubscribe_all(self, names: Iterable[str], subscriber: Subscriber) -> None:
        for name in names:
            self.unsubscribe(name, subscriber)

    def subscriber_count(self, name: str) -> int:
        channel = self._channels.get(name)
        return len(channel.subscribers) if channel else 0

    def channel_names(self) -> list[str]:
        """The channels that have local subscribers."""
        return list(self._channels)
