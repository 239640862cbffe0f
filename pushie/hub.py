# -*- test-case-name: tests.test_recovery -*-
"""
The Hub: the registry of channels and local subscribers, shared by every
front door.

Front doors call L{Hub.publish}, L{Hub.subscribe} and L{Hub.unsubscribe}; the
engine calls L{Hub.dispatch} for every publication of a watched channel and
L{Hub.presence_changed} for joins and leaves.  Per channel, the Hub hands
publications to subscribers in offset order and never twice.

Fan-out is coalesced: consecutive publications of a channel dispatched in
one reactor turn (several publishes, a batch) are kept as a burst and leave
at the end of the turn, one write per subscriber.  A publication of another
channel in between starts a new burst, so a connection subscribed to several
channels still receives them in the order they were published.  Anything else a front door sends to a
connection (a C{subscribed} frame, a close) first calls L{Hub.flush}, so every
connection still sees frames in the order in which they were dispatched.

Subscribing is where recovery happens, gap-free by construction: the new
subscriber is registered as I{pending} before the engine is asked anything,
so every publication dispatched while the engine answers is buffered for it.
Then history (or the current state) is read, and the answer to the front door
is the history after the client's offset followed by the buffered
publications that come after it, with duplicates removed by offset.  The
front door sends the C{subscribed} frame and that replay in one reactor turn,
and from then on the subscriber is live.  The engine answers a read of a
watched channel only once it has dispatched up to it, so the Hub's position
never runs ahead of what it dispatched.  Every publication handed on, live or
replayed, must follow the one before (the next offset, or offset 1 of a new
epoch); one that does not is never passed off as continuous: live
subscribers are told to recover (L{Hub.lost_continuity}), a subscribe fails
with C{engine_unavailable}.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, cast

import attr
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from pushie.channels import Position, is_presence, is_valid_channel
from pushie.engines import IEngine
from pushie.errors import EngineUnavailable, PushieError
from pushie.limits import ConnectionLimits
from pushie.metrics import Metrics
from pushie.records import (
    Burst,
    ChannelState,
    History,
    Member,
    PresenceEvent,
    Publication,
    PublishRequest,
    Transition,
)
from pushie.webhooks import Webhooks


class _AnswersAtOnce(Protocol):
    """An engine whose reads need no round trip (the memory engine): L{Hub.subscribe_now} uses them."""

    def state_now(self, name: str) -> ChannelState: ...

    def history_now(self, name: str, since: int, limit: int | None) -> History: ...


def _presence_full(cap: int) -> PushieError:
    return PushieError(
        403,
        "presence_full",
        f"this presence channel has its {cap} members (presence_max_members); try again when one leaves",
    )


class Subscriber(Protocol):
    """What the Hub needs of a subscriber (a WebSocket connection, an SSE stream)."""

    client_id: str

    def deliver(self, publication: Publication) -> None:
        """Send one publication; must not raise and must not block."""

    def deliver_burst(self, burst: Burst) -> None:
        """Send several publications of one channel, in order, as one write if it can."""

    def presence(self, event: PresenceEvent) -> None:
        """Send one join or leave."""

    def lost_continuity(self, channel: str) -> None:
        """
        Messages of C{channel} were lost before reaching this node: end the
        subscription so that the client resubscribes with C{since} and learns
        C{recovered: false}.
        """


class Connection(Protocol):
    """What the Hub needs of a client connection to end it on shutdown."""

    def close_for_shutdown(self) -> None:
        """Start a clean close (WebSocket 1001, end of an SSE stream)."""

    def abort(self) -> None:
        """Drop the connection now."""


@attr.s(frozen=True, auto_attribs=True)
class Subscribed:
    """
    The answer to a subscribe: where the channel stands, whether the
    client's position was recovered (C{None} when it gave none), what to send
    after the C{subscribed} frame, in order, and the members of a presence
    channel.
    """

    state: ChannelState
    recovered: bool | None
    replay: list[Publication | PresenceEvent]
    members: list[Member] | None

    def frame(self, channel: str) -> dict[str, Any]:
        """The C{subscribed} frame (WebSocket) or event data (SSE) for this answer."""
        frame: dict[str, Any] = {
            "type": "subscribed",
            "channel": channel,
            "offset": self.state.offset,
            "epoch": self.state.epoch,
        }
        if self.recovered is not None:
            frame["recovered"] = self.recovered
        if self.members is not None:
            frame["members"] = [m.to_json() for m in self.members]
        return frame

    def replay_to(self, subscriber: Subscriber) -> None:
        """Send the replay, in order; right after the C{subscribed} frame."""
        for item in self.replay:
            if isinstance(item, Publication):
                subscriber.deliver(item)
            else:
                subscriber.presence(item)


@attr.s(slots=True, auto_attribs=True, eq=False)
class _LocalChannel:
    subscribers: dict[Subscriber, None] = attr.ib(factory=dict)
    snapshot: tuple[Subscriber, ...] | None = None
    pending: dict[Subscriber, list[Publication | PresenceEvent]] = attr.ib(factory=dict)
    members: dict[Subscriber, Member] = attr.ib(factory=dict)
    last_offset: int = 0
    epoch: str | None = None
    # The engine's answer to watch(): None while waiting, then True or the Failure.
    watched: object = None
    watch_waiters: list[Deferred[None]] = attr.ib(factory=list)

    def when_watched(self) -> Deferred[None]:
        if self.watched is True:
            return succeed(None)
        if isinstance(self.watched, Failure):
            return fail(self.watched)
        d: Deferred[None] = Deferred()
        self.watch_waiters.append(d)
        return d

    def watch_done(self, result: object) -> None:
        self.watched = result if isinstance(result, Failure) else True
        waiters, self.watch_waiters = self.watch_waiters, []
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(None)


class WebhookRoute(Protocol):
    """
    Where the transitions of some channels go: the native webhooks (the
    native space, L{NativeWebhookRoute}), or a Pusher app's webhooks (its
    space, under the app's own channel names).
    """

    def webhooks_for(self, channel: str) -> tuple[Webhooks, str] | None:
        """The webhooks told about Hub channel C{channel}, and the name they know it by; None: none."""

    def all_webhooks(self) -> Sequence[Webhooks]:
        """Every webhooks of this route (for back-pressure and stopping)."""


class NativeWebhookRoute:
    """The native webhooks: told about the channels a native client can name (L{is_valid_channel})."""

    def __init__(self, webhooks: Webhooks) -> None:
        self.webhooks = webhooks

    def webhooks_for(self, channel: str) -> tuple[Webhooks, str] | None:
        return (self.webhooks, channel) if is_valid_channel(channel) else None

    def all_webhooks(self) -> Sequence[Webhooks]:
        return [self.webhooks]


class RoutedTransitionSink:
    """
    The engine's cluster-wide transitions, for every route that wants them
    (L{WebhookRoute.webhooks_for}): each one is handed to the webhooks of
    each route that names it, renamed to the name they know it by, and is
    settled back to the engine once every one of them has settled it.
    Transitions no route wants (another Pusher app's without a webhook, a
    Pusher user's) are settled at once.  C{room} is the smallest room of
    all: the engine keeps what one of them cannot take yet.
    """

    MAX_ROOM = 1000
    """The room when no webhooks exist yet (an apps file may add some)."""

    def __init__(self, routes: Callable[[], Sequence[WebhookRoute]]) -> None:
        self.routes = routes

    def room(self) -> int:
        rooms = [w.room() for route in self.routes() for w in route.all_webhooks()]
        return min(rooms) if rooms else self.MAX_ROOM

    def take(self, transitions: Sequence[Transition], settle: Callable[[Sequence[Transition]], None]) -> None:
        routes = self.routes()
        unwanted: list[Transition] = []
        waiting: dict[int, list[Any]] = {}  # id(original) -> [original, deliveries left]
        copies: dict[int, Transition] = {}  # id(copy) -> original
        per_webhooks: dict[Webhooks, list[Transition]] = {}
        for transition in transitions:
            targets = [t for t in (route.webhooks_for(transition.channel) for route in routes) if t is not None]
            if not targets:
                unwanted.append(transition)
                continue
            waiting[id(transition)] = [transition, len(targets)]
            for webhooks, name in targets:
                copy = transition if name == transition.channel else attr.evolve(transition, channel=name)
                if copy is transition:
                    copy = attr.evolve(transition)  # its own identity, for the count below
                copies[id(copy)] = transition
                per_webhooks.setdefault(webhooks, []).append(copy)

        def settled(group: Sequence[Transition]) -> None:
            done = []
            for copy in group:
                original = copies.pop(id(copy), None)
                if original is None:
                    continue
                entry = waiting[id(original)]
                entry[1] -= 1
                if entry[1] == 0:
                    del waiting[id(original)]
                    done.append(original)
            if done:
                settle(done)

        if unwanted:
            settle(unwanted)
        for webhooks, group in per_webhooks.items():
            webhooks.take(group, settled)


class Hub(Service):
    """
    Channels, their local subscribers, and the path of each publication.

    @ivar _engine: the L{IEngine} that assigns offsets and fans out to nodes;
        private: the Hub is the only code that talks to it.
    @ivar connections: every open client connection, for shutdown.
    """

    log = Logger()
    name = "hub"  # type: ignore[assignment]  # Twisted's Service says `name = None`, documented as str

    def __init__(
        self,
        engine: IEngine,
        reactor: IReactorTime,
        shutdown_timeout: float = 5.0,
        metrics: Metrics | None = None,
        limits: ConnectionLimits | None = None,
        webhooks: Webhooks | None = None,
        coalesce: bool = True,
        presence_max_members: int = 100,
    ) -> None:
        """
        @param coalesce: keep each channel's publications of a reactor turn
            and send them together at the end of the turn (L{flush}); when
            false, every publication is sent to every subscriber at once.
        @param presence_max_members: distinct members a presence channel
            admits (0: no limit); see L{_join}.
        @param webhooks: told about the channels that a native client can
            name (L{is_valid_channel}); other doors' channels that the Hub
            carries under names no native client can spell (another Pusher
            app's, a Pusher user's) are not told about.  When the engine
            decides transitions for the whole cluster (Redis), they are given
            the engine's transitions (L{RoutedTransitionSink}) and never the
            Hub's local ones, which are one node's view.  Other webhooks
            (a Pusher app's) join through L{webhook_routes} before the Hub
            starts.
        """
        self.presence_max_members = presence_max_members
        self.webhooks = webhooks
        self.webhook_routes: list[WebhookRoute] = []
        """Routes of transitions besides the native webhooks (the Pusher door's apps)."""
        self.webhook_debounce = 3.0
        """The debounce and backlog the engine decides transitions with when there are no native webhooks."""
        self.webhook_backlog = 10000
        self.coalesce = coalesce
        # (subscribers, publications) in dispatch order, until flush().
        self._bursts: list[tuple[tuple[Subscriber, ...], list[Publication]]] = []
        self._flush_call: Any = None
        self._engine = engine
        # The engine's synchronous reads, when it has them (the memory engine): see subscribe_now.
        self._engine_now: _AnswersAtOnce | None = (
            cast(_AnswersAtOnce, engine) if hasattr(engine, "state_now") and hasattr(engine, "history_now") else None
        )
        self.reactor = reactor
        self.shutdown_timeout = shutdown_timeout
        self.metrics = metrics or Metrics()
        self.metrics.watch_hub(self, engine)
        self.limits = limits or ConnectionLimits(0, 0)
        self.connections: dict[Connection, str] = {}
        self._channels: dict[str, _LocalChannel] = {}
        self._closing: list[Deferred[None]] = []
        self.draining = False
        # Whether the engine decides webhook transitions cluster-wide (Redis);
        # when it does, the Hub's local ones are not told to the webhooks.
        self._cluster_transitions = False

    # -- service ---------------------------------------------------------

    def startService(self) -> Deferred[None]:  # type: ignore[override]
        super().startService()
        if self._routes():
            debounce, backlog = self.webhook_debounce, self.webhook_backlog
            if self.webhooks is not None:
                debounce, backlog = self.webhooks.debounce, self.webhooks.max_queue
            self._cluster_transitions = self._engine.send_transitions(
                RoutedTransitionSink(self._routes), debounce, backlog
            )
        return self._engine.start(self)

    def _routes(self) -> list[WebhookRoute]:
        native: list[WebhookRoute] = [NativeWebhookRoute(self.webhooks)] if self.webhooks is not None else []
        return native + self.webhook_routes

    def _local(self, channel: str) -> list[tuple[Webhooks, str]]:
        """
        The webhooks the Hub's local transitions of C{channel} are told to,
        with the name they know it by: none when the engine decides them
        cluster-wide.
        """
        if self._cluster_transitions:
            return []
        targets = []
        for route in self._routes():
            target = route.webhooks_for(channel)
            if target is not None:
                targets.append(target)
        return targets

    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        """
        Drain: ask every connection to close cleanly, wait up to
        C{shutdown_timeout} seconds for them, abort the rest, stop the engine.
        """
        super().stopService()
        self.flush()
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        self.draining = True
        d = self._drain()
        # After the drain, so the vacated/removed events of the closing
        # connections are sent (with Redis: decided, and sent by a live node).
        d.addCallback(lambda _: self._stop_webhooks())
        d.addCallback(lambda _: self._engine.stop())
        return d

    def _stop_webhooks(self) -> Deferred[Any] | None:
        routes = self._routes()
        if not routes:
            return None
        if self._cluster_transitions:
            # What the engine handed over and is not settled yet is left to another node.
            self._engine.send_transitions(None, 0, 0)
        return gatherResults([w.stop() for route in routes for w in route.all_webhooks()])

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

    def admit(self, address: str) -> None:
        """
        Refuse a new connection from C{address} past the connection limits.

        @raise PushieError: 503 or 429.
        """
        self.limits.check(address)

    def connection_opened(self, connection: Connection, address: str = "local") -> None:
        if connection not in self.connections:
            self.connections[connection] = address
            self.limits.opened(address)

    def connection_closed(self, connection: Connection) -> None:
        address = self.connections.pop(connection, None)
        if address is not None:
            self.limits.closed(address)
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
        return self._engine.append(requests)

    def publish_now(self, requests: Sequence[PublishRequest]) -> list[Publication] | None:
        """
        L{publish}, answered at once when the engine can (the memory engine's
        C{append_now}): the publications, with no Deferred around them.
        C{None} when the engine answers later (Redis): use L{publish}.
        """
        append_now = getattr(self._engine, "append_now", None)
        if append_now is None:
            return None
        publications: list[Publication] = append_now(requests)
        return publications

    def publish_plain(self, items: Sequence[tuple[str, bytes]]) -> list[Publication] | None:
        """
        L{publish_now} of publications of the usual shape, given as
        C{(channel, data)} (a valid channel name, compact JSON data, event
        C{message}, nothing else), when the engine takes them so (the memory
        engine's C{append_plain}); C{None} otherwise: publish them as
        L{PublishRequest}s.
        """
        append_plain = getattr(self._engine, "append_plain", None)
        if append_plain is None:
            return None
        publications: list[Publication] = append_plain(items)
        return publications

    # -- reading: the doors' narrow view of the engine ---------------------
    #
    # Doors never hold the engine (the design's one rule of layers, checked by
    # tests/test_layers.py): what they may ask of it is here.

    @property
    def engine_name(self) -> str:
        """The engine's short name for logs and C{/healthz}: C{memory}, C{redis://host:port/db}."""
        return str(self._engine.name)

    def healthy(self) -> bool:
        """Whether the engine can take publications and answer reads now."""
        return self._engine.healthy()

    def shards_health(self) -> dict[str, bool] | None:
        """
        For an engine of several Redis shards, whether each (by name) takes
        publications now; None for an engine of one store.
        """
        shards_health = getattr(self._engine, "shards_health", None)
        return None if shards_health is None else dict(shards_health())

    def state(self, channel: str) -> Deferred[ChannelState]:
        """A Deferred firing with C{channel}'s current offset and epoch."""
        return self._engine.state(channel)

    def history(self, channel: str, since: int, limit: int | None) -> Deferred[History]:
        """A Deferred firing with what is kept of C{channel} after offset C{since} (at most C{limit})."""
        return self._engine.history(channel, since, limit)

    def members(self, channel: str) -> Deferred[list[Member]]:
        """A Deferred firing with the members present on C{channel}, across every node."""
        return self._engine.presence(channel)

    def occupied(self, prefix: str) -> Deferred[list[str]]:
        """A Deferred firing with the channels starting with C{prefix} that have subscribers on any node."""
        return self._engine.occupied(prefix)

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
        if channel.epoch == publication.epoch:
            if publication.offset <= channel.last_offset:
                return
            if publication.offset > channel.last_offset + 1:
                self._gap(publication.channel, channel.last_offset, publication)
        elif channel.epoch is not None and publication.offset != 1:
            self._gap(publication.channel, channel.last_offset, publication)
        channel.epoch = publication.epoch
        channel.last_offset = publication.offset
        subscribers = channel.snapshot
        if subscribers is None:
            subscribers = channel.snapshot = tuple(channel.subscribers)
        if subscribers:
            if not self.coalesce:
                for subscriber in subscribers:
                    subscriber.deliver(publication)
                self.metrics.deliveries.inc(len(subscribers))
            else:
                # The snapshot is one tuple per channel until its subscribers
                # change: the same one means the same channel and audience.
                bursts = self._bursts
                if bursts and bursts[-1][0] is subscribers:
                    bursts[-1][1].append(publication)
                else:
                    bursts.append((subscribers, [publication]))
                    if self._flush_call is None:
                        self._flush_call = self.reactor.callLater(0, self._flush_due)
        if channel.pending:
            for buffered in channel.pending.values():
                buffered.append(publication)

    def _flush_due(self) -> None:
        self._flush_call = None
        self.flush()

    def flush(self) -> None:
        """
        Send the publications dispatched and not yet sent, now.  Called at the
        end of each reactor turn that dispatched any, and by front doors
        before they send anything else to a connection.
        """
        if not self._bursts:
            return
        bursts, self._bursts = self._bursts, []
        delivered = 0
        for subscribers, publications in bursts:
            if len(publications) == 1:
                publication = publications[0]
                for subscriber in subscribers:
                    subscriber.deliver(publication)
            else:
                burst = Burst(publications)
                for subscriber in subscribers:
                    subscriber.deliver_burst(burst)
            delivered += len(subscribers) * len(publications)
        self.metrics.deliveries.inc(delivered)

    def presence_changed(self, event: PresenceEvent) -> None:
        """Tell a channel's local subscribers that a member joined or left."""
        for webhooks, name in self._local(event.channel):
            if event.kind == "join":
                webhooks.member_added(name, event.member.id)
            else:
                webhooks.member_removed(name, event.member.id)
        channel = self._channels.get(event.channel)
        if channel is None:
            return
        for subscriber in tuple(channel.subscribers):
            if subscriber.client_id != event.origin:
                subscriber.presence(event)
        for subscriber, buffered in channel.pending.items():
            if subscriber.client_id != event.origin:
                buffered.append(event)

    def _gap(self, name: str, last: int, publication: Publication) -> None:
        """
        The engine handed over a publication that does not follow the last
        one (it should have read the gap back first): never pass it off as
        continuous; the subscribers recover with C{since} instead.
        """
        self.log.error(
            "Channel {channel}: publication {offset} ({epoch}) does not follow {last}; subscribers must recover",
            channel=name,
            offset=publication.offset,
            epoch=publication.epoch,
            last=last,
        )
        self.lost_continuity(name)

    def lost_continuity(self, name: str) -> None:
        """The engine lost publications of C{name} on their way here: its subscribers must recover."""
        channel = self._channels.get(name)
        if channel is None:
            return
        channel.epoch = None
        channel.last_offset = 0
        for subscriber in tuple(channel.subscribers):
            subscriber.lost_continuity(name)

    # -- subscriptions ---------------------------------------------------

    def subscribe(
        self,
        name: str,
        subscriber: Subscriber,
        since: Position | None = None,
        member: Member | None = None,
    ) -> Deferred[Subscribed | None]:
        """
        Add C{subscriber} to channel C{name}, recovering from C{since}.

        @param member: on a presence channel, who the subscriber is.
        @return: a Deferred firing with L{Subscribed}, or with C{None} if the
            subscriber unsubscribed before the answer came.  Once it fires the
            subscriber is live: the caller must send the answer at once.
        """
        channel = self._channel(name)
        channel.pending[subscriber] = []
        self._engine.local_count(name, len(channel.subscribers) + len(channel.pending))
        return Deferred.fromCoroutine(self._subscribe(name, channel, subscriber, since, member))

    def subscribe_now(self, name: str, subscriber: Subscriber, since: Position | None = None) -> Subscribed | None:
        """
        L{subscribe} answered at once, without a coroutine or a Deferred,
        when the engine answers at once (the memory engine) and the channel
        is not a presence channel; the same answer, in the same order of
        events.

        @return: the answer (the subscriber is then live: send it at once),
            or C{None}: not possible here, use L{subscribe}.
        """
        engine = self._engine_now
        if engine is None or is_presence(name):
            return None
        channel = self._channel(name)
        if channel.watched is not True:
            return None
        channel.pending[subscriber] = []
        self._engine.local_count(name, len(channel.subscribers) + len(channel.pending))
        history = None
        if since is not None:
            history = engine.history_now(name, since.offset, None)
            state = history.state
        else:
            state = engine.state_now(name)
        return self._settle(name, channel, subscriber, since, state, history, None)

    def _channel(self, name: str) -> _LocalChannel:
        """The channel's local record; a new one is watched on the engine."""
        channel = self._channels.get(name)
        if channel is None:
            channel = self._channels[name] = _LocalChannel()
            for webhooks, hook_name in self._local(name):
                webhooks.channel_occupied(hook_name)
            self._engine.watch(name).addBoth(channel.watch_done)
        return channel

    async def _subscribe(
        self,
        name: str,
        channel: _LocalChannel,
        subscriber: Subscriber,
        since: Position | None,
        member: Member | None,
    ) -> Subscribed | None:
        try:
            await channel.when_watched()
            joined = False
            if member is not None:
                joined = await self._join(name, channel, subscriber, member)
            history = None
            if since is not None:
                history = await self._engine.history(name, since.offset, None)
                state = history.state
            else:
                state = await self._engine.state(name)
            members = await self._engine.presence(name) if is_presence(name) else None
            cap = self.presence_max_members
            if joined and cap and members is not None and len(members) > cap:
                # Another join (maybe on another node) raced this one past
                # the cap: the newcomer leaves again (unsubscribe, below).
                self.metrics.reject("presence_full")
                raise _presence_full(cap)
        except BaseException:
            self.unsubscribe(name, subscriber)
            raise
        return self._settle(name, channel, subscriber, since, state, history, members)

    def _settle(
        self,
        name: str,
        channel: _LocalChannel,
        subscriber: Subscriber,
        since: Position | None,
        state: ChannelState,
        history: History | None,
        members: list[Member] | None,
    ) -> Subscribed | None:
        """The engine has answered: make the pending subscriber live and build its answer."""
        buffered = channel.pending.pop(subscriber, None)
        if buffered is None:
            return None  # unsubscribed meanwhile
        channel.subscribers[subscriber] = None
        channel.snapshot = None
        if channel.epoch != state.epoch or channel.last_offset < state.offset:
            channel.epoch = state.epoch
            channel.last_offset = state.offset

        replay: list[Publication | PresenceEvent] = []
        recovered = None
        last = state.offset
        if since is not None and history is not None:
            recovered = history.complete and since.epoch == state.epoch and since.offset <= state.offset
            if recovered:
                replay.extend(history.publications)
                last = history.publications[-1].offset if history.publications else since.offset
        epoch = state.epoch
        for item in buffered:
            if isinstance(item, Publication):
                if item.epoch == epoch and item.offset <= last:
                    continue
                if (item.epoch == epoch and item.offset > last + 1) or (item.epoch != epoch and item.offset != 1):
                    # Never expected (the engine answers only once it has
                    # dispatched up to the state it read): refuse rather
                    # than hand over a gap as recovered.
                    self.log.error(
                        "Channel {channel}: publication {offset} does not follow {last}; subscribe refused",
                        channel=name,
                        offset=item.offset,
                        last=last,
                    )
                    self.unsubscribe(name, subscriber)
                    raise EngineUnavailable()
                epoch, last = item.epoch, item.offset
            replay.append(item)
        return Subscribed(state, recovered, replay, members)

    async def _join(self, name: str, channel: _LocalChannel, subscriber: Subscriber, member: Member) -> bool:
        """
        Add C{member} to a presence channel, within C{presence_max_members}.

        The member list goes whole in every C{subscribed} frame and
        C{subscription_succeeded} event, so the cap is what bounds them: a
        new member past it is refused with 403 C{presence_full} (Pusher's
        and Soketi's answer too) and is neither member nor subscriber.
        Another connection of a member already present is always admitted.

        @return: whether C{member} was new when it was checked (it is then
            checked again once added: see L{_subscribe}).
        """
        cap = self.presence_max_members
        new = True
        if cap:
            present = await self._engine.presence(name)
            new = all(m.id != member.id for m in present)
            if new and len(present) >= cap:
                self.metrics.reject("presence_full")
                raise _presence_full(cap)
        channel.members[subscriber] = member
        await self._engine.presence_add(name, member, subscriber.client_id)
        return new

    def unsubscribe(self, name: str, subscriber: Subscriber) -> None:
        """Remove C{subscriber} from channel C{name}; forget the channel when it empties."""
        # What was dispatched while it was subscribed reaches it first.
        self.flush()
        channel = self._channels.get(name)
        if channel is None:
            return
        live = channel.subscribers.pop(subscriber, 0) is None
        pending = channel.pending.pop(subscriber, None) is not None
        if not (live or pending):
            return
        channel.snapshot = None
        member = channel.members.pop(subscriber, None)
        if member is not None:
            d = self._engine.presence_remove(name, member, subscriber.client_id)
            d.addErrback(lambda f: self.log.failure("Removing a presence member failed", f))
        self._engine.local_count(name, len(channel.subscribers) + len(channel.pending))
        if not channel.subscribers and not channel.pending:
            del self._channels[name]
            for webhooks, hook_name in self._local(name):
                webhooks.channel_vacated(hook_name)
            self._engine.unwatch(name)

    def unsubscribe_all(self, names: Iterable[str], subscriber: Subscriber) -> None:
        for name in names:
            self.unsubscribe(name, subscriber)

    def subscriber_count(self, name: str) -> int:
        channel = self._channels.get(name)
        return len(channel.subscribers) if channel else 0

    def channel_names(self) -> list[str]:
        """The channels that have local subscribers."""
        return list(self._channels)

    def channel_positions(self) -> list[tuple[str, int, str | None, int]]:
        """
        Each channel with local subscribers as C{(name, subscribers, epoch,
        last dispatched offset)}: what the admin dashboard samples once a
        second to tell messages per second per channel (the difference of
        offsets), at no cost on the dispatch path.
        """
        return [(name, len(c.subscribers), c.epoch, c.last_offset) for name, c in self._channels.items()]

    def connection_count(self) -> int:
        """This node's open client connections (the engine shares the figure with the cluster)."""
        return len(self.connections)

    def subscription_counts(self, names: Sequence[str]) -> Deferred[dict[str, int]]:
        """
        A Deferred firing with the subscriptions of each channel on every
        node (see L{IEngine.counts}: with Redis, this node's own to the
        moment and the other nodes' as of the end of their last reactor turn).
        """
        return self._engine.counts(names)

    def channel_counts(self, prefix: str) -> Deferred[dict[str, int]]:
        """A Deferred firing with the channels starting with C{prefix} subscribed on any node, with their counts."""
        return self._engine.channel_counts(prefix)
