# -*- test-case-name: tests.test_engine -*-
"""
Engines decide where a publication stands (offset, epoch), keep each
channel's recent history and presence, and carry publications and presence
changes to every node that serves the channel.  The Hub talks to an
L{IEngine}; it never knows which one.  C{memory} serves one process; a Redis
engine implements the same interface for many.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attr
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from pushie.records import ChannelState, History, Member, PresenceEvent, Publication, PublishRequest, Transition


class EngineListener(Protocol):
    """What an engine reports to (the Hub)."""

    def dispatch(self, publication: Publication) -> None:
        """A publication of a watched channel, in offset order per channel."""

    def presence_changed(self, event: PresenceEvent) -> None:
        """A member joined or left a watched channel."""

    def lost_continuity(self, channel: str) -> None:
        """Publications of a watched channel were lost on the way to this node and cannot be read back."""

    def connection_count(self) -> int:
        """This node's open client connections (for the cluster-wide figures)."""


class TransitionSink(Protocol):
    """
    Where an engine that decides transitions cluster-wide sends them (see
    L{IEngine.send_transitions}): the Hub's C{RoutedTransitionSink}, which
    hands each to the native webhooks and to the Pusher apps' webhooks.  The
    engine hands over at most L{room} transitions at a time (back-pressure:
    what the sink cannot take stays in the engine's store), and the sink
    calls C{settle} with each transition once it is done with it
    (delivered, or given up); a transition never settled (the node died, or
    stopped first) is delivered again, by this node or another.
    """

    def room(self) -> int:
        """How many more transitions it can take now."""

    def take(self, transitions: Sequence[Transition], settle: Callable[[Sequence[Transition]], None]) -> None:
        """Deliver C{transitions}; call C{settle} with them (in any groups) once each is done."""


class IEngine(Interface):
    """The store and the node-to-node fan-out behind the Hub."""

    name = Attribute("A short name for logs: 'memory', 'redis://host:port/db' (several, comma-separated, for shards).")

    def start(listener: EngineListener) -> Deferred[None]:
        """
        Begin serving.  From now on the listener hears of every publication
        and presence change of the channels this node watches (see L{watch}),
        from any node.
        """

    def stop() -> Deferred[None]:
        """Stop serving and release connections and timers."""

    def append(requests: Sequence[PublishRequest]) -> Deferred[list[Publication]]:
        """
        Give each request the next offset of its channel, store it in the
        channel's history and send it to every node, atomically.  A request
        whose C{idempotency_key} was seen on the same channel in the last 5
        minutes is not published again: its publication carries the first
        offset and epoch.  All or nothing: either every request is published
        (the Deferred fires with the publications, in order) or none is (it
        fails with L{pushie.errors.EngineUnavailable}).
        """

    def state(channel: str) -> Deferred[ChannelState]:
        """
        The channel's current offset and epoch.  For a watched channel (as
        for L{history}), the answer comes only once every publication up to
        it has been dispatched to the listener: the Hub takes it as the
        position of a new subscriber, and its older subscribers must not
        lose what was still on its way.
        """

    def history(channel: str, since: int, limit: int | None) -> Deferred[History]:
        """The kept publications after offset C{since} (at most C{limit}), oldest first."""

    def watch(channel: str) -> Deferred[None]:
        """
        This node now has local subscribers for C{channel}: deliver its
        publications.  The Deferred fires once every publication from now on
        will be delivered (for Redis: once the SUBSCRIBE is confirmed).
        """

    def unwatch(channel: str) -> None:
        """This node's last local subscriber of C{channel} has gone."""

    def presence_add(channel: str, member: Member, origin: str) -> Deferred[None]:
        """One more connection of C{member}; its first one emits a C{join}."""

    def presence_remove(channel: str, member: Member, origin: str) -> Deferred[None]:
        """One connection of C{member} fewer; its last one emits a C{leave}."""

    def presence(channel: str) -> Deferred[list[Member]]:
        """The channel's members, one per C{sub}."""

    def occupied(prefix: str) -> Deferred[list[str]]:
        """
        The channels whose names start with C{prefix} that have subscribers
        on some node (for Redis: every node, as Redis' pub/sub knows them).
        """

    def healthy() -> bool:
        """Whether a publish would be accepted now."""

    def local_count(channel: str, count: int) -> None:
        """
        This node now holds C{count} subscriptions of C{channel} (0: none).
        Called at every change; an engine that shares counts sends them
        coalesced (for Redis: once per reactor turn).
        """

    def counts(channels: Sequence[str]) -> Deferred[dict[str, int]]:
        """The subscriptions of each channel on every live node (0 for none)."""

    def channel_counts(prefix: str) -> Deferred[dict[str, int]]:
        """The channels starting with C{prefix} that have subscriptions on a live node, with their counts."""

    def send_transitions(sink: TransitionSink | None, debounce: float, backlog: int) -> bool:
        """
        Send the cluster-wide transitions this engine decides to C{sink}
        (C{None}: stop sending them); C{channel_vacated} and C{member_removed}
        are held C{debounce} seconds, dropped with their opposite if it comes
        meanwhile; about C{backlog} undelivered transitions are kept.

        @return: whether this engine decides transitions (C{False} for the
            memory engine: the Hub's local transitions are the cluster's).
        """


@attr.s(frozen=True, auto_attribs=True)
class ClusterFigures:
    """
    What every live node of a cluster holds together, as an engine last
    learned it (for Redis: at its heartbeat, so up to C{HEARTBEAT_INTERVAL} old).
    """

    nodes: int
    connections: int
    subscriptions: int
    channels: int


@attr.s(frozen=True, auto_attribs=True)
class EngineSettings:
    """
    What an engine needs from the daemon's settings (built by C{pushie.tap}).

    @ivar engine: C{memory}, a C{redis://}, C{rediss://}, C{redis+sentinel://} or
        C{rediss+sentinel://} URL, or several C{redis://} / C{rediss://} URLs
        separated by commas (Redis shards), as the C{engine} setting says.
    @ivar history_size: publications kept per channel for recovery.
    @ivar history_ttl: seconds a channel's history outlives its last publication.
    @ivar memory_budget: bytes the memory engine's histories may hold in all.
    @ivar idempotency_max_keys: idempotency keys the memory engine remembers.
    @ivar redis_timeout: seconds a Redis command may take before it counts as failed.
    @ivar redis_sentinel_password: the sentinels' password, with a C{redis+sentinel://} engine.
    @ivar redis_wait_replicas: replicas that must have a publish before it answers (Redis C{WAIT}).
    """

    engine: str
    history_size: int
    history_ttl: float
    memory_budget: int
    idempotency_max_keys: int
    redis_timeout: float
    redis_sentinel_password: str | None = None
    redis_wait_replicas: int = 0


def engine_from_settings(settings: EngineSettings, reactor: Any) -> IEngine:
    """
    Build the engine named by the C{engine} setting.

    @raise ValueError: for an engine this build does not provide.
    """
    value = settings.engine
    if value == "memory":
        from pushie.engines.memory import MemoryEngine

        return MemoryEngine(  # type: ignore[no-any-return]
            clock=reactor,
            history_size=settings.history_size,
            history_ttl=settings.history_ttl,
            memory_budget=settings.memory_budget,
            idempotency_max_keys=settings.idempotency_max_keys,
        )
    if value.startswith(("redis://", "rediss://")) and "," in value:
        from pushie.engines.sharded import ShardedEngine, split_shard_urls

        return ShardedEngine(  # type: ignore[no-any-return]
            split_shard_urls(value),
            reactor,
            history_size=settings.history_size,
            history_ttl=settings.history_ttl,
            timeout=settings.redis_timeout,
            wait_replicas=settings.redis_wait_replicas,
        )
    if value.startswith(("redis://", "rediss://", "redis+sentinel://", "rediss+sentinel://")):
        from pushie.engines.redis import RedisEngine

        return RedisEngine(  # type: ignore[no-any-return]
            value,
            reactor,
            history_size=settings.history_size,
            history_ttl=settings.history_ttl,
            timeout=settings.redis_timeout,
            sentinel_password=settings.redis_sentinel_password,
            wait_replicas=settings.redis_wait_replicas,
        )
    raise ValueError(f"unknown engine {value!r}: use 'memory' or 'redis://host:6379/0'")
